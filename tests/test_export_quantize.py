"""ONNX export + ONNX Runtime int8 quantisation (static for a pruned CNN, dynamic for a tiny BERT), the
ONNX-vs-PyTorch check, named errors, and the side-by-side deployment measurement."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from secateur.analysis.deploy import format_deployment, measure_deployment  # noqa: E402
from secateur.analysis.onnx import export_onnx, inputs_at_batch, onnx_opset  # noqa: E402
from secateur.analysis.quantize import (  # noqa: E402
    FP32_ATOL,
    FP32_RTOL,
    INT8_MIN_COSINE,
    OnnxMismatchError,
    compare_onnx_outputs,
    quantize_onnx,
)
from secateur.errors import ConfigError, DataError  # noqa: E402


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory):
    """A channel-pruned (compacted) LeNet-5, exported with a dynamic batch and statically quantised."""
    from secateur.pruners.oneshot import prune_channels
    from secateur.zoo import create_model

    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    x = torch.randn(4, 1, 28, 28)
    dense_params = sum(p.numel() for p in model.parameters())
    model, _ = prune_channels(model, x, 0.5)
    assert sum(p.numel() for p in model.parameters()) < 0.7 * dense_params
    folder = tmp_path_factory.mktemp("cnn")
    fp32 = export_onnx(model, x, folder / "pruned.onnx", dynamic_batch=True)
    # (x, y) batches, as a classification loader yields them
    calib = [(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)) for _ in range(4)]
    int8 = quantize_onnx(fp32, folder / "pruned.int8.onnx", mode="static", calibration=calib)
    return model, fp32, int8


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random BERT (2 layers, width 32), exported with keyword inputs and dynamically quantised."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 120, (3, 12))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    folder = tmp_path_factory.mktemp("bert")
    fp32 = export_onnx(model, x, folder / "bert.onnx", dynamic_batch=True)
    int8 = quantize_onnx(fp32, folder / "bert.int8.onnx", mode="dynamic")
    return model, x, fp32, int8


def test_pruned_cnn_static_int8_within_tolerance(cnn) -> None:
    model, fp32, int8 = cnn
    x = torch.randn(6, 1, 28, 28)  # another batch size than the export's: the batch axis is dynamic
    exact = compare_onnx_outputs(model, fp32, x, precision="fp32", check=True)
    assert exact["within_tolerance"] and exact["batch_size"] == 6
    import onnxruntime as ort

    (got,) = ort.InferenceSession(str(fp32)).run(None, {"input_0": x.numpy()})
    with torch.no_grad():
        ref = model(x).double()
    err = float((torch.from_numpy(got).double() - ref).abs().max())
    assert exact["max_abs_error"] == pytest.approx(err, rel=1e-9, abs=1e-15)
    assert err <= FP32_RTOL * float(ref.abs().max()) + FP32_ATOL
    q = compare_onnx_outputs(model, int8, x, precision="int8", check=True)
    assert q["mean_cosine"] >= INT8_MIN_COSINE and 0 <= q["top1_agreement"] <= 1
    assert q["max_abs_error"] > exact["max_abs_error"]  # int8 is not bit-exact: the check measured something
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size  # int8 weights: about a quarter of float32's
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    assert isinstance(onnx_opset(fp32), int) and onnx_opset(fp32) >= 13


def test_tiny_bert_dynamic_int8_within_tolerance(bert) -> None:
    model, x, fp32, int8 = bert
    x5 = inputs_at_batch(x, 5)
    assert x5["input_ids"].shape == (5, 12) and torch.equal(x5["input_ids"][3], x["input_ids"][0])
    exact = compare_onnx_outputs(model, fp32, x5, check=True)
    assert len(exact["outputs"]) == 2  # last_hidden_state and pooler_output, flattened as the exporter does
    assert exact["outputs"][0]["shape"] == [5, 12, 32]
    q = compare_onnx_outputs(model, int8, x5, precision="int8", check=True)
    assert q["within_tolerance"] and q["max_abs_error"] > 0
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}


def test_compare_measures_a_known_error(tmp_path: Path) -> None:
    """A bias shifted by 0.5 after export: the ONNX model is off by exactly 0.5 and the check says so."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3).eval()
    x = torch.randn(4, 6)
    path = export_onnx(model, x, tmp_path / "lin.onnx")
    with torch.no_grad():
        model.bias += 0.5
    res = compare_onnx_outputs(model, path, x)
    assert res["max_abs_error"] == pytest.approx(0.5, abs=1e-5)
    assert not res["within_tolerance"]
    with pytest.raises(OnnxMismatchError, match=r"lin\.onnx: output 0 is outside the fp32 tolerance"):
        compare_onnx_outputs(model, path, x, check=True)
    with pytest.raises(ConfigError, match="precision"):
        compare_onnx_outputs(model, path, x, precision="fp16")


def test_quantize_errors_are_named_and_leave_files_alone(cnn, tmp_path: Path, monkeypatch) -> None:
    _, fp32, _ = cnn
    before = _digest(fp32)
    out = tmp_path / "q.onnx"
    with pytest.raises(ConfigError, match="not found: .*missing.onnx"):
        quantize_onnx(tmp_path / "missing.onnx", out)
    with pytest.raises(ConfigError, match="unknown mode 'statc'.*static"):
        quantize_onnx(fp32, out, mode="statc")
    with pytest.raises(ConfigError, match="static.*needs calibration"):
        quantize_onnx(fp32, out, mode="static")
    with pytest.raises(ConfigError, match="out_path must differ"):
        quantize_onnx(fp32, fp32)
    with pytest.raises(ConfigError, match="no batch"):
        quantize_onnx(fp32, out, mode="static", calibration=[])
    with pytest.raises(ConfigError, match=r"calibration batch 0.*input_0"):
        quantize_onnx(fp32, out, mode="static", calibration=[{"pixels": torch.randn(2, 1, 28, 28)}])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(DataError, match="bad.onnx is not a readable ONNX model"):
        quantize_onnx(bad, out)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"secateur\[onnx\]"):
        quantize_onnx(fp32, out)
    assert not out.exists() and _digest(fp32) == before
    assert [p.name for p in tmp_path.iterdir()] == ["bad.onnx"]  # no temporary left behind


def test_measure_deployment_rows(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).train()
    small = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).train()
    x = torch.randn(3, 1, 8, 8)
    rows = measure_deployment({"dense": dense, "pruned": small}, x, batch_sizes=(1, 4), out_dir=tmp_path,
                              calibration=[torch.randn(4, 1, 8, 8)], repeats=3, warmup=1, block_ms=1.0)
    assert dense.training and small.training  # modes restored
    runtimes = ("eager", "torchscript", "onnxruntime-fp32", "onnxruntime-int8")
    assert [(r["model"], r["runtime"], r["batch_size"]) for r in rows] == [
        (m, rt, b) for b in (1, 4) for m in ("dense", "pruned") for rt in runtimes
    ]
    for r in rows:
        assert r["n"] == 3 and r["threads"] == 1 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert r["size_bytes"] == Path(r["artefact"]).stat().st_size > 0
        eager = next(e for e in rows if (e["model"], e["batch_size"], e["runtime"]) ==
                     (r["model"], r["batch_size"], "eager"))
        assert r["speedup"] == pytest.approx(eager["median_ms"] / r["median_ms"])
        if r["runtime"] in ("torchscript", "onnxruntime-fp32"):
            assert r["check"]["within_tolerance"] and r["check"]["max_rel_error"] < 1e-4, r
        elif r["runtime"] == "onnxruntime-int8":  # measured, not gated: a tiny random net is no int8 test
            assert -1.0 <= r["check"]["mean_cosine"] <= 1.0 and r["check"]["max_rel_error"] > 0
    int8 = [r for r in rows if r["runtime"] == "onnxruntime-int8"]
    assert all(r["quantization"] == "static" for r in int8)  # convolutions + calibration: static
    sizes = {(r["model"], r["runtime"]): r["size_bytes"] for r in rows}
    assert sizes[("pruned", "onnxruntime-fp32")] < sizes[("dense", "onnxruntime-fp32")]
    table = format_deployment(rows)
    assert table.count("\n") == len(rows) + 1 and "| pruned | onnxruntime-int8 | 4 |" in table
    with pytest.raises(ConfigError, match="batch_sizes"):
        measure_deployment(dense, x, batch_sizes=(0,))
    with pytest.raises(ConfigError, match="quantize"):
        measure_deployment(dense, x, quantize="int4")
    with pytest.raises(ConfigError, match="calibration"):
        measure_deployment(dense, x, quantize="static")

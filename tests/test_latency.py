"""Latency, peak memory, measure() and ONNX export: structure and sanity, never speed."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from secateur.analysis.counting import count_macs, count_params
from secateur.analysis.latency import compare_latency, measure, measure_latency, peak_memory, time_callable
from secateur.errors import ConfigError
from secateur.pruners.element import Pruner
from secateur.zoo import create_model

FAST = {"repeats": 3, "warmup": 1, "block_ms": 0.5}


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(z)


def _check_stats(res: dict, repeats: int) -> None:
    assert res["n"] == repeats
    assert res["median_ms"] > 0 and res["mean_ms"] > 0 and res["min_ms"] > 0
    assert res["iqr_ms"] >= 0 and res["q1_ms"] <= res["median_ms"] <= res["q3_ms"]
    assert res["iqr_ms"] == pytest.approx(res["q3_ms"] - res["q1_ms"], rel=1e-6, abs=1e-9)
    assert res["calls_per_block"] >= 1


def test_measure_latency_structure_and_mode_restored() -> None:
    model = create_model("lenet5")
    model.train()
    threads_before = torch.get_num_threads()
    res = measure_latency(model, torch.randn(3, 1, 28, 28), threads=1, **FAST)
    _check_stats(res, 3)
    assert res["threads"] == 1 and res["device"] == "cpu" and res["batch_size"] == 3
    assert model.training  # restored
    assert torch.get_num_threads() == threads_before


def test_measure_latency_tuple_and_dict_inputs() -> None:
    model = TwoInputs().eval()
    x, z = torch.randn(5, 8), torch.randn(5, 6)
    by_pos = measure_latency(model, (x, z), **FAST)
    by_kw = measure_latency(model, {"x": x, "z": z}, **FAST)
    assert by_pos["batch_size"] == by_kw["batch_size"] == 5
    assert by_pos["threads"] == torch.get_num_threads()
    assert not model.training


def test_measure_latency_rejects_bad_arguments() -> None:
    model = nn.Linear(2, 2)
    x = torch.randn(1, 2)
    for kwargs in ({"repeats": 0}, {"warmup": -1}, {"threads": 0}, {"block_ms": 0}, {"device": "tpu"}):
        with pytest.raises(ConfigError):
            measure_latency(model, x, **kwargs)
    with pytest.raises(TypeError):
        measure_latency(lambda t: t, x)  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            measure_latency(model, x, device="cuda")


def test_compare_latency_reports_ratio_of_medians() -> None:
    dense = create_model("lenet5")
    pruned = create_model("lenet5")
    Pruner(pruned, 0.5).step(0)
    res = compare_latency(dense, pruned, torch.randn(2, 1, 28, 28), threads=1, **FAST)
    _check_stats(res["dense"], 3)
    _check_stats(res["pruned"], 3)
    assert res["speedup"] == pytest.approx(res["dense"]["median_ms"] / res["pruned"]["median_ms"])


def test_time_callable() -> None:
    res = time_callable(lambda: sum(range(100)), **FAST)
    _check_stats(res, 3)
    assert res["calls_per_block"] > 1  # a microsecond call: blocks of 0.5 ms hold many calls


def test_peak_memory_sees_activations() -> None:
    model = nn.Sequential(nn.Linear(100, 1000), nn.ReLU(), nn.Linear(1000, 10))
    res = peak_memory(model, torch.randn(32, 100))
    out_bytes = 32 * 1000 * 4  # the first layer's output must be alive at some point
    assert res["peak_activation_bytes"] >= out_bytes
    assert res["param_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    assert res["method"] == "torch.profiler" and res["device"] == "cpu"
    assert model.training  # restored


class _Talker(nn.Module):
    """Writes one line to descriptor 2 during its forward (what a user's debug print would do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        os.write(2, b"user line from forward\n")
        return self.fc(x)


def test_peak_memory_prints_nothing_and_keeps_the_figure(capfd) -> None:
    capfd.readouterr()
    model = nn.Sequential(nn.Linear(100, 1000), nn.ReLU(), nn.Linear(1000, 10))
    res = peak_memory(model, torch.randn(32, 100))
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    # Peak: the first layer's output and the ReLU's output (not in place) alive together, float32.
    assert res["peak_activation_bytes"] == 2 * 32 * 1000 * 4
    # Only the profiler's own lines are dropped: the user's stderr output during the forward
    # (warm-up call + measured call) still arrives.
    peak_memory(_Talker(), torch.randn(2, 8))
    assert capfd.readouterr().err == "user line from forward\n" * 2


def test_profiler_noise_filter_keeps_other_lines(capfd) -> None:
    from secateur.analysis.latency import _quiet_profiler_stderr

    capfd.readouterr()
    with _quiet_profiler_stderr():
        os.write(2, b"USDT:2026-01-01 00:00:00 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"STAGE:2026-01-01 00:00:00 1:1 ActivityProfilerController.cpp:312] Completed Stage\n")
        os.write(2, b"a real warning\n")
        sys.stderr.write("python-level line\n")
    # (pytest's capfd routes sys.stderr around descriptor 2, so only the set of lines is compared)
    assert sorted(capfd.readouterr().err.splitlines()) == ["a real warning", "python-level line"]


def test_measure_combines_counts_and_latency() -> None:
    model = create_model("lenet5")
    Pruner(model, 0.75).step(0)
    x = torch.randn(1, 1, 28, 28)
    res = measure(model, x, repeats=3, threads=1, memory=True)
    assert {k: res[k] for k in ("params", "nonzero_params")} == count_params(model)
    assert {k: res[k] for k in ("macs", "sparse_macs")} == count_macs(model, x)
    assert res["sparse_macs"] < res["macs"]
    assert 0.5 < res["sparsity"] < 0.8
    assert res["latency_ms"] > 0 and res["latency"]["n"] == 3
    assert res["memory"]["peak_activation_bytes"] > 0
    quick = measure(model, x, latency=False)
    assert "latency_ms" not in quick and quick["macs"] == res["macs"]


# -- ONNX (optional extra) ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from secateur.analysis.onnx import export_onnx

    torch.manual_seed(0)
    model = create_model("lenet5").train()
    Pruner(model, 0.5).step(0)
    x = torch.randn(2, 1, 28, 28)
    path = export_onnx(model, x, tmp_path_factory.mktemp("onnx") / "lenet.onnx")
    return model, x, path


def test_export_onnx_matches_masked_model_and_leaves_it_intact(exported) -> None:
    import onnxruntime as ort

    from secateur.masks import has_mask

    model, x, path = exported
    assert path.is_file() and path.stat().st_size > 1000
    assert has_mask(model.conv1) and model.training  # still masked, mode kept
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.train()
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-5)


def test_onnx_latency_structure_and_errors(exported, tmp_path) -> None:
    from secateur.analysis.onnx import onnx_latency

    _, x, path = exported
    res = onnx_latency(path, x, threads=1, **FAST)
    _check_stats(res, 3)
    assert res["device"] == "onnxruntime:cpu" and res["batch_size"] == 2 and res["outputs"] == [[2, 10]]
    with pytest.raises(ConfigError, match="inputs"):
        onnx_latency(path, (x, x), **FAST)
    with pytest.raises(ConfigError, match="not found"):
        onnx_latency(tmp_path / "missing.onnx", x)


def test_baked_copy_does_not_break_the_original() -> None:
    """deepcopy shares parametrize's generated class: baking the copy must not touch the original."""
    from secateur.analysis.onnx import baked_copy
    from secateur.masks import has_mask

    model = create_model("lenet5").eval()
    Pruner(model, 0.5).step(0)
    x = torch.randn(1, 1, 28, 28)
    copy_ = baked_copy(model)
    assert not has_mask(copy_.conv1) and has_mask(model.conv1)
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), model(x))
    assert float((copy_.fc1.weight == 0).float().mean()) > 0.3


def test_compare_onnx_latency_interleaved(exported) -> None:
    from secateur.analysis.onnx import compare_onnx_latency

    _, x, path = exported
    res = compare_onnx_latency(path, path, x, threads=1, **FAST)
    for key in ("dense", "pruned"):
        _check_stats(res[key], 3)
        assert res[key]["device"] == "onnxruntime:cpu" and res[key]["batch_size"] == 2
    assert res["speedup"] == pytest.approx(res["dense"]["median_ms"] / res["pruned"]["median_ms"])


def test_collect_results_with_onnx(exported, tmp_path) -> None:
    from secateur.analysis.report import collect_results, summary_rows

    dense = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    pruned = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))  # a "compacted" model
    res = collect_results(dense, pruned, torch.randn(4, 8), latency=False, memory=False, onnx_dir=tmp_path,
                          repeats=3, threads=1)
    assert (tmp_path / "dense.onnx").is_file() and (tmp_path / "pruned.onnx").is_file()
    for key in ("dense", "pruned"):
        m = res[key]
        assert m["onnx_latency_q1_ms"] <= m["onnx_latency_ms"] <= m["onnx_latency_q3_ms"]
    assert any(row[0].startswith("ONNX Runtime latency") for row in summary_rows(res))


def test_compare_callables() -> None:
    from secateur.analysis.latency import compare_callables

    res = compare_callables({"a": lambda: sum(range(10)), "b": lambda: sum(range(1000))}, **FAST)
    assert list(res) == ["a", "b"]
    for r in res.values():
        _check_stats(r, 3)
    with pytest.raises(ConfigError):
        compare_callables({})


def test_rss_figures_follow_an_allocation_and_the_peak_resets():
    import gc
    import os

    from secateur.analysis.rss import reset_peak_rss, status_mib

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    # Earlier tests' garbage in reference cycles (models, tensors) would otherwise be freed by a collection
    # that the allocation below may trigger, lowering RSS inside the measured interval (seen in the suite).
    gc.collect()
    before = status_mib("VmRSS")
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so the pages are resident
    assert status_mib("VmRSS") - before > 48
    del big
    if reset_peak_rss():
        assert status_mib("VmHWM") - status_mib("VmRSS") < 16
    with pytest.raises(RuntimeError, match="NoSuchField"):
        status_mib("NoSuchField")

"""HTML + Markdown report: self-contained HTML, plots embedded, and (with Chromium) a real screenshot."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from secateur.analysis.report import build_report, collect_results, layer_comparison
from secateur.errors import ConfigError
from secateur.pruners.element import Pruner
from secateur.zoo import create_model

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results() -> dict:
    torch.manual_seed(0)
    dense = create_model("lenet5").eval()
    pruned = copy.deepcopy(dense)
    Pruner(pruned, 0.8).step(0)
    sweep = [
        {"method": m, "compression": c, "accuracy": a0 - k * i, "macs": 833_040 / c,
         "latency_ms": 0.5 + 0.05 * i}
        for m, a0, k in (("magnitude", 0.90, 0.01), ("random", 0.89, 0.04))
        for i, c in enumerate((2.0, 4.0, 8.0, 16.0))
    ]
    return collect_results(
        dense, pruned, torch.randn(2, 1, 28, 28), dense_accuracy=0.91, pruned_accuracy=0.885,
        repeats=3, threads=1, title="LeNet-5 <tiny> report", sweep=sweep,
        command="secateur prune --model zoo:lenet5",
    )


def test_collect_results_fields(results: dict) -> None:
    d, p = results["dense"], results["pruned"]
    assert d["params"] == p["params"] and p["nonzero_params"] < 0.3 * d["params"]
    assert p["sparse_macs"] < p["macs"] == d["macs"]
    assert d["latency_ms"] > 0 and p["latency_iqr_ms"] >= 0 and d["peak_activation_bytes"] > 0
    names = [r["name"] for r in results["layers"]]
    assert names[:2] == ["conv1", "conv2"]
    for r in results["layers"]:
        assert r["dense_kept"] == 1.0 and 0.0 < r["pruned_kept"] < 1.0


def test_layer_comparison_of_a_smaller_model() -> None:
    """A compacted model's kept ratio is relative to the dense layer's parameter count."""
    dense = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    small = torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    rows = {r["name"]: r for r in layer_comparison(dense, small, torch.randn(1, 8))}
    assert rows["0"]["pruned_kept"] == pytest.approx(27 / 54)
    assert rows["2"]["pruned_kept"] == pytest.approx(8 / 14)


def test_layer_comparison_leaves_batchnorm_statistics_and_mode_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)).train()
    before = model[1].running_mean.clone()
    layer_comparison(model, model, torch.randn(2, 1, 8, 8) + 3.0)
    assert torch.equal(model[1].running_mean, before) and model.training


def test_build_report_html_is_self_contained(results: dict, tmp_path: Path) -> None:
    out = build_report(results, tmp_path)
    html = out["html"].read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "LeNet-5 &lt;tiny&gt; report" in html  # escaped
    # No external resources: every src/href is a data URI; no scripts or stylesheets links.
    assert re.findall(r"""(?:src|href)=["'](?!data:)""", html) == []
    assert "<script" not in html and "<link" not in html and "@import" not in html
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 3
    for b64 in images:
        assert base64.b64decode(b64).startswith(PNG_MAGIC)
    for key in ("accuracy_vs_compression", "layer_kept", "latency_vs_macs"):
        assert f'id="plot-{key}"' in html
    assert "secateur prune --model zoo:lenet5" in html


def test_build_report_markdown_references_pngs(results: dict, tmp_path: Path) -> None:
    out = build_report(results, tmp_path, formats=("md",), name="r")
    assert "html" not in out
    md = out["md"].read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) == 3
    for ref in refs:
        assert (tmp_path / ref).read_bytes().startswith(PNG_MAGIC)
    assert "| non-zero parameters |" in md and "| conv1 | Conv2d |" in md
    assert json.loads(out["json"].read_text())["pruned"]["accuracy"] == 0.885


def test_build_report_partial_results(tmp_path: Path) -> None:
    """Without sweep, latency or layers the report still renders what it has."""
    res = {"dense": {"params": 100, "nonzero_params": 100, "accuracy": 0.9},
           "pruned": {"params": 100, "nonzero_params": 25, "accuracy": 0.8}}
    out = build_report(res, tmp_path)
    html = out["html"].read_text()
    assert html.count("data:image/png;base64,") == 1  # accuracy vs compression only
    assert "4.00x" in html


def test_build_report_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="format"):
        build_report({"dense": {}, "pruned": {}}, tmp_path, formats=("pdf",))
    with pytest.raises(ConfigError, match="dict"):
        build_report([], tmp_path)  # type: ignore[arg-type]


def _tiny_png() -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1), dpi=50)
    FigureCanvasAgg(fig)
    fig.add_subplot().plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_build_report_extra_plots_embedded_and_written(tmp_path: Path) -> None:
    res = {"dense": {"params": 100, "nonzero_params": 100, "accuracy": 0.9},
           "pruned": {"params": 100, "nonzero_params": 25, "accuracy": 0.8}}
    png = _tiny_png()
    out = build_report(res, tmp_path, extra_plots={"curves": ("Training <curves>", png)})
    html = out["html"].read_text()
    m = re.search(r'<figure id="plot-curves"><img alt="Training &lt;curves&gt;" '
                  r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert m is not None and base64.b64decode(m.group(1)) == png
    # After the standard plot, in the Markdown too, with the PNG written beside it.
    assert html.index('id="plot-accuracy_vs_compression"') < html.index('id="plot-curves"')
    assert out["curves"].read_bytes() == png
    assert "![Training <curves>](report_curves.png)" in out["md"].read_text()
    for bad in ({"curves": ("caption", b"not a png")}, {"curves": png},
                {"layer_kept": ("caption", png)}):
        with pytest.raises(ConfigError, match="extra plot"):
            build_report(res, tmp_path / "bad", extra_plots=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "bad").exists()


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.timeout(180)
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install -y chromium)")
def test_screenshot_shows_plots(results: dict, tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    out = build_report(results, tmp_path)
    png = tmp_path / "shot.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(out["html"]), str(png),
         "--width", "1200", "--height", "2000"],
        capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    img = mpimg.imread(str(png))[..., :3]  # floats in [0, 1], (H, W, 3)
    assert img.shape[:2] == (2000, 1200)
    non_white = (img < 0.95).any(axis=2)
    assert non_white.mean() > 0.05
    # Text and tables are grey or black; only the plots draw saturated colour (lines, bars, markers).
    colour = (img.max(axis=2) - img.min(axis=2)) > 0.25
    rows = np.nonzero(colour.any(axis=1))[0]
    assert colour.sum() > 5000, f"only {colour.sum()} coloured pixels: plots did not render"
    # The coloured area spans at least the two rows of plots (several hundred pixels tall).
    assert rows.max() - rows.min() > 400


def test_summary_flags_overlapping_latency_ranges() -> None:
    from secateur.analysis.report import summary_rows

    def res(q1: float, med: float, q3: float) -> dict:
        return {"latency_ms": med, "latency_iqr_ms": q3 - q1, "latency_q1_ms": q1, "latency_q3_ms": q3}

    rows = {r[0]: r for r in summary_rows({"dense": res(1.0, 1.2, 1.4), "pruned": res(1.1, 1.15, 1.3)})}
    assert rows["latency, median ± IQR (ms)"][3] == "1.04x (IQRs overlap)"
    rows = {r[0]: r for r in summary_rows({"dense": res(2.0, 2.1, 2.2), "pruned": res(1.0, 1.05, 1.1)})}
    assert rows["latency, median ± IQR (ms)"][3] == "2.00x"


def test_table_cells_share_one_format() -> None:
    """Counts, fractions, MiB and ratios format alike in every table; missing or NaN is a dash."""
    from secateur.analysis.report import _layer_cells, _sweep_cells, summary_rows

    d = {"params": 1_234_567, "nonzero_params": 1_234_567, "accuracy": 0.91234,
         "peak_activation_bytes": 3 * 2**20}
    p = {"params": 1_234_567, "nonzero_params": 411_522, "accuracy": float("nan"),
         "peak_activation_bytes": 2**19}
    rows = {r[0]: r[1:] for r in summary_rows({"dense": d, "pruned": p})}
    assert rows["non-zero parameters"] == ("1,234,567", "411,522", f"{1_234_567 / 411_522:.2f}x")
    assert rows["accuracy (fraction)"] == ("0.9123", "—", "")
    assert rows["peak activation memory (MiB)"] == ("3.00", "0.50", "6.00x")
    # A NaN count (e.g. a failed measurement) is shown as missing, not a crash.
    rows = {r[0]: r[1:] for r in summary_rows({"dense": {"params": float("nan")}, "pruned": {"params": 7}})}
    assert rows["parameters"] == ("—", "7", "—")
    layer = {"name": "fc", "type": "Linear", "dense_params": 5000, "pruned_params": 2500,
             "pruned_nonzero": 1250, "dense_kept": 1.0, "pruned_kept": 0.25, "dense_macs": 4000,
             "pruned_macs": None, "pruned_sparse_macs": 1000.7}
    assert _layer_cells(layer) == ["fc", "Linear", "5,000", "2,500", "1,250", "1.000", "0.250", "4,000", "—",
                                   "1,000"]
    pt = {"method": "lamp", "compression": 8, "accuracy": 0.5, "macs": 10_000, "latency_ms": None}
    assert _sweep_cells(pt) == ["lamp", "8.00x", "0.5000", "10,000", "—", "—"]


# -- headline, recipe, sizes, deployment, axes (issue 16) -----------------------------------------
def test_headline_numbers_come_from_the_inputs(results: dict, tmp_path: Path) -> None:
    from secateur.analysis.report import headline

    d, p = results["dense"], results["pruned"]
    items = dict(headline(results))
    assert items["metric"] == (f"accuracy {d['accuracy']:.4f} → {p['accuracy']:.4f}, "
                               f"{100 * (p['accuracy'] - d['accuracy']):+.2f} points (worse)")
    assert d["params"] == p["params"] and f"parameters {d['params']:,} (unchanged)" in items["size"]
    nonzero = f"{d['nonzero_params'] / p['nonzero_params']:.2f}x"
    nz = f"non-zero parameters {d['nonzero_params']:,} → {p['nonzero_params']:,} ({nonzero} fewer)"
    assert nz in items["size"]
    # A masked model's safetensors file is as large as the dense one: the headline says so, not a saving.
    sizes = f"safetensors file {d['file_bytes'] / 2**20:.2f} → {p['file_bytes'] / 2**20:.2f} MiB"
    assert sizes in items["size"] and d["file_bytes"] == p["file_bytes"]
    assert items["speed"].startswith(f"{d['latency_ms'] / p['latency_ms']:.2f}x")
    assert "batch 2, 1 thread(s)" in items["speed"]
    page = build_report(results, tmp_path)["html"].read_text()
    head = page[page.index('<ul class="headline"'):page.index("</ul>")]
    for text in items.values():
        assert html_escape(text) in head
    assert page.index('id="headline"') < page.index("<h2>Dense vs pruned</h2>")
    md = (tmp_path / "report.md").read_text()
    assert f"- **metric**: {items['metric']}" in md


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def test_headline_perplexity_and_missing_values() -> None:
    from secateur.analysis.report import headline

    res = {"metric_name": "perplexity", "dense": {"accuracy": 20.0, "params": 10, "nonzero_params": 10},
           "pruned": {"accuracy": 26.0, "params": 10, "nonzero_params": 5}}
    items = dict(headline(res))
    assert items["metric"] == "perplexity 20.0000 → 26.0000, +30.0% (worse)"
    assert items["size"] == "parameters 10 (unchanged); non-zero parameters 10 → 5 (2.00x fewer)"
    assert "speed" not in items
    assert headline({"dense": {}, "pruned": {}}) == []


def test_recipe_sizes_and_deployment_rendered(tmp_path: Path) -> None:
    res = {
        "dense": {"params": 100, "nonzero_params": 100, "accuracy": 0.9, "file_bytes": 3 * 2**20},
        "pruned": {"params": 50, "nonzero_params": 50, "accuracy": 0.89, "file_bytes": 2**20},
        "recipe": {"method": "channel", "sparsity": 0.5, "criterion": "l1 <norm>"},
        "recipe_name": "resnet_channels",
        "deployment": [
            {"model": "pruned", "runtime": "onnxruntime-int8", "batch_size": 32, "median_ms": 1.25,
             "iqr_ms": 0.05, "speedup": 2.5, "size_bytes": 2**19, "n": 5, "threads": 1,
             "check": {"within_tolerance": True, "mean_cosine": 0.99871, "max_rel_error": 0.02}},
            {"model": "pruned", "runtime": "onnxruntime-fp32", "batch_size": 32, "median_ms": 2.0,
             "iqr_ms": 0.1, "speedup": 1.5625, "size_bytes": 2**20, "n": 5, "threads": 1,
             "check": {"within_tolerance": False, "mean_cosine": 1.0, "max_rel_error": 3e-3}},
        ],
    }
    out = build_report(res, tmp_path)
    page = out["html"].read_text()
    assert '<h2>Recipe (resnet_channels)</h2><pre id="recipe">method: channel\nsparsity: 0.5\n' in page
    assert "criterion: l1 &lt;norm&gt;" in page
    assert "<td>size on disk, safetensors (MiB)</td><td class=\"n\">3.00</td><td class=\"n\">1.00</td>" \
           "<td class=\"n\">3.00x</td>" in page
    assert "1.250 ± 0.050" in page and "2.50x" in page and "cosine 0.9987" in page
    assert "rel. err 3.0e-03 (outside tolerance)" in page
    md = out["md"].read_text()
    assert "```yaml\nmethod: channel" in md and "| pruned | onnxruntime-int8 | 32 | 1.250 ± 0.050 |" in md


def test_accuracy_axis_does_not_exaggerate_a_small_drop() -> None:
    from secateur.analysis.plots import MIN_METRIC_SPAN, metric_axis, trajectory_points

    lo, hi = metric_axis([0.885, 0.90], 0.91, fraction=True)
    assert lo <= 0.91 - MIN_METRIC_SPAN and hi >= 0.91 and hi <= 1.0
    assert (0.91 - 0.885) / (hi - lo) <= 0.12  # a 2.5-point drop is at most an eighth of the axis
    lo, hi = metric_axis([0.1, 0.64], 0.66, fraction=True)  # a trajectory point near chance stays visible
    assert lo <= 0.1 and lo >= 0.0
    assert metric_axis([25.0], 20.0, fraction=False) == (0.0, pytest.approx(26.25))
    history = [{"step": 0, "eval_accuracy": 0.91, "nonzero_params": 1000},
               {"step": 5, "sparsity": 0.3},  # no evaluation: not a point
               {"step": 9, "eval_accuracy": 0.88, "nonzero_params": 250, "phase": "prune"}]
    pts = trajectory_points({"dense": {"params": 1000}, "history": history})
    assert pts == [(1.0, 0.91, "0"), (4.0, 0.88, "prune")]
    given = trajectory_points({"trajectory": [{"compression": 2.0, "accuracy": 0.9, "label": "step 1"}]})
    assert given == [(2.0, 0.9, "step 1")]


def test_plots_name_the_report_extra_without_matplotlib(monkeypatch) -> None:
    from secateur.analysis.plots import plot_accuracy_vs_compression

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    res = {"dense": {"params": 10, "nonzero_params": 10, "accuracy": 0.9},
           "pruned": {"params": 10, "nonzero_params": 5, "accuracy": 0.8}}
    with pytest.raises(ImportError, match=r"secateur\[report\]"):
        plot_accuracy_vs_compression(res)


def test_collect_results_file_sizes_and_progress(capsys) -> None:
    dense = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    small = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    res = collect_results(dense, small, torch.randn(2, 64), latency=False, memory=False, progress=True)
    floats = {"dense": 64 * 64 + 64 + 64 * 4 + 4, "pruned": 64 * 16 + 16 + 16 * 4 + 4}
    for key, n in floats.items():  # float32 payload + a JSON header of under 1 KiB
        assert 4 * n < res[key]["file_bytes"] < 4 * n + 1024
    assert "report" in capsys.readouterr().err  # the progress bar was drawn on stderr

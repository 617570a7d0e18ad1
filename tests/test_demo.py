import base64
import copy
import html
import json
import re
from dataclasses import asdict

import pytest
import torch
from click.testing import CliRunner

from secateur.analysis import count_macs, count_params, layer_table
from secateur.analysis.report import layer_comparison
from secateur.app.cli import main
from secateur.app.demo import DemoConfig, write_outputs
from secateur.data import fashion_mnist_root
from secateur.errors import ConfigError
from secateur.pruners.element import Pruner
from secateur.zoo import create_model


def _have_data() -> bool:
    try:
        return (fashion_mnist_root() / "train-images-idx3-ubyte.gz").exists()
    except Exception:
        return False


needs_data = pytest.mark.skipif(not _have_data(), reason="Fashion-MNIST not installed (make data)")


def _fake_metrics(tmp_path) -> dict:
    """Metrics shaped like run_demo's, from a LeNet-5 pruned to 80% in one shot (no data, no training)."""
    torch.manual_seed(0)
    dense = create_model("lenet5").eval()
    pruned = copy.deepcopy(dense)
    pruner = Pruner(pruned, 0.8)
    pruner.step(0)
    sparsity = pruner.sparsity()
    pruner.finalize()
    x = torch.zeros(1, 1, 28, 28)
    d = {**count_params(dense), **count_macs(dense, x), "accuracy": 0.9, "seconds": 1.0}
    p = {**count_params(pruned), **count_macs(pruned, x), "accuracy": 0.875, "seconds": 2.0}
    cfg = asdict(DemoConfig(model="lenet5", dense_epochs=1, prune_epochs=1, subset=64, out_dir=str(tmp_path)))
    history = [{"step": 10, "phase": "dense", "eval_accuracy": 0.9}, {"step": 0, "sparsity": 0.0},
               {"step": 10, "sparsity": 0.0}, {"step": 15, "sparsity": 0.5},
               {"step": 20, "phase": "prune", "eval_accuracy": 0.875}, {"step": 20, "sparsity": sparsity}]
    return {
        "sparsity": sparsity, "dense": d, "pruned": p, "seconds": 3.0, "config": cfg,
        "pruned_accuracy_before_bn_recalibration": 0.5,
        "layers": [r.as_dict() for r in layer_table(pruned, x)],
        "layer_comparison": layer_comparison(dense, pruned, x), "history": history,
    }


def _embedded_pngs(page: str) -> dict[str, bytes]:
    """{figure id: PNG bytes} of the report's data-URI images."""
    pattern = r'<figure id="plot-([^"]+)"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"'
    found = re.findall(pattern, page)
    return {key: base64.b64decode(b64) for key, b64 in found}


def test_demo_writes_self_contained_html_report(tmp_path):
    m = _fake_metrics(tmp_path)
    paths = write_outputs(m, tmp_path / "out")
    cfg_bn = m["config"]["bn_batches"]
    assert paths["html"] == tmp_path / "out" / "report.html" and paths["md"].name == "report.md"
    page = paths["html"].read_text()
    # Self-contained: nothing is loaded from elsewhere.
    assert not re.search(r'(src|href)="(?!data:)', page)
    pngs = _embedded_pngs(page)
    assert set(pngs) == {"accuracy_vs_compression", "layer_kept", "training_curves"}
    # The training curves embedded are exactly the PNG the demo wrote beside report.md.
    assert pngs["training_curves"] == (tmp_path / "out" / "accuracy_sparsity.png").read_bytes()
    # The dense-vs-pruned table carries the models' own counts, the ratio dense / pruned non-zero
    # parameters, and the accuracies.
    d, p = m["dense"], m["pruned"]
    for cell in (f"{d['nonzero_params']:,}", f"{p['nonzero_params']:,}",
                 f"{d['nonzero_params'] / p['nonzero_params']:.2f}x", "0.9000", "0.8750"):
        assert f">{cell}<" in page, cell
    # Per-layer rows with each layer's kept fraction of its dense parameters.
    for row in m["layer_comparison"]:
        if row["dense_params"]:
            kept = row["pruned_nonzero"] / row["dense_params"]
            assert f"<td>{html.escape(row['name'])}</td>" in page and f">{kept:.3f}<" in page
    # The command that reproduces the run, with the subset, and the honest test-set wording.
    assert "secateur demo --dense-epochs 1 --prune-epochs 1" in page and "--subset 64" in page
    assert "first 64 test images" in page
    assert f"statistics on {cfg_bn} training batches" in page and "(before: 0.5000)" in page
    assert "report.html" in paths["md"].read_text()
    saved = json.loads(paths["metrics"].read_text())
    assert saved["pruned"]["nonzero_params"] == p["nonzero_params"] and "outputs" not in saved


def test_demo_outputs_reject_incomplete_metrics(tmp_path):
    m = _fake_metrics(tmp_path)
    del m["history"]
    with pytest.raises(ConfigError, match="history"):
        write_outputs(m, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_demo_cli_prints_the_html_path(tmp_path, monkeypatch):
    import secateur.app.demo

    fake = _fake_metrics(tmp_path)

    def run_demo(cfg):
        m = dict(fake)
        m["outputs"] = {k: str(v) for k, v in write_outputs(m, cfg.out_dir).items()}
        return m

    monkeypatch.setattr(secateur.app.demo, "run_demo", run_demo)
    out = tmp_path / "cli"
    res = CliRunner().invoke(main, ["demo", "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"report: {out / 'report.html'}" in res.output
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")


@needs_data
def test_demo_small_run_writes_metrics_report_and_plots(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(
        main,
        [
            "demo",
            "--quiet",
            "--json",
            "--subset",
            "512",
            "--dense-epochs",
            "1",
            "--prune-epochs",
            "2",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "dense_accuracy",
        "pruned_accuracy",
        "sparsity",
        "params",
        "nonzero_params",
        "macs",
        "sparse_macs",
        "seconds",
    ):
        assert key in m
    # The schedule ends at the target: 90% of conv/linear weights are zero.
    assert m["sparsity"] == pytest.approx(0.9, abs=0.002)
    assert m["nonzero_params"] < 0.15 * m["params"]
    assert m["sparse_macs"] < 0.3 * m["macs"]
    assert m["macs"] == m["dense"]["macs"]
    # Sparsity rises monotonically over the recorded mask updates.
    sp = [h["sparsity"] for h in m["history"] if "sparsity" in h]
    assert sp == sorted(sp) and sp[-1] == pytest.approx(m["sparsity"], abs=1e-6)
    assert max(h["step"] for h in m["history"]) == max(h["step"] for h in m["history"] if "sparsity" in h)
    report = (out / "report.md").read_text()
    assert "accuracy_sparsity.png" in report and "layer_sparsity.png" in report
    for png in ("accuracy_sparsity.png", "layer_sparsity.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # The pruned accuracy is measured after re-estimating BatchNorm statistics, recorded as the
    # last evaluation of the history, with the accuracy before it kept for comparison.
    evals = [h for h in m["history"] if "eval_accuracy" in h]
    assert evals[-1]["phase"] == "bn_recalibrated" and evals[-1]["eval_accuracy"] == m["pruned_accuracy"]
    assert 0.0 <= m["pruned_accuracy_before_bn_recalibration"] <= 1.0
    printed = json.loads(res.output)
    assert printed["sparsity"] == m["sparsity"]
    assert printed["outputs"]["html"] == str(out / "report.html")
    page = (out / "report.html").read_text()
    # training curves, layer sparsity, per-layer comparison and the accuracy-vs-compression trajectory
    assert page.count("data:image/png;base64,") == 4 and f">{m['pruned']['nonzero_params']:,}<" in page
    traj = m["trajectory"]
    assert traj and traj[-1]["label"] == "after BN re-estimation"
    assert traj[-1]["accuracy"] == m["pruned_accuracy"] and traj[-1]["nonzero_params"] >= m["nonzero_params"]
    assert all(a["nonzero_params"] >= b["nonzero_params"] for a, b in zip(traj, traj[1:]))
    assert m["latency"]["dense"]["median"] > 0 and m["latency"]["pruned"]["median"] > 0

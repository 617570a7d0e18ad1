import json

import pytest
from click.testing import CliRunner

from secateur.cli import main
from secateur.data import fashion_mnist_root


def _have_data() -> bool:
    try:
        return (fashion_mnist_root() / "train-images-idx3-ubyte.gz").exists()
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _have_data(), reason="Fashion-MNIST not installed (make data)")


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
    printed = json.loads(res.output)
    assert printed["sparsity"] == m["sparsity"]

"""``secateur export --quantize int8`` on a channel-pruned ResNet-20 (issue 16's must-show): the float32
ONNX model within the stated tolerance of PyTorch (max |onnx - torch| <= 1e-4 max |torch| + 1e-5), static
int8 calibrated on training images and checked on held-out ones (mean cosine >= 0.98, the stated bar), by
`export` and by `measure --latency --int8`.
The pruned all-MiniLM-L6-v2 counterpart is in tests/test_cli_models.py (dynamic int8 on held-out text).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from secateur.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(args: list[str]) -> dict:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_pruned_resnet20_exports_to_onnx_and_static_int8_within_tolerance(tmp_path: Path) -> None:
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(mod)
    run = tmp_path / "run"
    m = _invoke(["prune", "--model", "zoo:resnet20", "--recipe", "l1_filters_30", "--subset", "128",
                 "--quiet", "--json", "--out", str(run)])
    assert m["pruned"]["params"] < 0.6 * m["dense"]["params"]  # channels removed: a smaller network
    onnx = tmp_path / "resnet20.onnx"
    r = _invoke(["export", "--model", f"saved:{run / 'model'}", "--out", str(onnx), "--quantize", "int8",
                 "--calibration-batches", "2", "--quiet"])
    assert r["check"]["within_tolerance"] and r["check"]["max_rel_error"] <= 1e-4
    assert r["bytes"] == onnx.stat().st_size and isinstance(r["opset"], int)
    q = r["int8"]
    assert q["mode"] == "static" and q["calibration_batches"] == 2
    assert q["checked_on"] == "32 held-out images"  # the data the saved folder recorded
    assert q["check"]["mean_cosine"] >= 0.98 and q["bytes"] < r["bytes"] / 2
    assert Path(q["onnx"]).stat().st_size == q["bytes"]
    # measure --int8 compares the int8 model with PyTorch on held-out images too, not on random noise (where
    # a model calibrated on real images looks worse than it is)
    ms = _invoke(["measure", "--model", f"saved:{run / 'model'}", "--latency", "--int8", "--repeats", "1",
                  "--quiet"])
    assert ms["latency"]["checked_on"] == "32 held-out images"
    int8_rows = [row for row in ms["latency"]["rows"] if row["runtime"] == "onnxruntime-int8"]
    assert int8_rows and all(row["check"]["mean_cosine"] >= 0.98 for row in int8_rows)

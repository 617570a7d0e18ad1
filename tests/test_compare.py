"""``secateur compare``: secateur vs Torch-Pruning vs torch.ao.pruning at one budget (tiny, CPU)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from click.testing import CliRunner

from secateur.app.cli import main
from secateur.app.compare import compare

MODEL = "zoo:lenet5"
KWARGS: dict = {}
HAS_TP = importlib.util.find_spec("torch_pruning") is not None
PNG = b"\x89PNG\r\n\x1a\n"


def _ok(result: dict) -> dict[str, dict]:
    return {r["tool"]: r for r in result["rows"] if r["status"] == "ok"}


def test_cli_channel_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "cmp"
    res = CliRunner().invoke(
        main,
        [
            "compare",
            "--model",
            MODEL,
            "--model-kwargs",
            json.dumps(KWARGS),
            "--mode",
            "channel",
            "--sparsity",
            "0.5",
            "--subset",
            "128",
            "--dense-epochs",
            "0",
            "--batch-size",
            "64",
            "--steps",
            "3",
            "--latency-repeats",
            "3",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "| secateur |" in res.output and "| dense (unpruned) |" in res.output
    md = (out / "compare.md").read_text()
    assert "Torch-Pruning" in md and "torch.ao.pruning" in md
    assert (out / "compare.png").read_bytes()[:8] == PNG
    data = json.loads((out / "compare.json").read_text())
    rows = {r["tool"]: r for r in data["rows"]}
    dense = data["dense"]
    # every tool that ran got the identical fine-tuning budget
    budgets = [r["finetune"] for r in data["rows"]]
    assert all(b == budgets[0] for b in budgets) and budgets[0]["steps"] == 3
    sec = rows["secateur"]
    assert sec["status"] == "ok"
    assert sec["params"] < dense["params"] and sec["macs"] < dense["macs"]
    assert sec["latency"]["median_ms"] > 0 and sec["prune_s"] > 0
    assert 0.0 <= sec["accuracy"] <= 1.0
    assert rows["torch_ao"]["status"] == "not applicable"
    if HAS_TP:
        tp = rows["torch_pruning"]
        assert tp["status"] == "ok", tp["reason"]
        assert tp["params"] < dense["params"] and tp["macs"] < dense["macs"]
        assert "latency" in tp
    else:
        assert rows["torch_pruning"]["status"] == "not installed"


def test_element_mode_hits_sparsity(tmp_path):
    result = compare(
        MODEL,
        mode="element",
        sparsity=0.7,
        model_kwargs=KWARGS,
        subset=128,
        dense_epochs=0,
        batch_size=64,
        steps=2,
        latency_repeats=0,
        out_dir=tmp_path,
    )
    ok = _ok(result)
    assert set(ok) == {"secateur", "torch_ao"}
    for row in ok.values():
        assert abs(row["weight_sparsity"] - 0.7) < 0.005, row
        assert row["nonzero_params"] < result["dense"]["nonzero_params"]
        assert row["finetune"]["steps"] == 2
    tp = next(r for r in result["rows"] if r["tool"] == "torch_pruning")
    assert tp["status"] in ("not applicable", "not installed")
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG


def test_missing_peer_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import torch_pruning -> ImportError
    result = compare(
        MODEL,
        mode="channel",
        sparsity=0.5,
        target="macs",
        model_kwargs=KWARGS,
        subset=128,
        dense_epochs=0,
        batch_size=64,
        steps=1,
        latency_repeats=0,
        out_dir=tmp_path,
        tools=("secateur", "torch_pruning"),
    )
    rows = {r["tool"]: r for r in result["rows"]}
    assert rows["torch_pruning"]["status"] == "not installed"
    assert "pip install torch-pruning" in rows["torch_pruning"]["reason"]
    assert rows["secateur"]["status"] == "ok"
    assert rows["secateur"]["macs"] <= 0.55 * result["dense"]["macs"]
    assert "not installed" in (tmp_path / "compare.md").read_text()


def test_bad_arguments_fail_cleanly(tmp_path):
    res = CliRunner().invoke(
        main, ["compare", "--model", MODEL, "--sparsity", "1.5", "--subset", "64", "--out", str(tmp_path)]
    )
    assert res.exit_code != 0 and "sparsity" in res.output
    with pytest.raises(ValueError, match="tools"):
        compare(MODEL, tools=("nope",), out_dir=tmp_path)

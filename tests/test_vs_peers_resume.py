"""benchmarks/vs_peers.py resumes at row granularity: a run stopped inside a (model, seed) task keeps the
rows it finished (one JSON line each, fsynced, under the cache folder), ``--resume`` merges them and runs
only the missing ones, and a finished task leaves no row file behind. The pruning itself is replaced by a
stand-in (the rows are what is checked, not the accuracies)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def vs_peers(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("vs_peers_under_test", ROOT / "benchmarks" / "vs_peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Bench:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg

    def dense(self, spec: str, seed: int) -> tuple[None, dict]:
        return None, {"model": spec}


def _cfg(tmp_path: Path) -> dict:
    return {
        "models": ["m"],
        "seeds": [0, 1],
        "targets": [2.0, 4.0],
        "methods": ["tp-magnitude", "secateur-default", "random"],
        "threads": 1,
        "jobs": 1,
        "speed": 0,
        "cache_dir": str(tmp_path / "cache"),
        "command": "python benchmarks/vs_peers.py ...",
    }


def test_a_stopped_run_resumes_at_the_row_it_stopped(vs_peers, tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple] = []

    def point(bench, dense, dinfo, method, target, seed, aim):
        if len(calls) == 4 and stop_after_four:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the first task
        calls.append((seed, method, target))
        return {"model": dinfo["model"], "seed": seed, "method": method, "target_macs_x": target,
                "achieved_macs_x": target, "accuracy": 0.5, "accuracy_before_finetune": 0.4, "aim": aim}

    monkeypatch.setattr(vs_peers, "Bench", _Bench)
    monkeypatch.setattr(vs_peers, "point", point)
    out = tmp_path / "vs_peers.json"
    stop_after_four = True
    with pytest.raises(KeyboardInterrupt):
        vs_peers.run(_cfg(tmp_path), out, resume=False)
    first = list(calls)
    assert len(first) == 4 and {s for s, _, _ in first} == {0}
    partial = tmp_path / "cache" / "vs_peers_partial" / "m-s0.jsonl"
    assert len(partial.read_text().splitlines()) == 4
    assert json.loads(out.read_text())["rows"] == []  # nothing merged yet: the task did not finish

    stop_after_four = False
    calls.clear()
    res = vs_peers.run(_cfg(tmp_path), out, resume=True)
    keys = [(r["seed"], r["method"], r["target_macs_x"]) for r in res["rows"]]
    assert len(keys) == len(set(keys)) == 2 * 2 * 3  # every row once
    assert not set(calls) & set(first)  # the finished rows were not run again
    assert len(calls) == 12 - 4
    assert not partial.exists() and not (tmp_path / "cache" / "vs_peers_partial" / "m-s1.jsonl").exists()
    # the other methods still aim at Torch-Pruning's achieved reduction, also across the resume
    assert all(r["aim"] == r["target_macs_x"] for r in res["rows"] if r["method"] != "tp-magnitude")
    assert json.loads(out.read_text())["rows"] == res["rows"]

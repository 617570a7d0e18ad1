"""benchmarks/vision_removed.py without timm: one model's record through the matrix's own prune call (a model
that prunes fully, one with groups its code breaks, a refusal, a crash: each labelled, refused and crashed
ones counted as 0 removed, the model untouched), and the docs table built from the records (rows only where
something changed, counts of models pruning more/less, medians)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from secateur.errors import UnsupportedOpError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    added = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "graph")]  # _docs; graph_helpers
    sys.path[:0] = added
    try:
        spec = importlib.util.spec_from_file_location(
            "vision_removed", ROOT / "benchmarks" / "vision_removed.py"
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        from graph_helpers import prune_and_check

        yield mod, prune_and_check
    finally:
        for p in added:
            sys.path.remove(p)


class LostHeadWidth(nn.Module):
    """Attention whose head width comes from ``int(c)``: the trace loses it, so removing heads breaks the
    reshape (a group the matrix call leaves whole with ``skip_incompatible=True``); the MLP still prunes."""

    def __init__(self, c: int = 8, heads: int = 2, hidden: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, int(c) // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(
            torch.softmax(q @ k.transpose(-1, -2), -1).matmul(v).transpose(1, 2).reshape(b, n, -1)
        )
        return x + self.fc2(torch.relu(self.fc1(x)))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    ).eval()


def _state(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(m: nn.Module, before: dict) -> bool:
    after = m.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_prunable_model_is_a_pass_with_the_matrix_counts_and_is_untouched(bench):
    mod, prune = bench
    model, x = _cnn(), torch.randn(1, 3, 8, 8)
    before = _state(model)
    rec = mod.prune_record(model, x, prune, ratio=0.3, skip_incompatible=True)
    assert rec["outcome"] == "pass" and rec["skipped"] == 0 and rec["error"] == ""
    assert _unchanged(model, before)
    # the same call again, counted here: 30% of 8 channels -> 6 kept in both convs
    pruned = prune(model, x, ratio=0.3, skip_incompatible=True)[0]
    assert [m.out_channels for m in pruned if isinstance(m, nn.Conv2d)] == [6, 6]
    assert rec["params"] == [
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in pruned.parameters()),
    ]
    assert rec["params"][1] < rec["params"][0] and rec["macs"][1] < rec["macs"][0]
    assert mod.removed_fraction(*rec["params"]) == pytest.approx(1 - rec["params"][1] / rec["params"][0])


def test_groups_the_model_breaks_are_left_whole_and_labelled_partial(bench):
    mod, prune = bench
    torch.manual_seed(0)
    model, x = LostHeadWidth().eval(), torch.randn(1, 5, 8)
    rec = mod.prune_record(model, x, prune, ratio=0.5, skip_incompatible=True)
    assert rec["outcome"] == "partial" and rec["skipped"] >= 1 and "reshape" in rec["error"]
    assert rec["params"][1] < rec["params"][0]  # the MLP hidden units went


def test_a_refusal_and_a_crash_count_as_nothing_removed_with_the_error_head(bench):
    mod, _ = bench
    model, x = _cnn(), torch.randn(1, 3, 8, 8)
    before = _state(model)

    def refuse(m, x, **kw):
        raise UnsupportedOpError("op 'lstm' in module 'rnn' has no rule\nsecond line")

    def crash(m, x, **kw):
        raise RuntimeError("boom")

    r = mod.prune_record(model, x, refuse)
    assert (
        r["outcome"] == "refused"
        and r["error"] == "UnsupportedOpError: op 'lstm' in module 'rnn' has no rule"
    )
    assert r["params"][0] == r["params"][1] and r["macs"][0] == r["macs"][1] > 0
    c = mod.prune_record(model, x, crash)
    assert (
        c["outcome"] == "failed" and c["error"] == "RuntimeError: boom" and c["params"][0] == c["params"][1]
    )
    assert _unchanged(model, before)


def _rec(fam: str, outcome: str, params: list[int], macs: list[int], skipped: int = 0) -> dict:
    return {
        "family": fam,
        "outcome": outcome,
        "params": params,
        "macs": macs,
        "skipped": skipped,
        "error": "",
    }


def test_the_table_lists_only_changed_models_and_counts_and_medians_over_all(bench):
    mod, _ = bench
    before = {
        "a": _rec("fa", "pass", [100, 80], [1000, 700]),
        "b": _rec("fb", "partial", [100, 90], [1000, 900], skipped=3),
        "c": _rec("fc", "refused", [100, 100], [1000, 1000]),
        "e": _rec("fe", "pass", [100, 50], [1000, 500]),
    }
    mid = {**before, "b": _rec("fb", "pass", [100, 70], [1000, 600])}
    after = {
        **mid,
        "c": _rec("fc", "pass", [100, 60], [1000, 500]),
        "e": _rec("fe", "pass", [100, 56], [1000, 500]),
        "d": _rec("fd", "pass", [100, 50], [1000, 500]),  # not in every run: not compared
    }
    text = mod.table({"before": before, "mid": mid, "after": after})
    rows = [
        line for line in text.splitlines() if line.startswith(("| fa:", "| fb:", "| fc:", "| fd:", "| fe:"))
    ]
    assert [r.split("|")[1].strip() for r in rows] == ["fb: b", "fc: c", "fe: e"]
    assert (
        "| partial (3 left whole) → pass → pass | 10.0% | 30.0% | 30.0% | 10.0% | 40.0% | 40.0% |" in rows[0]
    )
    assert "mid vs before: 1 models prune more parameters, 3 the same, 0 fewer." in text
    assert "after vs before: 2 models prune more parameters, 1 the same, 1 fewer." in text
    # params removed: before 20/10/0/50 -> median 15%, mid 20/30/0/50 -> 25%, after 20/30/40/44 -> 35%;
    # pooled 80/400, 100/400, 134/400
    assert "| median per model | 15.0% | 25.0% | 35.0% |" in text
    assert "| pooled (sum) | 20.0% | 25.0% | 33.5% |" in text
    assert "outcomes before: partial 1, pass 2, refused 1" in text and "outcomes after: pass 4" in text


def test_each_record_is_credited_to_the_commit_it_was_measured_with(bench):
    mod, _ = bench
    models = {n: {"commit": "a" * 40} for n in ("m1", "m2", "m3")}
    assert mod.commits(models, {}) == "`aaaaaaa`"
    models["m2"]["commit"] = "b" * 40
    del models["m3"]["commit"]  # measured before per-record commits: the run's source
    assert mod.commits(models, {"commit": "a" * 40}) == "`aaaaaaa` for 2 models; `bbbbbbb` for m2"

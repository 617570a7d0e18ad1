"""Structured allocations beyond uniform/global: per-group loss sensitivity, and isomorphic pruning (one
ranking per class of structurally identical groups, one ratio shared by the classes)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.allocation.isomorphic import isomorphic_classes, isomorphic_removal
from secateur.allocation.sensitivity import sensitivity_sparsities
from secateur.analysis import count_macs
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph
from secateur.pruners.channel import ChannelPruner
from secateur.zoo import create_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# -- sensitivity ------------------------------------------------------------------------------------------
class TwoBranch(nn.Module):
    """``a2(relu(a1 x)) + b2(relu(b1 x))``: two hidden groups of 16 units that meet only at the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.b1, self.b2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a2(F.relu(self.a1(x))) + self.b2(F.relu(self.b1(x)))


def sensitive_a() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Branch a carries the function (its output weights x5), branch b barely matters (x0.01); labels are the
    dense model's own predictions, so removing a's units costs loss and removing b's almost none."""
    torch.manual_seed(0)
    model = TwoBranch()
    with torch.no_grad():
        model.a2.weight.mul_(5.0)
        model.b2.weight.mul_(0.01)
        x = torch.randn(256, 8)
        y = model(x).argmax(1)
    return model, (x, y)


def removed_by_layer(pruner: ChannelPruner, removal: dict) -> dict[str, int]:
    return {pruner.graph.groups[gi].members[0].module: len(r) for gi, r in removal.items()}


def test_sensitivity_prunes_the_sensitive_group_less_and_meets_the_target():
    model, data = sensitive_a()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = ChannelPruner(
        model, data[0][:4], schedule=0.5, criterion="l1", allocation="sensitivity", data=data
    )
    baseline, curves = pruner._sensitivity(pruner.scores())
    by_name = {pruner.graph.groups[gi].members[0].module: c for gi, c in curves.items()}
    assert all(by_name["a1"][f] > by_name["b1"][f] for f in (0.25, 0.5, 0.75))  # measured: a is sensitive
    counts = removed_by_layer(pruner, pruner.select(0.5))
    assert counts["a1"] + counts["b1"] >= 16  # half of the 32 prunable units
    assert counts["a1"] < counts["b1"]
    uniform = ChannelPruner(model, data[0][:4], schedule=0.5, criterion="l1", allocation="uniform")
    assert removed_by_layer(uniform, uniform.select(0.5)) == {"a1": 8, "b1": 8}
    # the sweep left the model as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a MAC target is reached too, with the same preference
    macs = ChannelPruner(
        model, data[0][:4], schedule=0.4, criterion="l1", allocation="sensitivity", target="macs", data=data
    )
    rm = macs.select(0.4)
    assert macs.cost.state(rm).removed_fraction() >= 0.4 - 1e-9
    got = removed_by_layer(macs, rm)
    assert got["a1"] < got["b1"]
    macs.prune_to(0.4)
    assert count_macs(macs.finalize(), data[0][:1])["macs"] > 0  # compacts under the oracle


def test_the_sweep_does_not_feed_a_data_dependent_criterion():
    """Wanda-sp records input statistics in forward hooks: the sweep's forward passes on its copies must not
    reach them (scores before and after the sweep are equal)."""
    model, data = sensitive_a()
    pruner = ChannelPruner(
        model, data[0][:4], schedule=0.5, criterion="wanda_sp", allocation="sensitivity", data=data
    )
    before = pruner.scores()
    pruner._sensitivity(before)
    after = pruner.scores()
    assert before.keys() == after.keys() and all(np.array_equal(before[g], after[g]) for g in before)
    pruner.close()


def test_sensitivity_needs_data():
    model, data = sensitive_a()
    with pytest.raises(ConfigError, match=r"allocation='sensitivity' needs data="):
        ChannelPruner(model, data[0][:4], schedule=0.5, allocation="sensitivity")


def test_interpolated_sensitivity_sparsities_follow_the_running_max_line():
    base = 1.0  # metric: higher is better; deficits 0.1, 0.3, (0.2 -> running max 0.3); worst of sweep 0.5
    sweep = {
        "one": {0.25: base - 0.1, 0.5: base - 0.3, 0.75: base - 0.2},
        "two": {0.25: base, 0.5: base, 0.75: base - 0.5},
    }
    at = lambda tol: sensitivity_sparsities(sweep, base, tol, interpolate=True)  # noqa: E731
    assert at(0.2)["one"] == pytest.approx(0.25 + 0.5 * 0.25)
    assert at(0.35)["one"] == pytest.approx(0.75 + 0.25 * 0.25)  # past 0.75: up to the worst, 0.5, at 1.0
    assert at(0.2)["two"] == pytest.approx(0.5 + 0.4 * 0.25)
    assert at(0.6) == {"one": 1.0, "two": 1.0} and at(0.0)["one"] == 0.0
    # the plain rule (unchanged) takes the largest swept point within tolerance, 0.75, though 0.5 was not
    assert sensitivity_sparsities(sweep, base, 0.2) == {"one": 0.75, "two": 0.5}
    rng = np.random.default_rng(0)
    for _ in range(20):  # monotone in the tolerance, whatever the curves
        sw = {i: {f: float(v) for f, v in zip((0.2, 0.5, 0.8), rng.normal(size=3))} for i in range(3)}
        tols = np.sort(rng.uniform(0, 3, 8))
        vals = [sensitivity_sparsities(sw, 0.0, float(t), interpolate=True) for t in tols]
        assert all(vals[j][i] <= vals[j + 1][i] + 1e-12 for j in range(7) for i in range(3))


# -- isomorphic -------------------------------------------------------------------------------------------
def vit() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("vit_tiny", depth=2, dim=32, num_heads=4).eval(), torch.randn(2, 1, 28, 28)


def kinds(model: nn.Module, graph: DependencyGraph, cls: list[int]) -> set[str]:
    return {graph.groups[gi].members[0].name.split(".")[-2] for gi in cls}


def test_isomorphic_classes_of_a_vit_bert_and_cnn():
    model, x = vit()
    g = DependencyGraph.build(model, x)
    ids = [gi for gi, gr in enumerate(g.groups) if gr.n_prunable]
    classes = isomorphic_classes(model, g, ids)
    assert [kinds(model, g, c) for c in classes] == [{"qkv"}, {"fc1"}] and [len(c) for c in classes] == [2, 2]

    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48
    )
    bert = transformers.BertModel(cfg).eval()
    gb = DependencyGraph.build(bert, {"input_ids": torch.randint(0, 50, (2, 8))})
    ids = [gi for gi, gr in enumerate(gb.groups) if gr.n_prunable]
    classes = isomorphic_classes(bert, gb, ids)
    assert [kinds(bert, gb, c) for c in classes] == [{"query"}, {"dense"}]
    assert [len(c) for c in classes] == [3, 3]
    assert all(gb.groups[gi].members[0].name.split(".")[-3] == "intermediate" for gi in classes[1])

    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 12, 3), nn.ReLU(), nn.Conv2d(12, 8, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    gc = DependencyGraph.build(cnn, torch.randn(1, 3, 12, 12))
    # conv->conv groups of 8 and 12 channels share a structure (sizes are not part of it); conv->linear not
    assert isomorphic_classes(cnn, gc, [0, 1, 2]) == [[0, 1], [2]]


def test_isomorphic_ranks_within_each_class_and_shares_the_ratio():
    """Heads score about 10, MLP neurons below 1: one global ranking would take only neurons. Isomorphic
    removes half of each class, each by its own ranking across blocks (block 0's heads score lowest, so it
    loses three heads and block 1 one: not a per-group uniform split)."""
    model, x = vit()
    rng = np.random.default_rng(0)
    head_scores = {0: [10.0, 10.1, 10.2, 13.0], 1: [10.05, 12.0, 12.1, 12.2]}
    mlp_scores = {0: rng.random(64), 1: rng.random(64) + 0.3}

    def crit(group, m):
        block = int(group.members[0].name.split(".")[1])
        return np.array(head_scores[block]) if group.n_units == 4 else mlp_scores[block]

    iso = ChannelPruner(model, x, schedule=0.5, criterion=crit, allocation="isomorphic", normalize="none")
    rm = iso.select(0.5)
    groups = iso.graph.groups

    def by_block(n: int) -> dict[int, np.ndarray]:
        block = {gi: int(groups[gi].members[0].name.split(".")[1]) for gi in rm}
        return {block[gi]: r for gi, r in rm.items() if groups[gi].n_units == n}

    heads, mlp = by_block(4), by_block(64)
    assert heads[0].tolist() == [0, 1, 2] and heads[1].tolist() == [0]
    # the MLP class: exactly the 64 lowest of its 128 scores, wherever they are
    allv = np.concatenate([mlp_scores[0], mlp_scores[1]])
    lowest = set(np.argsort(allv, kind="stable")[:64].tolist())
    assert set(mlp[0].tolist()) | {64 + u for u in mlp[1].tolist()} == lowest
    assert len(mlp[0]) != len(mlp[1])  # a ranking across blocks, not a per-layer ratio
    glob = ChannelPruner(model, x, schedule=0.5, criterion=crit, allocation="global", normalize="none")
    assert sum(len(r) for gi, r in glob.select(0.5).items() if groups[gi].n_units == 4) == 0
    # scores of one class never move another class's removal
    classes = iso.classes
    base = isomorphic_removal(groups, iso.scores(), iso.removed, classes, 0.5)
    shifted = {gi: (s - 100.0 if gi in classes[0] else s) for gi, s in iso.scores().items()}
    moved = isomorphic_removal(groups, shifted, iso.removed, classes, 0.5)
    assert all(np.array_equal(base[gi], moved[gi]) for gi in base)


def test_isomorphic_mac_target_is_reached_and_compacts():
    model, x = vit()
    macs0 = count_macs(model, x)["macs"]
    pruner = ChannelPruner(model, x, schedule=0.3, criterion="l2", allocation="isomorphic", target="macs")
    pruner.prune_to(0.3)
    assert pruner.sparsity() >= 0.3 - 1e-9
    out = pruner.finalize()  # the oracle checks masked == compacted
    assert count_macs(out, x)["macs"] < macs0

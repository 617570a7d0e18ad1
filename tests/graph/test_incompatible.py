"""Models whose own code computes a shape from another dimension. Where the trace can follow the integers
(graph.symbolic), the graph ties the groups together or freezes them, by name; where it cannot (a literal,
an integer it lost track of), removing whole heads breaks the model's reshape and secateur refuses by name
(group, op, module, and the file and line) with the model unchanged, or, when asked, leaves those groups
whole and prunes the rest exactly. A wrong op rule is caught by the oracle and named."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.compact import check_equivalence, mask_model
from secateur.errors import CompactionError, GraphError, IncompatibleGroupError
from secateur.graph import DependencyGraph
from secateur.pruners.oneshot import prune_channels


class DerivedHeadWidth(nn.Module):
    """Window attention as torchvision writes it: head width from the input width, not from qkv.
    ``untracked=True``: the input width goes through ``int()``, where the trace loses track of it."""

    def __init__(self, c: int = 8, heads: int = 4, hidden: int = 16, untracked: bool = False) -> None:
        super().__init__()
        self.num_heads = heads
        self.untracked = untracked
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if self.untracked:
            c = int(c)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, -1))
        return x + self.fc2(F.relu(self.fc1(x)))


def _model(untracked: bool = True) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(DerivedHeadWidth(untracked=untracked), nn.LayerNorm(8)).eval(), torch.randn(2, 5, 8)


def _state(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_a_head_width_derived_from_the_input_ties_the_heads_to_the_input_width():
    """``c // self.num_heads`` with ``c`` the block's input width: the heads can only go with input channels.
    Here the input is the model's input (no channel identity), so the graph freezes the heads and says
    where; the MLP is pruned, exactly."""
    model, x = _model(untracked=False)
    graph = DependencyGraph.build(model, x)
    heads = graph.group_of("0.qkv.weight", 0)
    assert heads.n_units == 4 and heads.n_prunable == 0
    assert any(
        "op 'reshape' in module '0' (DerivedHeadWidth) at" in r and "test_incompatible.py" in r
        for r in heads.reasons
    ), heads.reasons
    ref = copy.deepcopy(model)
    _, plan = prune_channels(model, x, sparsity=0.5, criterion="random")
    blk = model[0]
    assert blk.num_heads == 4 and blk.qkv.out_features == 24 and blk.fc1.out_features == 8
    check_equivalence(mask_model(ref, plan), model, x)


def test_a_head_width_the_trace_cannot_follow_is_a_named_refusal_and_the_model_is_unchanged():
    model, x = _model()
    before = _state(model)
    with pytest.raises(IncompatibleGroupError) as ei:
        prune_channels(model, x, sparsity=0.5, criterion="random")
    msg = str(ei.value)
    # the op and the module where the size goes wrong, the line, the formula and the group at fault
    assert "op 'reshape' in module '0' (DerivedHeadWidth)" in msg
    assert "test_incompatible.py:" in msg and "8 // 0.num_heads evaluates to 4" in msg
    assert "group 0.qkv" in msg
    assert "skip_incompatible=True" in msg
    # a refusal in both families of errors: graph (cannot prune this) and compaction (rolled back)
    assert isinstance(ei.value, GraphError) and isinstance(ei.value, CompactionError)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model[0].num_heads == 4 and model[0].qkv.out_features == 24 and model[0].fc1.out_features == 16


def test_skip_incompatible_leaves_those_groups_whole_and_prunes_the_rest_exactly():
    model, x = _model()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, plan = prune_channels(model, x, sparsity=0.5, criterion="random", skip_incompatible=True)
    assert any("left 1 group(s) whole" in str(r.message) for r in w)
    assert list(plan["skipped"]) == [g for g in plan["skipped"] if g.startswith("0.qkv")]
    assert "op 'reshape'" in next(iter(plan["skipped"].values()))
    blk = model[0]
    assert blk.num_heads == 4 and blk.qkv.out_features == 24  # heads kept whole
    assert blk.fc1.out_features == 8 and blk.fc2.in_features == 8  # the MLP lost half its hidden units
    # exact: the pruned model equals the reference with the same units masked
    check_equivalence(mask_model(ref, plan), model, x)


class Roll(nn.Module):
    """torch.roll along channels: channel i meets channel i - 1, so removing channels changes the result."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.roll(self.a(x), 1, dims=1))


def test_a_wrong_user_rule_is_caught_by_the_oracle_and_named(monkeypatch):
    """A user registers a wrong rule (roll treated as per-channel): the compacted outputs differ from the
    masked ones; the group is named, the model unchanged."""
    from secateur.graph import identity_rule, rules

    monkeypatch.setitem(rules.RULES, "roll", identity_rule)
    torch.manual_seed(0)
    model, x = Roll().eval(), torch.randn(1, 3, 4, 4)
    before = _state(model)
    with pytest.raises(IncompatibleGroupError, match=r"group a\.weight.*differs from masked output"):
        prune_channels(model, x, sparsity=0.25, criterion="l1")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.a.out_channels == 8


def test_a_model_with_nothing_prunable_is_a_named_refusal():
    """Every width is normalised over channels by inline code (as MobileNetV5's RmsNorm2d does): nothing
    can be removed exactly, so prune_channels says why instead of returning the model unchanged."""

    class InlineRms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y / y.pow(2).mean(1, keepdim=True).add(1e-6).sqrt())

    model, x = InlineRms().eval(), torch.randn(1, 3, 4, 4)
    with pytest.raises(GraphError, match=r"nothing to prune in InlineRms: .*reduction over a channel dim"):
        prune_channels(model, x, sparsity=0.3)
    assert model.a.out_channels == 8


def test_protect_with_a_prebuilt_graph_is_refused():
    """protect shapes the graph when it is built; passing both would silently ignore it."""
    from secateur.errors import ConfigError
    from secateur.graph import DependencyGraph

    model, x = _model()
    g = DependencyGraph.build(model, x)
    with pytest.raises(ConfigError, match="pass them to DependencyGraph.build"):
        prune_channels(model, x, sparsity=0.3, graph=g, protect=["0.fc1"])
    assert model[0].fc1.out_features == 16


def test_numeric_culprits_are_found_by_halving(monkeypatch):
    """Among 16 groups only the one rolled across channels (wrong user rule) differs from its masked model:
    it alone is named, with far fewer float64 oracle runs than one per group."""
    from secateur.compact import verify
    from secateur.graph import identity_rule, rules

    monkeypatch.setitem(rules.RULES, "roll", identity_rule)

    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(3 if i == 0 else 8, 8, 1) for i in range(16)])
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            for i, c in enumerate(self.convs):
                x = torch.tanh(c(x))  # no dead units: every channel carries signal
                if i == 13:
                    x = torch.roll(x, 1, dims=1)
            return self.head(x)

    calls = []
    real = verify.check_equivalence
    monkeypatch.setattr(verify, "check_equivalence", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model, x = Chain().eval(), torch.randn(2, 3, 4, 4)
    with pytest.raises(IncompatibleGroupError) as ei:
        prune_channels(model, x, sparsity=0.25, criterion="l1")
    named = [ln for ln in str(ei.value).splitlines() if ln.strip().startswith("group ")]
    assert len(named) == 1 and "convs.13.weight" in named[0], named
    assert len(calls) <= 1 + 2 * 4 + 1  # the failing full check, then halving over 16 groups

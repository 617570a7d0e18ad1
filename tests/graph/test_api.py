"""Public behaviour: errors, registry, transactions, inputs/outputs, protection, plans."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from graph_helpers import RTOL, assert_outputs_close, prune_and_check
from torch import nn

import secateur.compact.apply as compact_mod
from secateur.compact import check_equivalence, compact, make_plan, mask_model
from secateur.errors import CompactionError, UnsupportedOpError
from secateur.graph import DependencyGraph, register_rule
from secateur.graph.rules import RULES
from secateur.pruners.oneshot import prune_channels


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc1 = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x, scale: float = 1.0):
        h = F.relu(self.bn(self.conv(x)))
        if h.shape[-1] > 2:  # Python control flow: the executed path is traced
            h = h + self.conv2(h)
        h = h.mean((2, 3)) * scale
        return self.fc2(self.ln(F.gelu(self.fc1(h))))


def _state(m: nn.Module) -> dict:
    sd = {k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()}
    attrs = {
        n: {k: copy.copy(v) for k, v in vars(mod).items() if not k.startswith("_")}
        for n, mod in m.named_modules()
    }
    return {"sd": sd, "attrs": attrs}


def _assert_same(m: nn.Module, before: dict) -> None:
    now = _state(m)
    assert now["sd"].keys() == before["sd"].keys()
    for k, v in before["sd"].items():
        w = now["sd"][k]
        assert w.shape == v.shape and w.dtype == v.dtype and torch.equal(w, v), k
    assert now["attrs"] == before["attrs"]


@pytest.mark.parametrize("fail_at", [1, 4, 9])
def test_injected_failure_leaves_model_bit_identical(monkeypatch, fail_at):
    m = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    g = DependencyGraph.build(m, x)
    removed = {i: np.nonzero(gr.prunable)[0][:2] for i, gr in enumerate(g.groups) if gr.n_prunable > 2}
    plan = make_plan(g, removed)
    before = _state(m)
    real = compact_mod._slice
    calls = {"n": 0}

    def flaky(t, dim, kept):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("injected failure")
        return real(t, dim, kept)

    monkeypatch.setattr(compact_mod, "_slice", flaky)
    with pytest.raises(CompactionError, match="injected failure"):
        compact(m, plan)
    _assert_same(m, before)
    monkeypatch.setattr(compact_mod, "_slice", real)
    compact(m, plan)  # and the same plan then succeeds
    assert m.conv.out_channels < 8


def test_failing_check_rolls_back_attributes_too():
    m = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    g = DependencyGraph.build(m, x)
    removed = {i: [0] for i, gr in enumerate(g.groups) if gr.n_prunable > 1}
    plan = make_plan(g, removed)
    before = _state(m)

    def check(model):
        assert model.conv.out_channels == 7
        raise ValueError("oracle said no")

    with pytest.raises(CompactionError, match="oracle said no"):
        compact(m, plan, check=check)
    _assert_same(m, before)


class WithFFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.mix = nn.Identity()
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        h = torch.fft.fft(h, dim=1).real  # per channel over the sequence dim: channels untouched
        return self.b(h)


def test_unknown_op_raises_named_error_then_registered_rule_fixes_it():
    m = WithFFT()
    x = torch.randn(2, 5, 4)
    saved = {k: RULES.pop(k) for k in ("fft_fft", "real") if k in RULES}  # built in since issue 17
    with pytest.raises(UnsupportedOpError, match=r"op 'fft_fft' in module '<root>' \(WithFFT\)"):
        DependencyGraph.build(m, x)

    def fft_rule(ctx):
        x_, dim = ctx.args[0], ctx.kwargs.get("dim", -1)
        dims = list(ctx.dims(x_))
        ctx.freeze(dims[dim], "fft mixes this dim")
        ctx.set_dims(ctx.out, dims)

    register_rule(torch.fft.fft, fft_rule)
    try:
        register_rule("real", RULES["contiguous"])
        g = DependencyGraph.build(m, x)
        assert g.group_of("a.weight", 0).n_prunable == 8
        prune_and_check(m, x)
    finally:
        RULES.pop("fft_fft", None)
        RULES.update(saved)


def test_unknown_op_names_the_submodule():
    class Inner(nn.Module):
        def forward(self, h):
            return torch.special.i0(h)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.inner = Inner()

        def forward(self, x):
            return self.inner(self.a(x))

    with pytest.raises(UnsupportedOpError, match=r"'special_i0' in module 'inner' \(Inner\)"):
        DependencyGraph.build(M(), torch.randn(2, 3))


def test_no_hooks_left_mode_restored_frozen_params():
    m = Net()
    m.train()
    m.conv2.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 6, 6)
    for device in ("meta", "real"):
        DependencyGraph.build(m, x, device=device)
        for mod in m.modules():
            assert not mod._forward_hooks and not mod._forward_pre_hooks
        assert m.training and not m.conv2.training and m.conv.training
    pruned, plan = prune_channels(m, x, sparsity=0.5, criterion="l1", verify=True)
    assert pruned.conv.out_channels == 4 and not pruned.conv.weight.requires_grad


def test_module_rule_treats_module_as_one_op():
    from secateur.graph import register_module_rule
    from secateur.graph.rules import MODULE_RULES, identity_rule

    class Weird(nn.Module):
        def forward(self, h):
            return torch.special.i0(h) * 0 + h

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.w = Weird()
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.w(self.a(x)))

    register_module_rule(Weird, lambda ctx, mod, args, kwargs, out: identity_rule(ctx))
    try:
        g = DependencyGraph.build(M(), torch.randn(2, 3))
        assert g.group_of("a.weight", 0).n_prunable == 4
    finally:
        MODULE_RULES.pop(Weird)


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    hidden: tuple


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.up = nn.Linear(6, 12)
        self.down = nn.Linear(12, 6)
        self.cls = nn.Linear(6, 3)

    def forward(self, input_ids, mask=None):
        h = self.emb(input_ids)
        if mask is not None:
            h = h * mask[..., None]
        h2 = h + self.down(F.silu(self.up(h)))
        return Out(self.cls(h2[:, 0]), (h, h2))


def test_dict_inputs_dataclass_outputs_and_protect():
    m = DictModel()
    x = {"input_ids": torch.randint(0, 10, (2, 5)), "mask": torch.ones(2, 5)}
    g = DependencyGraph.build(m, x)
    assert not g.group_of("emb.weight", 1).n_prunable  # hidden states are outputs: protected
    assert g.group_of("up.weight", 0).n_prunable == 12
    g2 = DependencyGraph.build(m, x, protect=("up",))
    assert not g2.group_of("up.weight", 0).n_prunable
    assert "protected by the user" in g2.group_of("up.weight", 0).reasons[-1]
    pruned, plan, _, _ = prune_and_check(m, x, ratio=0.25)
    assert pruned.up.out_features == 9
    json.dumps(plan)


def test_round_to_and_plan_is_json():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 32)
            self.b = nn.Linear(32, 2)

        def forward(self, x):
            return self.b(F.relu(self.a(x)))

    m = M()
    x = torch.randn(3, 4)
    pruned, plan = prune_channels(m, x, sparsity=0.3, round_to=8, criterion="random", verify=True)
    assert pruned.a.out_features == 24
    back = json.loads(json.dumps(plan))
    assert back == plan and set(back["tensors"]) == {"a.weight", "a.bias", "b.weight"}
    # the plan alone re-applies to a fresh copy of the architecture
    fresh = M()
    compact(fresh, back)
    assert fresh.a.weight.shape == (24, 4)


def test_never_all_units_and_at_least_one_per_member():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 2)
            self.b = nn.Linear(4, 3)
            self.c = nn.Linear(5, 2)

        def forward(self, x):
            return self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], -1))

    m = M()
    x = torch.randn(3, 4)
    pruned, _ = prune_channels(m, x, sparsity=0.95, criterion="random", verify=True)
    assert pruned.a.out_features >= 1 and pruned.b.out_features >= 1


def test_removing_frozen_units_is_refused():
    m = Net()
    x = torch.randn(2, 3, 6, 6)
    g = DependencyGraph.build(m, x)
    gi = next(i for i, gr in enumerate(g.groups) if gr.n_prunable == 0)
    with pytest.raises(CompactionError, match="not prunable"):
        make_plan(g, {gi: [0]})


def test_oracle_detects_a_wrong_model():
    m = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    other = copy.deepcopy(m)
    with torch.no_grad():
        other.fc2.bias.add_(1e-3)
    with pytest.raises(CompactionError, match="differs"):
        check_equivalence(m, other, x)
    assert check_equivalence(m, copy.deepcopy(m), x) == 0.0


def test_masked_model_equals_compacted_in_train_mode():
    m = Net().train()
    x = torch.randn(4, 3, 6, 6)
    g = DependencyGraph.build(m, x)
    removed = {i: np.nonzero(gr.prunable)[0][::2] for i, gr in enumerate(g.groups) if gr.n_prunable > 1}
    plan = make_plan(g, removed)
    a = mask_model(copy.deepcopy(m), plan)
    b = compact(copy.deepcopy(m), plan)
    # equal up to RTOL (1e-6) of the outputs' own magnitude, in float64: the library's oracle (raises if not),
    # then the same rule computed here, independently
    check_equivalence(a, b, x)
    assert_outputs_close(a, b, x, rtol=RTOL)


def test_a_module_reached_by_two_paths_keeps_its_real_tensors_after_the_meta_trace():
    """timm's CoaT reuses one module under several attribute names; the meta trace swaps each module slot
    once, so no meta tensor is left behind in the user's model, and the shared module is pruned once."""
    torch.manual_seed(0)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
            self.again = self.mlp  # the same module under a second path
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(x + self.mlp(x) + self.again(x))

    m, x = Shared().eval(), torch.randn(3, 4)
    g = DependencyGraph.build(m, x)
    assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
    assert g.group_of("mlp.0.weight", 0).n_prunable == 8
    pruned, plan, _, diff = prune_and_check(m, x, ratio=0.5)
    # diff: the worst relative difference max|a-b| / max(max|a|, max|b|) of the outputs in float64
    assert diff <= RTOL and pruned.again is pruned.mlp and pruned.mlp[0].out_features == 4


def test_prune_channels_prunes_normalised_dims_on_request():
    """A width normalised by a LayerNorm is frozen by default (a named refusal here: nothing else to prune)
    and prunable with prune_normalized=True, exactly (verify runs inside prune_channels)."""
    from secateur.errors import GraphError

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    with pytest.raises(GraphError, match="layer_norm"):
        prune_channels(m, x, sparsity=0.5)
    ref = copy.deepcopy(m)
    _, plan = prune_channels(m, x, sparsity=0.5, criterion="l1", prune_normalized=True)
    assert m[1].normalized_shape == (4,) and m[0].out_features == 4 and m[3].in_features == 4
    kept = plan["tensors"]["1.weight"]["0"]
    # the formula on the dense model's kept channels, in float64 on both sides, judged against the outputs'
    # magnitude (the oracle's rule: max|a - b| <= RTOL * max(max|a|, max|b|))
    m, ref, x = m.double(), ref.double(), x.double()
    h = ref[0](x)[:, kept]
    expect = ref[3].weight[:, kept] @ F.gelu(F.layer_norm(h, (4,), ref[1].weight[kept], ref[1].bias[kept])).T
    got, want = m(x).detach(), (expect.T + ref[3].bias).detach()
    assert float((got - want).abs().max()) <= RTOL * max(float(got.abs().max()), float(want.abs().max()))

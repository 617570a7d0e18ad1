"""Untraced code paths: parameterised modules a trace never reached are refused by name (default), traced by
several example inputs (ExampleInputs, couplings merged), or kept whole with the channels around them frozen
(untraced="freeze"). Every comparison of outputs is in float64 (masked original vs compacted)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from secateur._torch import call_model
from secateur.compact import mask_model
from secateur.errors import ConfigError, GraphError, UntracedModuleError, UntracedModuleWarning
from secateur.graph import DependencyGraph, ExampleInputs
from secateur.pruners.oneshot import prune_channels


class Gate(nn.Module):
    """Branch ``a`` for inputs with a positive mean, branch ``b`` (its own two convs) otherwise."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c, 12, 1), nn.ReLU(), nn.Conv2d(12, c, 1))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.a(h)
        return self.b(h)


class BranchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.gate = Gate(8)
        self.body = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate(self.stem(x), x)
        return self.head(self.body(h).mean((2, 3)))


def _net_and_inputs() -> tuple[BranchNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = BranchNet().eval()
    xa = torch.randn(2, 3, 8, 8).abs() + 0.1  # mean > 0: branch a
    return model, xa, -xa  # mean < 0: branch b


def _float64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def _assert_exact(original: nn.Module, pruned: nn.Module, plan: dict, x: torch.Tensor) -> None:
    """The oracle on ``x``: compacted == masked original, float64, relative to the output's magnitude."""
    want = _float64(mask_model(copy.deepcopy(original), plan), x)
    got = _float64(pruned, x)
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_untraced_branch_is_refused_by_name_and_the_model_is_untouched():
    model, xa, xb = _net_and_inputs()
    before = _state(model)
    with pytest.raises(UntracedModuleError) as info:
        DependencyGraph.build(model, xa)
    msg = str(info.value)
    assert isinstance(info.value, GraphError)
    assert "'gate.b.0' (Conv2d)" in msg and "'gate.b.2' (Conv2d)" in msg
    assert "gate.a" not in msg  # the traced branch is not named
    assert "ExampleInputs" in msg and "untraced='freeze'" in msg  # the two remedies
    assert "op 'bool' in module 'gate' (Gate)" in msg  # where the data-dependent branch was decided
    with pytest.raises(UntracedModuleError):  # the same refusal through the one-call entry point
        prune_channels(model, xb.neg(), sparsity=0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the other input reaches b but not a: the refusal names a's modules (b.1 is a ReLU: no parameters)
    with pytest.raises(UntracedModuleError, match=r"'gate\.a\.0' \(Conv2d\), 'gate\.a\.1' \(BatchNorm2d\)"):
        DependencyGraph.build(model, xb)


def test_several_example_inputs_merge_both_branches_and_the_pruned_model_is_exact_on_both():
    model, xa, xb = _net_and_inputs()
    original = copy.deepcopy(model)
    graph = DependencyGraph.build(model, ExampleInputs([xa, xb]))
    # the union-find coupled what each trace saw: body.0 reads the output of a (trace 1) and of b (trace 2),
    # and the stem feeds both branches
    g = graph.group_of("gate.a.0.weight", 0)
    assert g is graph.group_of("gate.b.2.weight", 0) and g is graph.group_of("body.0.weight", 1)
    assert graph.group_of("stem.0.weight", 0) is graph.group_of("gate.b.0.weight", 1)
    assert graph.group_of("gate.b.0.weight", 0).n_prunable == 12
    pruned, plan = prune_channels(model, xa, sparsity=0.5, graph=graph, verify=True)
    assert pruned.gate.b[0].out_channels == 6 and pruned.gate.b[2].in_channels == 6
    assert pruned.stem[0].out_channels == 4 and pruned.gate.b[0].in_channels == 4
    for x in (xa, xb):  # both branches run and equal the masked original
        _assert_exact(original, pruned, plan, x)


def test_freeze_keeps_the_untraced_branch_whole_and_the_pruned_model_runs_it_exactly():
    model, xa, xb = _net_and_inputs()
    original = copy.deepcopy(model)
    b_before = _state(model.gate.b)
    kept = r"'gate\.b\.0' \(Conv2d\), 'gate\.b\.2' \(Conv2d\) kept whole"
    with pytest.warns(UntracedModuleWarning, match=kept):
        graph = DependencyGraph.build(model, xa, untraced="freeze")
    frozen = graph.group_of("stem.0.weight", 0)  # read by gate: frozen, with the reason
    assert frozen.n_prunable == 0 and "untraced" in " ".join(frozen.reasons)
    assert graph.group_of("gate.a.0.weight", 0).n_prunable == 0  # made inside gate: frozen too
    assert graph.group_of("body.0.weight", 0).n_prunable == 16  # after gate returned: prunable
    pruned, plan = prune_channels(model, xa, sparsity=0.5, graph=graph, verify=True)
    assert pruned.body[0].out_channels == 8
    assert all(torch.equal(v, b_before[k]) for k, v in pruned.gate.b.state_dict().items())
    for x in (xa, xb):  # branch b, never traced, still runs and is exact
        _assert_exact(original, pruned, plan, x)


class RootBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) if x.sum() > 0 else self.b(x)
        return self.head(torch.relu(self.mid(torch.relu(h))).mean((2, 3)))


def test_freeze_when_the_root_holds_the_branch_leaves_nothing_prunable_and_says_why():
    torch.manual_seed(0)
    model = RootBranch().eval()
    x = torch.randn(2, 3, 6, 6).abs()
    with pytest.warns(UntracedModuleWarning):
        graph = DependencyGraph.build(model, x, untraced="freeze")
    assert not graph.prunable_groups()
    with pytest.raises(GraphError, match="nothing to prune.*untraced modules 'b' \\(Conv2d\\)"):
        prune_channels(model, x, sparsity=0.5, graph=graph)
    # both inputs: every channel is traced and prunable again
    graph = DependencyGraph.build(model, ExampleInputs([x, -x]))
    assert graph.group_of("a.weight", 0) is graph.group_of("b.weight", 0)
    assert graph.group_of("mid.weight", 0).n_prunable == 8


class Functional(nn.Module):
    """``proj`` is never called: its weight is used through F.linear, and ``unused`` has no parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 10)
        self.proj = nn.Linear(10, 3)
        self.unused = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.relu(self.fc(x)), self.proj.weight, self.proj.bias)


def test_modules_whose_parameters_are_read_without_calling_them_are_traced():
    torch.manual_seed(0)
    graph = DependencyGraph.build(Functional(), torch.randn(2, 6))
    assert graph.group_of("proj.weight", 1) is graph.group_of("fc.weight", 0)


class AuxHead(nn.Module):
    """An auxiliary head used only in training (as in GoogLeNet / Inception v3)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.aux = nn.Linear(8, 2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.body(x)).mean((2, 3))
        if self.training:
            return self.head(h), self.aux(h)
        return self.head(h)


def test_a_training_only_head_is_named_in_eval_mode_and_traced_in_train_mode():
    model = AuxHead().eval()
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(UntracedModuleError, match=r"'aux' \(Linear\).*train mode"):
        DependencyGraph.build(model, x)
    graph = DependencyGraph.build(model.train(), x)
    assert graph.group_of("aux.weight", 1) is graph.group_of("body.weight", 0)
    assert model.training  # the trace leaves the mode as it found it


def test_example_inputs_validation_and_calls():
    with pytest.raises(ConfigError, match="at least one"):
        ExampleInputs([])
    with pytest.raises(ConfigError, match="nested"):
        ExampleInputs([ExampleInputs([torch.zeros(1)])])
    with pytest.raises(ConfigError, match="untraced must be one of"):
        DependencyGraph.build(nn.Linear(2, 2), torch.zeros(1, 2), untraced="ignore")
    lin = nn.Linear(3, 2)
    xs = ExampleInputs([torch.ones(1, 3), (torch.zeros(4, 3),), {"input": torch.ones(2, 3)}])
    outs = call_model(lin, xs)
    assert [tuple(o.shape) for o in outs] == [(1, 2), (4, 2), (2, 2)]
    assert len(xs.map(lambda t: t)) == 3 and "3 inputs" in repr(xs)


def test_one_input_wrapped_gives_the_same_graph_as_the_input_itself():
    model, xa, _ = _net_and_inputs()
    model.gate = model.gate.a  # no branch: Gate replaced by its branch a (takes one input)
    model.forward = lambda x: model.head(model.body(model.gate(model.stem(x))).mean((2, 3)))
    one = DependencyGraph.build(model, xa)
    wrapped = DependencyGraph.build(model, ExampleInputs([xa]))
    assert [(g.name, g.n_units, g.n_prunable) for g in one.groups] == [
        (g.name, g.n_units, g.n_prunable) for g in wrapped.groups
    ]


def test_freeze_is_silent_when_every_module_is_traced():
    model, xa, xb = _net_and_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = DependencyGraph.build(model, ExampleInputs([xa, xb]), untraced="freeze")
    b = DependencyGraph.build(model, ExampleInputs([xa, xb]))
    assert [g.n_prunable for g in a.groups] == [g.n_prunable for g in b.groups]

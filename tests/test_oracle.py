"""The equivalence oracle: NaN/Inf are never equal, tolerances are relative to each output's magnitude,
and non-finite example inputs are refused by name before anything changes.

The rule (secateur.compact.check_equivalence), per floating output tensor pair ``(a, b)`` in float64: both
finite, and ``max|a - b| <= atol + rtol * max(max|a|, max|b|)`` (defaults atol 0, rtol 1e-6).
The models here compute with exact float64 elementwise operations, so the differences are known exactly
(no reductions whose summation order could vary).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secateur import ChannelPruner, prune_channels
from secateur.compact import (
    ATOL,
    RTOL,
    NonFiniteOutputError,
    OutputDiff,
    check_equivalence,
    make_plan,
    mask_model,
    max_abs_diff,
    output_diffs,
    require_finite_inputs,
)
from secateur.compact.verify import verified_compact
from secateur.errors import CompactionError, ConfigError
from secateur.graph import DependencyGraph, ExampleInputs


class Affine(nn.Module):
    """``y = x * scale + shift`` elementwise, with fixed float buffers (no summation)."""

    def __init__(self, scale: float, shift: float = 0.0, poison: float | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float64))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float64))
        self.poison = poison

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.scale + self.shift
        if self.poison is not None:
            y = torch.cat([y[:1] * 0 + self.poison, y[1:]])  # first element replaced
        return y


class Assoc(nn.Module):
    """``scale * ((x0 + x1) + x2)`` or ``scale * (x0 + (x1 + x2))``: the same sum, rounded differently."""

    def __init__(self, scale: float, left: bool) -> None:
        super().__init__()
        self.scale, self.left = scale, left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x[0] + x[1]) + x[2] if self.left else x[0] + (x[1] + x[2])
        return s * self.scale


X = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)


def test_constants_are_the_documented_rule():
    assert (ATOL, RTOL) == (0.0, 1e-6)
    d = OutputDiff(index=0, shape=(1,), max_abs=1.0, scale=4.0)
    assert d.within(rtol=0.25, atol=0.0)  # 1 <= 0 + 0.25 * 4: on the bound passes
    assert not d.within(rtol=0.2499, atol=0.0)
    assert d.within(rtol=0.0, atol=1.0) and not d.within(rtol=0.0, atol=0.999)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_outputs_are_never_equal_even_to_themselves(poison):
    m = Affine(1.0, poison=poison)
    # the old oracle took a Python max over |a - b| and dropped the NaN: it reported 0.0 here
    assert torch.isnan(torch.tensor(max_abs_diff(m, copy.deepcopy(m), X)))
    with pytest.raises(CompactionError, match="not finite .*in the masked model.*in the compacted model"):
        check_equivalence(m, copy.deepcopy(m), X)
    kind = "NaN" if poison != poison else "Inf"
    with pytest.raises(CompactionError, match=f"{kind} in the compacted model"):
        check_equivalence(Affine(1.0), m, X)  # only one side
    (d,) = output_diffs(Affine(1.0), m, X)
    assert d.nonfinite == (None, kind) and not d.within(rtol=1.0, atol=1e300)


def test_tiny_outputs_that_differ_relatively_fail():
    a, b = Affine(1e-10), Affine(1e-10 * (1 + 1e-3))  # outputs ~3e-10 that differ by 0.1%
    diff = max_abs_diff(a, b, X)
    assert diff < 1e-6  # an absolute tolerance of 1e-6 would have passed them
    with pytest.raises(CompactionError, match=r"max abs diff 3e-13 > 0 \+ 1e-06 \* 3e-10"):
        check_equivalence(a, b, X)
    # the same models within their own rounding pass
    check_equivalence(a, Affine(1e-10), X)


def test_large_outputs_with_float64_rounding_pass():
    x = torch.tensor([1.0, 2.0**-53, 2.0**-53], dtype=torch.float64)
    a, b = Assoc(1e12, left=True), Assoc(1e12, left=False)
    diff = max_abs_diff(a, b, x)
    # the sums differ by one ulp of 1 (2**-52); times 1e12, rounded to the ulp of 1e12 (2**-13)
    assert diff == 2.0**-12
    assert diff > 1e-6  # an absolute tolerance of 1e-6 would have failed them
    assert check_equivalence(a, b, x) == diff
    with pytest.raises(CompactionError):  # but a tolerance far tighter than rounding still fails
        check_equivalence(a, b, x, rtol=1e-17)


def test_rule_is_symmetric_and_per_output_tensor():
    class Two(nn.Module):
        def __init__(self, small: float) -> None:
            super().__init__()
            self.big, self.small = Affine(1e6), Affine(small)

        def forward(self, x):
            return self.big(x), self.small(x)

    a, b = Two(1.0), Two(1.0 + 1e-3)
    # the second output differs by 3e-3 on a magnitude of 3: not hidden by the first output's 3e6
    with pytest.raises(CompactionError, match=r"output 1 \(shape \(3,\)\)"):
        check_equivalence(a, b, X)
    with pytest.raises(CompactionError, match=r"output 1"):
        check_equivalence(b, a, X)


def test_structure_and_shape_mismatch_fail():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    assert max_abs_diff(Affine(1.0), Pair(), X) == float("inf")
    with pytest.raises(CompactionError, match="1 and 2 floating output tensors"):
        check_equivalence(Affine(1.0), Pair(), X)

    class Head(nn.Module):
        def forward(self, x):
            return x[:2]

    with pytest.raises(CompactionError, match=r"output 0 has shape \(3,\)"):
        check_equivalence(Affine(1.0), Head(), X)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_example_inputs_are_refused_by_name(bad):
    x = {"pixels": torch.tensor([[1.0, bad]]), "ids": torch.tensor([[1, 2]])}
    with pytest.raises(ConfigError, match=r"example_inputs: input tensor 0 \(shape \(1, 2\)\) holds"):
        require_finite_inputs(x)
    require_finite_inputs({"ids": torch.tensor([[1, 2]]), "pixels": torch.ones(1, 2)})  # fine
    with pytest.raises(ConfigError, match="example_inputs"):
        check_equivalence(Affine(1.0), Affine(1.0), x["pixels"])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)
    ).eval()


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, state: dict) -> bool:
    """Bit-identical (NaN included: the bytes are compared)."""
    now = model.state_dict()
    return now.keys() == state.keys() and all(
        now[k].dtype == v.dtype
        and torch.equal(now[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
        for k, v in state.items()
    )


def test_prune_channels_refuses_nan_example_inputs_before_changing_anything():
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    x[1, 0, 2, 2] = float("nan")
    before = _state(model)
    with pytest.raises(
        ConfigError, match=r"example_inputs: input tensor 0 \(shape \(2, 3, 8, 8\)\) holds NaN"
    ):
        prune_channels(model, x, sparsity=0.5)
    assert _same(model, before) and model[0].out_channels == 8

    graph = DependencyGraph.build(model, torch.randn(2, 3, 8, 8))
    plan = make_plan(graph, {0: [0, 1]})
    with pytest.raises(ConfigError, match="example_inputs"):
        verified_compact(model, plan, x)
    assert _same(model, before) and model[0].out_channels == 8

    pruner = ChannelPruner(model, torch.randn(2, 3, 8, 8), schedule=0.5)
    pruner.step(0)
    masked = _state(model)
    pruner.example_inputs = x
    with pytest.raises(ConfigError, match="example_inputs"):
        pruner.finalize()
    assert _same(model, masked)
    model2, _ = prune_channels(_net(), x, sparsity=0.5, verify=False)  # without the oracle: allowed
    assert model2[0].out_channels == 4


def test_nan_weights_make_verification_fail_and_roll_back():
    model = _net()
    with torch.no_grad():
        model[3].bias[0] = float("nan")  # a layer that is not pruned: the output is NaN in both models
    before = _state(model)
    with pytest.raises(NonFiniteOutputError, match=r"not finite \(NaN in the masked model") as ei:
        prune_channels(model, torch.randn(2, 3, 8, 8), sparsity=0.5)
    assert ei.value.in_reference  # refused at once: no group is blamed for the model's own NaN
    assert _same(model, before) and model[0].out_channels == 8


# ------------------------------------------------------------------------------------------------------
# several example inputs (ExampleInputs): the oracle runs and judges every one of them
# ------------------------------------------------------------------------------------------------------
class Branchy(nn.Module):
    """Branch ``a`` for inputs with a positive mean, branch ``b`` (its own two convs) otherwise: a Python
    ``if`` on the data, so one input reaches one branch only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 12, 1), nn.ReLU(), nn.Conv2d(12, 8, 1))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = self.a(h) if x.mean() > 0 else self.b(h)
        return self.head(h.mean((2, 3)))


def _branchy() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    xa = torch.randn(2, 3, 8, 8).abs() + 0.1  # mean > 0: branch a
    return Branchy().eval(), xa, -xa  # mean < 0: branch b


def test_prune_channels_verifies_on_every_example_input(monkeypatch):
    import secateur.compact.verify as verify

    model, xa, xb = _branchy()
    original = copy.deepcopy(model)
    judged = []
    real = verify.check_equivalence

    def spy(masked, compacted, example_inputs, **kw):
        judged.append(example_inputs)
        return real(masked, compacted, example_inputs, **kw)

    monkeypatch.setattr(verify, "check_equivalence", spy)
    pruned, plan = prune_channels(model, ExampleInputs([xa, xb]), 0.5, verify=True)
    assert pruned.stem.out_channels == 4 and pruned.b[0].out_channels == 6  # both branches pruned
    assert judged and all(isinstance(x, ExampleInputs) and len(x) == 2 for x in judged)
    masked = mask_model(copy.deepcopy(original), plan)
    for x in (xa, xb):  # each branch of the compacted model computes what the masked original does
        assert check_equivalence(masked, pruned, x) <= RTOL * max_abs_output(masked, x)


def max_abs_output(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(copy.deepcopy(model).double()(x.double()).abs().max())


def test_the_oracle_judges_each_example_input_in_float64():
    model, xa, xb = _branchy()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.b[2].bias[0] += 1e-3  # differs on branch b only
    assert check_equivalence(model, other, ExampleInputs([xa, xa * 2])) == 0.0  # branch a twice: equal
    with pytest.raises(CompactionError, match=r"output 1 \(shape \(2, 4\)\)"):  # the second input's output
        check_equivalence(model, other, ExampleInputs([xa, xb]))
    diffs = output_diffs(model, other, ExampleInputs([xb, xa]))
    assert [d.max_abs > 0 for d in diffs] == [True, False]
    bad = xb.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ConfigError, match=r"input tensor 1 \(shape \(2, 3, 8, 8\)\) holds Inf"):
        check_equivalence(model, other, ExampleInputs([xa, bad]))

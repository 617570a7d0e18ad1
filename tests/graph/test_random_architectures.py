"""Property test: on random conv/BN/ReLU/add/mul/concat/chunk/pool/flatten/linear DAGs (random_archs.py),
``prune_channels(..., verify=True)`` either returns a model that equals the masked original in float64 or
raises a named refusal (GraphError / CompactionError subclass). Never a silent mismatch, never a raw
exception. Seeded (derandomize) and small (25 examples, a few seconds); the 500-model run is
``benchmarks/random_architectures.py``."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_archs import build, check_spec, draw_spec, float64_close

import secateur.pruners.oneshot as structured


@st.composite
def specs(draw: st.DrawFn) -> dict:
    return draw_spec(lambda lo, hi: draw(st.integers(lo, hi)))


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(spec=specs(), ratio=st.sampled_from([0.25, 0.5, 0.75]), criterion=st.sampled_from(["random", "l1"]))
def test_random_architecture_prunes_exactly_or_refuses_by_name(spec, ratio, criterion):
    model, x = build(spec)
    assert model(x).shape == (2, spec["classes"])  # the generator's shapes are consistent
    outcome, detail = check_spec(spec, ratio, criterion)
    assert outcome in ("passed", "refused"), f"{outcome}: {detail}\nratio={ratio} spec={json.dumps(spec)}"


def test_most_random_architectures_are_actually_pruned():
    """The property is not vacuous: most generated models prune (not all refused, not all no-ops)."""
    rng = random.Random(1)
    outcomes = []
    for i in range(10):
        spec = draw_spec(rng.randint)
        outcome, removed = check_spec(spec, 0.5, seed=i)
        outcomes.append(outcome == "passed" and int(removed) > 0)
    assert sum(outcomes) >= 6, outcomes


def test_the_check_catches_a_wrong_model_and_a_raw_exception(monkeypatch):
    spec = draw_spec(random.Random(3).randint)
    real = structured.prune_channels

    def wrong(model, x, **kw):
        pruned, plan = real(model, x, **kw)
        with torch.no_grad():
            list(pruned.parameters())[-1].add_(1.0)  # the head's bias: a bug the verify step did not see
        return pruned, plan

    monkeypatch.setattr(structured, "prune_channels", wrong)
    assert check_spec(spec, 0.5)[0] == "mismatch"

    def raw(model, x, **kw):
        raise IndexError("boom")

    monkeypatch.setattr(structured, "prune_channels", raw)
    assert check_spec(spec, 0.5) == ("raw", "IndexError: boom")


@pytest.mark.parametrize(
    "a, b, close",
    [
        ([1.0, 2.0], [1.0, 2.0 + 1e-12], True),
        ([1e-10, 0.0], [1e-10, 1e-17], False),  # relative to the output's magnitude, not 1e-6 absolute
        ([0.0], [0.0], True),
        ([float("nan")], [float("nan")], False),  # NaN is never equal
        ([1.0], [1.0, 1.0], False),
    ],
)
def test_float64_oracle(a, b, close):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert float64_close(a, b)[0] is close

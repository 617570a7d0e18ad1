"""The oracle's copies: ``replica`` is ``deepcopy(model).to(dtype)`` without the intermediate copy, and the
oracle's own float64 masked reference is run once as it is, never touching the user's model.

Values are compared exactly where both sides run the same float64 computation (same weights, same ops).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import secateur.compact.verify as verify
from secateur.compact import check_equivalence, make_plan, mask_model, output_diffs
from secateur.compact.verify import masked_reference, replica, verified_compact
from secateur.graph import DependencyGraph

pytestmark = pytest.mark.usefixtures("one_thread")


class Tied(nn.Module):
    """Conv + BatchNorm (an int64 buffer too) and a linear head whose weight is also reachable as
    ``alias`` (one Parameter under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)
        self.alias = nn.Linear(6, 4, bias=False)
        self.alias.weight = self.head.weight
        self.head.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(h) + self.alias(h)


def _storages(m: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_replica_is_deepcopy_to_dtype_and_shares_nothing(dtype):
    torch.manual_seed(0)
    model = Tied().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = copy.deepcopy(model).to(dtype)
    rep = replica(model, dtype)
    assert rep is not model
    assert rep.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        w = rep.state_dict()[k]
        assert w.dtype == v.dtype and torch.equal(w, v), k  # int64 num_batches_tracked stays int64
    assert rep.alias.weight is rep.head.weight  # tied stays tied
    assert isinstance(rep.head.weight, nn.Parameter) and not rep.head.weight.requires_grad
    assert rep.conv.weight.requires_grad
    assert not _storages(rep) & _storages(model)  # a copy even where the dtype already matches
    with torch.no_grad():
        for p in rep.parameters():
            p.zero_()
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    x = torch.randn(2, 3, 5, 5, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(replica(model, dtype)(x), ref(x))


def _plan(model: nn.Module, x: torch.Tensor) -> dict:
    graph = DependencyGraph.build(model, x)
    removed = {gi: np.array([0, 2]) for gi, g in enumerate(graph.groups) if g.n_prunable >= 4}
    assert removed
    return make_plan(graph, removed)


def test_masked_reference_equals_the_masked_model_in_float64_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.randn(2, 3, 5, 5)
    plan = _plan(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = masked_reference(model, plan)
    old_way = mask_model(copy.deepcopy(model), plan).double()
    assert all(p.dtype == torch.float64 for p in ref.parameters())
    with torch.no_grad():
        assert torch.equal(ref(x.double()), old_way(x.double()))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_oracle_runs_its_own_reference_once_then_copies_it(monkeypatch):
    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.randn(2, 3, 5, 5)
    plan = _plan(model, x)
    copied: list[nn.Module] = []
    real = verify.replica

    def spy(m: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
        copied.append(m)
        return real(m, dtype)

    ref = masked_reference(model, plan)
    monkeypatch.setattr(verify, "replica", spy)
    other = copy.deepcopy(model)
    first = output_diffs(ref, other, x)
    assert copied == [other]  # the reference itself was run, not copied
    second = output_diffs(ref, other, x)
    assert copied == [other, ref, other]  # a second use copies it (its first run may have moved buffers)
    assert [d.max_abs for d in first] == [d.max_abs for d in second]
    user_masked = mask_model(copy.deepcopy(model), plan)
    copied.clear()
    output_diffs(user_masked, other, x)
    assert copied == [user_masked, other]  # a model the caller passes is always copied


def test_verified_compact_still_equals_the_masked_model():
    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.randn(2, 3, 5, 5)
    plan = _plan(model, x)
    masked = mask_model(copy.deepcopy(model), plan)
    verified_compact(model, plan, x)
    assert model.conv.out_channels == 4 and model.bn.num_features == 4
    diff = check_equivalence(masked, model, x)
    with torch.no_grad():
        assert diff <= 1e-6 * float(masked.double()(x.double()).abs().max())

"""Compaction's shortcuts change no result: members sharing a unit map still get their own kept-index lists
in the plan, and attribute writes that change nothing are not journaled (the rollback stays exact)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import secateur.compact.apply as apply_mod
from secateur.compact import Journal, compact, make_plan
from secateur.errors import CompactionError
from secateur.graph import DependencyGraph

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def _plan(m: nn.Module) -> dict:
    g = DependencyGraph.build(m, torch.randn(1, 3, 6, 6))
    (gi,) = [i for i, gr in enumerate(g.groups) if gr.n_prunable]
    return make_plan(g, {gi: np.array([1, 4, 5])})


def test_each_member_gets_its_own_kept_list():
    plan = _plan(_net())
    lists = [kept for dims in plan["tensors"].values() for kept in dims.values()]
    assert len(lists) >= 6 and all(k == [0, 2, 3, 6, 7] for k in lists)
    assert len({id(k) for k in lists}) == len(lists)  # editing one leaves the others as they are
    lists[0].append(99)
    assert all(k == [0, 2, 3, 6, 7] for k in lists[1:])


def test_unchanged_attributes_are_not_journaled_and_rollback_is_exact(monkeypatch):
    m = _net()
    plan = _plan(m)
    written: list[tuple[str, object]] = []
    real = Journal.set_attr

    def spy(self, obj, name, value):
        written.append((name, value))
        real(self, obj, name, value)

    monkeypatch.setattr(Journal, "set_attr", spy)
    compact(copy.deepcopy(m), plan)
    assert ("out_channels", 5) in written and ("num_features", 5) in written and ("in_channels", 5) in written
    assert ("groups", 1) not in written and ("in_channels", 3) not in written  # unchanged: not written
    before = {k: v.clone() for k, v in m.state_dict().items()}
    attrs = [(mod.in_channels, mod.out_channels, mod.groups) for mod in (m[0], m[3])]

    def check(_model):
        raise RuntimeError("refused")

    with pytest.raises(CompactionError, match="rolled back"):
        compact(m, plan, check=check)
    assert [(mod.in_channels, mod.out_channels, mod.groups) for mod in (m[0], m[3])] == attrs
    assert m[1].num_features == 8
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert apply_mod.compact(m, plan) is m and m[0].out_channels == 5

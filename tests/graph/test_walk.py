"""One walk of the module tree (``walk_model``) gives what ``named_parameters``, ``named_buffers`` and
``named_modules`` give, shared modules and tied parameters included; members bound to one atoms array share
one unit map."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from secateur.graph import DependencyGraph
from secateur.graph.tracer import walk_model


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.b = self.a  # one module under two paths
        self.head = nn.Linear(4, 2)
        self.tail = nn.Linear(4, 2, bias=False)
        self.tail.weight = self.head.weight  # one parameter under two names
        self.register_buffer("none_buffer", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.a(x)).mean((2, 3))
        return self.head(h) + self.tail(h)


def test_walk_model_equals_the_named_iterators():
    m = Shared()
    w = walk_model(m)
    assert list(w.params.items()) == list(m.named_parameters(remove_duplicate=False))
    assert list(w.buffers.items()) == list(m.named_buffers(remove_duplicate=False))
    assert list(w.by_path.items()) == list(m.named_modules(remove_duplicate=False))
    assert w.unique == list(m.named_modules())
    assert w.by_path["b"] is w.by_path["a"] and "b" not in dict(w.unique)


def test_members_of_one_atoms_array_share_their_unit_map():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    g = DependencyGraph.build(m, torch.randn(1, 3, 6, 6))
    (grp,) = [gr for gr in g.groups if gr.n_prunable]
    maps = {(mb.name, mb.dim): mb.unit_of for mb in grp.members}
    assert np.array_equal(maps[("0.weight", 0)], np.arange(8))
    # the BatchNorm tensors were bound to the conv output's atoms: one unit map for all of them
    assert maps[("1.weight", 0)] is maps[("1.running_var", 0)] is maps[("1.bias", 0)]
    assert all(np.array_equal(u, np.arange(8)) for u in maps.values())

"""The reused scratch buffers of the pruning step (graph_speed, issue 14) change no value and leak no alias.

``compact.apply._sliced`` writes the first of several gathers into one buffer kept across the tensors of a
compaction, and ``criteria.group.norms.slice_sums_many`` writes ``|w|^p`` into one buffer kept across the
weights of a scoring pass: a fresh large tensor per weight cost its page faults, about as much as the
arithmetic. Checked: the results equal (``torch.equal``) those without a buffer, for every mix of range
views and gathers; a result never shares memory with the buffer, so the next call cannot overwrite it; and
a whole ``prune_channels`` gives the same model with and without the buffers.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import secateur.compact.apply as apply_mod
import secateur.criteria.group.norms as norms_mod
from secateur.pruners.oneshot import prune_channels

pytestmark = pytest.mark.usefixtures("one_thread")


def _kept(n: int, kind: str, g: torch.Generator) -> np.ndarray:
    if kind == "range":
        return np.arange(1, n - 1, dtype=np.int64)
    idx = torch.randperm(n, generator=g)[: n // 2].sort().values
    return idx.numpy().astype(np.int64)


@pytest.mark.parametrize("kinds", list(itertools.product(("range", "gather", None), repeat=3)))
def test_sliced_with_a_scratch_buffer_equals_the_plain_gathers(kinds) -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 8, 5, generator=g)
    dims = {d: _kept(t.shape[d], k, g) for d, k in enumerate(kinds) if k is not None}
    scratch: dict = {}
    got = apply_mod._sliced(t, dims, scratch)
    want = t
    for d, kept in dims.items():
        want = want.index_select(d, torch.from_numpy(kept))
    assert torch.equal(got, want) and got.is_contiguous()
    assert got.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()  # always a fresh tensor
    for buf in scratch.values():
        assert got.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
    # a second call through the same buffer leaves the first result as it was
    kept_first = got.clone()
    apply_mod._sliced(torch.randn(6, 8, 5, generator=g), dims, scratch)
    assert torch.equal(got, kept_first)


@pytest.mark.parametrize("p", [1.0, 2.0, 1.5])
def test_slice_sums_with_a_scratch_buffer_are_bit_identical(p: float) -> None:
    g = torch.Generator().manual_seed(1)
    scratch: dict = {}
    for shape in [(16, 8, 3, 3), (32, 16), (4, 64, 1, 1), (7, 5, 2)]:  # buffer grows and is reused
        t = torch.randn(*shape, generator=g)
        dims = list(range(min(t.dim(), 2)))
        plain = norms_mod.slice_sums_many(t, dims, p)
        reused = norms_mod.slice_sums_many(t, dims, p, scratch)
        assert plain.keys() == reused.keys()
        assert all(torch.equal(plain[d], reused[d]) for d in plain)
    assert scratch and all(b.dim() == 1 for b in scratch.values())


def test_prune_channels_gives_the_same_model_with_and_without_the_buffers(monkeypatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    with_buffers = copy.deepcopy(model)
    prune_channels(with_buffers, x, sparsity=0.5, criterion="l1")
    power_abs, plain = norms_mod._power_abs, copy.deepcopy(model)
    monkeypatch.setattr(norms_mod, "_power_abs", lambda t, p, scratch: power_abs(t, p, None))
    monkeypatch.setattr(apply_mod, "_gather_into", lambda t, d, kept, scratch: apply_mod._slice(t, d, kept))
    prune_channels(plain, x, sparsity=0.5, criterion="l1")
    a, b = with_buffers.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["3.weight"].shape[0] < 32  # something was removed

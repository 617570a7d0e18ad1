"""Coupling rules on small hand-built models."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from graph_helpers import prune_and_check
from torch import nn

from secateur.graph import DependencyGraph


def _group(graph, name, dim):
    g = graph.group_of(name, dim)
    assert g is not None, f"no group for {name}:{dim}"
    return g


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.a(x)
        z = y + self.b(F.relu(y))
        z = z - self.c(z) * 0.5
        return self.head(z.mean((2, 3)))


def test_residual_add_couples_producers():
    m = Residual()
    g = DependencyGraph.build(m, torch.randn(2, 3, 8, 8))
    grp = _group(g, "a.weight", 0)
    names = {(mm.name, mm.dim) for mm in grp.members}
    assert {
        ("a.weight", 0),
        ("b.weight", 0),
        ("c.weight", 0),
        ("b.weight", 1),
        ("c.weight", 1),
        ("head.weight", 1),
    } <= names
    assert grp.n_units == 8 and grp.n_prunable == 8
    prune_and_check(m, torch.randn(2, 3, 8, 8))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 5, 1)
        self.d = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        ya, yb = self.a(x), self.b(x)
        y = torch.cat([ya, yb], dim=1)
        p, q = torch.split(y, 5, dim=1)  # equal halves stay coupled position-wise
        return self.c(y) + self.d(torch.cat([ya, ya], 1)) + p * q


def test_concat_offsets_and_split():
    m = Concat()
    g = DependencyGraph.build(m, torch.randn(1, 3, 4, 4))
    grp = _group(g, "c.weight", 1)
    mem = {mm.name: mm for mm in grp.members}
    # c's input channels 0..3 come from a, 4..9 from b
    ua = mem["a.weight"].unit_of
    assert np.array_equal(mem["c.weight"].unit_of[:4], ua)
    assert np.array_equal(mem["d.weight"].unit_of, np.concatenate([ua, ua]))
    prune_and_check(m, torch.randn(1, 3, 4, 4))


class Depthwise(nn.Module):
    def __init__(self, mult=2):
        super().__init__()
        self.pw = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6 * mult, 3, padding=1, groups=6)
        self.bn2 = nn.BatchNorm2d(6 * mult)
        self.mid = nn.Conv2d(6 * mult, 8, 1)
        self.gc = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.gc(self.mid(F.relu(self.bn2(self.dw(F.relu(self.bn(self.pw(x)))))))))


def test_depthwise_couples_in_out_with_multiplier():
    m = Depthwise(mult=2).eval()
    g = DependencyGraph.build(m, torch.randn(1, 3, 6, 6))
    grp = _group(g, "pw.weight", 0)
    mem = {mm.name: mm for mm in grp.members}
    assert grp.n_units == 6
    assert np.array_equal(mem["dw.weight"].unit_of, np.repeat(mem["pw.weight"].unit_of, 2))
    assert "dw.weight" in mem and "bn2.weight" in mem
    pruned, *_ = prune_and_check(m, torch.randn(1, 3, 6, 6))
    assert pruned.dw.groups == pruned.dw.in_channels


def test_grouped_conv_prunes_whole_groups():
    m = Depthwise(mult=2).eval()
    g = DependencyGraph.build(m, torch.randn(1, 3, 6, 6))
    grp = _group(g, "gc.weight", 0)
    # two groups of the grouped conv: each unit owns 4 output channels (and 4 of mid's)
    assert grp.n_units == 2 and grp.unit_size == 4
    assert ("mid.weight", 0) in {(mm.name, mm.dim) for mm in grp.members}
    pruned, *_ = prune_and_check(m, torch.randn(1, 3, 6, 6), ratio=0.5)
    assert pruned.gc.groups == 1 and pruned.gc.out_channels == 4
    assert g.group_of("gc.weight", 1) is None or not g.group_of("gc.weight", 1).n_prunable


class Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 2 * 3, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc(torch.flatten(F.relu(self.conv(x)), 1))))


def test_flatten_after_conv_maps_channel_to_features():
    m = Flatten()
    g = DependencyGraph.build(m, torch.randn(2, 1, 4, 5))
    grp = _group(g, "conv.weight", 0)
    mem = {mm.name: mm for mm in grp.members}
    # feature f of fc belongs to channel f // (H*W)
    assert np.array_equal(mem["fc.weight"].unit_of, np.repeat(mem["conv.weight"].unit_of, 6))
    pruned, *_ = prune_and_check(m, torch.randn(2, 1, 4, 5), ratio=0.5)
    assert pruned.fc.in_features == pruned.conv.out_channels * 6


class GQA(nn.Module):
    """Grouped-query attention with repeat_interleave and a manual softmax."""

    def __init__(self, e=16, h=4, kv=2):
        super().__init__()
        self.h, self.kv, self.d = h, kv, e // h
        self.q = nn.Linear(e, h * self.d)
        self.k = nn.Linear(e, kv * self.d)
        self.v = nn.Linear(e, kv * self.d)
        self.o = nn.Linear(h * self.d, e)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, self.d).transpose(1, 2)
        k = self.k(x).view(b, s, -1, self.d).transpose(1, 2)
        v = self.v(x).view(b, s, -1, self.d).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v[:, :, None].expand(b, v.shape[1], rep, s, self.d).reshape(b, -1, s, self.d)
        att = torch.softmax(q @ k.transpose(-1, -2) / self.d**0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, -1)
        return self.o(y)


def test_gqa_heads_are_units():
    m = GQA()
    x = torch.randn(2, 5, 16)
    g = DependencyGraph.build(m, x)
    grp = _group(g, "q.weight", 0)
    mem = {mm.name: mm for mm in grp.members}
    assert grp.n_units == 2  # one unit = one kv head with its 2 query heads
    assert np.bincount(mem["q.weight"].unit_of).tolist() == [8, 8]
    assert np.bincount(mem["k.weight"].unit_of).tolist() == [4, 4]
    assert ("o.weight", 1) in {(mm.name, mm.dim) for mm in grp.members}
    pruned, *_ = prune_and_check(m, x, ratio=0.5)
    assert pruned.k.out_features == 4 and pruned.q.out_features == 8


def test_sdpa_heads():
    class A(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.proj = nn.Linear(16, 16)
            self.num_heads = 4

        def forward(self, x):
            b, s, e = x.shape
            q, k, v = self.qkv(x).reshape(b, s, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            y = F.scaled_dot_product_attention(q, k, v)
            return self.proj(y.transpose(1, 2).reshape(b, s, -1)) + x

    m = A()
    x = torch.randn(2, 3, 16)
    g = DependencyGraph.build(m, x)
    grp = _group(g, "qkv.weight", 0)
    assert grp.n_units == 4 and grp.n_prunable == 4
    pruned, plan, *_ = prune_and_check(m, x, ratio=0.5)
    assert pruned.num_heads == 2 and plan["attributes"][""]["num_heads"] == [4, 2]


def test_norms_and_shuffle():
    class N(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 1)
            self.gn = nn.GroupNorm(4, 8)
            self.c2 = nn.Conv2d(8, 8, 1)
            self.inorm = nn.InstanceNorm2d(8, affine=True)
            self.c3 = nn.Conv2d(8, 16, 1)
            self.shuffle = nn.ChannelShuffle(2)
            self.c4 = nn.Conv2d(16, 8, 1)
            self.ps = nn.PixelShuffle(2)
            self.c5 = nn.Conv2d(2, 3, 1)

        def forward(self, x):
            x = self.gn(self.c1(x))
            x = self.inorm(self.c2(x))
            x = self.c4(self.shuffle(self.c3(x)))
            return self.c5(self.ps(x))

    m = N().eval()
    x = torch.randn(2, 3, 4, 4)
    g = DependencyGraph.build(m, x)
    assert _group(g, "c1.weight", 0).n_units == 4  # whole GroupNorm groups
    assert _group(g, "c3.weight", 0).n_units == 8  # shuffle keeps both groups, shrinks them evenly
    assert _group(g, "c4.weight", 0).n_units == 2  # pixel shuffle: r*r channels per unit
    pruned, *_ = prune_and_check(m, x, ratio=0.5)
    assert pruned.gn.num_groups == 2


def test_layer_norm_freezes_channel_dim():
    class L(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.ln = nn.LayerNorm(8)
            self.b = nn.Linear(8, 2)

        def forward(self, x):
            return self.b(self.ln(self.a(x)))

    g = DependencyGraph.build(L(), torch.randn(3, 4))
    grp = _group(g, "a.weight", 0)
    assert grp.n_prunable == 0 and "layer_norm" in grp.reasons[0]


def test_embedding_and_tied_weights():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.up = nn.Linear(8, 16)
            self.down = nn.Linear(16, 8)
            self.head = nn.Linear(8, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            h = self.emb(ids)
            h = h + self.down(F.gelu(self.up(h)))
            return self.head(h)

    m = LM()
    ids = torch.randint(0, 11, (2, 5))
    g = DependencyGraph.build(m, ids)
    hid = _group(g, "emb.weight", 1)
    assert ("head.weight" in hid.members[0].aliases) or any(mm.name == "head.weight" for mm in hid.members)
    assert hid.n_prunable == 8  # hidden size is prunable: embeddings, residual and the tied head
    pruned, *_ = prune_and_check(m, ids)
    assert pruned.head.weight is pruned.emb.weight
    assert pruned.emb.embedding_dim == pruned.up.in_features < 8


def test_einsum_and_bmm():
    class E(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))
            self.m = nn.Parameter(torch.randn(6, 7))
            self.a = nn.Linear(7, 5)

        def forward(self, x):
            h = torch.einsum("bsi,ji->bsj", x, self.w.t().contiguous().t())
            h = torch.bmm(F.relu(h), self.m.expand(h.shape[0], -1, -1))
            return self.a(h)

    m = E()
    x = torch.randn(2, 3, 4)
    g = DependencyGraph.build(m, x)
    assert {(mm.name, mm.dim) for mm in g.group_of("w", 0).members} == {("w", 0), ("m", 0)}
    assert {(mm.name, mm.dim) for mm in g.group_of("m", 1).members} == {("m", 1), ("a.weight", 1)}
    pruned, *_ = prune_and_check(m, x, ratio=0.5)
    assert pruned.m.shape == (3, 4)


def test_conv_transpose_plain_and_grouped():
    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
            self.gup = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
            self.out = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.out(self.gup(F.relu(self.up(F.relu(self.a(x))))))

    m = T()
    x = torch.randn(1, 3, 4, 4)
    g = DependencyGraph.build(m, x)
    assert {(mm.name, mm.dim) for mm in _group(g, "a.weight", 0).members} >= {
        ("a.weight", 0),
        ("up.weight", 0),
    }
    grp = _group(g, "up.weight", 1)  # up's outputs feed a grouped transposed conv: two whole groups
    assert grp.n_units == 2 and ("gup.weight", 0) in {(mm.name, mm.dim) for mm in grp.members}
    pruned, *_ = prune_and_check(m, x, ratio=0.5)
    assert pruned.up.out_channels == 3 and pruned.gup.groups == 1 and pruned.gup.in_channels == 3


def test_chunk_unflatten_permute_unbind():
    class C(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 12)
            self.b = nn.Linear(6, 3)
            self.c = nn.Linear(2, 2)

        def forward(self, x):
            u, v = self.a(x).chunk(2, dim=-1)  # GLU-style: halves coupled position-wise
            h = self.b(u * torch.sigmoid(v))
            h = h.unflatten(-1, (3, 1)).permute(0, 2, 1).flatten(1)
            return self.c(torch.stack(h.unbind(0)[:2], 0)[:, :2])

    m = C()
    x = torch.randn(3, 4)
    g = DependencyGraph.build(m, x)
    grp = _group(g, "a.weight", 0)
    assert grp.n_units == 6 and grp.unit_size == 2
    assert not _group(g, "b.weight", 0).n_prunable  # sliced with constant bounds ([:, :2])
    pruned, *_ = prune_and_check(m, x, ratio=0.5)
    assert pruned.a.out_features == 6 and pruned.b.in_features == 3


def test_reductions_and_elementwise_max():
    class R(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 6)
            self.b = nn.Linear(3, 6)
            self.c = nn.Linear(6, 2)

        def forward(self, x):
            h = torch.max(self.a(x), self.b(x))  # elementwise: a and b coupled
            h = h * h.sum(0, keepdim=True)  # reduction over the batch dim: channels untouched
            return self.c(h) + h.mean(-1, keepdim=True)  # mean over channels freezes them

    g = DependencyGraph.build(R(), torch.randn(4, 3))
    grp = _group(g, "a.weight", 0)
    assert ("b.weight", 0) in {(mm.name, mm.dim) for mm in grp.members}
    assert grp.n_prunable == 0 and "reduction" in grp.reasons[0]


def test_union_find_numpy_fallback_matches_scipy(monkeypatch):
    import builtins

    from secateur.graph.atoms import AtomStore

    rng = np.random.default_rng(0)
    store = AtomStore()
    store.new(500)
    for _ in range(40):
        k = int(rng.integers(1, 20))
        store.union(rng.integers(0, 500, k), rng.integers(0, 500, k))
    fast = store.solve()
    real_import = builtins.__import__

    def no_scipy(name, *a, **kw):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    slow = store.solve()
    # same partition, whatever the label values
    pairs = {(int(a), int(b)) for a, b in zip(fast, slow)}
    assert len(pairs) == len(set(fast.tolist())) == len(set(slow.tolist()))

"""Symbolic sizes (secateur.graph.symbolic): integers that a model stores on its modules (head counts, head
widths, split sizes) or reads from tensor sizes shrink with the channels they describe, are rewritten at
compaction inside the transaction, and pass the oracle; a literal in the code is refused by file and line.

Models are written by hand after timm's ViT ``Attention`` (stored ``num_heads``/``head_dim``/``scale``,
``x.transpose(1, 2).reshape(B, N, C)`` with ``C`` the block's input width), torchvision's Swin (``C //
num_heads`` at run time) and YOLO's C2f (``split((self.c, self.c), 1)``).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateur.compact.apply as apply_mod
from secateur.compact import Journal, check_equivalence, compact, make_plan, mask_model
from secateur.errors import CompactionError, IncompatibleGroupError
from secateur.graph import DependencyGraph
from secateur.graph.symbolic import ShapeConflictError, TracedInt, render, solve
from secateur.pruners.heads import prune_heads
from secateur.pruners.oneshot import prune_channels, remove_units

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """timm's ViT attention as it was written before ``attn_dim``: stored head count, head width and scale;
    the output reshaped to the block's input width ``C`` (a tensor size)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class RunTimeWidth(Attention):
    """torchvision Swin / most timm families: the head width is ``C // self.num_heads`` at run time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class StoredWidth(Attention):
    """The attention width stored as ``self.dim``: the head width is ``self.dim // self.num_heads``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, self.dim))


class LiteralHeads(Attention):
    """Four heads of eight written as literals."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4)  # the literal line
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, attention: type[Attention]) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Patch embedding, class token, position embedding, blocks, norm, classifier head (timm's layout)."""

    def __init__(self, attention: type[Attention] = Attention, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, attention) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class C2f(nn.Module):
    """YOLOv8's C2f: one 1x1 conv to two halves of ``self.c`` channels, bottlenecks on the last one, all
    concatenated into a 1x1 conv."""

    def __init__(self, c1: int = 4, c2: int = 8, n: int = 2) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = nn.Conv2d(c1, 2 * self.c, 1)
        self.m = nn.ModuleList(nn.Conv2d(self.c, self.c, 3, padding=1) for _ in range(n))
        self.cv2 = nn.Conv2d((2 + n) * self.c, c2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(F.silu(self.cv1(x)).split((self.c, self.c), 1))
        y.extend(F.silu(m(y[-1])) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class StoredTuple(nn.Module):
    """inception_next's token mixer: a stored tuple of split sizes, one branch per piece."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 1)
        self.split_sizes = (6, 6)
        self.a = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.b = nn.Conv2d(6, 5, 1)
        self.out = nn.Conv2d(11, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xa, xb = torch.split(F.relu(self.stem(x)), self.split_sizes, dim=1)
        return self.out(torch.cat([self.a(xa), self.b(xb)], 1))


def _vit(attention: type[Attention] = Attention) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return ViT(attention).eval(), torch.randn(2, 3, 16, 16)


def _state(m: nn.Module) -> dict[str, Any]:
    """Tensors (values, shapes) and every plain attribute of every module (tuples included)."""
    plain = (int, float, bool, str, tuple, type(None))
    return {
        "tensors": {k: v.detach().clone() for k, v in m.state_dict().items()},
        "attrs": {
            p: {
                k: (type(v), v)
                for k, v in vars(mod).items()
                if not k.startswith("_") and isinstance(v, plain)
            }
            for p, mod in m.named_modules()
        },
    }


def _assert_same(m: nn.Module, before: dict[str, Any], where: str = "") -> None:
    now = _state(m)
    assert now["attrs"] == before["attrs"], where
    assert now["tensors"].keys() == before["tensors"].keys(), where
    for k, v in before["tensors"].items():
        assert now["tensors"][k].shape == v.shape and torch.equal(now["tensors"][k], v), f"{where}: {k}"


# ------------------------------------------------------------------------------------------------------
# attention heads
# ------------------------------------------------------------------------------------------------------
def test_vit_heads_go_with_the_residual_width_and_num_heads_is_rewritten():
    """``reshape(B, N, C)`` with ``C`` the block's input width: heads and residual channels are one count.
    With the residual prunable (through its LayerNorms) half the heads go, with head_dim channels of the
    residual each; ``num_heads`` is rewritten, ``head_dim`` and ``scale`` stay; the oracle holds."""
    model, x = _vit()
    ref = copy.deepcopy(model)
    graph = DependencyGraph.build(model, x, prune_normalized=True)
    residual = graph.group_of("patch_embed.weight", 0)
    assert (
        residual
        is graph.group_of("blocks.0.attn.qkv.weight", 0)
        is graph.group_of("blocks.1.attn.proj.weight", 1)
    )
    assert residual.n_units == 4 and residual.n_prunable == 4  # one unit: a head of each block + 8 channels
    _, plan = prune_channels(model, x, sparsity=0.5, criterion="l1", graph=graph)
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        assert (a.num_heads, a.head_dim, a.scale) == (2, 8, 8**-0.5)
        assert type(a.num_heads) is int and plan["attributes"][f"blocks.{i}.attn"] == {"num_heads": [4, 2]}
        assert (a.qkv.in_features, a.qkv.out_features, a.proj.in_features, a.proj.out_features) == (
            16,
            48,
            16,
            16,
        )
        assert blk.fc1.out_features == 64
    assert model.patch_embed.out_channels == 16 and model.cls_token.shape[-1] == 16
    check_equivalence(mask_model(ref, plan), model, x)  # float64, relative 1e-6


def test_vit_heads_are_frozen_with_the_residual_by_default_and_the_mlp_is_pruned():
    """By default the residual width is frozen by its LayerNorms, so the heads tied to it are too: no head
    goes (nothing to try and roll back) and the MLP is pruned exactly."""
    model, x = _vit()
    ref = copy.deepcopy(model)
    graph = DependencyGraph.build(model, x)
    heads = graph.group_of("blocks.0.attn.qkv.weight", 0)
    assert heads.n_units == 4 and heads.n_prunable == 0 and "layer_norm" in heads.reasons[0]
    _, plan = prune_channels(model, x, sparsity=0.5, criterion="l1")
    assert [b.attn.num_heads for b in model.blocks] == [4, 4] and model.blocks[0].fc1.out_features == 64
    assert not plan["attributes"]
    check_equivalence(mask_model(ref, plan), model, x)


def test_prune_heads_removes_heads_tied_to_the_residual():
    model, x = _vit()
    ref = copy.deepcopy(model)
    graph = DependencyGraph.build(model, x, prune_normalized=True)
    _, plan = prune_heads(model, x, sparsity=0.25, criterion="l1", graph=graph)
    assert [b.attn.num_heads for b in model.blocks] == [3, 3] and model.blocks[0].attn.proj.in_features == 24
    assert model.blocks[0].fc1.out_features == 128  # heads only
    check_equivalence(mask_model(ref, plan), model, x)


def test_head_width_computed_at_run_time_from_the_input_width():
    """``C // self.num_heads`` (Swin): the head width stays 8 because C shrinks by 8 per head removed."""
    model, x = _vit(RunTimeWidth)
    ref = copy.deepcopy(model)
    graph = DependencyGraph.build(model, x, prune_normalized=True)
    _, plan = prune_channels(model, x, sparsity=0.25, criterion="l1", graph=graph)
    assert [b.attn.num_heads for b in model.blocks] == [3, 3] and model.patch_embed.out_channels == 24
    check_equivalence(mask_model(ref, plan), model, x)


def test_a_stored_width_is_solved_from_its_formula():
    """``self.dim // self.num_heads`` and ``reshape(B, N, self.dim)``: both attributes are rewritten (dim to
    heads x 8) and heads go without touching the residual width (default graph)."""
    model, x = _vit(StoredWidth)
    ref = copy.deepcopy(model)
    _, plan = prune_channels(model, x, sparsity=0.5, criterion="l1")
    a = model.blocks[1].attn
    assert (a.num_heads, a.dim, a.head_dim) == (2, 16, 8)
    assert plan["attributes"]["blocks.1.attn"] == {"num_heads": [4, 2], "dim": [32, 16]}
    assert model.patch_embed.out_channels == 32
    check_equivalence(mask_model(ref, plan), model, x)


def test_a_literal_head_count_is_refused_naming_the_file_and_line():
    model, x = _vit(LiteralHeads)
    before = _state(model)
    line = next(i for i, s in enumerate(inspect.getsourcelines(LiteralHeads)[0]) if "the literal line" in s)
    where = f"{__file__}:{inspect.getsourcelines(LiteralHeads)[1] + line}"
    with pytest.raises(ShapeConflictError) as ei:
        prune_channels(model, x, sparsity=0.5, criterion="l1")
    msg = str(ei.value)
    assert where in msg and "dim 3 is the literal 4 in the code" in msg
    assert "op 'reshape' in module 'blocks.0.attn' (LiteralHeads)" in msg and "group blocks.0.attn.qkv" in msg
    assert isinstance(ei.value, IncompatibleGroupError)
    _assert_same(model, before)
    # with skip_incompatible the heads stay whole and the MLPs are pruned, exactly
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="left 2 group"):
        _, plan = prune_channels(model, x, sparsity=0.5, criterion="l1", skip_incompatible=True)
    assert sorted(plan["skipped"]) == ["blocks.0.attn.qkv.weight:0", "blocks.1.attn.qkv.weight:0"]
    assert model.blocks[0].attn.qkv.out_features == 96 and model.blocks[0].fc1.out_features == 64
    check_equivalence(mask_model(ref, plan), model, x)


class PackedHeads(nn.Module):
    """lowformer's conv attention: each head's q, k and v packed together (``3 * head_dim`` per head), the
    output width stored as ``self.inner``."""

    def __init__(self, c: int = 8, heads: int = 4, head_dim: int = 2) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.inner = heads, head_dim, heads * head_dim
        self.qkv = nn.Conv2d(c, 3 * heads * head_dim, 1)
        self.proj = nn.Conv2d(self.inner, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        qkv = self.qkv(x).reshape(B, self.num_heads, 3 * self.head_dim, H * W).permute(0, 1, 3, 2)
        q, k, v = qkv.chunk(3, dim=3)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.permute(0, 1, 3, 2).reshape(B, self.inner, H, W))


def test_a_head_dim_the_code_reads_is_solved_not_compared_with_the_packed_head_size():
    """The trace sees heads of 6 (q, k and v of one head together) while ``head_dim`` is 2: the code reads
    ``head_dim`` only as ``3 * self.head_dim``, so it stays 2 and ``inner`` becomes 2 heads x 2."""
    torch.manual_seed(0)
    model, x = PackedHeads().eval(), torch.randn(2, 8, 3, 3)
    ref = copy.deepcopy(model)
    _, plan = prune_channels(model, x, sparsity=0.5, criterion="l1")
    assert (model.num_heads, model.head_dim, model.inner) == (2, 2, 4)
    assert plan["attributes"][""] == {"num_heads": [4, 2], "inner": [8, 4]}
    check_equivalence(mask_model(ref, plan), model, x)


# ------------------------------------------------------------------------------------------------------
# stored split sizes
# ------------------------------------------------------------------------------------------------------
def _remove(model: nn.Module, x: torch.Tensor, member: str, units: list[int]) -> dict:
    """Remove ``units`` of the group holding ``member`` (dim 0) under the oracle; returns the plan."""
    graph = DependencyGraph.build(model, x)
    g = graph.group_of(member, 0)
    _, plan = remove_units(model, graph, {graph.groups.index(g): units}, x, verify=True)
    return plan


def test_c2f_split_sizes_shrink_evenly_and_self_c_is_rewritten():
    """The two halves of ``split((self.c, self.c), 1)`` are one unit each (they stay equal); removing two of
    cv1's four units leaves ``self.c == 2``."""
    torch.manual_seed(0)
    model, x = C2f().eval(), torch.randn(2, 4, 6, 6)
    ref = copy.deepcopy(model)
    plan = _remove(model, x, "cv1.weight", [1, 2])
    assert model.c == 2 and type(model.c) is int and plan["attributes"][""] == {"c": [4, 2]}
    assert model.cv1.out_channels == 4 and model.cv2.in_channels == 2 + 2 + 4 + 4
    check_equivalence(mask_model(ref, plan), model, x)


def test_a_stored_tuple_of_split_sizes_is_rewritten_as_a_tuple():
    torch.manual_seed(0)
    model, x = StoredTuple().eval(), torch.randn(2, 3, 5, 5)
    ref = copy.deepcopy(model)
    plan = _remove(model, x, "stem.weight", [0, 3, 4])
    assert model.split_sizes == (3, 3) and type(model.split_sizes) is tuple
    assert all(type(s) is int for s in model.split_sizes)
    assert plan["attributes"][""] == {"split_sizes": [[6, 6], [3, 3]]}
    check_equivalence(mask_model(ref, plan), model, x)


# ------------------------------------------------------------------------------------------------------
# transactions: every attribute rewrite is undone by any exception or interrupt
# ------------------------------------------------------------------------------------------------------
class _Faults:
    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.at: int | None = None
        self.exc: BaseException | None = None

    def step(self, kind: str) -> None:
        self.kinds.append(kind)
        if self.at is not None and len(self.kinds) - 1 == self.at:
            raise self.exc  # type: ignore[misc]


@pytest.fixture
def faults(monkeypatch) -> _Faults:
    f = _Faults()
    sliced, set_data, set_attr = apply_mod._sliced, Journal.set_data, Journal.set_attr

    def _sliced(t, dims, *scratch):
        f.step("slice")
        return sliced(t, dims, *scratch)

    def _set_data(self, t, new):
        set_data(self, t, new)
        f.step("data")

    def _set_attr(self, obj, name, value):
        set_attr(self, obj, name, value)
        f.step(f"attr {name}")

    monkeypatch.setattr(apply_mod, "_sliced", _sliced)
    monkeypatch.setattr(Journal, "set_data", _set_data)
    monkeypatch.setattr(Journal, "set_attr", _set_attr)
    return f


def _plan_for(model: nn.Module, x: torch.Tensor, **build: Any) -> dict:
    graph = DependencyGraph.build(model, x, **build)
    removed = {
        gi: list(range(max(1, g.n_units // 4)))
        for gi, g in enumerate(graph.groups)
        if g.n_prunable == g.n_units
    }
    return make_plan(graph, removed)


@pytest.mark.parametrize("name", ["vit", "c2f"])
def test_an_exception_at_every_attribute_rewrite_leaves_the_model_identical(name, faults):
    if name == "vit":
        model, x = _vit(StoredWidth)
        plan = _plan_for(model, x)
        rewritten = {"attr num_heads", "attr dim"}
    else:
        torch.manual_seed(0)
        model, x = C2f().eval(), torch.randn(2, 4, 6, 6)
        plan = _plan_for(model, x)
        rewritten = {"attr c"}
    reference = mask_model(copy.deepcopy(model), plan)
    compact(copy.deepcopy(model), plan)  # count the steps on a copy
    kinds = list(faults.kinds)
    assert rewritten <= set(kinds)
    before = _state(model)
    for k in range(len(kinds)):
        for exc in (RuntimeError(f"injected at {k}"), KeyboardInterrupt()):
            faults.kinds, faults.at, faults.exc = [], k, exc
            with pytest.raises(type(exc) if isinstance(exc, KeyboardInterrupt) else CompactionError):
                compact(model, plan)
            _assert_same(model, before, f"{type(exc).__name__} at step {k} ({kinds[k]})")
    faults.at = None
    compact(model, plan)
    check_equivalence(reference, model, x)


# ------------------------------------------------------------------------------------------------------
# the trace leaves no trace; expressions and the solver
# ------------------------------------------------------------------------------------------------------
class _Caches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.sizes = (2, 3)
        self.width = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        self.seen = y.shape[-1] // 2  # the forward stores a size on the module
        return y.view(x.shape[0], *self.sizes).sum(-1) * self.width


def test_the_trace_restores_module_attributes_and_strips_stored_sizes():
    model, x = _Caches(), torch.randn(2, 4)
    sizes = model.sizes
    graph = DependencyGraph.build(model, x)
    assert model.sizes is sizes and type(model.width) is int and type(model.seen) is int and model.seen == 3
    (use,) = graph.shape_uses
    assert [(p.label, render(p.expr)) for p in use.positions] == [
        ("dim 1", "sizes[0]"),
        ("dim 2", "sizes[1]"),
    ]


def test_traced_ints_build_formulas_and_pickle_as_plain_ints():
    from secateur.graph.symbolic import Attr

    n = TracedInt(4, Attr("attn", "num_heads", 4))
    c = TracedInt(32, Attr("", "dim", 32))
    e = (c // n) * 3 - 1
    assert e == 23 and isinstance(e, TracedInt) and render(e.expr) == "((dim // attn.num_heads) * 3) - 1"
    assert isinstance(c / n, float) and not isinstance(int(n), TracedInt)
    assert type(copy.deepcopy(n)) is int and type(copy.copy([n])[0]) is TracedInt


def test_the_solver_inverts_arithmetic_on_one_unknown():
    """``split(self.expand_chs // 2)`` (timm's CSP stages): the halves keep 3 channels each, so expand_chs
    becomes 6; an odd stored value keeps its remainder."""
    import numpy as np

    from secateur.graph.symbolic import Attr, BinOp, Const, Position, ShapeUse

    for old in (8, 9):
        leaf = Attr("stage", "expand_chs", old)
        half = BinOp("//", leaf, Const(2), old // 2)
        classes = np.arange(4)
        use = ShapeUse("split", "op 'split'", None, [Position("piece 0", half, 4, None, classes)])
        sol = solve([use], lambda c: 3)
        assert not sol.conflicts and sol.values[("stage", "expand_chs", None)] == (old, 6 + old % 2)

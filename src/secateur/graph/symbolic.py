"""Symbolic sizes: where the integers given to shape ops come from, and what they must become after pruning.

A trace sees ``qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads)`` as ``reshape(1, 197, 3, 3, 64)``:
plain integers. To remove whole heads, compaction must know that the ``3`` in position 3 is the module
attribute ``num_heads`` (rewrite it), that the ``3`` in position 2 is a literal (it stays), and that ``64``
is the block's input width ``C`` (a tensor size) divided by ``num_heads``: it stays ``64`` only if ``C``
shrinks with the heads. This module records that provenance during the trace and solves for the new values
when a plan is made.

**How provenance is carried.** During a trace, every ``int`` attribute of a module (and every element of a
tuple or list of ints stored on a module) is replaced by a :class:`TracedInt` whose :class:`Attr` leaf names
the module path and attribute; every ``x.shape`` / ``x.size()`` read returns :class:`TracedInt` sizes whose
:class:`Size` leaf holds the channel atoms of that tensor dim. :class:`TracedInt` is an ``int`` subclass
whose ``+ - * // %`` build an expression tree (:class:`BinOp`), so ``C // self.num_heads`` arrives at the
op as a value *and* its formula. A plain ``int`` reaching a shape op is a :class:`Const`: a literal in the
code, or a value computed where the trace could not follow it (``int(x)``, a cache). Everything is put back
after the trace (:class:`AttributeTracing`).

Why an ``int`` subclass rather than matching values: a value says nothing of its origin when two sources
agree (DeiT-tiny reshapes to ``(B, N, 3, 3, 64)``: the fused q/k/v count and ``num_heads`` are both 3).
``torch.fx`` symbolic tracing fails on the data-dependent Python control flow of real models, and
``torch.export`` dynamic shapes give symbols for input sizes, not for module attributes. The subclass costs
one small object per arithmetic operation on sizes and flows through PyTorch's argument parsing (it is an
``int``), ``torch.Size``, ``math`` and numpy unchanged.

**Count couplings.** Each shape op with a traced or literal size on a channel dim is a :class:`ShapeUse`.
While tracing, two relations become index couplings (a count coupling realised by pairing channels, which
is what makes any choice of units valid): a channel dim whose size *is* another tensor's size
(``x.transpose(1, 2).reshape(B, N, C)``: the attention output has as many channels as the block's input)
and a head width computed as that size divided by a head count (``C // self.num_heads`` beside
``self.num_heads``: each input channel follows one head). When the input width is frozen (behind a
LayerNorm, by default) the heads freeze with it; with ``prune_normalized=True`` both shrink together.

**Solving.** :func:`solve` evaluates every recorded size with the new sizes of a plan: a bare attribute
takes the new size of its dim (``num_heads``, ``head_dim``, a stored split size), an attribute inside
arithmetic is solved when it is the only unknown (``expand_chs // 2``), and then every expression must
equal the size its dim will have; otherwise :class:`ShapeConflictError` names the op, module, file and line
and the expression (for a literal: the literal).
"""

from __future__ import annotations

import dataclasses
import itertools
import linecache
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.errors import IncompatibleGroupError

__all__ = [
    "Attr",
    "AttributeTracing",
    "BinOp",
    "Const",
    "Expr",
    "Position",
    "ShapeConflictError",
    "ShapeUse",
    "Size",
    "Solution",
    "SymbolicTrace",
    "TracedInt",
    "expr_of",
    "read_attributes",
    "render",
    "solve",
]


# ------------------------------------------------------------------------------------------------------
# expressions
# ------------------------------------------------------------------------------------------------------
class Expr:
    """A node of a size expression; ``value`` is what it evaluated to during the trace."""

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = int(value)


class Const(Expr):
    """A plain ``int``: a literal in the code, or a value whose origin the trace could not follow."""

    __slots__ = ()


class Attr(Expr):
    """A module attribute read during the trace: ``module.<name>`` or element ``index`` of a stored tuple or
    list (``whole``: the stored sequence's values at the trace)."""

    __slots__ = ("index", "name", "path", "whole")

    def __init__(
        self, path: str, name: str, value: int, index: int | None = None, whole: tuple | None = None
    ) -> None:
        super().__init__(value)
        self.path, self.name, self.index, self.whole = path, name, index, whole

    @property
    def key(self) -> tuple[str, str, int | None]:
        return (self.path, self.name, self.index)


class Size(Expr):
    """The size of one dim of a tensor read during the trace (``x.shape[2]``). ``atoms``: the dim's channel
    atoms (``None``: no channel identity, the size never changes); ``param``: ``(qualname, dim)`` of a
    parameter not yet traced (resolved when the trace ends); ``classes``: the atoms' classes once the graph
    is solved."""

    __slots__ = ("atoms", "classes", "param")

    def __init__(self, value: int, atoms: np.ndarray | None, param: tuple[str, int] | None = None) -> None:
        super().__init__(value)
        self.atoms, self.param, self.classes = atoms, param, None


class BinOp(Expr):
    """``a <op> b`` for op in ``+ - * // %``."""

    __slots__ = ("a", "b", "depth", "op")

    def __init__(self, op: str, a: Expr, b: Expr, value: int) -> None:
        super().__init__(value)
        self.op, self.a, self.b = op, a, b
        self.depth = 1 + max(getattr(a, "depth", 0), getattr(b, "depth", 0))


_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
}
_MAX_DEPTH = 12  # deeper formulas (sizes computed in loops) are kept as constants


class TracedInt(int):
    """An ``int`` that carries the :class:`Expr` it was computed from (``expr``). Arithmetic with ``+ - * //
    %`` (either side an ``int``) returns a :class:`TracedInt`; anything else returns what ``int`` returns."""

    def __new__(cls, value: int, expr: Expr) -> TracedInt:  # noqa: D102
        obj = int.__new__(cls, value)
        obj.expr = expr
        return obj

    def __reduce__(self) -> tuple:  # pickles and deep copies as a plain int
        return (int, (int(self),))

    def __neg__(self) -> int:
        return _binary("-", 0, self)

    def __pos__(self) -> TracedInt:
        return self


def _binary(op: str, a: Any, b: Any) -> Any:
    if type(a) is bool or type(b) is bool or not (isinstance(a, int) and isinstance(b, int)):
        return NotImplemented
    v = _OPS[op](int(a), int(b))
    ea, eb = expr_of(a), expr_of(b)
    node: Expr = BinOp(op, ea, eb, v)
    if node.depth > _MAX_DEPTH:  # type: ignore[attr-defined]
        node = Const(v)
    return TracedInt(v, node)


def _make_ops() -> None:
    names = {"+": "add", "-": "sub", "*": "mul", "//": "floordiv", "%": "mod"}
    for op, n in names.items():

        def fwd(self: TracedInt, other: Any, _op: str = op) -> Any:
            return _binary(_op, self, other)

        def rev(self: TracedInt, other: Any, _op: str = op) -> Any:
            return _binary(_op, other, self)

        setattr(TracedInt, f"__{n}__", fwd)
        setattr(TracedInt, f"__r{n}__", rev)


_make_ops()


def expr_of(x: Any) -> Expr:
    """The expression of an integer: its own for a :class:`TracedInt`, a :class:`Const` otherwise."""
    e = getattr(x, "expr", None) if isinstance(x, TracedInt) else None
    return e if isinstance(e, Expr) else Const(int(x))


def leaves(e: Expr) -> Iterator[Expr]:
    """The leaves (:class:`Const`, :class:`Attr`, :class:`Size`) of an expression, left to right."""
    if isinstance(e, BinOp):
        yield from leaves(e.a)
        yield from leaves(e.b)
    else:
        yield e


def key_of(e: Expr) -> tuple:
    """A hashable structural key: equal keys mean the same formula over the same sources."""
    if isinstance(e, Attr):
        return ("attr", *e.key)
    if isinstance(e, Size):
        return ("size", id(e))
    if isinstance(e, BinOp):
        return (e.op, key_of(e.a), key_of(e.b))
    return ("const", e.value)


def render(e: Expr) -> str:
    """The expression as text: ``blocks.0.attn.num_heads``, ``size(192)``, ``4`` (a constant)."""
    if isinstance(e, Attr):
        base = f"{e.path}.{e.name}" if e.path else e.name
        return base if e.index is None else f"{base}[{e.index}]"
    if isinstance(e, Size):
        return f"size({e.value})"
    if isinstance(e, BinOp):
        a, b = render(e.a), render(e.b)
        if isinstance(e.a, BinOp):
            a = f"({a})"
        if isinstance(e.b, BinOp):
            b = f"({b})"
        return f"{a} {e.op} {b}"
    return str(e.value)


# ------------------------------------------------------------------------------------------------------
# trace side: module attributes
# ------------------------------------------------------------------------------------------------------
# Layers whose int attributes feed their own functional call (stride, padding, features), never a shape
# op of model code: left as they are (most of a CNN's modules).
_PLAIN_LAYER_MODULES = frozenset(
    "torch.nn.modules." + m
    for m in (
        "conv linear batchnorm normalization instancenorm pooling activation dropout sparse container rnn "
        "padding upsampling pixelshuffle distance loss transformer"
    ).split()
)
# Subclasses of those layers (Hugging Face's depthwise conv, timm's Conv2dSame) too: their ints are the
# layer's hyper-parameters, refreshed from the weights by compaction.
_PLAIN_LAYER_TYPES = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
)
_MAX_SEQ = 16  # tuples/lists of ints longer than this (lookup tables) are left alone


def _traced_seq(path: str, name: str, seq: Sequence[int]) -> Any:
    whole = tuple(int(v) for v in seq)
    items = [TracedInt(v, Attr(path, name, v, i, whole)) for i, v in enumerate(whole)]
    return tuple(items) if isinstance(seq, tuple) else items


def _plain(v: Any) -> Any:
    """``v`` without :class:`TracedInt` inside (an int, a tuple or list of ints); other values as they are."""
    if isinstance(v, TracedInt):
        return int(v)
    if type(v) in (tuple, list) and any(isinstance(e, TracedInt) for e in v):
        return type(v)(int(e) if isinstance(e, TracedInt) else e for e in v)
    return v


class AttributeTracing:
    """Replace, for the duration of a trace, the ``int`` attributes of modules (and tuples/lists of up to 16
    ints) by :class:`TracedInt` values naming their module path and attribute; :meth:`restore` puts the
    original objects back and removes any :class:`TracedInt` the forward stored on a module.

    ``modules``: ``(path, module)`` pairs, each module once. Modules of ``skip`` types (module rules: traced
    as one op) and plain torch layers are left alone.
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], skip: Any = ()) -> None:
        self.modules = [m for _, m in modules]
        self.swapped: list[tuple[dict, str, Any, Any]] = []
        skip_types = tuple(skip)
        for path, mod in modules:
            cls = type(mod)
            if (
                cls.__module__ in _PLAIN_LAYER_MODULES
                or isinstance(mod, _PLAIN_LAYER_TYPES)
                or (skip_types and isinstance(mod, skip_types))
            ):
                continue
            d = getattr(mod, "__dict__", None)
            if not d:
                continue
            for name, v in list(d.items()):
                t = type(v)
                if t is int or t is TracedInt:
                    new: Any = TracedInt(int(v), Attr(path, name, int(v)))
                elif (
                    (t is tuple or t is list)
                    and 0 < len(v) <= _MAX_SEQ
                    and all(type(e) is int or type(e) is TracedInt for e in v)
                ):
                    new = _traced_seq(path, name, v)
                else:
                    continue
                self.swapped.append((d, name, v, new))
                d[name] = new

    def restore(self) -> None:
        """Put back every replaced attribute (the original object); an attribute the forward reassigned keeps
        its new value, stripped of :class:`TracedInt`, as does anything else the forward stored."""
        for d, name, old, new in reversed(self.swapped):
            if d.get(name) is new:
                d[name] = old
        self.swapped.clear()
        for mod in self.modules:
            d = getattr(mod, "__dict__", None)
            if not d:
                continue
            for name, v in list(d.items()):
                p = _plain(v)
                if p is not v:
                    d[name] = p


def traced_shape(size_atoms: Callable[[torch.Tensor, int], Size], t: torch.Tensor, out: Any, dim: Any) -> Any:
    """``x.shape`` / ``x.size()`` / ``x.size(d)`` with :class:`TracedInt` sizes whose :class:`Size` leaves
    come from ``size_atoms(t, d)``; ``out`` is the real result, returned unchanged if it is not sizes."""
    if isinstance(out, torch.Size):
        return torch.Size([TracedInt(int(s), size_atoms(t, d)) for d, s in enumerate(out)])
    if type(out) is int and isinstance(dim, int):
        d = dim + t.dim() if dim < 0 else dim
        return TracedInt(out, size_atoms(t, d))
    return out


# ------------------------------------------------------------------------------------------------------
# trace side: shape ops
# ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Position:
    """One size given to a shape op: ``label`` (``"dim 3"``, ``"piece 1"``), its expression, its value at
    the trace, and the channel atoms of the output dim it sizes (``None``: no channel identity, the size
    must not change), replaced by their classes once the graph is solved."""

    label: str
    expr: Expr
    size: int
    atoms: np.ndarray | None
    classes: np.ndarray | None = None


@dataclasses.dataclass
class ShapeUse:
    """A shape op (view, reshape, unflatten, expand, split) whose sizes include a traced integer, or a
    literal on a channel dim: where it ran (``where``: op and module; ``site``: ``(file, first line, last
    line)`` of the calling code) and its :class:`Position` list."""

    op: str
    where: str
    site: tuple[str, int, int] | None
    positions: list[Position]

    def site_text(self) -> str:
        """``"file.py:12"`` (or ``"file.py:12-14"``), or ``"an unknown line"``."""
        if self.site is None:
            return "an unknown line"
        f, a, b = self.site
        return f"{f}:{a}" if a == b else f"{f}:{a}-{b}"


_CONV_OPS = frozenset("conv1d conv2d conv3d".split())
SHAPE_OPS = frozenset("view reshape unflatten expand split split_with_sizes".split()) | _CONV_OPS

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_GRAPH_DIR = os.path.dirname(__file__) + os.sep
_TORCH_HELPERS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_torch.py")


def call_site() -> tuple[str, int, int] | None:
    """``(file, first line, last line)`` of the innermost frame outside torch and secateur's tracer: the
    model code that called the op being traced (the whole call expression's lines on Python 3.11+)."""
    f = sys._getframe(1)
    while f is not None:
        fn = f.f_code.co_filename
        if not (fn.startswith((_TORCH_DIR, _GRAPH_DIR)) or fn == _TORCH_HELPERS or fn.startswith("<frozen")):
            break
        f = f.f_back
    if f is None:
        return None
    first = last = f.f_lineno or 0
    positions = getattr(f.f_code, "co_positions", None)
    if positions is not None:
        try:
            pos = next(itertools.islice(positions(), f.f_lasti // 2, None), None)
        except (ValueError, TypeError):
            pos = None
        if pos and pos[0] and pos[1]:
            first, last = pos[0], pos[1]
    return (f.f_code.co_filename, int(first), int(last))


def literal_in_source(site: tuple[str, int, int] | None, value: int) -> bool:
    """True if the integer ``value`` is written as a number in the code at ``site`` (comments and strings
    aside): evidence that a :class:`Const` there is a literal, not a value the trace lost track of."""
    if site is None:
        return False
    f, a, b = site
    text = "".join(linecache.getline(f, i) for i in range(a, b + 1))
    text = re.sub(r"#.*", "", text)
    text = re.sub(r"(\"[^\"]*\"|'[^']*')", "", text)
    return re.search(rf"(?<![\w.]){int(value)}(?![\w.])", text) is not None


def _may_change(leaf: Expr) -> bool:
    """An attribute, or the size of a dim with channels (or of a parameter): a value pruning may change."""
    return isinstance(leaf, Attr) or (
        isinstance(leaf, Size) and (leaf.atoms is not None or leaf.param is not None)
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _sizes_arg(args: tuple, start: int, kwargs: dict, names: Sequence[str]) -> list | None:
    rest = args[start:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        seq = list(rest[0])
    elif rest:
        seq = list(rest)
    else:
        v = next((kwargs[n] for n in names if n in kwargs), None)
        if v is None:
            return None
        seq = list(v) if isinstance(v, (tuple, list)) else [v]
    return seq if seq and all(_is_int(s) for s in seq) else None


def _candidates(name: str, args: tuple, kwargs: dict, outs: list) -> list[tuple[str, Any, Any, int]]:
    """``(label, size value, output tensor, output dim)`` for each size an op was given."""
    if not outs or not args or not isinstance(args[0], torch.Tensor):
        return []
    x = args[0]
    res: list[tuple[str, Any, Any, int]] = []
    if name in ("view", "reshape", "expand"):
        sizes = _sizes_arg(args, 1, kwargs, ("shape", "size"))
        out = outs[0]
        if sizes is None or len(sizes) != out.dim():
            return []
        res = [(f"dim {i}", s, out, i) for i, s in enumerate(sizes)]
        if name == "expand":  # a broadcast (new or size-1) dim takes any size: only the others are sizes
            off = out.dim() - x.dim()
            res = [r for r in res if r[3] >= off and x.shape[r[3] - off] == out.shape[r[3]]]
    elif name == "unflatten":
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        sizes = args[2] if len(args) > 2 else kwargs.get("sizes")
        if not _is_int(dim) or not isinstance(sizes, (tuple, list)) or not all(_is_int(s) for s in sizes):
            return []
        d = dim + x.dim() if dim < 0 else dim
        res = [(f"dim {d + i}", s, outs[0], d + i) for i, s in enumerate(sizes)]
    elif name in ("split", "split_with_sizes"):
        sizes = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
        if sizes is None:
            sizes = kwargs.get("split_sizes")
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        if not _is_int(dim):
            return []
        d = dim + x.dim() if dim < 0 else dim
        if _is_int(sizes):
            res = [(f"piece {i}", sizes, o, d) for i, o in enumerate(outs) if o.shape[d] == int(sizes)]
        elif isinstance(sizes, (tuple, list)) and len(sizes) == len(outs) and all(_is_int(s) for s in sizes):
            res = [(f"piece {i}", s, o, d) for i, (s, o) in enumerate(zip(sizes, outs))]
    return [r for r in res if not (type(r[1]) is int and int(r[1]) == -1)]


def _conv_groups(tracer: Any, args: tuple, kwargs: dict, outs: list) -> list[Position]:
    """The ``groups`` of a functional convolution when a module attribute gives it (timm's BlurPool:
    ``F.conv2d(x, self.filt, groups=self.channels)``): one atom per group (a group is one unit)."""
    g = args[6] if len(args) > 6 else kwargs.get("groups")
    if not isinstance(g, TracedInt) or isinstance(g.expr, Const) or not outs or len(args) < 2:
        return []
    out = outs[0]
    dims = tracer.dims(out)
    cd = 1 if out.dim() == args[1].dim() else 0
    a = dims[cd] if cd < len(dims) else None
    atoms = None if a is None or a.size % int(g) else a.reshape(int(g), -1)[:, 0].copy()
    return [Position("groups", g.expr, int(g), atoms)]


class SymbolicTrace:
    """What one trace learns about sizes: the :class:`ShapeUse` records and the count couplings to add
    when the forward ends (:meth:`finalize`)."""

    def __init__(self) -> None:
        self.uses: list[ShapeUse] = []
        self.pending: list[tuple[Size | np.ndarray, np.ndarray | None, str]] = []
        self.sizes: list[Size] = []
        # the channel dims each stored attribute sizes directly, and where one sizes a dim without channels
        self.attr_dims: dict[tuple, list[tuple[np.ndarray, str]]] = {}
        self.attr_fixed: dict[tuple, str] = {}

    def size_leaf(self, tracer: Any, t: torch.Tensor, d: int) -> Size:
        """The :class:`Size` leaf of dim ``d`` of ``t`` (its atoms now; a parameter not yet traced is
        resolved when the trace ends, so that reading a weight's shape does not change how it is bound)."""
        value = int(t.shape[d])
        rec = tracer._info.get(id(t))
        if rec is not None and rec[0]() is t:
            leaf = Size(value, rec[1][d] if d < len(rec[1]) else None)
        else:
            name = tracer.param_name(t)
            leaf = Size(value, None, (name, d) if name is not None and value > 1 else None)
        self.sizes.append(leaf)
        return leaf

    def record(self, tracer: Any, name: str, args: tuple, kwargs: dict, outs: list) -> None:
        """Note the sizes of shape op ``name`` (one of :data:`SHAPE_OPS`) after its rule set the outputs'
        atoms: traced sizes, and literals on channel dims; queue the count couplings they imply."""
        if name in _CONV_OPS:
            positions = _conv_groups(tracer, args, kwargs, outs)
            if positions:
                use = ShapeUse(name, tracer.where(name), call_site(), positions)
                self.uses.append(use)
                self._couplings(use)
            return
        cands = _candidates(name, args, kwargs, outs)
        if not cands:
            return
        positions = []
        for label, v, out, d in cands:
            dims = tracer.dims(out)
            atoms = dims[d] if d < len(dims) else None
            e = expr_of(v)
            if atoms is None and not any(_may_change(leaf) for leaf in leaves(e)):
                continue  # a constant size on a dim without channels: nothing can change it
            positions.append(Position(label, e, int(v), atoms))
        if not positions:
            return
        use = ShapeUse(name, tracer.where(name), call_site(), positions)
        self.uses.append(use)
        self._couplings(use)

    def _couplings(self, use: ShapeUse) -> None:
        """Count couplings of one shape op: a dim sized by another tensor's size follows that size's
        channels; a head width ``size // count`` beside a dim sized ``count`` ties each channel of the size
        to one unit of that dim."""
        why = f"its size is given to {use.where} at {use.site_text()}"
        by_key: dict[tuple, Position] = {}
        for p in use.positions:
            if p.atoms is not None:
                by_key.setdefault(key_of(p.expr), p)
        for p in use.positions:
            e = p.expr
            if isinstance(e, Attr):  # one stored integer sizing several dims: they keep equal counts
                said = f"sized by {render(e)} in {use.where} at {use.site_text()}"
                if p.atoms is None:
                    self.attr_fixed.setdefault(e.key, said)
                else:
                    self.attr_dims.setdefault(e.key, []).append((p.atoms, said))
            elif isinstance(e, Size):
                self.pending.append((e, p.atoms, why))
            elif isinstance(e, BinOp) and e.op == "//" and isinstance(e.a, Size) and p.atoms is None:
                unit = by_key.get(key_of(e.b))
                if unit is not None and unit.atoms is not None and unit.atoms.size * p.size == e.a.value:
                    self.pending.append((e.a, np.repeat(unit.atoms, p.size), why))

    def finalize(self, tracer: Any) -> None:
        """Resolve parameter sizes read before their first op, then add the queued couplings to the atom
        store: equal counts are coupled index by index; a channel dim tied to a dim without channel
        identity is frozen (the reason names the op and line)."""
        for leaf in self.sizes:
            if leaf.param is not None and leaf.atoms is None:
                pd = tracer.param_dims.get(leaf.param)
                leaf.atoms = None if pd is None else pd.atoms
        store = tracer.atoms
        for key, dims in self.attr_dims.items():
            fixed = self.attr_fixed.get(key)
            for atoms, why in dims:
                if fixed is not None:  # the same integer sizes a dim that cannot change: neither can this one
                    store.freeze(
                        atoms,
                        f"{why}, which is also the size of a dim without channel identity "
                        f"(there {fixed.partition(' in ')[2]})",
                    )
                elif atoms is not dims[0][0] and atoms.shape == dims[0][0].shape:
                    self.pending.append((dims[0][0], atoms, why))
        self.attr_dims.clear()
        for leaf, atoms, why in self.pending:
            z = leaf if isinstance(leaf, np.ndarray) else leaf.atoms
            if z is None and atoms is None:
                continue
            if z is None:
                store.freeze(atoms, f"size taken from a dim without channel identity: {why}")
            elif atoms is None:
                store.freeze(z, f"{why}, as the size of a dim without channel identity")
            elif z is not atoms and z.shape == atoms.shape and not np.array_equal(z, atoms):
                store.union(z, atoms)
        self.pending.clear()

    def label(self, labels: np.ndarray) -> None:
        """Replace atoms by their classes (``labels[atoms]``) in every position and size leaf."""
        for leaf in self.sizes:
            if leaf.atoms is not None:
                leaf.classes = labels[leaf.atoms]
        for use in self.uses:
            for p in use.positions:
                if p.atoms is not None:
                    p.classes = labels[p.atoms]


# ------------------------------------------------------------------------------------------------------
# plan side: solving
# ------------------------------------------------------------------------------------------------------
class ShapeConflictError(IncompatibleGroupError):
    """A size computed by the model's code cannot match the pruned tensors: a literal on a pruned dim, or a
    formula whose sources do not shrink with it. Names the op, module, file and line and the expression.
    ``groups``: ``{group index: reason}`` for the groups whose removal alone causes a conflict (``{}``
    when only their combination does). The model is unchanged (raised while planning)."""

    def __init__(self, message: str, groups: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.groups = dict(groups or {})


@dataclasses.dataclass
class Solution:
    """The result of :func:`solve`: ``values``: the value after pruning of every attribute an expression
    of a changed size reads (``{(module path, name, index or None): (old, new)}``); ``conflicts``: one
    message per size that cannot be made right."""

    values: dict[tuple[str, str, int | None], tuple[int, int]]
    conflicts: list[str]
    whole: dict[tuple[str, str], tuple]


class _Unsolvable(Exception):
    pass


def _evaluate(e: Expr, env: dict, new_size: Callable[[np.ndarray], int]) -> int:
    if isinstance(e, Attr):
        return env.get(e.key, e.value)
    if isinstance(e, Size):
        return new_size(e.classes) if e.classes is not None else e.value
    if isinstance(e, BinOp):
        a, b = _evaluate(e.a, env, new_size), _evaluate(e.b, env, new_size)
        if e.op in ("//", "%") and b == 0:
            raise _Unsolvable("division by zero")
        return _OPS[e.op](a, b)
    return e.value


def _unknowns(e: Expr, env: dict) -> list[Attr]:
    return [x for x in leaves(e) if isinstance(x, Attr) and x.key not in env]


def _invert(e: Expr, target: int, env: dict, new_size: Callable[[np.ndarray], int]) -> tuple[Attr, int]:
    """The value of the single unknown attribute in ``e`` that makes ``e == target``."""
    if isinstance(e, Attr):
        return e, target
    if not isinstance(e, BinOp):
        raise _Unsolvable("no attribute to solve for")
    left = bool(_unknowns(e.a, env))
    known = _evaluate(e.b if left else e.a, env, new_size)
    sub = e.a if left else e.b
    op = e.op
    if op == "+":
        return _invert(sub, target - known, env, new_size)
    if op == "-":
        return _invert(sub, target + known if left else known - target, env, new_size)
    if op == "*":
        if known == 0 or target % known:
            raise _Unsolvable(f"{target} is not a multiple of {known}")
        return _invert(sub, target // known, env, new_size)
    if op == "//" and left:
        if known <= 0:
            raise _Unsolvable("division by a non-positive number")
        return _invert(sub, target * known + sub.value % known, env, new_size)
    if op == "//" and target > 0 and known // (known // target) == target:
        return _invert(sub, known // target, env, new_size)
    raise _Unsolvable(f"cannot solve {render(e)} = {target}")


def _invert_one(
    e: Expr, target: int, env: dict, new_size: Callable[[np.ndarray], int]
) -> tuple[Attr, int] | None:
    """Solve ``e == target`` for one of its unknown attributes, the others keeping their values, trying
    them left to right (``self.in_channels // self.num_paths``: the width before the count)."""
    for leaf in dict.fromkeys(_unknowns(e, env)):
        trial = {**env, **{x.key: x.value for x in _unknowns(e, env) if x.key != leaf.key}}
        try:
            found, v = _invert(e, target, trial, new_size)
            if v > 0 and _evaluate(e, {**trial, found.key: v}, new_size) == target:
                return found, v
        except _Unsolvable:
            continue
    return None


def solve(uses: Sequence[ShapeUse], new_size: Callable[[np.ndarray], int]) -> Solution:
    """New values of the attributes that the recorded shape ops read, given the new size of every channel
    dim (``new_size(classes)``: how many of those indices a plan keeps), and the sizes that cannot match.

    Order: a position whose size is a bare attribute fixes it (two positions asking different values for
    one attribute conflict); then a position with one unknown attribute inside arithmetic is solved for it,
    while its value would change; then every position is evaluated. A literal that would have to change is
    a conflict (named with its file and line); a constant that the trace could not follow (not written in
    the code at that line) is left to the oracle.

    Returns a :class:`Solution`; raises nothing.
    """
    rows = []
    for use in uses:
        for p in use.positions:
            need = new_size(p.classes) if p.classes is not None else p.size
            rows.append((use, p, need))
    env: dict[tuple, int] = {}
    conflicts: list[str] = []
    bare: dict[tuple, tuple[int, ShapeUse, Position]] = {}
    for use, p, need in rows:
        if isinstance(p.expr, Attr):
            prev = bare.get(p.expr.key)
            if prev is not None and prev[0] != need:
                conflicts.append(
                    f"{use.where} at {use.site_text()}: {p.label} is {render(p.expr)}, which must be "
                    f"{need} there but {prev[0]} at {prev[1].where} ({prev[2].label}) after pruning"
                )
                continue
            bare[p.expr.key] = (need, use, p)
            env[p.expr.key] = need
    for _ in range(4):  # attributes solved inside arithmetic, until nothing changes
        progress = False
        for _use, p, need in rows:
            if isinstance(p.expr, (Attr, Const, Size)) or not _unknowns(p.expr, env):
                continue
            try:
                if _evaluate(p.expr, env, new_size) == need:
                    continue
            except _Unsolvable:
                continue
            found = _invert_one(p.expr, need, env, new_size)
            if found is not None:
                env[found[0].key] = found[1]
                progress = True
        if not progress:
            break
    for use, p, need in rows:
        try:
            got = _evaluate(p.expr, env, new_size)
        except _Unsolvable as e:
            conflicts.append(f"{use.where} at {use.site_text()}: {p.label} = {render(p.expr)}: {e}")
            continue
        if got == need:
            continue
        if isinstance(p.expr, Const):
            if literal_in_source(use.site, p.expr.value):
                conflicts.append(
                    f"{use.where} at {use.site_text()}: {p.label} is the literal {p.expr.value} in the code, "
                    f"but the pruned tensor there has {need}: write that size from an attribute (such as "
                    f"self.num_heads) or protect the module"
                )
            continue
        conflicts.append(
            f"{use.where} at {use.site_text()}: {p.label} = {render(p.expr)} evaluates to {got} after "
            f"pruning, but the pruned tensor there has {need}"
        )
    values: dict[tuple[str, str, int | None], tuple[int, int]] = {}
    whole: dict[tuple[str, str], tuple] = {}
    for _use, p, _ in rows:
        for leaf in leaves(p.expr):
            if isinstance(leaf, Attr):
                values[leaf.key] = (leaf.value, env.get(leaf.key, leaf.value))
                if leaf.index is not None and leaf.whole is not None:
                    whole[(leaf.path, leaf.name)] = leaf.whole
    for k, (_old, new) in values.items():
        if new <= 0:
            conflicts.append(f"attribute {render(Attr(k[0], k[1], 0, k[2]))} would become {new}")
    return Solution(values, list(dict.fromkeys(conflicts)), whole)


def read_attributes(uses: Sequence[ShapeUse]) -> set[tuple[str, str]]:
    """``(module path, attribute name)`` of every attribute the recorded shape ops read."""
    return {
        (leaf.path, leaf.name)
        for use in uses
        for p in use.positions
        for leaf in leaves(p.expr)
        if isinstance(leaf, Attr)
    }


def attribute_changes(solution: Solution) -> dict[str, dict[str, list]]:
    """The attribute writes of a :class:`Solution` in a plan's ``"attributes"`` format: ``{module path:
    {name: [old, new]}}``; an element of a stored tuple or list rewrites the whole sequence (as a list)."""
    out: dict[str, dict[str, list]] = {}
    seqs: dict[tuple[str, str], list[int]] = {}
    for (path, name, index), (old, new) in solution.values.items():
        if index is None:
            if new != old:
                out.setdefault(path, {})[name] = [old, new]
            continue
        whole = solution.whole.get((path, name))
        if whole is None or index >= len(whole):
            continue
        seq = seqs.setdefault((path, name), list(whole))
        seq[index] = new
    for (path, name), seq in seqs.items():
        old_seq = list(solution.whole[(path, name)])
        if seq != old_seq:
            out.setdefault(path, {})[name] = [old_seq, seq]
    return out

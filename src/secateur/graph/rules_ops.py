"""Coupling rules for tiling, sliding windows (im2col / col2im), vector and matrix norms and Fourier
transforms.

Each rule states, per dim of its input, whether the op *passes* it (output index ``i`` holds input channel
``i``: the atoms are carried over), *copies* it (each output index holds one input channel, several indices
the same one: the atoms repeat), *merges* it (several input channels sum into one output channel: they become
one unit, removed whole) or *mixes* it (each output value depends on every index of the dim: a channel dim
there is frozen with a reason that names the op). :mod:`secateur.graph.rules` registers them:

=====================  ===========================================================================
op                     dims
=====================  ===========================================================================
``tile``               every dim copied ``reps`` times in a row (``np.tile``); missing reps are 1
``Tensor.unfold``      ``unfold(d, size, step)``: dim ``d`` becomes the window index (mixed: frozen
                       if it carries channels), a new last dim of ``size`` positions; others pass
``F.unfold`` (im2col)  ``(B, C, H, W) -> (B, C*k, L)``: each channel copied over its ``k`` kernel
                       positions (channel-major); spatial dims become ``L`` (frozen)
``F.fold`` (col2im)    ``(B, C*k, L) -> (B, C, H, W)``: the ``k`` entries of channel ``c`` sum into
                       output channel ``c``: merged into one unit; ``L`` frozen
``linalg_*norm``       reduced dims (``dim``; all dims when ``None``; matrix norms the last two) are
                       mixed; the others pass (``keepdim`` keeps size-1 dims without channels)
``fft_*``              transformed dims (``dim``/``s``, as torch.fft defaults them) are mixed; the
                       others pass; a transformed dim that changes size (``rfft``, ``n=``) has no
                       channel identity after it
``fftshift``           a roll along its dims: mixed (frozen) there, others pass
``real`` ``imag``...   complex views: ``view_as_real`` adds a size-2 last dim, ``view_as_complex``
                       drops it; the others keep the shape
=====================  ===========================================================================

"Mixed" dims are frozen rather than coupled: zeroing a channel of a masked model leaves the other outputs of
a Fourier transform or a norm different from those of the compacted model, so no choice of units is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from secateur._torch import iter_tensors
from secateur.graph.tracer import OpContext, Rule

__all__ = [
    "COMPLEX_VIEW_OPS",
    "FFT_OPS",
    "NORM_OPS",
    "complex_view_rule",
    "fft_rule",
    "fold_rule",
    "im2col_rule",
    "linalg_norm_rule",
    "op_rules",
    "tensor_unfold_rule",
    "tile_rule",
    "unfold_rule",
]


def _norm_dims(dim: Any, n: int) -> list[int]:
    """``dim`` (an int or a sequence of ints, possibly negative) as sorted non-negative dims of an n-d
    tensor."""
    ds = [dim] if isinstance(dim, int) else list(dim)
    return sorted({d + n if d < 0 else d for d in ds})


def _out(ctx: OpContext) -> torch.Tensor:
    return next(iter_tensors(ctx.out))


# --------------------------------------------------------------------------------------------------
# tile
# --------------------------------------------------------------------------------------------------
def tile_rule(ctx: OpContext) -> None:
    """``tile(x, reps)`` / ``x.tile(*reps)``: dim ``i`` of the output is ``reps[i]`` copies of dim ``i`` in a
    row, so index ``j`` holds channel ``j % size`` (``np.tile`` of the atoms); with fewer reps than dims
    the leading dims are repeated once, with more the output gains leading dims without channels."""
    x = ctx.args[0]
    reps = ctx.args[1] if len(ctx.args) == 2 and not isinstance(ctx.args[1], int) else ctx.args[1:]
    if not reps:
        reps = ctx.kwargs.get("dims", ())
    reps = [int(r) for r in reps]
    dims = list(ctx.dims(x))
    reps = [1] * (len(dims) - len(reps)) + reps
    off = len(reps) - len(dims)
    res: list = [None] * off
    for d, r in zip(dims, reps[off:]):
        res.append(None if d is None else np.tile(d, r))
    ctx.set_dims(_out(ctx), res)


# --------------------------------------------------------------------------------------------------
# sliding windows
# --------------------------------------------------------------------------------------------------
def tensor_unfold_rule(ctx: OpContext) -> None:
    """``x.unfold(dimension, size, step)``: ``(..., S, ...) -> (..., n_windows, ..., size)``. Windows slide
    along ``dimension``: a channel dim there is frozen (a window index mixes channels); every other dim
    passes; the new last dim (position inside a window) has no channel identity."""
    x = ctx.args[0]
    dims = list(ctx.dims(x))
    if not dims:  # a 0-d tensor: unfold adds one dim
        ctx.set_dims(_out(ctx), [None] * _out(ctx).dim())
        return
    d = _norm_dims(ctx.arg(1, "dimension"), len(dims))[0]
    ctx.freeze(dims[d], "'unfold' slides windows along a channel dim")
    dims[d] = None
    ctx.set_dims(_out(ctx), dims + [None])


def im2col_rule(ctx: OpContext) -> None:
    """``F.unfold`` (im2col): ``(B, C, H, W) -> (B, C*k, L)`` (or unbatched ``(C, H, W) -> (C*k, L)``), ``k``
    the kernel positions; output index ``c*k + j`` holds channel ``c``, so each channel's atoms repeat ``k``
    times (channel-major); the spatial dims become the ``L`` block positions (no channel identity; a channel
    dim there is frozen: the block count follows its size)."""
    x = ctx.args[0]
    out = _out(ctx)
    dims = list(ctx.dims(x))
    cd = x.dim() - 3
    c = dims[cd]
    k = out.shape[cd] // x.shape[cd] if x.shape[cd] else 1
    for d in dims[cd + 1 :]:  # the block count L follows the spatial sizes: a channel dim there is frozen
        ctx.freeze(d, "'unfold' (im2col) slides blocks over a channel dim")
    ctx.set_dims(out, dims[:cd] + [None if c is None else np.repeat(c, k), None])


def unfold_rule(ctx: OpContext) -> None:
    """``unfold``: ``F.unfold`` / ``nn.Unfold`` (im2col, :func:`im2col_rule`) or ``Tensor.unfold(dimension,
    size, step)`` (sliding windows along one dim, :func:`tensor_unfold_rule`); both trace as ``'unfold'``."""
    if ctx.func is torch.nn.functional.unfold:
        im2col_rule(ctx)
    else:
        tensor_unfold_rule(ctx)


def fold_rule(ctx: OpContext) -> None:
    """``F.fold`` (col2im): ``(B, C*k, L) -> (B, C, H, W)`` (or unbatched ``(C*k, L) -> (C, H, W)``): the
    ``k`` entries ``c*k .. c*k + k - 1`` are summed (over overlapping blocks) into output channel ``c``, so
    they become one unit (removed whole) and the output channel carries it. A channel dim on ``L`` (the block
    positions, whose count ``output_size`` fixes) is frozen. An input whose channel-major
    layout differs (``(k, C)`` flattened) merges more channels into a unit: coarser, never wrong."""
    x = ctx.args[0]
    out = _out(ctx)
    dims = list(ctx.dims(x))
    cd = x.dim() - 2
    c = dims[cd]
    n_out = out.shape[cd]
    # the L block positions are summed into the spatial output (L is fixed by output_size): frozen
    ctx.freeze(dims[cd + 1], "'fold' (col2im) sums the block dim into spatial positions")
    o = None
    if c is not None and n_out:
        rows = c.reshape(n_out, -1)
        ctx.union_rows(rows)
        o = rows[:, 0].copy()
    ctx.set_dims(out, dims[:cd] + [o] + [None] * (out.dim() - cd - 1))


# --------------------------------------------------------------------------------------------------
# vector and matrix norms
# --------------------------------------------------------------------------------------------------
#: op name -> (position of ``dim``, its default: ``None`` = every dim)
NORM_OPS: dict[str, tuple[int, Any]] = {
    "linalg_vector_norm": (2, None),
    "linalg_norm": (2, None),
    "linalg_matrix_norm": (2, (-2, -1)),
    "frobenius_norm": (1, (-2, -1)),
    "nuclear_norm": (1, (-2, -1)),
}


def linalg_norm_rule(ctx: OpContext) -> None:
    """``torch.linalg.vector_norm(x, ord, dim, keepdim)`` and the other norms of :data:`NORM_OPS`: the
    reduced dims mix their indices (a channel dim there is frozen: the masked and the compacted norms would
    differ whenever a masked channel is not exactly zero); the other dims pass, and ``keepdim`` leaves
    size-1 dims without channels."""
    x = ctx.args[0]
    pos, default = NORM_OPS[ctx.name]
    dim = ctx.arg(pos, "dim", default)
    if isinstance(dim, bool):  # nuclear_norm(x, keepdim): the overload without dim
        dim = default
    dims = list(ctx.dims(x))
    red = set(range(len(dims))) if dim is None else set(_norm_dims(dim, len(dims)))
    for d in sorted(red):
        ctx.freeze(dims[d], f"'{ctx.name}' reduces over a channel dim")
    out = _out(ctx)
    if out.dim() == len(dims):
        res = [None if i in red else a for i, a in enumerate(dims)]
    else:
        res = [a for i, a in enumerate(dims) if i not in red]
    ctx.set_dims(out, res if len(res) == out.dim() else [None] * out.dim())


# --------------------------------------------------------------------------------------------------
# Fourier transforms
# --------------------------------------------------------------------------------------------------
_FFT_1D = "fft ifft rfft irfft hfft ihfft".split()
_FFT_2D = "fft2 ifft2 rfft2 irfft2 hfft2 ihfft2".split()
_FFT_ND = "fftn ifftn rfftn irfftn hfftn ihfftn".split()
#: torch.fft ops traced as ``fft_<name>``.
FFT_OPS: list[str] = [f"fft_{n}" for n in _FFT_1D + _FFT_2D + _FFT_ND + ["fftshift", "ifftshift"]]


def fft_dims(name: str, args: Sequence, kwargs: dict, ndim: int) -> list[int]:
    """The dims a ``torch.fft`` op transforms (non-negative, sorted), with torch's defaults: 1-d
    transforms ``dim=-1``; 2-d ``dim=(-2, -1)``; n-d ``dim=None``: the last ``len(s)`` dims when ``s`` is
    given, else every dim; ``fftshift`` / ``ifftshift`` ``dim=None``: every dim."""
    base = name.removeprefix("fft_")

    def arg(i: int, key: str) -> Any:
        return args[i] if len(args) > i else kwargs.get(key)

    if base in ("fftshift", "ifftshift"):
        dim = arg(1, "dim")
        return list(range(ndim)) if dim is None else _norm_dims(dim, ndim)
    dim = arg(2, "dim")
    if base in _FFT_1D:
        return _norm_dims(-1 if dim is None else dim, ndim)
    if base in _FFT_2D:
        return _norm_dims((-2, -1) if dim is None else dim, ndim)
    if dim is not None:
        return _norm_dims(dim, ndim)
    s = arg(1, "s")
    return list(range(ndim - len(s), ndim)) if s is not None else list(range(ndim))


def fft_rule(ctx: OpContext) -> None:
    """``torch.fft.*``: every output index of a transformed dim depends on every input index (a channel dim
    there is frozen: 'mixes a channel dim', named); dims not transformed pass through like an elementwise
    op. A transformed dim keeps its (frozen) atoms when its size is unchanged, none otherwise."""
    x = ctx.args[0]
    out = _out(ctx)
    dims = list(ctx.dims(x))
    mixed = fft_dims(ctx.name, ctx.args, ctx.kwargs, len(dims))
    for d in mixed:
        ctx.freeze(dims[d], f"'{ctx.name}' mixes a channel dim (Fourier transform along it)")
    if out.dim() != len(dims):
        ctx.set_dims(out, [None] * out.dim())
        return
    res = [None if (i in mixed and out.shape[i] != x.shape[i]) else a for i, a in enumerate(dims)]
    ctx.set_dims(out, res)


# --------------------------------------------------------------------------------------------------
# complex views
# --------------------------------------------------------------------------------------------------
COMPLEX_VIEW_OPS = "real imag angle view_as_real view_as_complex".split()


def complex_view_rule(ctx: OpContext) -> None:
    """``.real`` / ``.imag`` / ``angle`` keep the shape and channels; ``view_as_real`` adds a last dim of
    size 2 (real, imaginary: no channel identity); ``view_as_complex`` drops it (a channel dim of size 2
    there is frozen: its two entries become one complex value)."""
    x = ctx.args[0]
    out = _out(ctx)
    dims = list(ctx.dims(x))
    if ctx.name == "view_as_real":
        res = dims + [None]
    elif ctx.name == "view_as_complex":
        ctx.freeze(dims[-1], "'view_as_complex' pairs the entries of a channel dim")
        res = dims[:-1]
    else:
        res = dims
    ctx.set_dims(out, res if len(res) == out.dim() else [None] * out.dim())


def op_rules() -> dict[str, Rule]:
    """Op name -> rule for every op of this module (what :mod:`secateur.graph.rules` registers)."""
    rules: dict[str, Rule] = {"tile": tile_rule, "unfold": unfold_rule, "fold": fold_rule}
    rules.update(dict.fromkeys(NORM_OPS, linalg_norm_rule))
    rules.update(dict.fromkeys(FFT_OPS, fft_rule))
    rules.update(dict.fromkeys(COMPLEX_VIEW_OPS, complex_view_rule))
    return rules

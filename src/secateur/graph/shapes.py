"""Shape-only results of ops during a meta trace: the output tensor of the right shape, dtype and layout,
without running the op.

Why: on ``meta`` tensors a trace needs shapes, not values, but many meta kernels are slow Python
decompositions (batch/layer norms, activations, convolutions, linear, attention). For these ops
:func:`meta_result` builds the empty output directly (3-10x faster traces). Each shape function follows the
op's documented output-shape formula (``torch.nn.functional``) and returns ``None`` for any call it does not
cover exactly (unusual layouts, keyword arguments, mixed dtypes), and the op then runs as usual;
``tests/graph/test_speed_equivalence.py`` checks every fast path against the real op.

Tables: :data:`META_SHAPES` (ops always answered from shapes, ``f(args, kwargs)``) and :data:`META_MAYBE`
(ops answered for some calls only, ``f(args, kwargs, inplace)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["META_MAYBE", "META_SHAPES", "is_inplace", "meta_result"]

_INPLACE: dict[Any, bool] = {}
_INPLACE_DUNDERS = {
    f"__i{op}__" for op in "add sub mul truediv div floordiv mod pow and or xor lshift rshift matmul".split()
}


def is_inplace(func: Any) -> bool:
    """``Tensor.add_``, ``Tensor.__iadd__``...: the op writes into its first argument and returns it."""
    try:
        return _INPLACE[func]
    except (KeyError, TypeError):
        pass
    raw = getattr(func, "__name__", "") or ""
    res = (raw.endswith("_") and not raw.endswith("__")) or raw in _INPLACE_DUNDERS
    if len(_INPLACE) < 4096:
        try:
            _INPLACE[func] = res
        except TypeError:
            pass
    return res


def _like(args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs["input"]
    dtype = kwargs.get("dtype")
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        # dense: what empty_like (preserve_format) gives, without its slow Python meta decomposition
        return torch.empty_strided(x.shape, x.stride(), dtype=dtype or x.dtype, device=x.device)
    return torch.empty_like(x, dtype=dtype) if dtype is not None else torch.empty_like(x)


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    if a == b:
        return a
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + a
    b = (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(out)


_SCALARS = (int, float)


@functools.lru_cache(maxsize=4096)
def _row_major(shape: tuple) -> tuple:
    strides = []
    acc = 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _standard(t: torch.Tensor) -> bool:
    """Row-major strides exactly, size-1 dims included: a layout no op reads as channels-last."""
    return t.stride() == _row_major(tuple(t.shape))


def _binary_shape(args: tuple, kwargs: dict, inplace: bool = False) -> torch.Tensor | None:
    """add/sub/mul/div of two row-major floating tensors of one dtype (or one and a Python number): a
    row-major tensor of the broadcast shape (in place: the first argument itself, when the result has its
    shape). ``None`` (run the op) for anything else."""
    if kwargs or len(args) != 2:
        return None
    a, b = args
    if not isinstance(a, torch.Tensor):
        if inplace:
            return None
        a, b = b, a
        if not isinstance(a, torch.Tensor):
            return None
    if type(a) is not torch.Tensor or not a.is_floating_point() or not _standard(a):
        return None
    if isinstance(b, torch.Tensor):
        if type(b) is not torch.Tensor or b.dtype != a.dtype or b.device != a.device or not _standard(b):
            return None
        shape = _broadcast(tuple(a.shape), tuple(b.shape))
        if shape is None:
            return None
    elif isinstance(b, _SCALARS) and not isinstance(b, bool):
        shape = tuple(a.shape)
    else:
        return None
    if inplace:
        return a if shape == tuple(a.shape) else None
    return torch.empty(shape, dtype=a.dtype, device=a.device)


def _adaptive_avg_pool2d_shape(args: tuple, kwargs: dict, inplace: bool = False) -> torch.Tensor | None:
    """F.adaptive_avg_pool2d of a row-major 3-d or 4-d floating tensor: a row-major tensor of the output
    shape. ``None`` (run the op) for anything else."""
    if kwargs or len(args) != 2 or inplace:
        return None
    x, size = args
    if type(x) is not torch.Tensor or x.dim() not in (3, 4) or not x.is_floating_point() or not _standard(x):
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        return None
    out = []
    for o, i in zip(size, x.shape[-2:]):
        if o is None:
            o = i
        if not isinstance(o, int) or isinstance(o, bool) or o < 1 or i < 1:
            return None
        out.append(o)
    return torch.empty((*x.shape[:-2], *out), dtype=x.dtype, device=x.device)


def _pair(v: Any, n: int) -> tuple | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * n
    if isinstance(v, (tuple, list)) and len(v) == n and all(isinstance(i, int) for i in v):
        return tuple(v)
    if isinstance(v, (tuple, list)) and len(v) == 1 and isinstance(v[0], int):
        return (v[0],) * n
    return None


def _conv_shape(args: tuple, kwargs: dict, inplace: bool = False) -> torch.Tensor | None:
    """F.conv{1,2,3}d of a batched row-major input and weight (positional arguments, numeric or 'valid'
    padding): a row-major tensor of the output shape from the usual formula. ``None`` (run the op) for
    anything else."""
    if kwargs or len(args) < 2 or inplace:
        return None
    x, w = args[0], args[1]
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or x.dim() != w.dim() or x.dim() < 3:
        return None
    n = x.dim() - 2
    if type(x) is not torch.Tensor or x.dtype != w.dtype or x.device != w.device:
        return None
    if not (_standard(x) and _standard(w)):  # other layouts: let the op pick the output's memory format
        return None
    b = args[2] if len(args) > 2 else None
    if b is not None and not (isinstance(b, torch.Tensor) and b.dtype == x.dtype):
        return None
    stride = _pair(args[3] if len(args) > 3 else 1, n)
    pad_arg = args[4] if len(args) > 4 else 0
    dilation = _pair(args[5] if len(args) > 5 else 1, n)
    groups = args[6] if len(args) > 6 else 1
    if stride is None or dilation is None or not isinstance(groups, int) or groups < 1:
        return None
    k = tuple(w.shape[2:])
    if isinstance(pad_arg, str):
        if pad_arg == "valid":
            padding = (0,) * n
        else:
            return None
    else:
        padding = _pair(pad_arg, n)
        if padding is None:
            return None
    if x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
        return None
    if b is not None and tuple(b.shape) != (w.shape[0],):
        return None
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        return None
    spatial = []
    for i in range(n):
        o = (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1
        if o <= 0:
            return None
        spatial.append(o)
    return torch.empty((x.shape[0], w.shape[0], *spatial), dtype=x.dtype, device=x.device)


def _linear_shape(args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs["input"]
    w = args[1] if len(args) > 1 else kwargs["weight"]
    shape = tuple(x.shape[:-1]) + ((w.shape[0],) if w.dim() == 2 else ())
    return torch.empty(shape, dtype=x.dtype, device=x.device)


def _sdpa_shape(args: tuple, kwargs: dict) -> torch.Tensor:
    q = args[0] if args else kwargs["query"]
    v = args[2] if len(args) > 2 else kwargs["value"]
    return torch.empty(tuple(q.shape[:-1]) + (v.shape[-1],), dtype=q.dtype, device=q.device)


# Shape-only results for ops whose meta kernels are slow Python decompositions: on meta tensors a trace
# needs shapes, not values, so these ops are not executed at all (3-10x faster traces).
META_SHAPES: dict[str, Callable] = {
    **{
        n: _like
        for n in (
            "batch_norm",
            "instance_norm",
            "group_norm",
            "layer_norm",
            "rms_norm",
            "relu",
            "gelu",
            "silu",
            "sigmoid",
            "tanh",
            "hardswish",
            "hardsigmoid",
            "relu6",
            "mish",
            "elu",
            "leaky_relu",
            "dropout",
            "dropout1d",
            "dropout2d",
            "softmax",
            "log_softmax",
        )
    },
    "linear": _linear_shape,
    "scaled_dot_product_attention": _sdpa_shape,
}
# Shape-only results that apply only to some calls (they return None otherwise, and the op then runs).
# Called as ``f(args, kwargs, inplace)``; ``inplace``: the op writes into (and returns) its first argument.
META_MAYBE: dict[str, Callable] = {
    **{n: _binary_shape for n in ("add", "sub", "mul", "div", "true_divide", "radd", "rmul")},
    **{n: _binary_shape for n in ("iadd", "isub", "imul", "itruediv")},  # in place (see is_inplace)
    **{n: _conv_shape for n in ("conv1d", "conv2d", "conv3d")},
    "adaptive_avg_pool2d": _adaptive_avg_pool2d_shape,
}


def meta_result(name: str, func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The output of op ``func`` (registry key ``name``, :func:`secateur._torch.op_name`) on meta tensors
    from shapes alone (an empty tensor of the output's shape, dtype, device and strides; in place: the
    first argument itself), or ``None`` when the op must run: it has no shape function, or this call is
    not one the function covers."""
    fast = META_SHAPES.get(name)
    if fast is not None:
        return fast(args, kwargs)
    maybe = META_MAYBE.get(name)
    if maybe is None:
        return None
    return maybe(args, kwargs) if not is_inplace(func) else maybe(args, kwargs, True)

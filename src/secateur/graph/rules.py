"""Coupling rules: how each op maps the channel dimensions of its inputs to those of its outputs.

A rule is ``rule(ctx: OpContext) -> None``; it couples input dims (``ctx.couple``), freezes channels that
must not be pruned (``ctx.freeze``) and sets the atoms of every output (``ctx.set_dims``). Rules are keyed
by op name (``"add"`` covers ``torch.add``, ``Tensor.add``, ``Tensor.__add__``; in-place and reflected
operator names are listed explicitly). Users add rules with :func:`register_rule` and
:func:`register_module_rule`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from secateur._torch import iter_tensors, op_name
from secateur.graph.rules_ops import op_rules
from secateur.graph.tracer import ModuleRule, OpContext, Rule

RULES: dict[str, Rule] = {}
MODULE_RULES: dict[type, ModuleRule] = {}


def register_rule(op: Any, rule: Rule | None = None) -> Any:
    """Register ``rule`` for a torch function, Tensor method or op name (str); usable as a decorator.

    The rule is called as ``rule(ctx)`` with an :class:`~secateur.graph.tracer.OpContext` whenever the op
    runs on a tensor carrying channels. Example, an op that keeps its input's shape and works per channel::

        register_rule(torch.special.i0, secateur.graph.rules.identity_rule)
    """
    names = op if isinstance(op, (list, tuple)) else [op]

    def deco(fn: Rule) -> Rule:
        for o in names:  # keys as op_name makes them: in-place "zero_" and "__iadd__" are looked up bare
            RULES[o.strip("_") if isinstance(o, str) else op_name(o)] = fn
        return fn

    return deco(rule) if rule is not None else deco


def register_module_rule(cls: type, rule: ModuleRule) -> None:
    """Treat modules of type ``cls`` as one op: the ops inside are not traced and
    ``rule(ctx, module, args, kwargs, output)`` maps the module's inputs to its output."""
    MODULE_RULES[cls] = rule


def _norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


def _first_out(ctx: OpContext) -> torch.Tensor | None:
    return next(iter_tensors(ctx.out), None)


# --------------------------------------------------------------------------------------------------
# elementwise and identity
# --------------------------------------------------------------------------------------------------
def broadcast_couple(ctx: OpContext, tensors: list[torch.Tensor], out_shape: tuple[int, ...]) -> list:
    """Couple equal-size dims of ``tensors`` aligned from the right (numpy broadcasting); returns out dims."""
    nd = len(out_shape)
    out_dims: list = [None] * nd
    for k in range(1, nd + 1):
        size = out_shape[-k]
        if size <= 1:
            continue
        arr = None
        seen_none = False
        for t in tensors:
            if t.dim() < k or t.shape[-k] != size:
                continue
            d = ctx.dims(t)[-k]
            if d is None:
                seen_none = True
            elif arr is None:
                arr = d
            else:
                ctx.couple(arr, d)
        if arr is not None and seen_none:
            ctx.freeze(arr, "elementwise op with a tensor whose dim has no channel identity")
        out_dims[-k] = arr
    return out_dims


def elementwise_rule(ctx: OpContext) -> None:
    """Add, mul, where, activations...: same-size dims are coupled, broadcast dims are free."""
    ins = list(iter_tensors(ctx.args)) + list(iter_tensors(ctx.kwargs))
    for out in iter_tensors(ctx.out):
        ctx.set_dims(out, broadcast_couple(ctx, ins, tuple(out.shape)))


def identity_rule(ctx: OpContext) -> None:
    """The output has the first input's shape and channels (``contiguous``, ``to``, ``clone``)."""
    x = next(iter_tensors(ctx.args))
    dims = ctx.dims(x)
    for out in iter_tensors(ctx.out):
        if out.dim() == len(dims):
            ctx.set_dims(out, dims)
        else:
            for d in dims:
                ctx.freeze(d, "identity-like op changed the rank")
            ctx.set_dims(out, [None] * out.dim())


def new_tensor_rule(ctx: OpContext) -> None:
    """``x.new_zeros(size)`` and the like: a fresh tensor whose dims carry no channels."""
    for out in iter_tensors(ctx.out):
        ctx.set_dims(out, [None] * out.dim())


ELEMENTWISE = """add sub mul div true_divide floor_divide remainder fmod pow float_power maximum minimum fmax
fmin where addcmul addcdiv lerp clamp clip clamp_min clamp_max masked_fill eq ne lt le gt ge greater less
greater_equal less_equal logical_and logical_or logical_xor logical_not bitwise_and bitwise_or bitwise_xor
bitwise_not and or xor invert copysign atan2 hypot xlogy rsub radd rmul rtruediv rdiv rpow rfloordiv rmod
rand ror rxor neg abs relu relu6 gelu silu sigmoid tanh exp exp2 expm1 log log2 log10 log1p sqrt rsqrt erf
erfc erfinv sin cos tan asin acos atan sinh cosh asinh acosh atanh softplus softsign hardswish hardsigmoid
hardtanh leaky_relu elu selu celu mish logsigmoid tanhshrink softshrink hardshrink threshold prelu rrelu
square reciprocal sign sgn floor ceil round trunc frac nan_to_num isnan isinf isfinite dropout dropout1d
dropout2d dropout3d alpha_dropout feature_alpha_dropout sigmoid_ gelu_ relu_ silu_ add_ sub_ mul_ div_ pow_
clamp_ clamp_min_ masked_fill_ neg_ exp_ tanh_ sqrt_ rsqrt_ abs_ iadd isub imul itruediv idiv ipow ifloordiv
hardswish_ hardsigmoid_ leaky_relu_ elu_ relu6_ hardtanh_ mish_ celu_ selu_ threshold_ fill_ zero_ lerp_
addcmul_ addcdiv_ copy_ erf_ log_ copy logit heaviside positive conj""".split()
IDENTITY = """contiguous clone detach to type type_as float double half bfloat16 int long bool cpu cuda
data requires_grad_ detach_ zeros_like ones_like empty_like full_like rand_like randn_like
pin_memory resolve_conj resolve_neg as_subclass coalesce alias""".split()
NEW = "new_zeros new_ones new_empty new_full new_tensor".split()

register_rule(ELEMENTWISE, elementwise_rule)
register_rule(IDENTITY, identity_rule)
register_rule(NEW, new_tensor_rule)


# --------------------------------------------------------------------------------------------------
# reductions, softmax, norms
# --------------------------------------------------------------------------------------------------
def _reduce_dims(ctx: OpContext, x: torch.Tensor, dim: Any, keepdim: bool) -> list:
    dims = ctx.dims(x)
    n = len(dims)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        red = set(range(n))
    else:
        red = {_norm_dim(d, n) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    for d in red:
        ctx.freeze(dims[d], "reduction over a channel dim (masked and pruned models would differ)")
    return [None if i in red else a for i, a in enumerate(dims) if keepdim or i not in red]


def reduction_rule(ctx: OpContext) -> None:
    """sum/mean/var/max(dim)/norm...: reduced channel dims are frozen, others pass through.
    ``max(a, b)`` / ``min(a, b)`` with a tensor second argument are elementwise."""
    x = ctx.args[0]
    if len(ctx.args) > 1 and isinstance(ctx.args[1], torch.Tensor):
        elementwise_rule(ctx)
        return
    dim = ctx.kwargs.get("dim", ctx.kwargs.get("axis"))
    pos = 2 if ctx.name == "norm" else 1
    if dim is None and len(ctx.args) > pos:
        a = ctx.args[pos]
        if isinstance(a, (int, list, tuple)) and not isinstance(a, bool):
            dim = a
    for out in iter_tensors(ctx.out):
        dims = _reduce_dims(ctx, x, dim, keepdim=out.dim() == x.dim() and x.dim() > 0)
        ctx.set_dims(out, dims if len(dims) == out.dim() else [None] * out.dim())


_ALONG_DIM_ARG = {"topk": (2, -1), "normalize": (2, 1), "gumbel_softmax": (4, -1)}


def along_dim_rule(ctx: OpContext) -> None:
    """softmax/cumsum/sort along ``dim``: that dim mixes channels, the others pass through."""
    x = ctx.args[0]
    pos, default = _ALONG_DIM_ARG.get(ctx.name, (1, -1))  # topk(x, k, dim), normalize(x, p, dim=1)
    dim = ctx.arg(pos, "dim", default)
    dims = ctx.dims(x)
    if dim is None:
        dim = default
    d = _norm_dim(dim, len(dims)) if dims else 0
    if dims:
        ctx.freeze(dims[d], f"'{ctx.name}' mixes a channel dim")
    for out in iter_tensors(ctx.out):
        ctx.set_dims(out, list(dims) if out.dim() == len(dims) else [None] * out.dim())


register_rule(
    "sum mean nanmean nansum prod amax amin max min std var std_mean var_mean norm logsumexp any all argmax "
    "argmin count_nonzero median nanmedian mode aminmax".split(),
    reduction_rule,
)
register_rule(
    "softmax log_softmax cumsum cumprod cummax cummin sort argsort topk normalize softmin logcumsumexp "
    "gumbel_softmax".split(),
    along_dim_rule,
)


def layer_norm_rule(ctx: OpContext) -> None:
    """layer_norm / rms_norm: weight/bias couple to the last dims, frozen (the statistics mix them)."""
    x = ctx.args[0]
    shape = ctx.arg(1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    dims = ctx.dims(x)
    for name, i in (("weight", 2), ("bias", 3)):
        w = ctx.arg(i, name)
        if isinstance(w, torch.Tensor):
            for j, wd in enumerate(ctx.dims(w)):
                ctx.couple(dims[len(dims) - k + j], wd) if x.shape[len(dims) - k + j] > 1 else None
    for j in range(len(dims) - k, len(dims)):
        ctx.freeze(dims[j], f"'{ctx.name}' normalises over a channel dim")
    ctx.set_dims(_first_out(ctx), dims)


def batch_norm_rule(ctx: OpContext) -> None:
    """batch_norm / instance_norm: per-channel along dim 1; stats and affine params are coupled to it."""
    x = ctx.args[0]
    dims = list(ctx.dims(x))
    c = dims[1] if len(dims) > 1 else None
    names = (
        (("running_mean", 1), ("running_var", 2), ("weight", 3), ("bias", 4))
        if ctx.name == "batch_norm"
        else (("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4))
    )
    for name, i in names:
        t = ctx.arg(i, name)
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == x.shape[1] > 1:
            td, bound = ctx.dims_binding(t, {0: c})
            if not bound:
                c = ctx.couple(c, td[0])
    if len(dims) > 1:
        dims[1] = c
    ctx.set_dims(_first_out(ctx), dims)


def group_norm_rule(ctx: OpContext) -> None:
    """group_norm: each of the ``num_groups`` channel blocks becomes one unit (removed whole)."""
    x = ctx.args[0]
    g = ctx.arg(1, "num_groups")
    dims = list(ctx.dims(x))
    c = dims[1]
    for name, i in (("weight", 2), ("bias", 3)):
        t = ctx.arg(i, name)
        if isinstance(t, torch.Tensor):
            c = ctx.couple(c, ctx.dims(t)[0])
    if c is not None:
        if g == 1:
            ctx.freeze(c, "group_norm with one group normalises over all channels")
        else:
            ctx.union_rows(c.reshape(g, -1))
            ctx.record_split(g, x.shape[1] // g, c.reshape(g, -1)[:, 0], kind="groups")
    dims[1] = c
    ctx.set_dims(_first_out(ctx), dims)


register_rule(["layer_norm", "rms_norm"], layer_norm_rule)
register_rule(["batch_norm", "instance_norm"], batch_norm_rule)
register_rule("group_norm", group_norm_rule)


# --------------------------------------------------------------------------------------------------
# weighted layers
# --------------------------------------------------------------------------------------------------
def linear_rule(ctx: OpContext) -> None:
    """linear(x, W[out, in], b[out]): x's last dim <-> W dim 1; output last dim = W dim 0 (+ bias)."""
    x, w = ctx.args[0], ctx.arg(1, "weight")
    b = ctx.arg(2, "bias")
    xd = ctx.dims(x)
    wd, bound = ctx.dims_binding(w, {w.dim() - 1: xd[-1] if x.shape[-1] > 1 else None})
    if w.dim() == 1:
        if not bound:
            ctx.couple(xd[-1], wd[0])
        ctx.set_dims(_first_out(ctx), xd[:-1])
        return
    if x.shape[-1] > 1 and not bound:
        ctx.couple(xd[-1], wd[1])
    o = wd[0]
    if isinstance(b, torch.Tensor) and b.dim() == 1 and b.shape[0] > 1:
        bd, bound = ctx.dims_binding(b, {0: o})
        if not bound:
            o = ctx.couple(o, bd[0])
    ctx.set_dims(_first_out(ctx), list(xd[:-1]) + [o])


def conv_rule(ctx: OpContext) -> None:
    """conv{1,2,3}d / conv_transpose: channels along dim 1 of the input/output; grouped convs are pruned by
    whole groups (depthwise: one input channel with its ``multiplier`` outputs per unit)."""
    transposed = "transpose" in ctx.name
    x, w = ctx.args[0], ctx.arg(1, "weight")
    b = ctx.arg(2, "bias")
    if ctx.name == "convolution":  # torch.convolution(input, weight, bias, stride, padding, dilation,
        transposed = bool(ctx.arg(6, "transposed"))  # transposed, output_padding, groups)
        groups = ctx.arg(8, "groups")
    else:  # F.conv*d and F.conv_transpose*d both take groups at position 6
        groups = ctx.arg(6, "groups", 1)
    groups = int(groups or 1)
    xd = list(ctx.dims(x))
    batched = x.dim() == w.dim()
    cdim = 1 if batched else 0
    cin = xd[cdim]
    # an ungrouped conv's input-channel dim is the input's channels (bound, not coupled, when first seen)
    w_in_dim = 0 if transposed else 1
    wd, bound = ctx.dims_binding(w, {w_in_dim: cin if groups == 1 and x.shape[cdim] > 1 else None})
    if transposed:  # weight (Cin, Cout/G, k...)
        w_in, w_out = wd[0], wd[1]
    else:  # weight (Cout, Cin/G, k...)
        w_out, w_in = wd[0], wd[1]
    for k in range(2, w.dim()):
        ctx.freeze(wd[k], "convolution kernel dim")
    out = _first_out(ctx)
    cout_n = out.shape[cdim]
    if groups == 1:
        if x.shape[cdim] > 1 and not bound:
            ctx.couple(cin, w_in)
        o = w_out
    else:
        cin_g, cout_g = x.shape[cdim] // groups, cout_n // groups
        if transposed:
            ctx.freeze(w_out, "position inside a transposed-conv group")
            o_atoms = ctx.new_atoms(cout_n)
            w_in_ok = w_in
        else:
            ctx.freeze(w_in, "position inside a conv group")
            o_atoms = w_out
            w_in_ok = None
        if w_in_ok is not None:
            cin = ctx.couple(cin, w_in_ok)
        if cin is None:
            cin = ctx.new_atoms(x.shape[cdim])
            ctx.freeze(cin, "grouped conv on a tensor without channel identity")
        if o_atoms is None:
            o_atoms = ctx.new_atoms(cout_n)
        mat = np.concatenate([cin.reshape(groups, cin_g), o_atoms.reshape(groups, cout_g)], axis=1)
        ctx.union_rows(mat)
        o = o_atoms
    if isinstance(b, torch.Tensor) and b.shape[0] > 1:
        bd, bound = ctx.dims_binding(b, {0: o})
        if not bound:
            o = ctx.couple(o, bd[0])
    od = [None] * out.dim()
    od[cdim] = o
    ctx.set_dims(out, od)


register_rule("linear", linear_rule)
register_rule(
    "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution".split(), conv_rule
)


def embedding_rule(ctx: OpContext) -> None:
    """embedding(ids, W[V, E]): output (..., E); the vocabulary dim is frozen (ids index into it)."""
    ids, w = ctx.args[0], ctx.args[1]
    wd = ctx.dims(w)
    ctx.freeze(wd[0], "embedding rows are indexed by input ids")
    ctx.set_dims(_first_out(ctx), list(ctx.dims(ids)) + [wd[1]])


register_rule("embedding", embedding_rule)


def _matmul_core(ctx: OpContext, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> list:
    ad, bd = list(ctx.dims(a)), list(ctx.dims(b))
    a_vec, b_vec = a.dim() == 1, b.dim() == 1
    if a_vec:
        ad, a_shape = [None] + ad, (1,) + tuple(a.shape)
    else:
        a_shape = tuple(a.shape)
    if b_vec:
        bd, b_shape = bd + [None], tuple(b.shape) + (1,)
    else:
        b_shape = tuple(b.shape)
    ka, kb = ad[-1], bd[-2]
    both_act = not ctx.is_param_derived(a) and not ctx.is_param_derived(b)
    if ka is not None and kb is not None:
        ctx.couple(ka, kb)
        if both_act:
            ctx.freeze(ka, "contraction between two activations over a channel dim")
    elif a_shape[-1] > 1:
        ctx.couple(ka, kb, "contraction with a tensor without channel identity")
    # batch dims broadcast
    na, nb = len(a_shape) - 2, len(b_shape) - 2
    nbatch = max(na, nb)
    batch = []
    for k in range(nbatch, 0, -1):
        sa = a_shape[na - k] if k <= na else 1
        sb = b_shape[nb - k] if k <= nb else 1
        da = ad[na - k] if k <= na else None
        db = bd[nb - k] if k <= nb else None
        if sa == sb and sa > 1:
            batch.append(ctx.couple(da, db))
        else:
            batch.append(da if sa > 1 else db)
    res = batch + ([] if a_vec else [ad[-2]]) + ([] if b_vec else [bd[-1]])
    if len(res) != out.dim():
        res = [None] * out.dim()
    return res


def matmul_rule(ctx: OpContext) -> None:
    """matmul/mm/bmm (and ``@``): contracted dims coupled; batch dims broadcast-coupled."""
    a, b = ctx.args[0], ctx.args[1]
    out = _first_out(ctx)
    ctx.set_dims(out, _matmul_core(ctx, a, b, out))


def addmm_rule(ctx: OpContext) -> None:
    """addmm/baddbmm/addbmm(bias, a, b): a @ b plus a broadcast bias (Hugging Face Conv1D)."""
    bias, a, b = ctx.args[0], ctx.args[1], ctx.args[2]
    out = _first_out(ctx)
    dims = _matmul_core(ctx, a, b, out)
    for k in range(1, min(bias.dim(), out.dim()) + 1):
        if bias.shape[-k] == out.shape[-k] > 1:
            dims[-k] = ctx.couple(dims[-k], ctx.dims(bias)[-k])
    ctx.set_dims(out, dims)


register_rule("matmul mm bmm rmatmul".split(), matmul_rule)
register_rule("addmm baddbmm addbmm".split(), addmm_rule)


def rmatmul_rule(ctx: OpContext) -> None:
    b, a = ctx.args[0], ctx.args[1]
    out = _first_out(ctx)
    ctx.set_dims(out, _matmul_core(ctx, a, b, out))


register_rule("rmatmul", rmatmul_rule)


def einsum_rule(ctx: OpContext) -> None:
    """einsum: dims sharing a letter are coupled; contracted channel letters between activations freeze."""
    eq = ctx.args[0].replace(" ", "")
    ops = ctx.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if "..." in eq:
        raise_unsupported(ctx, "einsum with '...'")
    if "->" not in eq:
        letters = "".join(terms)
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    by_letter: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    n_act = sum(1 for t in ops if not ctx.is_param_derived(t))
    for term, t in zip(terms, ops):
        for c, d in zip(term, ctx.dims(t)):
            sizes[c] = max(sizes.get(c, 1), t.shape[term.index(c)])
            if t.shape[term.index(c)] == 1:
                continue
            if c in by_letter:
                by_letter[c] = ctx.couple(by_letter[c], d)
            else:
                by_letter[c] = d
    for c, d in by_letter.items():
        if c not in rhs and n_act > 1:
            ctx.freeze(d, "einsum contraction between activations over a channel dim")
    ctx.set_dims(_first_out(ctx), [by_letter.get(c) for c in rhs])


register_rule("einsum", einsum_rule)


def raise_unsupported(ctx: OpContext, what: str) -> None:
    from secateur.errors import UnsupportedOpError

    raise UnsupportedOpError(f"{what} is not supported: {ctx.where()}")


# --------------------------------------------------------------------------------------------------
# shape ops
# --------------------------------------------------------------------------------------------------
def merge_dims(ctx: OpContext, dims: list, sizes: list[int]) -> np.ndarray | None:
    """Atoms of the row-major merge of ``dims`` (a flattened block), shape ``(prod(sizes),)``."""
    carriers = [i for i, d in enumerate(dims) if d is not None]
    if not carriers:
        return None
    keep = carriers[0]
    for i in carriers[1:]:
        ctx.freeze(dims[i], "reshape merges two channel dims")
    shape = [1] * len(sizes)
    shape[keep] = sizes[keep]
    return np.broadcast_to(dims[keep].reshape(shape), sizes).ravel()


def split_flat(ctx: OpContext, flat: np.ndarray | None, sizes: list[int]) -> list:
    """Atoms of each dim when a flat block is viewed as ``sizes``; a channel dim cut into (units, inner)
    makes each unit whole (heads)."""
    if flat is None:
        return [None] * len(sizes)
    if len(sizes) == 1:
        return [flat]
    grid = flat.reshape(sizes)
    varying = []
    for k, s in enumerate(sizes):
        if s > 1 and not (grid == np.take(grid, [0], axis=k)).all():
            varying.append(k)
    res: list = [None] * len(sizes)
    if not varying:
        k = next((i for i, s in enumerate(sizes) if s > 1), 0)
        res[k] = np.moveaxis(grid, k, 0).reshape(sizes[k], -1)[:, 0].copy()
        return res
    # several varying axes, e.g. (heads, head_dim) or (3, heads, head_dim): the unit axis is the one before
    # the innermost varying axis (heads); everything else in a unit (head_dim, q/k/v) is merged into it
    k = varying[-2] if len(varying) > 1 else varying[0]
    rows = np.moveaxis(grid, k, 0).reshape(sizes[k], -1)
    if len(varying) > 1:
        ctx.union_rows(rows)
        ctx.record_split(sizes[k], int(np.prod(sizes[k + 1 :])), rows[:, 0])
    res[k] = rows[:, 0].copy()
    return res


def reshape_dims(ctx: OpContext, in_shape: tuple, in_dims: list, out_shape: tuple) -> list:
    """Map atoms through a view/reshape by matching blocks of equal products."""
    out_dims: list = [None] * len(out_shape)
    i = j = 0
    ni, no = len(in_shape), len(out_shape)
    while True:
        while i < ni and in_shape[i] == 1:
            i += 1
        while j < no and out_shape[j] == 1:
            j += 1
        if i >= ni or j >= no:
            break
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                if i >= ni:
                    break
                gi.append(i)
                pi *= in_shape[i]
                i += 1
            else:
                if j >= no:
                    break
                gj.append(j)
                pj *= out_shape[j]
                j += 1
        if pi != pj:
            break
        if len(gi) == 1 and len(gj) == 1:
            out_dims[gj[0]] = in_dims[gi[0]]
            continue
        flat = merge_dims(ctx, [in_dims[k] for k in gi], [in_shape[k] for k in gi])
        for k, d in zip(gj, split_flat(ctx, flat, [out_shape[k] for k in gj])):
            out_dims[k] = d
    return out_dims


def view_rule(ctx: OpContext) -> None:
    """view/reshape/flatten/unflatten/view_as: channels follow the row-major layout."""
    x = ctx.args[0]
    out = _first_out(ctx)
    if tuple(x.shape) == tuple(out.shape):
        ctx.set_dims(out, ctx.dims(x))
        return
    ctx.set_dims(out, reshape_dims(ctx, tuple(x.shape), list(ctx.dims(x)), tuple(out.shape)))


register_rule("view reshape flatten unflatten view_as reshape_as ravel".split(), view_rule)


def permute_rule(ctx: OpContext) -> None:
    """permute/transpose/movedim/t/T/mT: atoms move with their dims."""
    x = ctx.args[0]
    dims = list(ctx.dims(x))
    n = len(dims)
    name = ctx.name
    if name in ("permute",):
        order = (
            ctx.args[1:] if len(ctx.args) > 2 or isinstance(ctx.arg(1, "dims"), int) else ctx.arg(1, "dims")
        )
        order = [_norm_dim(o, n) for o in order]
        res = [dims[o] for o in order]
    elif name in ("transpose", "swapaxes", "swapdims"):
        a = _norm_dim(ctx.arg(1, "dim0"), n)
        b = _norm_dim(ctx.arg(2, "dim1"), n)
        res = dims[:]
        res[a], res[b] = res[b], res[a]
    elif name in ("t", "T", "numpy_T"):
        res = dims[::-1]
    elif name in ("mT", "mH", "adjoint", "H"):
        res = dims[:-2] + [dims[-1], dims[-2]]
    elif name in ("movedim", "moveaxis"):
        src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
        src = [_norm_dim(d, n) for d in ([src] if isinstance(src, int) else src)]
        dst = [_norm_dim(d, n) for d in ([dst] if isinstance(dst, int) else dst)]
        final: list = [None] * n
        for s_, d_ in zip(src, dst):
            final[d_] = s_
        rest = iter(o for o in range(n) if o not in src)
        res = [dims[f if f is not None else next(rest)] for f in final]
    else:
        res = dims
    ctx.set_dims(_first_out(ctx), res)


register_rule(
    "permute transpose swapaxes swapdims t T mT mH H adjoint movedim moveaxis".split(), permute_rule
)


def squeeze_rule(ctx: OpContext) -> None:
    """squeeze/unsqueeze: size-1 dims carry no channels."""
    x = ctx.args[0]
    out = _first_out(ctx)
    kept = [d for d, s in zip(ctx.dims(x), x.shape) if s != 1]
    res: list = []
    it = iter(kept)
    for s in out.shape:
        res.append(None if s == 1 else next(it, None))
    ctx.set_dims(out, res)


register_rule("squeeze unsqueeze squeeze_ unsqueeze_".split(), squeeze_rule)


def expand_rule(ctx: OpContext) -> None:
    """expand/broadcast_to/expand_as: expanded (size-1) dims carry no channels."""
    x = ctx.args[0]
    out = _first_out(ctx)
    dims = ctx.dims(x)
    off = out.dim() - x.dim()
    res = [None] * off + [d if x.shape[i] == out.shape[off + i] else None for i, d in enumerate(dims)]
    ctx.set_dims(out, res)


register_rule("expand expand_as broadcast_to".split(), expand_rule)


def repeat_rule(ctx: OpContext) -> None:
    """repeat and repeat_interleave: repeated channel dims map each copy to the same atoms (``tile``:
    :func:`secateur.graph.rules_ops.tile_rule`)."""
    x = ctx.args[0]
    out = _first_out(ctx)
    dims = ctx.dims(x)
    if ctx.name == "repeat":
        reps = ctx.args[1:] if len(ctx.args) > 2 or isinstance(ctx.args[1], int) else ctx.args[1]
        reps = list(reps)
        off = len(reps) - x.dim()
        res = [None] * off
        for i, d in enumerate(dims):
            r = reps[off + i]
            res.append(None if d is None else np.tile(d, r))
        ctx.set_dims(out, res)
        return
    reps = ctx.arg(1, "repeats")
    dim = ctx.arg(2, "dim")
    if dim is None or isinstance(reps, torch.Tensor) and reps.numel() > 1:
        for d in dims:
            ctx.freeze(d, "repeat_interleave without dim or with per-element repeats")
        ctx.set_dims(out, [None] * out.dim())
        return
    r = int(reps)
    dim = _norm_dim(dim, x.dim())
    res = list(dims)
    res[dim] = None if dims[dim] is None else np.repeat(dims[dim], r)
    ctx.set_dims(out, res)


register_rule(["repeat", "repeat_interleave"], repeat_rule)


def cat_rule(ctx: OpContext) -> None:
    """cat/concat: the output channel dim is the concatenation (with offsets) of the inputs'."""
    ts = [t for t in ctx.arg(0, "tensors") if isinstance(t, torch.Tensor)]
    dim = ctx.arg(1, "dim", 0)
    out = _first_out(ctx)
    ts = [t for t in ts if not (t.dim() == 1 and t.numel() == 0)]
    n = out.dim()
    dim = _norm_dim(dim, n)
    res: list = [None] * n
    parts = []
    any_atoms = False
    for t in ts:
        d = ctx.dims(t)[dim]
        if d is not None:
            any_atoms = True
        parts.append(d)
    if any_atoms:
        filled = []
        for t, p in zip(ts, parts):
            if p is None:
                p = ctx.new_atoms(t.shape[dim])
                ctx.freeze(p, "concatenated with a tensor without channel identity")
            filled.append(p)
        res[dim] = np.concatenate(filled)
    others = [k for k in range(n) if k != dim]
    for k in others:
        if out.shape[k] > 1:
            res[k] = _couple_all(ctx, [ctx.dims(t)[k] for t in ts])
    ctx.set_dims(out, res)


def _couple_all(ctx: OpContext, ds: list) -> Any:
    """Couple same-size dims of several tensors; any None among channel dims freezes them."""
    arrs = [d for d in ds if d is not None]
    if not arrs:
        return None
    for d in arrs[1:]:
        ctx.couple(arrs[0], d)
    if len(arrs) < len(ds):
        ctx.freeze(arrs[0], "joined with a tensor without channel identity")
    return arrs[0]


def stack_rule(ctx: OpContext) -> None:
    """stack: a new (non-channel) dim; other dims coupled across the inputs."""
    ts = list(ctx.arg(0, "tensors"))
    dim = ctx.arg(1, "dim", 0)
    out = _first_out(ctx)
    dim = _norm_dim(dim, out.dim())
    base: list = []
    for k in range(ts[0].dim()):
        base.append(_couple_all(ctx, [ctx.dims(t)[k] for t in ts]) if ts[0].shape[k] > 1 else None)
    ctx.set_dims(out, base[:dim] + [None] + base[dim:])


register_rule("cat concat concatenate".split(), cat_rule)
register_rule(["stack", "hstack", "vstack"], stack_rule)


def split_rule(ctx: OpContext) -> None:
    """split/chunk/unbind/tensor_split: equal pieces of a channel dim are coupled position-wise (so that they
    stay equal after pruning); unequal explicit sizes freeze the dim."""
    x = ctx.args[0]
    outs = list(iter_tensors(ctx.out))
    dims = list(ctx.dims(x))
    if ctx.name == "unbind":
        dim = _norm_dim(ctx.arg(1, "dim", 0), x.dim())
    elif ctx.name == "split_with_sizes":
        dim = _norm_dim(ctx.arg(2, "dim", 0), x.dim())
    else:
        dim = _norm_dim(ctx.arg(2, "dim", 0), x.dim())
    src = dims[dim]
    if ctx.name == "unbind":
        if src is not None:
            ctx.freeze(src, "unbind over a channel dim")
        for o in outs:
            ctx.set_dims(o, dims[:dim] + dims[dim + 1 :])
        return
    sizes = [o.shape[dim] for o in outs]
    pieces: list = [None] * len(outs)
    if src is not None:
        equal = len(set(sizes)) == 1
        if not equal:
            ctx.freeze(src, f"'{ctx.name}' into unequal sizes {sizes}")
        off = 0
        for i, s in enumerate(sizes):
            pieces[i] = src[off : off + s]
            off += s
        if equal:
            for p in pieces[1:]:
                ctx.couple(pieces[0], p)
    for o, p in zip(outs, pieces):
        od = dims[:]
        od[dim] = p
        ctx.set_dims(o, od)


register_rule(
    "split chunk unbind tensor_split split_with_sizes unsafe_split unsafe_chunk".split(), split_rule
)


def _index_rule_core(ctx: OpContext, x: torch.Tensor, idx: Any, out_dim: int) -> list:
    dims = list(ctx.dims(x))
    items = list(idx) if isinstance(idx, tuple) else [idx]
    consumed = 0
    for it in items:
        if it is None or it is Ellipsis:
            continue
        if isinstance(it, torch.Tensor) and it.dtype == torch.bool:
            consumed += max(it.dim(), 1)
        else:
            consumed += 1
    expanded: list = []
    for it in items:
        if it is Ellipsis:
            expanded.extend([slice(None)] * (x.dim() - consumed))
        else:
            expanded.append(it)
    res: list = []
    adv_positions: list[int] = []
    k = 0
    for it in expanded:
        if it is None:
            res.append(None)
            continue
        if k >= len(dims):
            break
        d = dims[k]
        if isinstance(it, slice):
            full = it == slice(None) or (
                (it.start in (None, 0))
                and (it.stop is None or it.stop >= x.shape[k])
                and it.step in (None, 1)
            )
            if d is not None and not full:
                ctx.freeze(d, "slice with constant bounds over a channel dim")
                d = d[it]
            res.append(d)
            k += 1
        elif isinstance(it, int):
            ctx.freeze(d, "integer index into a channel dim")
            k += 1
        else:  # tensor / list: advanced indexing
            n_cons = it.dim() if isinstance(it, torch.Tensor) and it.dtype == torch.bool else 1
            for j in range(n_cons):
                ctx.freeze(dims[k + j] if k + j < len(dims) else None, "tensor index into a channel dim")
            adv_positions.append(len(res))
            res.append("ADV")
            k += n_cons
    res.extend(dims[k:])
    if adv_positions:
        res = [r for r in res if not (isinstance(r, str))]
        n_adv = out_dim - len(res)
        contiguous = adv_positions == list(range(adv_positions[0], adv_positions[0] + len(adv_positions)))
        pos = adv_positions[0] if contiguous else 0
        res = res[:pos] + [None] * max(n_adv, 0) + res[pos:]
    return res


def getitem_rule(ctx: OpContext) -> None:
    """Tensor[...]: full slices keep channels; partial slices, ints and tensor indices freeze them."""
    x, idx = ctx.args[0], ctx.args[1]
    out = _first_out(ctx)
    res = _index_rule_core(ctx, x, idx, out.dim())
    if len(res) != out.dim():
        for d in ctx.dims(x):
            ctx.freeze(d, "indexing pattern not understood")
        res = [None] * out.dim()
    ctx.set_dims(out, res)


def setitem_rule(ctx: OpContext) -> None:
    """Tensor[...] = v: the written region is coupled with ``v`` (broadcast)."""
    x, idx, v = ctx.args[0], ctx.args[1], ctx.args[2]
    if not isinstance(v, torch.Tensor):
        return
    try:
        region = x[idx]
    except Exception:  # noqa: BLE001
        region = None
    if region is None:
        return
    rd = _index_rule_core(ctx, x, idx, region.dim())
    if len(rd) != region.dim():
        rd = [None] * region.dim()
    vd = ctx.dims(v)
    for k in range(1, min(region.dim(), v.dim()) + 1):
        if v.shape[-k] == region.shape[-k] > 1:
            ctx.couple(rd[-k], vd[-k], "in-place write of a channel dim into a tensor without channels")


register_rule("getitem", getitem_rule)
register_rule("setitem", setitem_rule)


def select_rule(ctx: OpContext) -> None:
    """select/narrow/index_select/gather/roll/flip/pad...: along the touched dim, channels are frozen."""
    x = ctx.args[0]
    out = _first_out(ctx)
    dims = list(ctx.dims(x))
    name = ctx.name
    if name in ("pad",):
        pad = ctx.arg(1, "pad")
        n = len(pad) // 2
        touched = [x.dim() - 1 - i for i in range(n) if pad[2 * i] or pad[2 * i + 1]]
    elif name in ("roll",):
        d = ctx.arg(2, "dims")
        touched = list(range(x.dim())) if d is None else ([d] if isinstance(d, int) else list(d))
    elif name in ("flip",):
        d = ctx.arg(1, "dims")
        touched = [d] if isinstance(d, int) else list(d)
    elif name in ("tril", "triu", "diagonal", "diag_embed"):
        touched = [x.dim() - 2, x.dim() - 1]
    else:
        d = ctx.arg(1, "dim")
        touched = [d] if isinstance(d, int) else []
    touched = [_norm_dim(t, x.dim()) for t in touched]
    for t in touched:
        if out.dim() == x.dim() and out.shape[t] == x.shape[t] and name in ("roll", "flip", "tril", "triu"):
            ctx.freeze(dims[t], f"'{name}' permutes/masks positions of a channel dim")
        else:
            ctx.freeze(dims[t], f"'{name}' selects positions of a channel dim")
    if name == "select":
        res = dims[: touched[0]] + dims[touched[0] + 1 :]
    elif out.dim() == x.dim():
        res = [None if (t in touched and out.shape[t] != x.shape[t]) else d for t, d in enumerate(dims)]
    else:
        res = [None] * out.dim()
    ctx.set_dims(out, res)


register_rule(
    "select narrow index_select gather take_along_dim roll flip pad tril triu masked_select".split(),
    select_rule,
)


def _n_spatial(name: str, ndim: int) -> int:
    """Spatial dims of a pooling / interpolation op: the digit in its name (``max_pool2d``: 2), else all but
    batch and channels (``interpolate``)."""
    for k in (1, 2, 3):
        if f"{k}d" in name:
            return min(k, ndim)
    return max(ndim - 2, 0)


def spatial_rule(ctx: OpContext) -> None:
    """Pooling/interpolation over the last 1-3 (spatial) dims: the channel dim before them (dim 1, or dim 0
    unbatched) and the batch dim pass through; the spatial dims are resampled, so atoms there (a position
    embedding's grid, channels pooled by mistake) are frozen."""
    x = ctx.args[0]
    dims = list(ctx.dims(x))
    ns = _n_spatial(ctx.name, len(dims))
    for d in dims[len(dims) - ns :]:
        ctx.freeze(d, f"'{ctx.name}' pools or resamples over this dim")
    kept = dims[: len(dims) - ns] + [None] * ns
    for out in iter_tensors(ctx.out):
        ctx.set_dims(out, kept if out.dim() == x.dim() else [None] * out.dim())


register_rule(
    """avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
    adaptive_max_pool3d interpolate upsample
    upsample_nearest upsample_bilinear lp_pool1d lp_pool2d max_pool1d_with_indices max_pool2d_with_indices
    adaptive_max_pool2d_with_indices fractional_max_pool2d""".split(),
    spatial_rule,
)


# tile, Tensor.unfold / F.unfold (im2col), F.fold (col2im), linalg norms, torch.fft, complex views: the
# dims each couples, passes or mixes are tabled in secateur.graph.rules_ops
for _name, _rule in op_rules().items():
    register_rule(_name, _rule)


def pixel_shuffle_rule(ctx: OpContext) -> None:
    """pixel_shuffle(r): C*r*r -> C, each output channel owns r*r inputs (one unit);
    pixel_unshuffle(r): C -> C*r*r."""
    x = ctx.args[0]
    r = int(ctx.arg(1, "upscale_factor" if ctx.name == "pixel_shuffle" else "downscale_factor"))
    out = _first_out(ctx)
    dims = list(ctx.dims(x))
    cd = x.dim() - 3
    c = dims[cd]
    if c is None:
        o = None
    elif ctx.name == "pixel_shuffle":
        rows = c.reshape(-1, r * r)
        ctx.union_rows(rows)
        o = rows[:, 0].copy()
    else:
        o = np.repeat(c, r * r)
    res = dims[:cd] + [o, None, None]
    ctx.set_dims(out, res)


def channel_shuffle_rule(ctx: OpContext) -> None:
    """channel_shuffle(g): position j of every group is one unit, so groups shrink evenly and ``g`` holds."""
    x = ctx.args[0]
    g = int(ctx.arg(1, "groups"))
    out = _first_out(ctx)
    dims = list(ctx.dims(x))
    c = dims[1]
    if c is not None:
        grid = c.reshape(g, -1)  # grid[i, j] = channel i*(C/g)+j
        ctx.union_rows(grid.T.copy())
        dims[1] = grid.T.reshape(-1).copy()  # output index j*g+i holds input i*(C/g)+j
    ctx.set_dims(out, dims)


register_rule(["pixel_shuffle", "pixel_unshuffle"], pixel_shuffle_rule)
register_rule(["channel_shuffle", "native_channel_shuffle"], channel_shuffle_rule)


def sdpa_rule(ctx: OpContext) -> None:
    """scaled_dot_product_attention(q[B,H,L,E], k[B,Hk,S,E], v[B,Hk,S,Ev]): heads coupled (under GQA,
    query head h with key/value head h // (H/Hk)); output (B, H, L, Ev)."""
    q, k, v = ctx.args[0], ctx.arg(1, "key"), ctx.arg(2, "value")
    qd, kd, vd = ctx.dims(q), ctx.dims(k), ctx.dims(v)
    n = q.dim()
    batch: list = []
    for i in range(n - 2):
        if i == n - 3 and q.shape[i] != k.shape[i]:
            rep = q.shape[i] // k.shape[i]
            kv = ctx.couple(kd[i], vd[i])
            if qd[i] is not None or kv is not None:
                kvr = None if kv is None else np.repeat(kv, rep)
                ctx.couple(qd[i], kvr)
            batch.append(qd[i] if qd[i] is not None else (None if kv is None else np.repeat(kv, rep)))
            continue
        a = ctx.couple(qd[i], kd[i]) if q.shape[i] == k.shape[i] > 1 else qd[i]
        if v.shape[i] == q.shape[i] > 1:
            a = ctx.couple(a, vd[i]) if a is not None or vd[i] is not None else None
        batch.append(a)
    if qd[-1] is not None or kd[-1] is not None:
        e = ctx.couple(qd[-1], kd[-1])
        ctx.freeze(e, "attention contracts q and k over a channel dim")
    ctx.freeze(kd[-2], "attention sums over key positions")
    mask = ctx.arg(3, "attn_mask")
    if isinstance(mask, torch.Tensor):  # added to the scores (B, H, L, S): heads of a bias couple with ours
        scores = batch + [qd[-2], kd[-2]]
        shape = tuple(q.shape[:-1]) + (k.shape[-2],)
        md = ctx.dims(mask)
        for j in range(1, min(mask.dim(), len(scores)) + 1):
            if mask.shape[-j] == shape[-j] > 1:
                ctx.couple(scores[-j], md[-j], "attention mask/bias without channel identity on a head dim")
    ctx.set_dims(_first_out(ctx), batch + [qd[-2], vd[-1]])


register_rule("scaled_dot_product_attention", sdpa_rule)


def weight_norm_rule(ctx: OpContext) -> None:
    """_weight_norm(v, g, dim): the norm mixes every dim except ``dim``, which is coupled with ``g``."""
    v, g = ctx.args[0], ctx.args[1]
    dim = _norm_dim(int(ctx.arg(2, "dim", 0)), v.dim())
    vd, gd = list(ctx.dims(v)), ctx.dims(g)
    for i, d in enumerate(vd):
        if i != dim:
            ctx.freeze(d, "weight norm over this dim")
    if g.dim() == v.dim() and g.shape[dim] == v.shape[dim] > 1:
        vd[dim] = ctx.couple(vd[dim], gd[dim])
    ctx.set_dims(_first_out(ctx), vd)


register_rule(["weight_norm", "_weight_norm"], weight_norm_rule)


def glu_rule(ctx: OpContext) -> None:
    """glu(x, dim): halves coupled position-wise; output carries the first half's channels."""
    x = ctx.args[0]
    dim = _norm_dim(ctx.arg(1, "dim", -1), x.dim())
    dims = list(ctx.dims(x))
    c = dims[dim]
    if c is not None:
        h = c.size // 2
        ctx.couple(c[:h], c[h:])
        dims[dim] = c[:h]
    ctx.set_dims(_first_out(ctx), dims)


register_rule("glu", glu_rule)


def no_channel_output_rule(ctx: OpContext) -> None:
    """Ops whose tensor result has no channel identity and whose inputs' channels do not matter."""
    for out in iter_tensors(ctx.out):
        ctx.set_dims(out, [None] * out.dim())


register_rule("nonzero argwhere numel".split(), no_channel_output_rule)


def _freeze_all_rule(ctx: OpContext) -> None:
    """Ops that read tensor values (``item``-like) or compare whole tensors: channels frozen."""
    for t in list(iter_tensors(ctx.args)) + list(iter_tensors(ctx.kwargs)):
        for d in ctx.dims(t):
            ctx.freeze(d, f"'{ctx.name}' depends on the channel layout")
    for out in iter_tensors(ctx.out):
        ctx.set_dims(out, [None] * out.dim())


register_rule("equal allclose isclose unique bincount histc searchsorted bucketize".split(), _freeze_all_rule)


# --------------------------------------------------------------------------------------------------
# module rules
# --------------------------------------------------------------------------------------------------
def mha_module_rule(ctx: OpContext, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
    """nn.MultiheadAttention as one op: all of its channels are frozen except that its output projection's
    output is the (frozen) embedding dim; pruning heads inside it is not supported (named refusal)."""
    q = args[0] if args else kwargs.get("query")
    for t in list(iter_tensors(args)) + list(iter_tensors(kwargs)):
        for d in ctx.dims(t):
            ctx.freeze(d, "input of nn.MultiheadAttention (heads inside it are not pruned)")
    for o in iter_tensors(out):
        dims = list(ctx.dims(q))
        ctx.set_dims(o, dims if o.dim() == len(dims) else [None] * o.dim())


register_module_rule(nn.MultiheadAttention, mha_module_rule)


# --------------------------------------------------------------------------------------------------
# lookup helpers used by tests/docs
# --------------------------------------------------------------------------------------------------
def known_ops() -> list[str]:
    """Names with a registered rule (sorted)."""
    return sorted(RULES)

"""Normalisation modules as single ops, so that the dims they normalise over can be pruned.

By default a norm's statistics freeze the channels it normalises (``'layer_norm' normalises over a channel
dim``): zeroing a channel in a masked model leaves it in the mean and variance, so the masked and the
compacted models would differ. With ``DependencyGraph.build(..., prune_normalized=True)`` the norm
*modules* found here become one op each (input channel ``i`` <-> output channel ``i`` <-> ``weight[i]`` /
``bias[i]``), and :mod:`secateur.compact.norms` makes masked models compute their statistics over the
kept channels only, which is what the compacted module computes.

Which modules count (:func:`norm_kind`):

- ``nn.LayerNorm`` / ``nn.RMSNorm`` with a one-dimensional ``normalized_shape`` and torch's own
  ``forward`` (kinds ``"layer_norm"``, ``"rms_norm"``; the last dim);
- ``nn.GroupNorm`` with ``num_groups == 1`` (kind ``"group_norm"``; dim 1): with more groups the
  existing rule already prunes whole groups;
- any other module whose class name ends in ``RMSNorm`` or ``LayerNorm`` (any case: ``LlamaRMSNorm``,
  ``Qwen2RMSNorm``, ``T5LayerNorm``, timm's ``RmsNorm``...) or whose class was passed to
  :func:`register_norm` (kind ``"module"``; the last dim), provided it has a 1-D ``weight`` (and
  optionally a ``bias``) of the normalised size, no other parameters, no submodules, and passes
  :func:`probe_norm`: on random float64 inputs it keeps the shape, treats rows independently, permuting
  its input channels together with its weights permutes its output, and it runs on a channel subset.

A module that is not recognised, or that is called in a way the rule does not expect (two tensor inputs,
a different width), is traced inside as before, so its channels stay frozen with the usual reason.
Functional norms written inline in user code (``F.layer_norm`` outside such modules, ``x.pow(2).mean(-1)``)
always stay frozen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from secateur._torch import iter_tensors
from secateur.graph.tracer import ModuleRule, OpContext

__all__ = [
    "NORM_NAME_PATTERN",
    "find_norms",
    "forward_kind",
    "forward_on_channels",
    "norm_dim",
    "norm_kind",
    "norm_module_rules",
    "norm_size",
    "probe_norm",
    "register_norm",
]

#: Class names treated as last-dim normalisations (subject to :func:`probe_norm`).
NORM_NAME_PATTERN = re.compile(r"(rms|layer)norm$", re.IGNORECASE)

_REGISTERED: set[type] = set()
_RMSNorm = getattr(nn, "RMSNorm", None)


def register_norm(cls: type | Iterable[type]) -> None:
    """Treat modules of class ``cls`` (or each class of an iterable) as last-dim normalisations when the
    graph is built with ``prune_normalized=True``, whatever their name.

    The module must normalise its input over the last dim with per-channel parameters: a 1-D ``weight``
    (optionally ``bias``) of that size and nothing else; :func:`probe_norm` still checks each instance, and
    one that fails is traced inside as usual (its channels stay frozen).

    Raises:
        TypeError: ``cls`` is not an ``nn.Module`` subclass.
    """
    classes = [cls] if isinstance(cls, type) else list(cls)
    for c in classes:
        if not (isinstance(c, type) and issubclass(c, nn.Module)):
            raise TypeError(f"register_norm expects nn.Module subclasses, got {c!r}")
    _REGISTERED.update(classes)


def _own_forward(mod: nn.Module, base: type | None) -> bool:
    return base is not None and isinstance(mod, base) and type(mod).forward is base.forward


def norm_kind(mod: nn.Module) -> str | None:
    """``"layer_norm"``, ``"rms_norm"``, ``"group_norm"`` or ``"module"`` for a normalisation module whose
    normalised dim this module can prune (see the module docstring), else ``None``. Static: the generic
    ``"module"`` kind still needs :func:`probe_norm` before it is trusted."""
    for base, kind in ((nn.LayerNorm, "layer_norm"), (_RMSNorm, "rms_norm")):
        if _own_forward(mod, base):
            return kind if len(mod.normalized_shape) == 1 else None
    if _own_forward(mod, nn.GroupNorm):
        return "group_norm" if mod.num_groups == 1 else None
    cls = type(mod)
    registered = any(c in _REGISTERED for c in cls.__mro__)
    named = any(NORM_NAME_PATTERN.search(c.__name__) for c in cls.__mro__)
    if not (registered or named):
        return None
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] < 2:
        return None
    if getattr(mod, "data_format", "channels_last") != "channels_last":
        return None  # ConvNeXt-style channels-first norms normalise dim 1
    if next(mod.children(), None) is not None:
        return None
    for name, p in mod.named_parameters(recurse=False):
        if name not in ("weight", "bias") or p.shape != w.shape:
            return None
    return "module"


def forward_kind(mod: nn.Module) -> str:
    """How :func:`forward_on_channels` computes a norm module already recognised by :func:`norm_kind`
    (also once its weight carries a mask parametrization): ``"layer_norm"``, ``"rms_norm"``,
    ``"group_norm"`` for torch's own modules, ``"module"`` (its own forward on sliced tensors) otherwise."""
    for base, kind in ((nn.LayerNorm, "layer_norm"), (_RMSNorm, "rms_norm"), (nn.GroupNorm, "group_norm")):
        if _own_forward(mod, base):
            return kind
    return "module"


def norm_dim(mod: nn.Module) -> int:
    """The dim a recognised norm module normalises over: 1 for ``nn.GroupNorm``, -1 (last) otherwise."""
    return 1 if isinstance(mod, nn.GroupNorm) else -1


def norm_size(mod: nn.Module) -> int:
    """Number of channels along the normalised dim (the ``weight`` size, else ``normalized_shape`` /
    ``num_channels``)."""
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1:
        return int(w.shape[0])
    if isinstance(mod, nn.GroupNorm):
        return int(mod.num_channels)
    return int(mod.normalized_shape[-1])


def _channel_tensors(mod: nn.Module, size: int) -> dict[str, torch.Tensor]:
    """The module's per-channel tensors, as its forward reads them (a masked weight is the masked one):
    ``weight`` and ``bias`` when they are 1-D of ``size``."""
    out = {}
    for name in ("weight", "bias"):
        t = getattr(mod, name, None)
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == size:
            out[name] = t
    return out


def forward_on_channels(
    mod: nn.Module,
    x: torch.Tensor,
    kept: torch.Tensor,
    kind: str,
    tensors: dict[str, torch.Tensor] | None = None,
    size: int | None = None,
) -> torch.Tensor:
    """What ``mod`` computes once compacted to the channels ``kept``, applied to ``x`` already restricted
    to them.

    Args:
        mod: a norm module of kind ``kind`` (:func:`norm_kind`), at its full width ``n``.
        x: input restricted to the kept channels along :func:`norm_dim`: shape ``(..., k)`` (or
            ``(B, k, *)`` for ``group_norm``).
        kept: int64 indices into the full width, shape ``(k,)``, sorted.
        tensors: per-channel tensors to use instead of the module's (full width ``n``, sliced here).
        size: the full width ``n`` (default :func:`norm_size`).

    Returns the output, shape of ``x``: statistics (mean, variance, mean square) over the ``k`` channels
    only, per-channel weight and bias ``[kept]``. Differentiable in ``x`` and the module's parameters.
    """
    n = norm_size(mod) if size is None else size
    full = _channel_tensors(mod, n) if tensors is None else tensors
    sub = {k: t.index_select(0, kept.to(t.device)) for k, t in full.items()}
    k = int(kept.numel())
    if kind == "layer_norm":
        return F.layer_norm(x, (k,), sub.get("weight"), sub.get("bias"), mod.eps)
    if kind == "rms_norm":
        return F.rms_norm(x, (k,), sub.get("weight"), mod.eps)
    if kind == "group_norm":
        return F.group_norm(x, 1, sub.get("weight"), sub.get("bias"), mod.eps)
    return _call_with(mod, x, sub, width=k)


def _call_with(mod: nn.Module, x: torch.Tensor, tensors: dict[str, torch.Tensor], width: int) -> Any:
    """``mod``'s own forward on ``x`` with ``tensors`` in place of its parameters of those names, run on a
    shallow stand-in (the module itself is not touched, no hook fires, a mask parametrization on the weight
    is bypassed: ``tensors`` already hold the effective values). A one-dim ``normalized_shape`` (LayerNorm
    subclasses pass it to ``F.layer_norm``) is ``(width,)``, as compaction will set it."""
    cls = type(mod)
    if parametrize.is_parametrized(mod):  # torch swaps in a generated subclass of the original class
        cls = cls.__bases__[0]
    state = dict(mod.__dict__)
    params = {k: v for k, v in mod._parameters.items() if k not in tensors}
    params.update(tensors)
    state["_parameters"] = params
    state["_modules"] = {k: v for k, v in mod._modules.items() if k != "parametrizations"}
    shape = state.get("normalized_shape")
    if isinstance(shape, tuple) and len(shape) == 1:
        state["normalized_shape"] = (width,)
    stand = object.__new__(cls)
    object.__setattr__(stand, "__dict__", state)
    return cls.forward(stand, x)


def probe_norm(mod: nn.Module) -> str | None:
    """Check numerically that a ``"module"``-kind norm acts on its last dim as the graph rule assumes.

    On a random float64 input ``x`` of shape ``(2, 3, n)`` with random float64 per-channel tensors (the
    module's own values are not used, so zero or meta weights do not matter): the output has ``x``'s shape
    and is finite; changing one row changes no other row; permuting the input channels together with the
    weights permutes the output the same way; and :func:`forward_on_channels` runs on a channel subset.
    Tolerances allow for modules that compute in float32 (rtol 1e-4).

    Returns ``None`` if every check passes, else the first failure as text.
    """
    n = norm_size(mod)
    gen = torch.Generator().manual_seed(0)
    own = _channel_tensors(mod, n)
    fresh = {k: torch.randn(n, generator=gen, dtype=torch.float64) for k in own}

    def run(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> Any:
        return _call_with(mod, x, tensors, n)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5)

    try:
        with torch.no_grad():
            x = torch.randn(2, 3, n, generator=gen, dtype=torch.float64)
            y = run(x, fresh)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape or not torch.isfinite(y).all():
                return "output is not one finite tensor of the input's shape"
            x2 = x.clone()
            x2[0, 0] = torch.randn(n, generator=gen, dtype=torch.float64)
            y2 = run(x2, fresh)
            if not (close(y2[1], y[1]) and close(y2[0, 1:], y[0, 1:])):
                return "changing one row changed other rows (not a per-row normalisation over the last dim)"
            perm = torch.randperm(n, generator=gen)
            yp = run(x[..., perm], {k: t[perm] for k, t in fresh.items()})
            if not close(yp, y[..., perm]):
                return "not permutation-equivariant in channels and weights (grouped or positional stats)"
            kept = torch.arange(0, n, 2)
            yk = forward_on_channels(mod, x.index_select(-1, kept), kept, "module", fresh)
            if yk.shape != (2, 3, kept.numel()) or not torch.isfinite(yk).all():
                return "does not run on a subset of its channels"
    except Exception as e:  # noqa: BLE001 - any failure means: not a norm this rule understands
        return f"probe raised {type(e).__name__}: {e}"
    return None


def find_norms(model: nn.Module) -> dict[int, tuple[str, str]]:
    """``{id(module): (path, kind)}`` of the norm modules of ``model`` whose normalised dim can be pruned
    (:func:`norm_kind`, and :func:`probe_norm` for the generic kind)."""
    out: dict[int, tuple[str, str]] = {}
    for path, mod in model.named_modules():
        kind = norm_kind(mod)
        if kind is None or id(mod) in out:
            continue
        if kind == "module" and probe_norm(mod) is not None:
            continue
        out[id(mod)] = (path, kind)
    return out


def _trace_inside(ctx: OpContext, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
    """Fallback: run the module's forward again with its ops traced (as if it had no module rule)."""
    again = type(mod).forward(mod, *args, **kwargs)
    for o, a in zip(iter_tensors(out), iter_tensors(again)):
        ctx.set_dims(o, ctx.dims(a) if o.dim() == a.dim() else [None] * o.dim())


def norm_module_rules(model: nn.Module) -> dict[type, ModuleRule]:
    """Module rules (``{class: rule}``) for the norm modules of ``model`` (:func:`find_norms`).

    The rule couples the normalised dim of the input with the output and with ``weight`` / ``bias`` (per
    channel), passes the other dims through, and records the norm (a ``SplitEvent`` of kind ``"norm"``,
    one unit per channel) so that plans can list its kept channels. Several calls of one module are coupled
    (one module has one width). Instances not in :func:`find_norms`, or calls with more than one tensor
    input or another width, are traced inside as without the option.
    """
    norms = find_norms(model)
    first_atoms: dict[int, Any] = {}

    def rule(ctx: OpContext, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if id(mod) not in norms:
            _trace_inside(ctx, mod, args, kwargs, out)
            return
        ins = list(iter_tensors(args)) + list(iter_tensors(kwargs))
        outs = list(iter_tensors(out))
        n = norm_size(mod)
        x = ins[0] if len(ins) == 1 else None
        d = norm_dim(mod) % x.dim() if x is not None and x.dim() else 0
        if x is None or len(outs) != 1 or outs[0].shape != x.shape or x.dim() <= d or x.shape[d] != n:
            _trace_inside(ctx, mod, args, kwargs, out)
            return
        dims = list(ctx.dims(x))
        c = dims[d]
        for t in _channel_tensors(mod, n).values():  # a parameter, or computed from one (a masked weight)
            c = ctx.couple(c, ctx.dims(t)[0], "per-channel norm weight without channel identity")
        if c is not None:
            prev = first_atoms.setdefault(id(mod), c)
            if prev is not c:
                ctx.couple(prev, c)
            ctx.record_split(n, 1, c, kind="norm")
        dims[d] = c
        ctx.set_dims(outs[0], dims)

    return {type(mod): rule for mod in model.modules() if id(mod) in norms}

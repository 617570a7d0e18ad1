"""The equivalence oracle, and the diagnosis of a failed compaction down to the group, op and module.

The oracle's rule, per floating output tensor pair ``(a, b)`` in float64: both finite (a NaN or Inf is never
equal) and ``max|a - b| <= atol + rtol * max(max|a|, max|b|)``, defaults :data:`ATOL` 0 and :data:`RTOL`
1e-6 (:func:`check_equivalence`); inputs must be finite (:func:`require_finite_inputs`). Example inputs may
be a :class:`~secateur.graph.ExampleInputs` of several: every one of them must pass.

Some models compute shapes in Python from a dimension the graph cannot see as coupled: torchvision's Swin
(v1) reshapes ``qkv`` to ``(B, N, 3, num_heads, C // num_heads)`` with ``C`` the *input* width, so removing
whole heads (or input channels) makes the reshape invalid. A trace sees only the integers, not where they
came from, so such a coupling is found by trying: :func:`verified_compact` runs the oracle inside the
compaction transaction, and when it fails :func:`incompatible_groups` tries each group alone to name the
groups at fault, with the op and the module where the compacted forward broke (:func:`forward_failure`).
Only on the failure path, so a model that compacts cleanly pays nothing extra.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from secateur._torch import ExampleInputs, call_model, iter_tensors, op_name
from secateur.errors import CompactionError, ConfigError
from secateur.graph.groups import DependencyGraph
from secateur.graph.symbolic import ShapeConflictError

from .apply import compact, mask_model
from .plan import make_plan

__all__ = [
    "ATOL",
    "RTOL",
    "NonFiniteOutputError",
    "OutputDiff",
    "check_equivalence",
    "forward_failure",
    "incompatible_groups",
    "masked_reference",
    "max_abs_diff",
    "oracle_check",
    "output_diffs",
    "replica",
    "require_finite_inputs",
    "verified_compact",
]


def _to_double(obj: Any) -> Any:
    """``obj`` with every floating tensor in it (nested tuples, lists, dicts, :class:`ExampleInputs`) cast
    to float64."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_to_double(o) for o in obj)
    if isinstance(obj, list):
        return [_to_double(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_double(v) for k, v in obj.items()}
    if isinstance(obj, ExampleInputs):  # several example inputs: each one cast
        return obj.map(_to_double)
    return obj


#: Default tolerances of the oracle (:func:`check_equivalence`): per output tensor, in float64,
#: ``max|a - b| <= ATOL + RTOL * max(max|a|, max|b|)``.
RTOL = 1e-6
ATOL = 0.0


@dataclass(frozen=True)
class OutputDiff:
    """How one floating output tensor of two models differs (float64 values).

    Attributes:
        index: position of the tensor among the floating outputs (:func:`iter_tensors` order).
        shape: its shape.
        max_abs: ``max |a - b|`` (0.0 for an empty tensor; NaN when either holds a non-finite value).
        scale: ``max(max |a|, max |b|)`` over the finite values (the magnitude the tolerance is relative to).
        nonfinite: ``(in a, in b)``: ``"NaN"``, ``"Inf"`` or ``None`` for each model's tensor.
    """

    index: int
    shape: tuple[int, ...]
    max_abs: float
    scale: float
    nonfinite: tuple[str | None, str | None] = (None, None)

    @property
    def finite(self) -> bool:
        """Both tensors hold finite values only."""
        return self.nonfinite == (None, None)

    def within(self, rtol: float = RTOL, atol: float = ATOL) -> bool:
        """The oracle's rule: finite on both sides and ``max_abs <= atol + rtol * scale``."""
        return self.finite and self.max_abs <= atol + rtol * self.scale


def replica(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """``copy.deepcopy(model).to(dtype)``, without the intermediate copy: every floating parameter and buffer
    (plain ``torch.Tensor`` / ``nn.Parameter``) is converted once, straight into a new tensor of ``dtype``
    placed in deepcopy's memo, so deepcopy copies only the module tree; then the copy's ``.to(dtype)`` runs
    as before (a no-op for those tensors; it converts what else ``to`` would and runs modules' own
    ``_apply``). ``model`` is not touched; the copy never shares storage with it (``copy=True`` even when the
    dtype already matches). Costs one tensor of ``dtype`` per floating tensor of ``model``.
    """
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo or not t.is_floating_point() or type(t) not in (torch.Tensor, nn.Parameter):
            continue  # tensor subclasses: deepcopy copies them as it always did, then .to converts
        new = t.detach().to(dtype=dtype, copy=True)
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if type(t) is nn.Parameter else new
    return copy.deepcopy(model, memo).to(dtype)


# float64 masked references the oracle made itself (:func:`masked_reference`): output_diffs runs each as it
# is, once, instead of copying it again (nobody else holds them, so running them changes nothing anyone sees)
_OWN_REFERENCES: weakref.WeakSet = weakref.WeakSet()


def masked_reference(model: nn.Module, plan: Mapping) -> nn.Module:
    """The oracle's reference: a float64 copy of ``model`` (:func:`replica`) masked by ``plan``
    (:func:`~secateur.compact.mask_model`); ``model`` is not touched. The first :func:`output_diffs` given
    it (as its first model, in float64) runs it as it is instead of copying it again; later calls copy it.
    Memory: one float64 copy of the model.

    Raises:
        KeyError / CompactionError: from :func:`~secateur.compact.mask_model` (a plan that does not fit).
    """
    ref = mask_model(replica(model, torch.float64), plan)
    _OWN_REFERENCES.add(ref)
    return ref


def _copy_for(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """What output_diffs runs: a copy of ``model`` in ``dtype``, or the oracle's own unused reference."""
    if dtype == torch.float64 and model in _OWN_REFERENCES:
        _OWN_REFERENCES.discard(model)  # once: a second run would see buffers the first one moved
        return model
    return replica(model, dtype)


def _nonfinite(t: torch.Tensor) -> str | None:
    if t.numel() == 0 or bool(torch.isfinite(t).all()):
        return None
    return "NaN" if bool(torch.isnan(t).any()) else "Inf"


def _float_outputs(model: nn.Module, x: Any) -> list[torch.Tensor]:
    return [t for t in iter_tensors(call_model(model, x)) if t.is_floating_point()]


@torch.no_grad()
def output_diffs(
    a: nn.Module, b: nn.Module, example_inputs: Any, dtype: torch.dtype = torch.float64
) -> list[OutputDiff] | str:
    """Compare the floating output tensors of ``a`` and ``b`` on ``example_inputs``, both run in ``dtype``
    (copies, :func:`replica`: the models are not touched; floating inputs are cast to float64 when ``dtype``
    is; an unused reference from :func:`masked_reference` is run as it is).

    Returns one :class:`OutputDiff` per output tensor, or a string saying why the outputs cannot be
    compared (a different number of floating outputs, or output ``i`` of another shape).
    """
    ca, cb = _copy_for(a, dtype), replica(b, dtype)
    x = _to_double(example_inputs) if dtype == torch.float64 else example_inputs
    oa, ob = _float_outputs(ca, x), _float_outputs(cb, x)
    if len(oa) != len(ob):
        return f"the models return {len(oa)} and {len(ob)} floating output tensors"
    out = []
    for i, (u, v) in enumerate(zip(oa, ob)):
        if u.shape != v.shape:
            return f"output {i} has shape {tuple(u.shape)} in the first model, {tuple(v.shape)} in the other"
        u, v = u.double(), v.double()
        if not u.numel():
            out.append(OutputDiff(i, tuple(u.shape), 0.0, 0.0))
            continue
        bad = (_nonfinite(u), _nonfinite(v))
        if bad != (None, None):
            finite = [t[torch.isfinite(t)] for t in (u, v)]
            scale = max([float(t.abs().max()) for t in finite if t.numel()], default=0.0)
            out.append(OutputDiff(i, tuple(u.shape), math.nan, scale, bad))
            continue
        scale = max(float(u.abs().max()), float(v.abs().max()))
        out.append(OutputDiff(i, tuple(u.shape), float((u - v).abs().max()), scale))
    return out


def max_abs_diff(
    a: nn.Module, b: nn.Module, example_inputs: Any, dtype: torch.dtype = torch.float64
) -> float:
    """Largest ``|a(x) - b(x)|`` over all floating output tensors, both run in ``dtype`` (copies; the
    originals are untouched). ``inf`` when the outputs differ in number or shape; NaN when either model
    outputs a NaN or an Inf (non-finite outputs are never equal, so ``max_abs_diff(...) <= tol`` is False
    then; Python's ``max`` would have dropped the NaN)."""
    diffs = output_diffs(a, b, example_inputs, dtype)
    if isinstance(diffs, str):
        return math.inf
    if not all(d.finite for d in diffs):
        return math.nan
    return max((d.max_abs for d in diffs), default=0.0)


def require_finite_inputs(example_inputs: Any, name: str = "example_inputs") -> None:
    """Refuse non-finite example inputs for the oracle.

    Raises:
        ConfigError: a floating tensor inside ``example_inputs`` (nested tuples, lists, dicts) holds NaN
            or Inf; the message names the argument (``name``), the tensor's position and shape. Outputs
            computed from such inputs are not finite, and non-finite outputs are never equal, so nothing
            could be verified.
    """
    for i, t in enumerate(iter_tensors(example_inputs)):
        if t.is_floating_point() or t.is_complex():
            kind = _nonfinite(t.detach())
            if kind is not None:
                raise ConfigError(
                    f"{name}: input tensor {i} (shape {tuple(t.shape)}) holds {kind}; the equivalence "
                    "check cannot verify on non-finite inputs. Pass finite example inputs (or verify=False)"
                )


_SIDES = ("masked", "compacted")


class NonFiniteOutputError(CompactionError):
    """The oracle met a NaN or Inf output. ``in_reference``: the masked (reference) model's own output is
    not finite, so no compaction could ever be verified on these inputs (no group is at fault)."""

    def __init__(self, message: str, in_reference: bool) -> None:
        super().__init__(message)
        self.in_reference = in_reference


def check_equivalence(
    masked: nn.Module,
    compacted: nn.Module,
    example_inputs: Any,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> float:
    """The oracle: the compacted model computes what the masked one does, in float64.

    Rule, for every floating output tensor pair ``(a, b)`` (float64): both finite, and
    ``max|a - b| <= atol + rtol * max(max|a|, max|b|)`` (defaults ``atol`` 0, ``rtol`` 1e-6: a difference
    is judged against the output's own magnitude, so outputs of size 1e-10 that differ by 1% fail and
    outputs of size 1e12 that differ by float64 rounding pass). A NaN or an Inf in either output is
    never equal (even NaN against NaN at the same place).

    Returns the max abs difference over all outputs.

    Raises:
        ConfigError: ``example_inputs`` holds NaN or Inf (named; nothing is run).
        CompactionError: the outputs differ in number or shape, or break the rule (naming the output, its
            difference, magnitude and the bound); :class:`NonFiniteOutputError` when one holds NaN/Inf.
    """
    require_finite_inputs(example_inputs)
    diffs = output_diffs(masked, compacted, example_inputs)
    if isinstance(diffs, str):
        raise CompactionError(f"compacted output differs from masked output: {diffs}")
    for d in diffs:
        if not d.finite:
            where = ", ".join(f"{k} in the {side} model" for side, k in zip(_SIDES, d.nonfinite) if k)
            raise NonFiniteOutputError(
                f"output {d.index} (shape {d.shape}) is not finite ({where}); non-finite outputs are never "
                "equal, so the compacted model cannot be verified",
                in_reference=d.nonfinite[0] is not None,
            )
        if not d.within(rtol, atol):
            raise CompactionError(
                f"compacted output differs from masked output: output {d.index} (shape {d.shape}), max abs "
                f"diff {d.max_abs:.3g} > {atol:.3g} + {rtol:.3g} * {d.scale:.3g} (atol + rtol * magnitude)"
            )
    return max((d.max_abs for d in diffs), default=0.0)


class _Where(TorchFunctionMode):
    """Remembers the innermost module and the op that raised first."""

    def __init__(self, paths: dict[int, str]) -> None:
        super().__init__()
        self.paths = paths
        self.stack: list[nn.Module] = []
        self.failed: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        try:
            return func(*args, **(kwargs or {}))
        except Exception:
            if self.failed is None:
                mod = self.stack[-1] if self.stack else None
                path = self.paths.get(id(mod), "") if mod is not None else ""
                cls = type(mod).__name__ if mod is not None else "?"
                self.failed = f"op '{op_name(func)}' in module '{path or '<root>'}' ({cls})"
            raise


@contextlib.contextmanager
def _locating(model: nn.Module) -> Iterator[_Where]:
    paths = {id(m): p for p, m in model.named_modules()}
    mode = _Where(paths)

    def pre(mod: nn.Module, args: tuple) -> None:
        mode.stack.append(mod)

    def post(mod: nn.Module, args: tuple, out: Any) -> None:
        if mode.stack and mode.stack[-1] is mod:
            mode.stack.pop()

    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    try:
        with mode:
            yield mode
    finally:
        h1.remove()
        h2.remove()


def forward_failure(model: nn.Module, example_inputs: Any) -> str | None:
    """Run ``model`` once (no grad); ``None`` if it works, else ``"op 'x' in module 'p' (Cls): Error(...)"``.

    Names the first torch op that raised and the innermost module running at that moment. The model's
    buffers are put back afterwards: a model in training mode would otherwise leave this forward in its
    BatchNorm running statistics (the oracle runs inside a compaction that then commits).
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.no_grad(), _locating(model) as where:
            try:
                call_model(model, example_inputs)
            except Exception as e:  # the model's own code failed: describe where
                return f"{where.failed or 'model code (no torch op)'}: {type(e).__name__}: {e}"
        return None
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def oracle_check(
    model: nn.Module, plan: Mapping, example_inputs: Any, atol: float = ATOL, rtol: float = RTOL
) -> Callable[[nn.Module], None]:
    """The oracle as a ``check`` for :func:`~secateur.compact.compact` (or any caller that compacts inside
    a transaction, e.g. :func:`secateur.train.compact_in_training`): ``check(compacted)`` raises unless the
    compacted model runs and equals ``model`` masked by ``plan`` on ``example_inputs``
    (:func:`~secateur.compact.check_equivalence`). Call it *before* compacting: it keeps a masked deep copy
    of ``model`` in float64 (:func:`masked_reference`; memory: one float64 copy of the model).

    Raises:
        ConfigError: ``example_inputs`` holds NaN or Inf (checked first: the model is not touched).
        (from ``check``) CompactionError: naming the failing op and module when the compacted forward raises,
            or the difference when it runs but differs.
    """
    require_finite_inputs(example_inputs)
    masked = masked_reference(model, plan)

    def check(m: nn.Module) -> None:
        broke = forward_failure(m, example_inputs)
        if broke is not None:
            raise CompactionError(f"the compacted model's forward fails at {broke}")
        check_equivalence(masked, m, example_inputs, atol=atol, rtol=rtol)

    return check


def verified_compact(
    model: nn.Module, plan: Mapping, example_inputs: Any, atol: float = ATOL, rtol: float = RTOL
) -> None:
    """:func:`~secateur.compact.compact` with the oracle inside the transaction (:func:`oracle_check`): the
    compacted model must run and equal the masked one on ``example_inputs``
    (:func:`~secateur.compact.check_equivalence`: per output tensor, float64, finite and
    ``max|a - b| <= atol + rtol * magnitude``).

    Like :func:`~secateur.compact.compact`, BaseException-safe: a ``KeyboardInterrupt`` anywhere (the
    oracle's forwards included) restores the model bit-identical and is re-raised.

    Raises:
        ConfigError: ``example_inputs`` holds NaN or Inf (checked first: the model is not touched).
        CompactionError: (the model unchanged) naming the failing op and module when the compacted forward
            raises, or the difference when it runs but differs.
    """
    compact(model, plan, check=oracle_check(model, plan, example_inputs, atol, rtol))


class _Probed(Exception):
    """Raised inside a probe's transaction so that compaction always rolls back."""


def incompatible_groups(
    model: nn.Module,
    graph: DependencyGraph,
    removed: Mapping[int, Any],
    example_inputs: Any,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> dict[int, str]:
    """Groups whose removal alone breaks the model: ``{group index: why}`` (op, module and error).

    Each group of ``removed`` (``{group index: unit indices}``) is compacted alone inside a transaction that
    always rolls back, so ``model`` ends bit-identical. First pass: does the compacted forward run (one
    float32 forward per group)? Only if every group passes, a second pass finds the groups whose compacted
    outputs differ from their masked model (a deep copy and two float64 forwards per probe, halving the
    set: :func:`_bisect`). Groups that fail only together are not found. Meant for the failure path.
    """
    groups = [(gi, u) for gi, u in removed.items() if len(np.atleast_1d(u))]
    bad: dict[int, str] = {}
    for gi, units in groups:
        why = _probe(model, graph, {gi: units}, example_inputs, None)
        if why is not None:
            bad[gi] = why
    if not bad:
        bad = _bisect(model, graph, groups, example_inputs, (atol, rtol))
    return bad


def _bisect(
    model: nn.Module, graph: DependencyGraph, groups: list, example_inputs: Any, tol: tuple[float, float]
) -> dict[int, str]:
    """Groups whose compacted outputs differ from their masked model, found by halving: a set that passes
    the oracle is cleared at once, so k culprits among n cost about 2k·log2(n) oracle runs, not n.
    ``tol``: the oracle's ``(atol, rtol)``."""
    why = _probe(model, graph, dict(groups), example_inputs, tol)
    if why is None:
        return {}
    if len(groups) == 1:
        return {groups[0][0]: why}
    half = len(groups) // 2
    return {
        **_bisect(model, graph, groups[:half], example_inputs, tol),
        **_bisect(model, graph, groups[half:], example_inputs, tol),
    }


def _probe(
    model: nn.Module,
    graph: DependencyGraph,
    removed: Mapping[int, Any],
    example_inputs: Any,
    tol: tuple[float, float] | None,
) -> str | None:
    """Compact ``removed`` inside a transaction that always rolls back; ``None`` if the compacted model runs
    (``tol`` None) or also equals its masked model (float64, ``tol = (atol, rtol)``), else why not."""
    try:
        plan = make_plan(graph, removed)
    except ShapeConflictError as e:  # a size the model computes cannot match: found without a forward
        return next(iter(e.groups.values()), str(e))
    ref = masked_reference(model, plan) if tol is not None else None

    def probe(m: nn.Module) -> None:
        if ref is None:
            broke = forward_failure(m, example_inputs)
            if broke is not None:
                raise CompactionError(f"the compacted forward fails at {broke}")
        else:
            check_equivalence(ref, m, example_inputs, atol=tol[0], rtol=tol[1])
        raise _Probed()

    try:
        compact(model, plan, check=probe)
    except CompactionError as e:
        if not isinstance(e.__cause__, _Probed):
            return str(e)
    return None

"""Compaction checked by the oracle, and the diagnosis of a failure down to the group, op and module.

Some models compute shapes in Python from a dimension the graph cannot see as coupled: torchvision's Swin
(v1) reshapes ``qkv`` to ``(B, N, 3, num_heads, C // num_heads)`` with ``C`` the *input* width, so removing
whole heads (or input channels) makes the reshape invalid. A trace sees only the integers, not where they
came from, so such a coupling is found by trying: :func:`verified_compact` runs the oracle inside the
compaction transaction, and when it fails :func:`incompatible_groups` tries each group alone to name the
groups at fault, with the op and the module where the compacted forward broke. Only on the failure path,
so a model that compacts cleanly pays nothing extra.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from secateur.compact import (
    ATOL,
    RTOL,
    check_equivalence,
    compact,
    make_plan,
    mask_model,
    require_finite_inputs,
)
from secateur.errors import CompactionError
from secateur.graph.groups import DependencyGraph
from secateur.graph.tracer import call_model, op_name


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

    Names the first torch op that raised and the innermost module running at that moment.
    """

    with torch.no_grad(), _locating(model) as where:
        try:
            call_model(model, example_inputs)
        except Exception as e:  # the model's own code failed: describe where
            return f"{where.failed or 'model code (no torch op)'}: {type(e).__name__}: {e}"
    return None


def verified_compact(
    model: nn.Module, plan: Mapping, example_inputs: Any, atol: float = ATOL, rtol: float = RTOL
) -> None:
    """:func:`~secateur.compact.compact` with the oracle inside the transaction: the compacted model must
    run and equal the masked one on ``example_inputs`` (:func:`~secateur.compact.check_equivalence`: per
    output tensor, float64, finite and ``max|a - b| <= atol + rtol * magnitude``).

    Like :func:`~secateur.compact.compact`, BaseException-safe: a ``KeyboardInterrupt`` anywhere (the
    oracle's forwards included) restores the model bit-identical and is re-raised.

    Raises:
        ConfigError: ``example_inputs`` holds NaN or Inf (checked first: the model is not touched).
        CompactionError: (the model unchanged) naming the failing op and module when the compacted forward
            raises, or the difference when it runs but differs.
    """
    require_finite_inputs(example_inputs)
    masked = mask_model(copy.deepcopy(model), plan)

    def check(m: nn.Module) -> None:
        broke = forward_failure(m, example_inputs)
        if broke is not None:
            raise CompactionError(f"the compacted model's forward fails at {broke}")
        check_equivalence(masked, m, example_inputs, atol=atol, rtol=rtol)

    compact(model, plan, check=check)


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
    plan = make_plan(graph, removed)
    ref = mask_model(copy.deepcopy(model), plan) if tol is not None else None

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


__all__ = ["forward_failure", "incompatible_groups", "verified_compact"]

"""Helpers shared by the graph tests (imported as a plain module; tests/ has no packages)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

#: Tolerances of :func:`assert_outputs_close`: the oracle's (secateur.compact.verify RTOL / ATOL).
RTOL, ATOL = 1e-6, 0.0


def _float64(obj: Any) -> Any:
    """``obj`` with every floating tensor cast to float64 (nested tuples, lists, dicts, ExampleInputs)."""
    from secateur._torch import ExampleInputs

    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, ExampleInputs):
        return obj.map(_float64)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_float64(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _float64(v) for k, v in obj.items()}
    return obj


@torch.no_grad()
def assert_outputs_close(a, b, x, rtol: float = RTOL, atol: float = ATOL) -> float:
    """The oracle's rule, computed here (not by the library): deep copies of ``a`` and ``b`` run in float64
    on ``x`` (floating inputs cast); every floating output pair has the same shape, is finite, and
    ``max|u - v| <= atol + rtol * max(max|u|, max|v|)``, so the verdict never depends on the outputs' scale.

    Returns the worst relative difference ``max|u - v| / max(max|u|, max|v|)`` over the outputs (0 where
    both are all zero).
    """
    from secateur._torch import call_model, iter_tensors

    x64 = _float64(x)
    outs = [
        [t for t in iter_tensors(call_model(copy.deepcopy(m).double(), x64)) if t.is_floating_point()]
        for m in (a, b)
    ]
    assert len(outs[0]) == len(outs[1]), f"{len(outs[0])} vs {len(outs[1])} floating outputs"
    worst = 0.0
    for i, (u, v) in enumerate(zip(*outs)):
        assert u.shape == v.shape, f"output {i}: shapes {tuple(u.shape)} vs {tuple(v.shape)}"
        assert bool(torch.isfinite(u).all() and torch.isfinite(v).all()), f"output {i}: NaN or Inf"
        if u.numel() == 0:
            continue
        diff = float((u - v).abs().max())
        scale = max(float(u.abs().max()), float(v.abs().max()))
        assert diff <= atol + rtol * scale, f"output {i}: max|a-b| {diff:.3g} > {atol} + {rtol} * {scale:.3g}"
        worst = max(worst, diff / scale if scale > 0 else 0.0)
    return worst


def prune_and_check(
    model, x, ratio=0.3, criterion="random", seed=0, atol=ATOL, rtol=RTOL, skip_incompatible=False, **kw
):
    """Prune ``ratio`` of every group with the oracle (per output, float64: finite and ``max|a - b| <= atol
    + rtol * magnitude``), then check the same rule independently (:func:`assert_outputs_close`); returns
    (pruned model, plan, graph, worst relative difference ``max|a - b| / magnitude`` of the outputs)."""
    from secateur.allocation.structured import choose_units
    from secateur.compact import mask_model
    from secateur.graph import DependencyGraph
    from secateur.pruners.oneshot import remove_units

    graph = DependencyGraph.build(model, x, **kw)
    rng = np.random.default_rng(seed)
    removed = {}
    for gi, g in enumerate(graph.groups):
        if g.n_prunable:
            scores = rng.random(g.n_units)
            rm = choose_units(g, scores, ratio)
            if rm.size:
                removed[gi] = rm
    # remove_units verifies inside the transaction and names the groups, ops and modules that break the
    # model (IncompatibleGroupError, a named refusal); the rule is then checked here, independently
    pruned, plan = remove_units(
        copy.deepcopy(model), graph, removed, x, verify=True, skip_incompatible=skip_incompatible
    )
    masked = mask_model(copy.deepcopy(model), plan)
    return pruned, plan, graph, assert_outputs_close(masked, pruned, x, rtol=rtol, atol=atol)

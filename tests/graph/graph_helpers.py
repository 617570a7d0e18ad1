"""Helpers shared by the graph tests (imported as a plain module; tests/ has no packages)."""

from __future__ import annotations

import copy

import numpy as np


def prune_and_check(
    model, x, ratio=0.3, criterion="random", seed=0, atol=0.0, rtol=1e-6, skip_incompatible=False, **kw
):
    """Prune ``ratio`` of every group with the oracle (per output, float64: finite and ``max|a - b| <= atol
    + rtol * magnitude``); returns (pruned model, plan, graph, max abs diff)."""
    from secateur.allocation.structured import choose_units
    from secateur.compact import check_equivalence, mask_model
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
    # model (IncompatibleGroupError, a named refusal); the oracle is then re-run for the figure
    pruned, plan = remove_units(
        copy.deepcopy(model), graph, removed, x, verify=True, skip_incompatible=skip_incompatible
    )
    masked = mask_model(copy.deepcopy(model), plan)
    diff = check_equivalence(masked, pruned, x, atol=atol, rtol=rtol)
    return pruned, plan, graph, diff

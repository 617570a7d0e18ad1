"""Sensitivity-derived allocation: prune each layer alone, keep what stays within a tolerance.

Li et al. 2017, "Pruning Filters for Efficient ConvNets", sec. 3.3 / 4.1: sweep each layer's sparsity
alone, read off the largest one whose metric stays within ``tolerance`` of the dense baseline, and use
those per-layer values (scaled to the pruner's overall sparsity) as the allocation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from secateur._validate import check_sparsity
from secateur.allocation.element import Masks, layerwise
from secateur.errors import ConfigError
from secateur.masks.element import original
from secateur.scope import Target

__all__ = ["Sensitivity", "sensitivity_sparsities", "sensitivity_sweep"]


@torch.no_grad()
def sensitivity_sweep(
    targets: Sequence[Target],
    evaluate: Callable[[], float],
    sparsities: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    scores: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[float, float]]:
    """Prune each layer alone at each sparsity and evaluate (Li et al. 2017, sec. 3.3, fig. 2).

    For each target and each fraction ``s``, the ``floor(s · n)`` lowest-scoring entries of that
    layer only are zeroed (by ``|w|`` unless ``scores`` is given), ``evaluate()`` is called (e.g.
    validation accuracy, higher is better), and the weights are restored exactly.

    Returns:
        ``{target.name: {sparsity: metric}}``.

    Raises:
        ConfigError: a sparsity outside [0, 1).
    """
    sps = [check_sparsity(s) for s in sparsities]
    out: dict[str, dict[float, float]] = {}
    for t in targets:
        stored = original(t.module, t.param_name)
        saved = stored.detach().clone()
        s_layer = (
            getattr(t.module, t.param_name).detach().abs() if scores is None else scores[t.name].detach()
        )
        order = torch.sort(s_layer.flatten().double(), stable=True).indices
        out[t.name] = {}
        try:
            for s in sps:
                stored.copy_(saved)
                stored.view(-1)[order[: math.floor(s * order.numel())]] = 0
                out[t.name][s] = float(evaluate())
        finally:
            stored.copy_(saved)
    return out


def sensitivity_sparsities(
    sweep: Mapping[str, Mapping[float, float]], baseline: float, tolerance: float
) -> dict[str, float]:
    """Per layer, the largest swept sparsity whose metric is within ``tolerance`` of ``baseline``
    (``metric >= baseline - tolerance``, same units as the metric); 0.0 if none is.

    This is how Li et al. 2017 (sec. 4.1) choose which layers to prune and by how much.
    """
    out = {}
    for name, curve in sweep.items():
        ok = [s for s, metric in curve.items() if metric >= baseline - tolerance]
        out[name] = max(ok, default=0.0)
    return out


class Sensitivity:
    """Allocation with per-layer sparsities from a sensitivity sweep (see :func:`sensitivity_sparsities`).

    The pruner's ``sparsity`` (a fraction of all scoped weights) scales the per-layer values
    ``s_l`` proportionally: layer ``l`` gets ``s_l · sparsity / total``, where ``total`` (attribute
    :attr:`total_sparsity`) is the weighted mean of ``s_l`` over layer sizes. A schedule ending at
    ``total_sparsity`` therefore ends at exactly the sweep's per-layer values.

    Raises (on call):
        ConfigError: ``sparsity`` above ``total_sparsity`` (the sweep allows no more), or a layer
            of ``scores`` without a value.
    """

    def __init__(self, layer_sparsity: Mapping[str, float]) -> None:
        self.layer_sparsity = {n: check_sparsity(s, f"sparsity of {n}") for n, s in layer_sparsity.items()}

    def total(self, scores: Mapping[str, torch.Tensor]) -> float:
        missing = [n for n in scores if n not in self.layer_sparsity]
        if missing:
            raise ConfigError(f"sensitivity allocation has no sparsity for layers {missing}")
        sizes = {n: s.numel() for n, s in scores.items()}
        return sum(self.layer_sparsity[n] * sizes[n] for n in scores) / max(sum(sizes.values()), 1)

    def __call__(
        self,
        scores: Mapping[str, torch.Tensor],
        sparsity: float | None = None,
        previous: Mapping[str, torch.Tensor] | None = None,
    ) -> Masks:
        total = self.total(scores)
        factor = 1.0
        if sparsity is not None:
            sp = check_sparsity(sparsity)
            if sp > total + 1e-12:
                raise ConfigError(
                    f"sparsity {sp} unreachable: the sensitivity sweep allows at most {total:.4f} "
                    "of the scoped weights within its tolerance"
                )
            factor = sp / total if total > 0 else 0.0
        return layerwise(scores, {n: self.layer_sparsity[n] * factor for n in scores}, previous)



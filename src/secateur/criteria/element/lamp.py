"""LAMP: layer-adaptive magnitude-based pruning scores (Lee et al. 2021, ICLR, eq. 2).

Within one layer, index the weights so that ``|W[u]|`` is ascending. The LAMP score of ``u`` is

    score(u) = W[u]^2 / Σ_{v >= u} W[v]^2,

the squared magnitude of a weight relative to all weights at least as large in the same layer. The
largest weight of every layer scores exactly 1, so every layer keeps at least one weight, and
the scores are comparable across layers: LAMP then prunes globally by these scores (the "lamp"
allocation in :mod:`secateur.allocation.targets`). Ties are ordered by position (stable sort).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from secateur.criteria.element.base import register_criterion
from secateur.scope import Target


def lamp_scores(values: torch.Tensor) -> torch.Tensor:
    """LAMP scores of one layer, same shape as ``values`` (any shape; the magnitude is ``|values|``).

    Entries whose denominator is zero (all of them and every larger one are zero) score 0.
    Source: Lee et al. 2021, eq. 2.
    """
    flat = values.detach().flatten().double() ** 2
    order = torch.sort(flat, stable=True).indices
    sorted_sq = flat[order]
    suffix = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])
    ratio = torch.where(suffix > 0, sorted_sq / torch.where(suffix > 0, suffix, 1.0), 0.0)
    out = torch.empty_like(flat)
    out[order] = ratio
    return out.view_as(values).to(values.dtype if values.is_floating_point() else torch.float32)


@register_criterion("lamp")
class LAMP:
    """LAMP scores of each scoped (effective, i.e. masked) weight; see :func:`lamp_scores`.

    Output: ``{target.name: tensor of the weight's shape}`` with values in [0, 1]; rank globally.
    """

    name = "lamp"

    @torch.no_grad()
    def scores(self, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        return {t.name: lamp_scores(getattr(t.module, t.param_name)) for t in targets}

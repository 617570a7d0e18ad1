"""Magnitude and random criteria.

Magnitude: the importance of a weight is its absolute value (Han et al. 2015, "Learning both
Weights and Connections for Efficient Neural Networks", section 3). Element-wise, every Lp norm
ranks weights identically, so the score is ``|w|``. Random scores are the baseline every pruning
comparison needs (Blalock et al. 2020, "What is the State of Neural Network Pruning?").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from secateur.criteria.element.base import register_criterion
from secateur.scope import Target


@register_criterion("magnitude")
class Magnitude:
    """Element-wise score ``|w|`` (same shape as each weight)."""

    name = "magnitude"

    @torch.no_grad()
    def scores(self, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        return {t.name: getattr(t.module, t.param_name).detach().abs() for t in targets}


@register_criterion("random")
class RandomScore:
    """Uniform random scores in [0, 1), from a generator seeded with ``seed`` (reproducible)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        out = {}
        for t in targets:
            w = getattr(t.module, t.param_name)
            out[t.name] = torch.rand(w.shape, generator=self.generator).to(w.device)
        return out

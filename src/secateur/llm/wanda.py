"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter 2023).

"A Simple and Effective Pruning Approach for Large Language Models", eq. (1): the importance of
weight ``W_ij`` (output ``i``, input ``j``) is ``S_ij = |W_ij| * ||X_j||_2``, where ``X_j`` is the
``j``-th input feature over all calibration tokens. Section 3 compares scores *per output* (within
each row of ``W``), which the paper finds better than per layer for LLMs; N:M groups are taken
along the input dimension of each row. No weight update: the survivors keep their values.
"""

from __future__ import annotations

import torch

from secateur.errors import ConfigError
from secateur.masks.patterns import Pattern, pattern_mask


def wanda_scores(weight: torch.Tensor, column_norms: torch.Tensor, layer: str = "") -> torch.Tensor:
    """``|W| * ||X_j||_2`` broadcast over rows: ``(out, in)`` from ``weight (out, in)`` and ``(in,)``.

    Raises:
        ConfigError: mismatched shapes (naming ``layer``).
    """
    if weight.dim() != 2 or column_norms.shape != (weight.shape[1],):
        raise ConfigError(
            f"{layer or 'layer'}: weight {tuple(weight.shape)} and column norms "
            f"{tuple(column_norms.shape)} do not fit (need (out, in) and (in,))"
        )
    return weight.detach().abs().float() * column_norms.to(weight.device).float().unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor,
    column_norms: torch.Tensor,
    sparsity: float | None = None,
    pattern: str | tuple[int, int] | Pattern = "row",
    layer: str = "",
) -> torch.Tensor:
    """Bool keep-mask ``(out, in)`` from Wanda scores under ``pattern``.

    ``pattern="row"`` (the paper's per-output comparison) prunes ``floor(sparsity * in)`` per row;
    ``"layer"`` compares over the whole matrix; ``"2:4"``/``(N, M)`` keeps N of every M inputs per
    row (sparsity implied). ``sparsity`` is a fraction in [0, 1).

    Raises:
        ConfigError: as :func:`wanda_scores` and :func:`secateur.masks.patterns.pattern_mask`.
    """
    return pattern_mask(wanda_scores(weight, column_norms, layer), pattern, sparsity, layer)

"""OWL: Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024).

"Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity",
section 3. Uniform layer-wise sparsity ignores that LLM layers hold very different shares of *outlier*
weights, those whose Wanda score ``A_ij = ||X_j||_2 * |W_ij|`` is far above the layer's mean. OWL:

1. the Layerwise Outlier Distribution: for each layer ``l``,
   ``D_l = (1 / N_l) * sum_ij 1[A^l_ij > M * mean(A^l)]`` (eq. 2; ``M = 5`` in the paper's main
   results), with the scores of all the layer's Linears taken together (a "layer" is a transformer block,
   as in the paper's reference code);
2. layers with more outliers are pruned less: the sparsities are a linear map of ``D`` onto a range
   of width ``2 * lambda`` (``lambda = 0.08`` there) whose mean is the target ``S``:
   ``s_l = S - 2 * lambda * (d_l - mean(d))`` with ``d_l = (D_l - min D) / (max D - min D)`` (the paper's
   ``S_l = 1 - D_l`` constrained to ``[S - lambda, S + lambda]`` around mean ``S``, as its reference code
   computes it). The mean is weighted by the layers' numbers of weights, so the pruned fraction of the
   whole model is ``S`` also when layers differ in size (equal sizes: the plain mean, as in the paper).

OWL only changes *how much* each layer loses; *which* weights go is the pruning method's choice
(magnitude, Wanda, SparseGPT, RIA) at that layer's sparsity. It is an allocation for unstructured (and
block) patterns: an N:M pattern fixes every layer's sparsity at ``1 - N/M`` (the hardware format), so a
non-uniform allocation cannot be expressed as that pattern and the one-shot drivers refuse the pair.

The drivers (:func:`secateur.llm.prune_oneshot`, :func:`secateur.llm.prune_linears`) take
``allocation="owl"`` or ``allocation=OWL(m=..., lam=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from secateur._validate import check_sparsity
from secateur.errors import ConfigError

__all__ = ["OWL", "layer_outlier_ratio", "outlier_ratio", "owl_sparsities"]


@dataclass(frozen=True)
class OWL:
    """OWL's two hyper-parameters: ``m`` the outlier threshold (a score above ``m`` times the layer's mean
    score is an outlier; 5 in the paper) and ``lam`` the half-width of the sparsity range (0.08).

    Raises:
        ConfigError: ``m`` not a finite number > 0, or ``lam`` outside [0, 0.5).
    """

    m: float = 5.0
    lam: float = 0.08

    def __post_init__(self) -> None:
        if not _finite(self.m) or self.m <= 0:
            raise ConfigError(f"OWL: m (outlier threshold, times the mean score) must be > 0, got {self.m!r}")
        if not _finite(self.lam) or not 0.0 <= self.lam < 0.5:
            raise ConfigError(f"OWL: lam (half-width of the sparsity range) must be in [0, 0.5): {self.lam}")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(float(x)) < float("inf")


def outlier_ratio(scores: torch.Tensor | Sequence[torch.Tensor], m: float = 5.0) -> float:
    """``D = mean(1[A > m * mean(A)])`` over all entries of ``scores`` (one tensor or several taken
    together), computed in float64; a fraction in [0, 1). OWL eq. 2.

    Raises:
        ConfigError: no entries.
    """
    parts = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    n = sum(p.numel() for p in parts)
    if n == 0:
        raise ConfigError("outlier ratio of an empty set of scores")
    mean = sum(float(p.detach().double().sum()) for p in parts) / n
    above = sum(int((p.detach().double() > m * mean).sum()) for p in parts)
    return above / n


def layer_outlier_ratio(
    weights: Sequence[torch.Tensor], column_norms: Sequence[torch.Tensor], m: float = 5.0
) -> float:
    """OWL's ``D_l`` of one layer from its Linears' weights ``(out, in)`` and input norms ``(in,)``.

    The Wanda scores ``|W_ij| * ||X_j||_2`` are formed in float64 one Linear at a time (twice: for the
    mean, then for the count), so no more than one Linear's scores are held at once.

    Raises:
        ConfigError: no Linear, or a weight and norms that do not fit.
    """
    if not weights or len(weights) != len(column_norms):
        raise ConfigError(f"layer_outlier_ratio: {len(weights)} weights and {len(column_norms)} norms")

    def score(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if w.dim() != 2 or x.shape != (w.shape[1],):
            raise ConfigError(f"weight {tuple(w.shape)} and column norms {tuple(x.shape)} do not fit")
        return w.detach().abs().double() * x.detach().to(w.device, torch.float64).unsqueeze(0)

    n = sum(w.numel() for w in weights)
    mean = sum(float(score(w, x).sum()) for w, x in zip(weights, column_norms)) / n
    above = sum(int((score(w, x) > m * mean).sum()) for w, x in zip(weights, column_norms))
    return above / n


def owl_sparsities(
    ratios: Sequence[float],
    sparsity: float,
    lam: float = 0.08,
    sizes: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> list[float]:
    """Per-layer sparsities from outlier ratios: ``s_l = S - 2 lam (d_l - sum_k w_k d_k)``.

    ``d_l = (D_l - min D) / (max D - min D)`` (all equal: every layer gets ``S``), ``w_k = N_k / sum N``
    the layers' shares of the weights (``sizes``; equal when None). So the weighted mean of the result is
    exactly ``S``, the spread is ``2 lam``, and the order is the reverse of the outlier ratios' (more
    outliers, less pruning). Yin et al. 2024, section 3.

    Args:
        ratios: ``D_l`` per layer (fractions).
        sparsity: the target ``S``, a fraction in [0, 1).
        lam: half-width ``lambda`` of the range, in [0, 0.5).
        sizes: the number of prunable weights of each layer (None: equal).
        names: layer names for error messages (default ``layer <index>``).

    Raises:
        ConfigError: no layer, lengths that differ, a size <= 0, or a layer sparsity outside [0, 1) (the
            target too close to 0 or 1 for ``lam``; the message names the layer and suggests a smaller
            ``lam``).
    """
    sp = check_sparsity(sparsity)
    OWL(lam=lam)  # validates lam
    d = torch.tensor([float(r) for r in ratios], dtype=torch.float64)
    if d.numel() == 0:
        raise ConfigError("OWL needs at least one layer")
    w = torch.ones_like(d) if sizes is None else torch.tensor([float(s) for s in sizes], dtype=torch.float64)
    if w.shape != d.shape or bool((w <= 0).any()):
        raise ConfigError(f"OWL: {d.numel()} outlier ratios need as many positive layer sizes, got {sizes!r}")
    w = w / w.sum()
    spread = float(d.max() - d.min())
    norm = (d - d.min()) / spread if spread > 0 else torch.zeros_like(d)
    out = [sp - 2.0 * lam * float(v) for v in (norm - (w * norm).sum())]
    for i, s in enumerate(out):
        if not 0.0 <= s < 1.0:
            name = names[i] if names is not None else f"layer {i}"
            raise ConfigError(
                f"OWL gives {name} a sparsity of {s:.4f}, outside [0, 1): target {sp} with lam {lam}; "
                f"use lam <= {min(sp, 1.0 - sp) / 2:.4f} or another target"
            )
    return out

"""Running statistics of a layer's inputs (activations), accumulated batch by batch.

Activation-aware criteria look at the inputs ``X`` that a Linear layer sees on a few calibration batches:
Wanda (Sun et al. 2023) and its structured variant Wanda-sp (:mod:`secateur.criteria.group.llm`) need the
per-feature norms ``||X_j||_2``, SparseGPT (Frantar & Alistarh 2023) the Hessian ``H = 2 X X^T`` of the
layer-wise squared error. :class:`InputStats` accumulates both so that ``X`` itself is never stored (memory
``O(in^2)`` per layer, not ``O(tokens * in)``). Padding tokens are left out through a token mask: they are
not text, and counting them would bias the statistics toward the pad embedding.

Here, below the pruners, so that a registered group criterion (used by every structured entry point) and
the layer-by-layer one-shot driver of :mod:`secateur.llm` read one implementation.
"""

from __future__ import annotations

import torch

from secateur.errors import ConfigError

__all__ = ["InputStats"]


class InputStats:
    """Running statistics of a Linear layer's inputs ``x`` of shape ``(..., in)``.

    ``sq_sum[j] = sum_t x_tj^2`` (Wanda's ``||X_j||_2^2``) and, when ``hessian=True``,
    ``xtx = sum_t x_t x_t^T`` (SparseGPT's ``H = 2 X X^T`` up to the factor 2). ``sq_sum`` is kept
    in float64 (cheap); ``xtx`` in float32 like the paper's reference, since an ``in x in`` float64
    product costs several times more on CPU. ``n_tokens`` counts the tokens seen.
    """

    def __init__(self, in_features: int, hessian: bool = False, device: torch.device | None = None) -> None:
        self.in_features = in_features
        self.n_tokens = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.xtx = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        )

    @torch.no_grad()
    def add(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add inputs ``x`` ``(..., in)``; ``token_mask`` (bool, ``x.shape[:-1]``) selects real tokens."""
        if x.shape[-1] != self.in_features:
            raise ConfigError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        if token_mask is not None and tuple(token_mask.shape) == tuple(x.shape[:-1]):
            x = x[token_mask.to(x.device, torch.bool)]
        x = x.reshape(-1, self.in_features)
        self.n_tokens += x.shape[0]
        x64 = x.to(torch.float64)
        self.sq_sum = self.sq_sum.to(x.device)
        self.sq_sum += (x64 * x64).sum(0)
        if self.xtx is not None:
            self.xtx = self.xtx.to(x.device)
            xf = x.float()
            self.xtx.addmm_(xf.T, xf)

    def column_norms(self) -> torch.Tensor:
        """``||X_j||_2`` over all tokens seen, shape ``(in,)``, float32 (Wanda, Sun et al. 2023, eq. 1)."""
        return self.sq_sum.sqrt().float()

    def hessian(self) -> torch.Tensor:
        """``H = 2 X X^T / n_tokens``, shape ``(in, in)``, float32 (SparseGPT, Frantar & Alistarh 2023, §3).

        The ``1/n`` scale does not change SparseGPT's result (the update and the mask score are
        invariant to a common scale of ``H``) but keeps the numbers in a sane range.

        Raises:
            ConfigError: if the Hessian was not requested or no token was seen.
        """
        if self.xtx is None:
            raise ConfigError("InputStats was built without hessian=True")
        if self.n_tokens == 0:
            raise ConfigError("no calibration tokens reached this layer")
        return (2.0 * self.xtx / self.n_tokens).float()

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators."""
        n = self.sq_sum.numel() * self.sq_sum.element_size()
        if self.xtx is not None:
            n += self.xtx.numel() * self.xtx.element_size()
        return n

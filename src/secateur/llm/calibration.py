"""Calibration data and the input statistics one-shot pruning needs.

One-shot methods look at the inputs ``X`` that a Linear layer sees on a small calibration set:
Wanda needs the per-feature norms ``||X_j||_2`` and SparseGPT the Hessian ``H = 2 X X^T`` of the
layer-wise squared error. :class:`InputStats` accumulates both from batches so that ``X`` itself is
never stored (memory ``O(in^2)`` per layer, not ``O(tokens * in)``). Padding tokens are excluded:
they are not text, and counting them would bias the statistics toward the pad embedding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from secateur.errors import ConfigError


def tokenized_batches(
    texts: Sequence[str],
    tokenizer,
    batch_size: int = 16,
    max_length: int = 64,
    sort_by_length: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield Hugging Face tokeniser outputs (``input_ids``, ``attention_mask``, ...) of ``texts``.

    Each batch is padded to its own longest sequence and truncated to ``max_length`` tokens;
    tensors have shape ``(batch, seq)``. The order of ``texts`` is kept unless ``sort_by_length``,
    which groups texts of similar length so that little compute is spent on padding (the
    statistics ignore padding either way, so the pruning result depends only on the set of texts).

    Raises:
        ConfigError: empty ``texts``, non-string entries, or non-positive sizes.
    """
    if batch_size < 1 or max_length < 1:
        raise ConfigError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
    if len(texts) == 0:
        raise ConfigError("no calibration texts given")
    if not all(isinstance(t, str) for t in texts):
        raise ConfigError("calibration texts must all be str")
    if sort_by_length:
        ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        lengths = [len(x) for x in ids]
        texts = [t for _, t in sorted(zip(lengths, texts), key=lambda p: p[0])]
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        yield dict(enc)


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

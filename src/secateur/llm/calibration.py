"""Calibration data of LLM pruning: tokenised batches, their normal form, and the causal-LM loss.

* :func:`tokenized_batches`: texts to Hugging Face tokeniser outputs.
* :func:`calibration_batches`: any accepted form of ``data`` (ids, a tokeniser output, an iterable of
  either) to ``{"input_ids", "attention_mask"}`` batches.
* :func:`causal_lm_data` / :func:`causal_lm_loss`: those batches as the ``(x, y)`` pairs and
  ``loss_fn(output, y)`` of the structured driver's data collection
  (:func:`secateur.criteria.group.collect`, ``ChannelPruner(data=..., loss_fn=...)``): next-token
  cross-entropy with padding ignored.
* :class:`InputStats` (defined in :mod:`secateur.criteria.activations`, below the pruners, so that group
  criteria share it): running input statistics of a Linear (Wanda's ``||X_j||``, SparseGPT's Hessian).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from secateur.criteria.activations import InputStats
from secateur.errors import ConfigError

#: One normalised calibration batch: ``input_ids`` (B, S) long and ``attention_mask`` (B, S).
Batch = dict[str, torch.Tensor]

__all__ = [
    "Batch",
    "InputStats",
    "calibration_batches",
    "causal_lm_data",
    "causal_lm_loss",
    "tokenized_batches",
]


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


def calibration_batches(data: Any) -> list[Batch]:
    """Normalise calibration ``data`` to a list of ``{"input_ids": (B, S) long, "attention_mask": (B, S)}``.

    Accepts a token-id tensor ``(B, S)`` or ``(S,)``, one tokeniser output (a mapping with ``input_ids``),
    or an iterable of either (e.g. :func:`tokenized_batches`). A missing ``attention_mask`` means every
    token is real.

    Raises:
        ConfigError: no batch, a batch without ``input_ids``, or ids that are not an integer tensor (names
            the batch).
    """
    if isinstance(data, (torch.Tensor, Mapping)):
        data = [data]
    out: list[Batch] = []
    for i, b in enumerate(data):
        if isinstance(b, torch.Tensor):
            b = {"input_ids": b}
        if not isinstance(b, Mapping) or "input_ids" not in b:
            raise ConfigError(f"data batch {i}: expected a token-id tensor or a mapping with input_ids")
        ids = b["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() not in (1, 2):
            raise ConfigError(f"data batch {i}: input_ids must be an integer tensor (B, S) or (S,)")
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        mask = b.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.reshape(ids.shape)
        out.append({"input_ids": ids, "attention_mask": mask})
    if not out:
        raise ConfigError("no calibration batch given in data")
    return out


def causal_lm_data(data: Any) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """Calibration ``data`` (any form :func:`calibration_batches` accepts) as ``(x, labels)`` batches for
    the structured driver (:func:`secateur.criteria.group.collect`).

    ``x`` holds the keyword inputs ``input_ids``, ``attention_mask``, ``labels`` and ``use_cache=False``;
    ``labels`` (``(B, S)`` long) are the input ids with padded positions set to -100, so a Hugging Face
    causal LM computes its next-token loss itself (it shifts the labels) and :func:`causal_lm_loss` reads
    it. ``labels`` is also ``y``, for a custom ``loss_fn(output, labels)``.

    Raises:
        ConfigError: as :func:`calibration_batches`.
    """
    out = []
    for b in calibration_batches(data):
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        out.append(({**b, "labels": labels, "use_cache": False}, labels))
    return out


def causal_lm_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """The next-token cross-entropy a Hugging Face causal LM computed from ``labels=`` (``output.loss``, a
    scalar; padding at -100 ignored). ``labels`` is unused: the model already shifted and applied them.

    Raises:
        ConfigError: the output has no ``loss`` (not a ``*ForCausalLM`` model, or ``x`` lacked ``labels``:
            use :func:`causal_lm_data`, or pass your own ``loss_fn(output, labels)``).
    """
    loss = getattr(output, "loss", None)
    if loss is None:
        raise ConfigError(
            f"the model output ({type(output).__name__}) has no loss for labels=; use a *ForCausalLM model "
            "with causal_lm_data batches, or pass loss_fn(output, labels)"
        )
    return loss

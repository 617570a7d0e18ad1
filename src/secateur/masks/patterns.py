"""Mask patterns (granularities) built from element scores: N:M semi-structured and k x l blocks.

A criterion gives one score per weight; a *pattern* decides which weights may be removed together.
These functions turn a score tensor into a bool keep-mask of the same shape, so any criterion
(magnitude, Wanda, Taylor ...) can be used at any granularity:

* ``nm_mask``: N:M sparsity, N kept out of every M consecutive weights along the input dimension of
  each output row (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks", NVIDIA 2:4; Zhou
  et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks"). Conv weights
  ``(out, in, kh, kw)`` are read as ``(out, in*kh*kw)`` rows, the order cuSPARSELt uses.
* ``block_mask``: k x l blocks scored by the sum (or mean) of their scores; the lowest-scoring
  ``floor(sparsity * n_blocks)`` blocks are removed (Gray et al. 2017, "GPU Kernels for
  Block-Sparse Weights"; Narang et al. 2017, "Block-Sparse Recurrent Neural Networks").
* ``row_mask`` / ``layer_mask``: unstructured sparsity compared within each row (Wanda, Sun et al.
  2023, section 3) or across the whole tensor (Han et al. 2015).

Every function counts exactly (stable sort, ties broken by position) and never modifies its input.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from secateur._validate import check_sparsity
from secateur.errors import ConfigError


def _as_rows(scores: torch.Tensor, layer: str) -> torch.Tensor:
    """View scores ``(out, ...)`` as ``(out, in)`` rows (conv: ``(out, in*kh*kw)``)."""
    if scores.dim() < 2:
        raise ConfigError(
            f"{layer or 'layer'}: pattern needs a score tensor with >= 2 dims, got {tuple(scores.shape)}"
        )
    return scores.detach().reshape(scores.shape[0], -1).float()


def _check_nm(n: int, m: int, layer: str) -> None:
    for v, what in ((n, "N"), (m, "M")):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{layer or 'layer'}: {what} of N:M must be an int, got {v!r}")
    if not 0 < n < m:
        why = (
            "N=0 would remove every weight"
            if n == 0 and m > 0
            else "N=M keeps every weight (no pruning)"
            if n == m
            else "N must be a positive int below M"
        )
        raise ConfigError(f"{layer or 'layer'}: invalid N:M = {n}:{m}: {why}; need 0 < N < M (e.g. 2:4)")


def nm_mask(scores: torch.Tensor, n: int, m: int, layer: str = "") -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive entries along the input dim of each row.

    Args:
        scores: ``(out, in)`` (Linear) or ``(out, in, kh, kw)`` (conv, read as ``(out, in*kh*kw)``);
            higher means more important.
        n, m: keep ``n`` of every ``m`` (e.g. 2:4 keeps half; sparsity = 1 - n/m).
        layer: name used in error messages.

    Returns:
        bool keep-mask of ``scores.shape``; every group of ``m`` has exactly ``n`` True.

    Raises:
        ConfigError: unless ``0 < n < m`` (``n = 0`` would zero every weight, ``n = m`` prunes nothing),
            or the row length not divisible by ``m`` (the message names ``layer`` and the sizes).
    """
    _check_nm(n, m, layer)
    rows = _as_rows(scores, layer)
    out_f, in_f = rows.shape
    if in_f % m != 0:
        raise ConfigError(
            f"{layer or 'layer'}: in_features ({in_f}) is not divisible by M={m} for {n}:{m} sparsity"
        )
    groups = rows.reshape(out_f, in_f // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    # Stable descending sort: among equal scores the earlier position wins, so counts are exact.
    idx = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep.scatter_(-1, idx, True)
    return keep.reshape(scores.shape)


def _prune_lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        keep[torch.sort(flat, stable=True).indices[:k]] = False
    return keep


def row_mask(scores: torch.Tensor, sparsity: float, layer: str = "") -> torch.Tensor:
    """Unstructured, compared within each output row: prune ``floor(sparsity * in)`` per row.

    This is Wanda's comparison group (Sun et al. 2023, section 3, "per output"). Shapes as
    :func:`nm_mask`; ``sparsity`` is a fraction in [0, 1).

    Raises:
        ConfigError: a sparsity outside [0, 1).
    """
    sp = check_sparsity(sparsity, f"sparsity of {layer or 'layer'}")
    rows = _as_rows(scores, layer)
    k = math.floor(sp * rows.shape[1])
    keep = torch.ones_like(rows, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(rows, dim=1, stable=True).indices[:, :k]
        keep.scatter_(1, idx, False)
    return keep.reshape(scores.shape)


def layer_mask(scores: torch.Tensor, sparsity: float, layer: str = "") -> torch.Tensor:
    """Unstructured, compared over the whole tensor: prune ``floor(sparsity * numel)`` lowest scores.

    Raises:
        ConfigError: a sparsity outside [0, 1).
    """
    sp = check_sparsity(sparsity, f"sparsity of {layer or 'layer'}")
    flat = scores.detach().float().flatten()
    return _prune_lowest(flat, math.floor(sp * flat.numel())).reshape(scores.shape)


def block_mask(
    scores: torch.Tensor,
    block: tuple[int, int],
    sparsity: float,
    reduce: str = "sum",
    layer: str = "",
) -> torch.Tensor:
    """Remove whole ``k x l`` blocks: the ``floor(sparsity * n_blocks)`` with the lowest sum/mean score.

    Args:
        scores: ``(out, in)`` or conv ``(out, in, kh, kw)`` read as ``(out, in*kh*kw)``.
        block: ``(k, l)``: k rows (outputs) by l columns (inputs).
        sparsity: fraction of blocks (hence of weights) to remove, in [0, 1).
        reduce: ``"sum"`` or ``"mean"`` of the element scores in a block (equal rankings here,
            since every block has k*l entries; ``"mean"`` keeps scores in the element scale).

    Returns:
        bool keep-mask of ``scores.shape``; each block is all True or all False.

    Raises:
        ConfigError: bad block sizes, rows/columns not divisible by ``k``/``l`` (naming ``layer``),
            an unknown ``reduce``, or a sparsity outside [0, 1).
    """
    sp = check_sparsity(sparsity, f"sparsity of {layer or 'layer'}")
    if reduce not in ("sum", "mean"):
        raise ConfigError(f"{layer or 'layer'}: block reduce must be 'sum' or 'mean', got {reduce!r}")
    if len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block):
        raise ConfigError(f"{layer or 'layer'}: block must be two positive ints (k, l), got {block!r}")
    k, l = block
    rows = _as_rows(scores, layer)
    out_f, in_f = rows.shape
    if out_f % k or in_f % l:
        raise ConfigError(f"{layer or 'layer'}: shape ({out_f}, {in_f}) is not divisible by block {k}x{l}")
    blocks = rows.reshape(out_f // k, k, in_f // l, l)
    bs = blocks.sum(dim=(1, 3)) if reduce == "sum" else blocks.mean(dim=(1, 3))
    keep_b = _prune_lowest(bs.flatten(), math.floor(sp * bs.numel())).reshape(bs.shape)
    keep = keep_b[:, None, :, None].expand(out_f // k, k, in_f // l, l)
    return keep.reshape(scores.shape).clone()


@dataclass(frozen=True)
class Pattern:
    """A parsed granularity: ``kind`` in {"layer", "row", "nm", "block"} with its sizes.

    Build with :func:`parse_pattern`; ``nm`` holds ``(N, M)`` exactly when ``kind`` is ``"nm"``, ``block``
    holds ``(k, l)`` exactly when ``kind`` is ``"block"``.

    Raises:
        ConfigError: an unknown ``kind``, or sizes that disagree with it (``Pattern("nm")`` without ``nm``).
    """

    kind: str
    nm: tuple[int, int] | None = None
    block: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("layer", "row", "nm", "block"):
            raise ConfigError(f"Pattern: unknown kind {self.kind!r}; use 'layer', 'row', 'nm' or 'block'")
        if (self.nm is not None) != (self.kind == "nm") or (self.block is not None) != (self.kind == "block"):
            raise ConfigError(
                f"Pattern: kind {self.kind!r} with nm={self.nm!r}, block={self.block!r}; "
                "'nm' takes nm=(N, M) alone, 'block' takes block=(k, l) alone, 'layer' and 'row' take neither"
            )

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (``1 - N/M``); None for the others."""
        return None if self.nm is None else 1.0 - self.nm[0] / self.nm[1]

    def __str__(self) -> str:
        if self.nm is not None:
            return f"{self.nm[0]}:{self.nm[1]}"
        if self.block is not None:
            return f"block{self.block[0]}x{self.block[1]}"
        return self.kind


_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK_RE = re.compile(r"^\s*block\s*(\d+)\s*x\s*(\d+)\s*$")


def parse_pattern(spec: str | tuple[int, int] | Pattern, what: str = "pattern") -> Pattern:
    """Parse ``"layer"``, ``"row"`` (alias ``"unstructured"``), ``"N:M"``/``(N, M)`` or ``"blockKxL"``.

    Raises:
        ConfigError: an unrecognised spec, an N:M without ``0 < N < M`` (``"0:4"`` would zero every weight,
            ``"4:4"`` prunes nothing), or a block size < 1. Messages start with ``what`` (e.g. a layer name).
    """
    if isinstance(spec, Pattern):
        return spec
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise ConfigError(f"{what}: N:M pattern tuple must be (N, M), got {spec!r}")
        _check_nm(spec[0], spec[1], what)
        return Pattern("nm", nm=(spec[0], spec[1]))
    if not isinstance(spec, str):
        raise ConfigError(f"{what}: unknown pattern {spec!r}")
    s = spec.strip().lower()
    if s in ("layer", "row"):
        return Pattern(s)
    if s == "unstructured":
        return Pattern("row")
    if mt := _NM_RE.match(s):
        n, m = int(mt.group(1)), int(mt.group(2))
        _check_nm(n, m, what)
        return Pattern("nm", nm=(n, m))
    if mt := _BLOCK_RE.match(s):
        k, l = int(mt.group(1)), int(mt.group(2))
        if k < 1 or l < 1:
            raise ConfigError(f"{what}: block sizes must be positive, got {spec!r}")
        return Pattern("block", block=(k, l))
    raise ConfigError(f"{what}: unknown pattern {spec!r}; use 'layer', 'row', 'N:M' (e.g. '2:4'), 'blockKxL'")


def pattern_mask(
    scores: torch.Tensor,
    pattern: str | tuple[int, int] | Pattern,
    sparsity: float | None = None,
    layer: str = "",
) -> torch.Tensor:
    """Dispatch a score tensor to the mask builder of ``pattern`` (see :func:`parse_pattern`).

    ``sparsity`` (fraction in [0, 1)) is required for layer/row/block and ignored for N:M, whose
    sparsity is ``1 - N/M``. Returns a bool keep-mask of ``scores.shape``.

    Raises:
        ConfigError: as the chosen builder, or a missing sparsity.
    """
    p = parse_pattern(pattern, layer or "pattern")
    if p.nm is not None:
        return nm_mask(scores, p.nm[0], p.nm[1], layer)
    if sparsity is None:
        raise ConfigError(f"{layer or 'layer'}: pattern {p} needs a sparsity")
    if p.block is not None:
        return block_mask(scores, p.block, sparsity, layer=layer)
    if p.kind == "row":
        return row_mask(scores, sparsity, layer)
    return layer_mask(scores, sparsity, layer)


def check_nm_mask(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive entries of each row has exactly ``n`` True."""
    rows = mask.reshape(mask.shape[0], -1)
    if rows.shape[1] % m:
        return False
    return bool((rows.reshape(rows.shape[0], -1, m).sum(-1) == n).all())

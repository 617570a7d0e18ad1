"""Allocation: how much to remove where, given scores.

``layerwise`` prunes the same fraction of every layer; ``global_`` ranks all scoped scores
together and prunes the lowest fraction overall (Han et al. 2015 use per-layer thresholds; the
global variant is the common baseline of Blalock et al. 2020 and Frankle & Carbin 2019 for conv
nets). Both count exactly: ``floor(sparsity * n)`` entries are pruned, ties broken by position, so
the achieved sparsity is the requested one up to rounding.

Entries already pruned (``previous`` masks False) are forced to stay pruned, which makes the
gradual schedule monotone (Zhu & Gupta 2017 never regrow pruned weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from secateur.errors import ConfigError, did_you_mean


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Validate a sparsity as a fraction in [0, 1).

    Raises:
        ConfigError: if it is not a number in [0, 1) (1.0 would remove every weight).
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or math.isnan(sparsity):
        raise ConfigError(f"{what} must be a fraction in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(f"{what} must be a fraction in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _with_previous(scores: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    s = scores.detach().float().flatten()
    if previous is not None:
        s = torch.where(previous.flatten().to(s.device), s, torch.full_like(s, -math.inf))
    return s


def _lowest_k_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        # A stable sort breaks ties by position, so the count is exact and reproducible.
        idx = torch.sort(flat, stable=True).indices[:k]
        keep[idx] = False
    return keep


def layerwise(
    scores: Mapping[str, torch.Tensor],
    sparsity: float | Mapping[str, float],
    previous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune ``floor(s * n)`` lowest-scoring entries in each layer.

    Args:
        scores: ``{name: scores}``, any shapes.
        sparsity: one fraction in [0, 1) for all layers, or ``{name: fraction}``.
        previous: optional current masks; pruned entries stay pruned.

    Returns:
        ``{name: bool keep-mask}`` with the shapes of ``scores``.

    Raises:
        ConfigError: a sparsity outside [0, 1) or a per-layer dict missing a layer.
    """
    out = {}
    for name, s in scores.items():
        if isinstance(sparsity, Mapping):
            if name not in sparsity:
                raise ConfigError(f"no sparsity given for layer {name!r}")
            sp = check_sparsity(sparsity[name], f"sparsity of {name}")
        else:
            sp = check_sparsity(sparsity)
        flat = _with_previous(s, None if previous is None else previous.get(name))
        out[name] = _lowest_k_mask(flat, math.floor(sp * flat.numel())).view_as(s)
    return out


def global_threshold(scores: Mapping[str, torch.Tensor], sparsity: float) -> float:
    """The k-th smallest score over all layers, k = floor(sparsity * total); -inf when k = 0.

    Entries with score <= threshold are the ones :func:`global_` prunes (up to ties at the value).
    """
    sp = check_sparsity(sparsity)
    flat = torch.cat([s.detach().float().flatten() for s in scores.values()])
    k = math.floor(sp * flat.numel())
    if k == 0:
        return -math.inf
    return torch.kthvalue(flat, k).values.item()


def global_(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune the ``floor(sparsity * total)`` lowest scores over all layers together.

    Scores must be comparable across layers (true for magnitude within one network; see LAMP for a
    normalised alternative). Returns ``{name: bool keep-mask}``.

    Raises:
        ConfigError: a sparsity outside [0, 1).
    """
    sp = check_sparsity(sparsity)
    names = list(scores)
    flats = [_with_previous(scores[n], None if previous is None else previous.get(n)) for n in names]
    allflat = torch.cat(flats)
    keep = _lowest_k_mask(allflat, math.floor(sp * allflat.numel()))
    out, offset = {}, 0
    for n, f in zip(names, flats):
        out[n] = keep[offset : offset + f.numel()].view_as(scores[n])
        offset += f.numel()
    return out


ALLOCATIONS = {"layerwise": layerwise, "global": global_}


def get_allocation(spec):
    """The allocation registered under ``spec`` (a name), or ``spec`` itself if it is callable.

    Names: "global", "layerwise", and those of :mod:`secateur.allocation.targets` ("uniform",
    "global_capped", "erk", "lamp"). A callable must have the signature
    ``allocate(scores, sparsity, previous=None) -> {name: bool keep-mask}``.

    Raises:
        ConfigError: an unknown name, listing the allowed ones.
    """
    import secateur.allocation.targets  # noqa: F401  (registers the extra allocations)

    if callable(spec):
        return spec
    if spec not in ALLOCATIONS:
        raise ConfigError(
            f"unknown allocation {spec!r}{did_you_mean(spec, ALLOCATIONS)}; available: {sorted(ALLOCATIONS)}"
        )
    return ALLOCATIONS[spec]

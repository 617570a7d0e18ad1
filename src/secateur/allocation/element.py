"""Element allocations: how many entries of each scored tensor to prune, given scores.

Every allocation has the signature ``allocate(scores: {name: Tensor}, sparsity: float, previous:
{name: bool Tensor} | None) -> {name: bool keep-mask}``, where ``sparsity`` is the fraction (in [0, 1),
not a percent) of the *scoped* weights to prune. They are registered by name in :data:`ALLOCATIONS`
(:func:`register_allocation`, :func:`get_allocation`):

- ``"layerwise"`` / ``"uniform"``: the same fraction of every layer.
- ``"global"``: rank all scoped scores together and prune the lowest fraction overall (Han et al. 2015
  use per-layer thresholds; the global variant is the common baseline of Blalock et al. 2020 and
  Frankle & Carbin 2019 for conv nets).
- ``"global_capped"``: global ranking, but no layer pruned beyond ``max_sparsity``; what a capped
  layer cannot take is redistributed to the others by the same global ranking.
- ``"erk"``: Erdős–Rényi-Kernel layer densities (Evci et al. 2020, "Rigging the Lottery", sec. 3):
  ``density_l = ε · sum(shape) / prod(shape)``; layers whose density would exceed 1 are made dense
  and ε is solved again on the rest. Within a layer the lowest scores are pruned.
- ``"lamp"``: global ranking of LAMP scores (Lee et al. 2021) computed from the given scores.

All count exactly: ``floor(sparsity * n)`` entries are pruned, ties broken by position. Entries already
pruned (``previous`` masks False) are forced to stay pruned, which makes the gradual schedule monotone
(Zhu & Gupta 2017 never regrow pruned weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from secateur._validate import check_sparsity
from secateur.criteria.element.lamp import lamp_scores
from secateur.errors import ConfigError
from secateur.registry import Registry

Masks = dict[str, torch.Tensor]
Allocation = Callable[..., Masks]



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


#: Element allocations by name (recipes, the CLI and :class:`secateur.Pruner` resolve names here).
ALLOCATIONS: Registry[Allocation] = Registry("allocation")
ALLOCATIONS.register("layerwise", layerwise)
ALLOCATIONS.register("global", global_)


def register_allocation(name: str) -> Callable[[Allocation], Allocation]:
    """Decorator registering an allocation under ``name`` in ``ALLOCATIONS``
    (so ``Pruner(..., allocation=name)`` and recipes find it)."""

    return ALLOCATIONS.register(name)


def _flat(scores: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    s = scores.detach().double().flatten()
    if previous is not None:
        s = torch.where(previous.flatten().to(s.device), s, torch.full_like(s, -math.inf))
    return s


def _prev(previous: Mapping[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
    return None if previous is None else previous.get(name)


@register_allocation("uniform")
def uniform(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """The same fraction ``sparsity`` pruned in every layer (``floor(s · n_l)`` entries each).

    Raises:
        ConfigError: a sparsity outside [0, 1).
    """
    return layerwise(scores, sparsity, previous)


@register_allocation("global_capped")
def global_capped(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    previous: Mapping[str, torch.Tensor] | None = None,
    *,
    max_sparsity: float = 0.9,
) -> Masks:
    """Global ranking with a per-layer cap: prune ``floor(sparsity · N)`` entries over all layers,
    the lowest scores first, but at most ``floor(max_sparsity · n_l)`` in layer ``l``.

    Water-filling: layers that the global threshold would prune beyond the cap are fixed at the
    cap, and the remaining budget is ranked globally over the other layers, until no layer
    exceeds its cap. Previously pruned entries count toward a layer's pruned total (and raise its
    cap to their number if they already exceed it). Both fractions are in [0, 1).

    Raises:
        ConfigError: a fraction outside [0, 1), or a ``sparsity`` that the caps make unreachable.
    """
    sp = check_sparsity(sparsity)
    cap_frac = check_sparsity(max_sparsity, "max_sparsity")
    names = list(scores)
    flats = {n: _flat(scores[n], _prev(previous, n)) for n in names}
    already = {n: int(torch.isinf(flats[n]).sum()) for n in names}
    caps = {n: max(math.floor(cap_frac * flats[n].numel()), already[n]) for n in names}
    total = sum(f.numel() for f in flats.values())
    k = math.floor(sp * total)
    if k > sum(caps.values()):
        raise ConfigError(
            f"sparsity {sp} unreachable with max_sparsity {cap_frac} per layer: the caps allow at most "
            f"{sum(caps.values()) / max(total, 1):.4f} of the scoped weights to be pruned"
        )
    capped: set[str] = set()
    while True:
        free = [n for n in names if n not in capped]
        budget = k - sum(caps[n] for n in capped)
        counts = dict.fromkeys(free, 0)
        if free and budget > 0:
            allflat = torch.cat([flats[n] for n in free])
            owner = torch.cat([torch.full((flats[n].numel(),), i) for i, n in enumerate(free)])
            chosen = owner[torch.sort(allflat, stable=True).indices[:budget]]
            per = torch.bincount(chosen, minlength=len(free))
            counts = {n: int(per[i]) for i, n in enumerate(free)}
        over = {n for n in free if counts[n] > caps[n]}
        if not over:
            break
        capped |= over
    out: Masks = {}
    for n in names:
        count = caps[n] if n in capped else counts[n]
        keep = torch.ones(flats[n].numel(), dtype=torch.bool, device=flats[n].device)
        keep[torch.sort(flats[n], stable=True).indices[:count]] = False
        out[n] = keep.view(scores[n].shape)
    return out


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """ERK layer densities whose parameter-weighted mean is ``density`` (a fraction in (0, 1]).

    ``density_l = min(1, ε · sum(shape_l) / prod(shape_l))`` (Evci et al. 2020, sec. 3: ERK for a
    conv ``(n_out, n_in, k_h, k_w)``, Erdős–Rényi for a linear ``(n_out, n_in)``), with ε solved so
    that ``Σ density_l · n_l = density · Σ n_l``; layers that would exceed 1 are set dense and ε is
    re-solved on the others (the procedure of the paper's released code).

    Raises:
        ConfigError: ``density`` outside (0, 1].
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be a fraction in (0, 1], got {density!r}")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    target = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        rest = [n for n in shapes if n not in dense]
        if not rest:
            return dict.fromkeys(shapes, 1.0)
        eps = (target - sum(sizes[n] for n in dense)) / sum(raw[n] * sizes[n] for n in rest)
        over = {n for n in rest if eps * raw[n] > 1.0}
        if not over:
            break
        dense |= over
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


@register_allocation("erk")
def erk(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Per-layer sparsity ``1 - density_l`` from :func:`erk_densities` (shapes of the score tensors,
    so pass scores of the weights' shapes); the lowest scores of each layer are pruned.

    Raises:
        ConfigError: a sparsity outside [0, 1).
    """
    sp = check_sparsity(sparsity)
    dens = erk_densities({n: tuple(s.shape) for n, s in scores.items()}, 1.0 - sp)
    return layerwise(
        scores, {n: min(max(1.0 - d, 0.0), math.nextafter(1.0, 0.0)) for n, d in dens.items()}, previous
    )


@register_allocation("lamp")
def lamp(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Global pruning by LAMP scores (Lee et al. 2021, eq. 2) computed layer by layer from
    ``scores`` (entries already pruned count as zero), then the lowest ``floor(sparsity · N)``.

    Raises:
        ConfigError: a sparsity outside [0, 1).
    """
    transformed = {}
    for n, s in scores.items():
        p = _prev(previous, n)
        v = s.detach().double()
        if p is not None:
            v = torch.where(p.to(v.device), v, torch.zeros_like(v))
        transformed[n] = lamp_scores(v)
    return global_(transformed, sparsity, previous)


def get_allocation(spec):
    """The allocation registered under ``spec`` (a name), or ``spec`` itself if it is callable.

    Names: "global", "layerwise", "uniform", "global_capped", "erk", "lamp" and any added with
    :func:`register_allocation`. A callable must have the signature
    ``allocate(scores, sparsity, previous=None) -> {name: bool keep-mask}``.

    Raises:
        ConfigError: an unknown name, listing the allowed ones.
    """
    if callable(spec):
        return spec
    return ALLOCATIONS.get(spec)

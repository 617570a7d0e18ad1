"""Structured criteria as pure functions over units (filters, channels, neurons).

A *unit matrix* is a tensor of shape ``(n_units, ...)``: conv filters ``(C_out, C_in, k_h, k_w)``,
linear rows ``(out, in)``, BatchNorm scales ``(C,)``. Each function returns one score per unit,
shape ``(n_units,)``, higher = more important (the lowest are pruned), so they plug into the
dependency graph's channel groups: a group's members are concatenated along the unit dimension's
complement or their scores summed, as the group code decides.

- :func:`norm_scores`: ``||F_i||_p`` per filter; L1 is Li et al. 2017 ("Pruning Filters for
  Efficient ConvNets", sec. 3.1, ``s_j = Σ |F_j|``).
- :func:`fpgm_scores`: FPGM (He et al. 2019, "Filter Pruning via Geometric Median", sec. 3.3-3.4):
  filters near the geometric median of their layer are the most replaceable. The practical
  criterion (eq. 6) ranks filter ``i`` by ``Σ_j ||F_i - F_j||_2``; the smallest sums are pruned.
- :func:`bn_scale_scores`: network slimming (Liu et al. 2017, "Learning Efficient Convolutional
  Networks through Network Slimming", sec. 3.1): ``|γ|`` of the BatchNorm after each channel.
- :func:`redundant_features`: Ayinde & Zurada 2018 ("Building Efficient ConvNets using Redundant
  Feature Pruning"): agglomerative clustering of filters by cosine similarity with a threshold
  ``τ``; one filter per cluster is kept. :func:`merge_tree` gives the whole clustering as its merges.
- :func:`taylor_group_scores` and :class:`TaylorAccumulator`: first-order Taylor importance of a
  group (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning", eq. 4 with
  eq. 3): ``I_S = (Σ_{s∈S} g_s w_s)^2``, averaged over mini-batches and smoothed across pruning
  steps by an exponential moving average with momentum 0.9 (sec. 3.1-3.2). For a gate ``z = 1``
  after a BatchNorm, ``Σ (γ ∂L/∂γ + β ∂L/∂β) = z ∂L/∂z``, the gate formulation of sec. 3.2.
- :func:`fisher_channel_scores`: Fisher pruning (Theis et al. 2018, "Faster gaze prediction with
  dense networks and Fisher pruning", eq. 8-9, as used by Crowley et al. 2018): per channel
  ``Δ_c = 1/(2N) Σ_n (Σ_{h,w} a_{nchw} g_{nchw})^2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from secateur.errors import ConfigError

__all__ = [
    "TaylorAccumulator",
    "bn_scale_scores",
    "fisher_channel_scores",
    "fpgm_scores",
    "geometric_median",
    "merge_tree",
    "norm_scores",
    "redundant_features",
    "taylor_group_scores",
]


def _units(units: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(units, torch.Tensor) or units.dim() < 1 or units.shape[0] < 1:
        raise ConfigError(
            f"{what}: expected a tensor of shape (n_units, ...), got {getattr(units, 'shape', units)}"
        )
    return units.detach().reshape(units.shape[0], -1).double()


def norm_scores(units: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """``||F_i||_p`` of each unit, shape ``(n_units,)`` (Li et al. 2017 use ``p = 1``).

    Raises:
        ConfigError: ``p`` not positive, or ``units`` without a unit dimension.
    """
    if not p > 0:
        raise ConfigError(f"norm order p must be > 0, got {p!r}")
    flat = _units(units, "norm_scores")
    return flat.abs().pow(p).sum(1).pow(1.0 / p)


def geometric_median(points: torch.Tensor, iters: int = 200, tol: float = 1e-10) -> torch.Tensor:
    """The geometric median ``argmin_x Σ_i ||x - p_i||_2`` of the rows of ``points`` (n, d), by
    Weiszfeld's algorithm (1937) started at the mean. Returns a tensor of shape (d,) (float64)."""
    pts = _units(points, "geometric_median")
    x = pts.mean(0)
    for _ in range(iters):
        d = torch.linalg.vector_norm(pts - x, dim=1)
        if torch.any(d < tol):  # x sits on a data point: Weiszfeld's fixed point there
            return pts[int(torch.argmin(d))]
        w = 1.0 / d
        nxt = (w[:, None] * pts).sum(0) / w.sum()
        if torch.linalg.vector_norm(nxt - x) < tol:
            return nxt
        x = nxt
    return x


def fpgm_scores(units: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """FPGM scores, shape ``(n_units,)``: low = close to the layer's geometric median = pruned first.

    Args:
        units: ``(n_units, ...)``, e.g. conv filters.
        method: ``"sum"`` (default, He et al. 2019 eq. 6: ``Σ_j ||F_i - F_j||_2``) or ``"median"``
            (distance to the geometric median computed by :func:`geometric_median`).

    Raises:
        ConfigError: unknown method.
    """
    flat = _units(units, "fpgm_scores")
    if method == "sum":
        return torch.cdist(flat, flat).sum(1)
    if method == "median":
        return torch.linalg.vector_norm(flat - geometric_median(flat), dim=1)
    raise ConfigError(f"fpgm method must be 'sum' or 'median', got {method!r}")


def bn_scale_scores(bn: nn.Module | torch.Tensor) -> torch.Tensor:
    """``|γ|`` per channel (Liu et al. 2017), shape ``(C,)``, from a norm layer or its weight.

    Raises:
        ConfigError: a norm layer without affine scale.
    """
    gamma = bn if isinstance(bn, torch.Tensor) else getattr(bn, "weight", None)
    if not isinstance(gamma, torch.Tensor):
        raise ConfigError(f"{type(bn).__name__} has no affine scale γ (affine=False?); slimming needs γ")
    return gamma.detach().abs()


def merge_tree(
    units: torch.Tensor, linkage: str = "average", tau: float | None = None
) -> list[tuple[int, int, float]]:
    """Agglomerative clustering of filters by cosine similarity, as the list of its merges (Ayinde & Zurada
    2018 cluster this way).

    Start with singletons and repeatedly merge the two clusters with the highest linkage similarity while it
    is ``>= tau`` (``tau=None``: until one cluster is left). Linkage similarity of clusters A, B:
    ``"single"`` max, ``"complete"`` min, ``"average"`` mean of the pairwise cosine similarities (updated by
    the Lance–Williams formulas; all three are reducible, so the merge similarities do not increase, up to
    rounding). A zero filter has similarity 0 to every other.

    Args:
        units: ``(n_units, ...)`` filters.
        tau: cosine-similarity threshold in [-1, 1], or None (the whole tree: ``n_units - 1`` merges).
        linkage: ``"single"``, ``"complete"`` or ``"average"``.

    Returns:
        ``[(i, j, similarity), ...]`` in merge order: the cluster held in slot ``i`` absorbs the one in slot
        ``j`` (slot ``k`` starts as the singleton ``{k}``).

    Raises:
        ConfigError: ``tau`` outside [-1, 1], unknown linkage, ``units`` without a unit dimension.
    """
    if tau is not None and not -1.0 <= tau <= 1.0:
        raise ConfigError(f"tau must be a cosine similarity in [-1, 1], got {tau!r}")
    if linkage not in ("single", "complete", "average"):
        raise ConfigError(f"linkage must be 'single', 'complete' or 'average', got {linkage!r}")
    flat = _units(units, "merge_tree")
    n = flat.shape[0]
    norms = torch.linalg.vector_norm(flat, dim=1)
    unit = flat / torch.where(norms > 0, norms, 1.0)[:, None]
    sim = unit @ unit.T
    sim.fill_diagonal_(-torch.inf)
    size = [1] * n
    alive = torch.ones(n, dtype=torch.bool)
    merges: list[tuple[int, int, float]] = []
    while int(alive.sum()) > 1:
        masked = sim.masked_fill(~(alive[:, None] & alive[None, :]), -torch.inf)
        best = torch.argmax(masked)
        i, j = divmod(int(best), n)
        s = float(masked[i, j])
        if tau is not None and s < tau:
            break
        if linkage == "single":
            row = torch.maximum(sim[i], sim[j])
        elif linkage == "complete":
            row = torch.minimum(sim[i], sim[j])
        else:
            row = (size[i] * sim[i] + size[j] * sim[j]) / (size[i] + size[j])
        sim[i, :] = row
        sim[:, i] = row
        sim[i, i] = -torch.inf
        size[i] += size[j]
        alive[j] = False
        merges.append((i, j, s))
    return merges


def redundant_features(
    units: torch.Tensor,
    tau: float,
    linkage: str = "average",
    representative: str = "norm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster filters by cosine similarity; keep one per cluster (Ayinde & Zurada 2018).

    The clusters of :func:`merge_tree` at threshold ``tau``: merges of linkage similarity ``>= tau``.
    With single linkage, clusters are exactly the connected components of the graph
    ``cos(F_i, F_j) >= tau``.

    Args:
        units: ``(n_units, ...)`` filters. A zero filter has similarity 0 to every other.
        tau: cosine-similarity threshold in [-1, 1]; higher merges less.
        linkage: ``"single"``, ``"complete"`` or ``"average"``.
        representative: the kept member of each cluster: ``"norm"`` (largest L2 norm) or
            ``"first"`` (lowest index).

    Returns:
        ``(labels, keep)``: ``labels`` (n_units,) int64 cluster ids 0..K-1 numbered by first
        member; ``keep`` (n_units,) bool, exactly one True per cluster.

    Raises:
        ConfigError: ``tau`` outside [-1, 1], unknown linkage or representative.
    """
    if tau is None or not -1.0 <= tau <= 1.0:
        raise ConfigError(f"tau must be a cosine similarity in [-1, 1], got {tau!r}")
    if representative not in ("norm", "first"):
        raise ConfigError(f"representative must be 'norm' or 'first', got {representative!r}")
    merges = merge_tree(units, linkage, tau)
    n = units.shape[0]
    norms = torch.linalg.vector_norm(_units(units, "redundant_features"), dim=1)
    members: list[list[int] | None] = [[i] for i in range(n)]
    for i, j, _ in merges:
        a, b = members[i], members[j]
        assert a is not None and b is not None
        members[i] = a + b
        members[j] = None
    clusters = sorted((sorted(m) for m in members if m is not None), key=lambda m: m[0])
    labels = torch.empty(n, dtype=torch.long)
    keep = torch.zeros(n, dtype=torch.bool)
    for k, m in enumerate(clusters):
        labels[m] = k
        rep = m[0] if representative == "first" else m[int(torch.argmax(norms[m]))]
        keep[rep] = True
    return labels, keep


def taylor_group_scores(
    members: Sequence[tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, int]],
) -> torch.Tensor:
    """First-order Taylor score of each unit of a group: ``(Σ_{s∈unit} w_s g_s)^2`` (Molchanov et
    al. 2019, eq. 4), for one mini-batch.

    Args:
        members: ``(w, g)`` or ``(w, g, dim)`` per coupled tensor (weight and its gradient of the
            same shape; ``dim`` the unit dimension, default 0), e.g. a conv's filters (dim 0), its
            bias, the next BatchNorm's γ and β, or the next conv's input channels (dim 1). Every
            member must have the same number of units.

    Returns:
        ``(n_units,)`` float64 scores.

    Raises:
        ConfigError: no members, mismatched shapes or unit counts.
    """
    if not members:
        raise ConfigError("taylor_group_scores needs at least one (weight, gradient) member")
    total: torch.Tensor | None = None
    for member in members:
        w, g = member[0], member[1]
        dim = member[2] if len(member) > 2 else 0
        if w.shape != g.shape:
            raise ConfigError(f"weight {tuple(w.shape)} and gradient {tuple(g.shape)} differ in shape")
        prod = (w.detach().double() * g.detach().double()).movedim(dim, 0).reshape(w.shape[dim], -1).sum(1)
        if total is not None and total.shape != prod.shape:
            raise ConfigError(f"group members have {total.shape[0]} and {prod.shape[0]} units")
        total = prod if total is None else total + prod
    assert total is not None
    return total**2


class TaylorAccumulator:
    """Molchanov et al. 2019's bookkeeping: average group scores over mini-batches, then smooth
    them across pruning steps with an exponential moving average (momentum 0.9 in the paper).

    Per group name: :meth:`add` one mini-batch's ``(n_units,)`` scores; :meth:`step` ends a pruning
    interval and returns ``ema = momentum · ema + (1 - momentum) · mean_of_batches`` (the first
    step sets ``ema`` to the mean), then clears the batch sums. The ranking is global: compare
    scores of all groups together.

    Raises:
        ConfigError: momentum outside [0, 1); :meth:`step` with no batch added; a group whose
            number of units changed (prune it from the accumulator with :meth:`reset`).
    """

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = momentum
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.ema: dict[str, torch.Tensor] = {}

    def add(self, name: str, scores: torch.Tensor) -> None:
        s = scores.detach().double()
        if name in self.sums and self.sums[name].shape != s.shape:
            raise ConfigError(f"group {name!r}: {s.shape[0]} units, previously {self.sums[name].shape[0]}")
        self.sums[name] = self.sums.get(name, torch.zeros_like(s)) + s
        self.counts[name] = self.counts.get(name, 0) + 1

    def add_all(self, scores: Mapping[str, torch.Tensor]) -> None:
        for name, s in scores.items():
            self.add(name, s)

    def step(self) -> dict[str, torch.Tensor]:
        if not self.sums:
            raise ConfigError("TaylorAccumulator.step: no mini-batch scores were added since the last step")
        for name, total in self.sums.items():
            mean = total / self.counts[name]
            prev = self.ema.get(name)
            if prev is not None and prev.shape != mean.shape:
                raise ConfigError(f"group {name!r} changed from {prev.shape[0]} to {mean.shape[0]} units")
            self.ema[name] = mean if prev is None else self.momentum * prev + (1 - self.momentum) * mean
        self.sums, self.counts = {}, {}
        return dict(self.ema)

    def reset(self, name: str | None = None) -> None:
        """Forget one group (after it was pruned and changed size) or everything."""
        if name is None:
            self.sums, self.counts, self.ema = {}, {}, {}
        else:
            for d in (self.sums, self.counts, self.ema):
                d.pop(name, None)


def fisher_channel_scores(activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Fisher pruning signal per channel, shape ``(C,)`` (Theis et al. 2018, eq. 9).

    ``Δ_c = 1/(2N) Σ_n (Σ_{h,w} a_{nchw} g_{nchw})^2`` with ``a`` the activation (N, C, H, W) of the
    channel (the output of the mask/gate point) and ``g = ∂L/∂a`` of the same shape. Also accepts
    (N, C) or (N, C, L) tensors (spatial dimensions are summed).

    Raises:
        ConfigError: shapes differ or have no batch and channel dimensions.
    """
    if activation.shape != grad.shape or activation.dim() < 2:
        raise ConfigError(
            f"activation {tuple(activation.shape)} and gradient {tuple(grad.shape)} "
            "must share a shape (N, C, ...)"
        )
    n = activation.shape[0]
    per_sample = (
        (activation.detach().double() * grad.detach().double()).reshape(n, activation.shape[1], -1).sum(2)
    )
    return per_sample.pow(2).sum(0) / (2 * n)

"""Criteria over dependency-graph groups: one score per unit (channel, head, FFN neuron) of a group.

Where :mod:`secateur.criteria.structured` holds pure functions over unit matrices, this module reads
a group's members out of a live model (masked weights included) and, for the data-dependent criteria,
collects statistics during the user's training loop. Scores have shape ``(group.n_units,)``, float64,
higher = more important (the lowest go first). Registered names (:func:`available_group_criteria`):

- ``"random"``: uniform noise (a baseline, ShrinkBench's advice).
- ``"l1"`` / ``"l2"``: Li et al. 2017 ("Pruning Filters for Efficient ConvNets", sec. 3.1): per unit the
  mean ``|w|^p`` of its slice in each producing parameter member (dim 0: filters, biases, norm scales),
  each member divided by its mean over units so that no single large tensor dominates, summed over
  members (:func:`secateur.pruners.oneshot.lp_scores`'s definition, read through masks).
- ``"bn_scale"``: network slimming (Liu et al. 2017, sec. 3.1): ``|γ|`` of the group's BatchNorm /
  LayerNorm / GroupNorm members (mean over them when a residual group couples several).
- ``"fpgm"``: He et al. 2019 ("Filter Pruning via Geometric Median", sec. 3.3-3.4): the distance of each
  unit's filter to the geometric median of its producing layer's filters (``method="median"``) or eq.
  6's ``Σ_j ||F_i - F_j||`` (``method="sum"``); summed over producers after dividing each by its mean.
- ``"taylor"``: Molchanov et al. 2019 ("Importance Estimation for Neural Network Pruning", eq. 3-4):
  per mini-batch ``I_u = (Σ_{members} Σ_{s∈u} w_s g_s)^2``, averaged over the mini-batches seen between
  two pruning steps and smoothed across pruning steps by an EMA of momentum 0.9 (sec. 3.1-3.2).
- ``"fisher"``: Theis et al. 2018 (eq. 8-9) as used by Crowley et al. 2018: at the output ``a`` of each
  producing module (conv / linear), ``Δ_u = 1/(2N) Σ_n (Σ_{positions, s∈u} a_{ns} g_{ns})^2`` with
  ``g = ∂L/∂a``, recorded by forward/backward hooks; summed over the group's producers.

- ``"michel"``: Michel et al. 2019 ("Are Sixteen Heads Really Better than One?", eq. 2 and sec. 4.1):
  attention-head importance ``I_h = E_x |∂L(x)/∂ξ_h|`` for a gate ``ξ_h`` (= 1) multiplying head ``h``'s
  output, read at the layer that consumes the concatenated heads (the output projection) as
  ``∂L/∂ξ_h = Σ_{tokens} Σ_{d∈h} z_d ∂L/∂z_d`` (``z``: that layer's input), then divided by the layer's
  L2 norm of scores (sec. 4.1). See :class:`MichelCriterion`.

``"taylor"``, ``"fisher"`` and ``"michel"`` need gradients: call :meth:`GroupCriterion.accumulate` after each
``loss.backward()`` (Fisher records in its hooks on its own) or give the pruner ``data``; without either
they raise :class:`~secateur.errors.ConfigError` saying so. Their scores estimate the loss change of
removing a unit, so they are comparable across groups (``comparable = True``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from secateur.criteria.structured import TaylorAccumulator, fpgm_scores, norm_scores
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group, Member
from secateur.registry import Registry

__all__ = [
    "BNScaleCriterion",
    "FPGMCriterion",
    "FisherCriterion",
    "FunctionCriterion",
    "GroupCriterion",
    "LpCriterion",
    "MichelCriterion",
    "RandomCriterion",
    "TaylorCriterion",
    "available_group_criteria",
    "consumer_members",
    "effective_tensor",
    "get_group_criterion",
    "head_group_ids",
    "producer_members",
    "register_group_criterion",
    "stored_parameter",
]

GroupScores = dict[int, np.ndarray]
NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


# ----------------------------------------------------------------------------------------------------
# reading members through masks
# ----------------------------------------------------------------------------------------------------
def _owner(model: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    path, _, attr = qualname.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def effective_tensor(model: nn.Module, qualname: str) -> torch.Tensor:
    """The tensor forward sees for parameter/buffer ``qualname`` (masked through a parametrization)."""
    mod, attr = _owner(model, qualname)
    return getattr(mod, attr)


def stored_parameter(model: nn.Module, qualname: str) -> torch.Tensor:
    """The stored tensor behind ``qualname`` (the optimizer's Parameter, ``.original`` if masked)."""
    mod, attr = _owner(model, qualname)
    if parametrize.is_parametrized(mod, attr):
        return mod.parametrizations[attr].original
    return getattr(mod, attr)


def _per_index(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as a matrix ``(t.shape[dim], -1)``, float64 (one row per index of ``dim``)."""
    t = t.detach().double()
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)


def _unit_sum(values: np.ndarray, m: Member, n_units: int) -> np.ndarray:
    return np.bincount(m.unit_of, weights=values, minlength=n_units)


def _unit_mean(values: np.ndarray, m: Member, n_units: int) -> np.ndarray:
    return _unit_sum(values, m, n_units) / np.maximum(np.bincount(m.unit_of, minlength=n_units), 1)


def _weight_dims(mod: nn.Module) -> tuple[int, int] | None:
    """Dimensions ``(output channels, input channels)`` of ``mod.weight``, or None if ``mod`` is not a
    conv / linear layer."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return (1, 0) if mod.transposed else (0, 1)
    if isinstance(mod, nn.Linear):
        return (0, 1)
    if type(mod).__name__ == "Conv1D":  # Hugging Face GPT-2: weight (in, out)
        return (1, 0)
    return None


def _weight_members(group: Group, model: nn.Module, side: int) -> list[Member]:
    """Members that are dim ``_weight_dims(module)[side]`` of a conv / linear ``weight``."""
    out = []
    for m in group.members:
        if m.is_buffer or not m.name.endswith(".weight"):
            continue
        dims = _weight_dims(model.get_submodule(m.module) if m.module else model)
        if dims is not None and dims[side] == m.dim:
            out.append(m)
    return out


def producer_members(group: Group, model: nn.Module) -> list[Member]:
    """Members that are the output-channel dim of a conv / linear ``weight`` (the layers producing the
    group's channels). Several for residual groups; none for e.g. a group of embedding columns."""
    return _weight_members(group, model, 0)


def consumer_members(group: Group, model: nn.Module) -> list[Member]:
    """Members that are the input-channel dim of a conv / linear ``weight``: the layers reading the group's
    channels (for attention heads, the output projection that consumes the concatenated head outputs)."""
    return _weight_members(group, model, 1)


def head_group_ids(graph: DependencyGraph, group_ids: Sequence[int] | None = None) -> list[int]:
    """Indices (into ``graph.groups``) of the groups whose units are attention heads: groups holding the
    units of a traced head split (a view of a channel dim into ``(heads, head_dim)``). ``group_ids``
    restricts the search (default: all groups)."""
    wanted = [ev.classes for ev in graph.splits if ev.kind == "heads" and ev.classes is not None]
    if not wanted:
        return []
    classes = np.unique(np.concatenate(wanted))
    ids = range(len(graph.groups)) if group_ids is None else group_ids
    return [gi for gi in ids if np.isin(graph.groups[gi].classes, classes).any()]


def _mean_normalised_sum(parts: list[np.ndarray], n_units: int) -> np.ndarray:
    total = np.zeros(n_units)
    for p in parts:
        total += p / max(float(np.mean(np.abs(p))), 1e-30)
    return total


# ----------------------------------------------------------------------------------------------------
# interface and registry
# ----------------------------------------------------------------------------------------------------
class GroupCriterion:
    """Base class: scores the units of graph groups.

    Attributes:
        name: registry name.
        needs_data: True when scores come from gradients/activations (statistics must be collected).
        comparable: True when raw scores are on one scale across groups (estimates of a loss change), so
            a global ranking needs no per-group normalisation.
    """

    name = "base"
    needs_data = False
    comparable = False

    def scores(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> GroupScores:
        """``{group index: (n_units,) float64 scores}`` for ``group_ids`` (indices into ``graph.groups``)."""
        return {gi: self.group_scores(graph.groups[gi], model) for gi in group_ids}

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- statistics (data-dependent criteria) ------------------------------------------------------
    def attach(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> None:
        """Install hooks (Fisher). Called once by the pruner; a no-op by default."""

    def detach(self) -> None:
        """Remove hooks installed by :meth:`attach`."""

    def accumulate(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> None:
        """Read the gradients now in ``.grad`` (after a backward) into the statistics; no-op by default."""

    def has_stats(self) -> bool:
        """Whether :meth:`scores` can be computed now (always for data-free criteria)."""
        return True

    def after_prune(self) -> None:
        """Called after masks changed; clears per-interval statistics."""

    def missing_stats_message(self) -> str:
        return (
            f"criterion {self.name!r} needs gradients: call pruner.accumulate() after loss.backward() in "
            "your loop, use the pruner as a Trainer callback, or pass data=(x, y) batches to the pruner"
        )


Factory = Callable[..., GroupCriterion]

#: Group (structured) criteria by name: every structured entry point resolves names here.
GROUP_CRITERIA: Registry[Factory] = Registry("group criterion")


def register_group_criterion(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering a :class:`GroupCriterion` factory under ``name``."""
    return GROUP_CRITERIA.register(name)


def available_group_criteria() -> list[str]:
    """Registered group criterion names."""
    return GROUP_CRITERIA.list()


def get_group_criterion(
    spec: str | GroupCriterion | Callable[[Group, nn.Module], Any], **kwargs: Any
) -> GroupCriterion:
    """A criterion from its name (``kwargs`` go to its constructor), an instance, or a callable
    ``f(group, model) -> (n_units,) scores`` (wrapped in :class:`FunctionCriterion`).

    Raises:
        ConfigError: unknown name (lists the registered ones) or bad constructor arguments.
    """
    if isinstance(spec, GroupCriterion):
        return spec
    if isinstance(spec, str):
        factory = GROUP_CRITERIA.get(spec)
        try:
            return factory(**kwargs)
        except TypeError as e:
            raise ConfigError(f"group criterion {spec!r}: bad arguments {sorted(kwargs)}: {e}") from e
    if callable(spec):
        return FunctionCriterion(spec)
    raise ConfigError(f"criterion must be a name, a GroupCriterion or a callable, got {type(spec).__name__}")


class FunctionCriterion(GroupCriterion):
    """Wraps ``f(group, model) -> (n_units,) scores`` (array-like, higher = keep)."""

    name = "function"

    def __init__(self, fn: Callable[[Group, nn.Module], Any]) -> None:
        self.fn = fn

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray:
        s = self.fn(group, model)
        if isinstance(s, torch.Tensor):
            s = s.detach().cpu().double().numpy()
        return np.asarray(s, dtype=float)


# ----------------------------------------------------------------------------------------------------
# data-free criteria
# ----------------------------------------------------------------------------------------------------
@register_group_criterion("random")
class RandomCriterion(GroupCriterion):
    """Uniform random scores in [0, 1), from a seeded generator (reproducible across runs)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray:
        return self.rng.random(group.n_units)


class LpCriterion(GroupCriterion):
    """Li et al. 2017 filter norms over a whole group (see the module docstring for the normalisation).

    Per member: ``||w_i||_p^p / row size`` per index via :func:`norm_scores`, averaged over the indices
    of each unit, divided by its mean over units; summed over parameter members (buffers skipped).

    Args:
        p: the norm order (> 0).
        producers_only: read only the members along dim 0 (filters, biases, norm scales: the side that
            produces the channels, Li et al.'s filter norm), as :func:`secateur.pruners.oneshot.lp_scores`
            does by default; False adds the consumer side (the next layer's input slices).
    """

    def __init__(self, p: float = 1.0, producers_only: bool = True) -> None:
        if not p > 0:
            raise ConfigError(f"norm order p must be > 0, got {p!r}")
        self.p = float(p)
        self.producers_only = bool(producers_only)
        self.name = "l1" if self.p == 1.0 else "l2" if self.p == 2.0 else f"l{self.p:g}"

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray:
        parts = []
        members = [m for m in group.members if not m.is_buffer]
        if self.producers_only and any(m.dim == 0 for m in members):
            members = [m for m in members if m.dim == 0]
        with torch.no_grad():
            for m in members:
                rows = _per_index(effective_tensor(model, m.name), m.dim)
                per_index = norm_scores(rows, self.p).pow(self.p) / max(rows.shape[1], 1)
                parts.append(_unit_mean(per_index.cpu().numpy(), m, group.n_units))
        return _mean_normalised_sum(parts, group.n_units)


register_group_criterion("l1")(lambda p=1.0, producers_only=True: LpCriterion(p, producers_only))
register_group_criterion("l2")(lambda p=2.0, producers_only=True: LpCriterion(p, producers_only))


@register_group_criterion("bn_scale")
class BNScaleCriterion(GroupCriterion):
    """Network slimming (Liu et al. 2017, sec. 3.1): ``|γ|`` per unit from the group's norm layers
    (BatchNorm, LayerNorm, GroupNorm ``weight`` along dim 0), averaged over them.

    Args:
        missing: ``"error"`` (default) raises ConfigError naming a scored group without a norm scale;
            ``"skip"`` leaves such groups unpruned.
    """

    name = "bn_scale"

    def __init__(self, missing: str = "error") -> None:
        if missing not in ("error", "skip"):
            raise ConfigError(f"bn_scale: missing must be 'error' or 'skip', got {missing!r}")
        self.missing = missing

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray | None:  # type: ignore[override]
        parts = []
        for m in group.members:
            if m.is_buffer or m.dim != 0 or not m.name.endswith(".weight"):
                continue
            mod = model.get_submodule(m.module) if m.module else model
            if isinstance(mod, NORM_TYPES):
                g = effective_tensor(model, m.name).detach().abs().double().reshape(-1).cpu().numpy()
                parts.append(_unit_mean(g, m, group.n_units))
        if not parts:
            if self.missing == "skip":
                return None
            raise ConfigError(
                f"bn_scale: group {group.name} has no BatchNorm/LayerNorm scale γ among its members "
                f"{[f'{m.name}:{m.dim}' for m in group.members][:6]}; protect it or use missing='skip'"
            )
        return np.mean(parts, axis=0)

    def scores(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> GroupScores:
        out = {}
        for gi in group_ids:
            s = self.group_scores(graph.groups[gi], model)
            if s is not None:
                out[gi] = s
        return out


def _unit_rows(t: torch.Tensor, m: Member, n_units: int) -> torch.Tensor | None:
    """Unit matrix ``(n_units, -1)`` of member ``m`` when every unit owns the same number of indices."""
    counts = np.bincount(m.unit_of, minlength=n_units)
    if counts.min() != counts.max() or counts[0] == 0:
        return None
    rows = _per_index(t, m.dim)
    order = torch.from_numpy(np.argsort(m.unit_of, kind="stable"))
    return rows[order].reshape(n_units, -1)


@register_group_criterion("fpgm")
class FPGMCriterion(GroupCriterion):
    """FPGM (He et al. 2019): filters near their layer's geometric median are redundant.

    For each producing member (conv / linear output dim, :func:`producer_members`), the unit matrix is
    the unit's filters (a head's rows concatenated) and scores come from
    :func:`~secateur.criteria.structured.fpgm_scores`; each producer's scores are divided by their mean
    and summed. Units already masked sit at the origin and are excluded from the median.

    Args:
        method: ``"median"`` (default; distance to the geometric median, sec. 3.3) or ``"sum"`` (eq. 6).

    Raises:
        ConfigError: unknown method; a group without a producing conv/linear layer (named).
    """

    name = "fpgm"

    def __init__(self, method: str = "median") -> None:
        if method not in ("median", "sum"):
            raise ConfigError(f"fpgm method must be 'median' or 'sum', got {method!r}")
        self.method = method

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray:
        prods = producer_members(group, model)
        if not prods:
            raise ConfigError(
                f"fpgm: group {group.name} has no producing conv/linear layer to take filters from"
            )
        parts = []
        with torch.no_grad():
            for m in prods:
                t = effective_tensor(model, m.name)
                units = _unit_rows(t, m, group.n_units)
                if units is None:  # uneven units: score each row (filter) and average per unit
                    rows = _per_index(t, m.dim)
                    parts.append(_unit_mean(self._score(rows), m, group.n_units))
                else:
                    parts.append(self._score(units))
        return _mean_normalised_sum(parts, group.n_units)

    def _score(self, units: torch.Tensor) -> np.ndarray:
        alive = units.abs().sum(1) > 0  # masked filters are not part of the layer any more
        out = np.zeros(units.shape[0])
        if int(alive.sum()) >= 2:
            out[alive.numpy()] = fpgm_scores(units[alive], self.method).cpu().numpy()
        return out


# ----------------------------------------------------------------------------------------------------
# data-dependent criteria
# ----------------------------------------------------------------------------------------------------
@register_group_criterion("taylor")
class TaylorCriterion(GroupCriterion):
    """First-order Taylor group importance (Molchanov et al. 2019, eq. 4), averaged over mini-batches and
    smoothed by :class:`~secateur.criteria.structured.TaylorAccumulator` (EMA momentum 0.9).

    :meth:`accumulate` (after each backward) adds, per group, ``(Σ_{members} Σ_{s∈u} w_s g_s)^2`` with
    ``w`` the effective (masked) weights and ``g`` the stored parameter's ``.grad``; buffers and members
    without a gradient contribute nothing. :meth:`scores` closes the interval (one EMA step per pruning
    step) and reuses the last EMA if no batch came since.

    Raises:
        ConfigError: :meth:`scores` before any gradient was accumulated.
    """

    name = "taylor"
    needs_data = True
    comparable = True

    def __init__(self, momentum: float = 0.9) -> None:
        self.acc = TaylorAccumulator(momentum)

    def batch_scores(self, group: Group, model: nn.Module) -> np.ndarray | None:
        """One mini-batch's ``(n_units,)`` scores from the current gradients (None: no gradient)."""
        total = np.zeros(group.n_units)
        seen = False
        with torch.no_grad():
            for m in group.members:
                if m.is_buffer:
                    continue
                g = stored_parameter(model, m.name).grad
                if g is None:
                    continue
                seen = True
                w = effective_tensor(model, m.name)
                per_index = (_per_index(w, m.dim) * _per_index(g, m.dim)).sum(1).cpu().numpy()
                total += _unit_sum(per_index, m, group.n_units)
        return total**2 if seen else None

    def accumulate(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> None:
        for gi in group_ids:
            g = graph.groups[gi]
            s = self.batch_scores(g, model)
            if s is not None:
                self.acc.add(g.name, torch.from_numpy(s))

    def has_stats(self) -> bool:
        return bool(self.acc.sums) or bool(self.acc.ema)

    def scores(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> GroupScores:
        if not self.has_stats():
            raise ConfigError(self.missing_stats_message())
        ema = self.acc.step() if self.acc.sums else dict(self.acc.ema)
        out = {}
        for gi in group_ids:
            g = graph.groups[gi]
            out[gi] = ema[g.name].numpy() if g.name in ema else np.zeros(g.n_units)
        return out


@register_group_criterion("fisher")
class FisherCriterion(GroupCriterion):
    """Fisher pruning (Theis et al. 2018, eq. 9; Crowley et al. 2018) at each producing module's output.

    :meth:`attach` registers a forward hook on every producer (conv / linear whose output dim is a group
    member); when the output requires grad, a tensor hook on it receives ``g = ∂L/∂a`` and adds
    ``Σ_n (Σ_{positions, s∈u} a_{ns} g_{ns})^2`` per unit and ``N`` to the group's sums. Scores are
    ``sum / (2 · N)`` summed over producers, for the batches since the last pruning step.

    Raises:
        ConfigError: :meth:`scores` before any backward pass ran through the hooks.
    """

    name = "fisher"
    needs_data = True
    comparable = True

    def __init__(self) -> None:
        self.sums: dict[tuple[int, str], np.ndarray] = {}  # (group, producer) -> Σ_n (Σ a·g)^2 per unit
        self.counts: dict[tuple[int, str], int] = {}  # (group, producer) -> N
        self.handles: list[Any] = []

    def attach(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> None:
        if self.handles:
            return
        for gi in group_ids:
            g = graph.groups[gi]
            for m in producer_members(g, model):
                mod = model.get_submodule(m.module) if m.module else model
                self.handles.append(mod.register_forward_hook(self._hook(gi, g.n_units, m, mod)))

    def _hook(self, gi: int, n_units: int, m: Member, mod: nn.Module) -> Callable:
        channel_last = not isinstance(mod, nn.modules.conv._ConvNd)
        onehot = torch.zeros(m.unit_of.size, n_units, dtype=torch.float64)
        onehot[torch.arange(m.unit_of.size), torch.from_numpy(m.unit_of)] = 1.0

        def forward_hook(module: nn.Module, args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                return
            act = out.detach()

            def grad_hook(grad: torch.Tensor) -> None:
                a, g = (act.movedim(-1, 1), grad.movedim(-1, 1)) if channel_last else (act, grad)
                n = a.shape[0]
                per = (a.double() * g.double()).reshape(n, a.shape[1], -1).sum(2)  # (N, C)
                unit = (per @ onehot.to(per.device)).pow(2).sum(0).cpu().numpy()  # (n_units,)
                key = (gi, m.name)
                self.sums[key] = self.sums.get(key, 0.0) + unit
                self.counts[key] = self.counts.get(key, 0) + n

            out.register_hook(grad_hook)

        return forward_hook

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def has_stats(self) -> bool:
        return bool(self.counts)

    def missing_stats_message(self) -> str:
        return (
            "criterion 'fisher' needs activation gradients: run loss.backward() on training batches "
            "(the pruner's hooks record them) or pass data=(x, y) batches to the pruner"
        )

    def scores(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> GroupScores:
        if not self.has_stats():
            raise ConfigError(self.missing_stats_message())
        out = {gi: np.zeros(graph.groups[gi].n_units) for gi in group_ids}
        for (gi, _), total in self.sums.items():
            if gi in out:
                out[gi] = out[gi] + total / (2.0 * self.counts[(gi, _)])
        return out

    def after_prune(self) -> None:
        self.sums, self.counts = {}, {}


@register_group_criterion("michel")
class MichelCriterion(GroupCriterion):
    """Head importance from head-gate gradients (Michel et al. 2019, eq. 2; per-layer L2 normalisation,
    sec. 4.1), for any model whose heads the dependency graph finds, without model-specific code.

    Michel et al. put a gate ``ξ_h`` (value 1) on each head's output and score ``I_h = E_x |∂L(x)/∂ξ_h|``.
    Head ``h``'s output is the slice ``z_{:,h}`` of the input ``z`` (shape ``(N, T, H·d)``) of the layer
    that consumes the concatenated heads (found from the graph: the member of the head group that is a
    Linear / GPT-2 Conv1D / conv *input* dim, :func:`consumer_members`), so with the gate in place
    ``∂L/∂ξ_h = Σ_{t} Σ_{d∈h} z_{t,d} · ∂L/∂z_{t,d}``. :meth:`attach` puts a forward pre-hook on that layer;
    when gradients are enabled it hands the layer an alias of ``z`` whose gradient hook receives
    ``∂L/∂z`` during the user's ``loss.backward()``. A unit of the graph is a whole removable head (with
    grouped-query attention: one key/value head and the query heads sharing it), so its gate gates all
    of them; when a group has several consuming layers their derivatives are summed before ``|·|``.

    Per batch, with ``s_{n,h}`` the contribution of example ``n``:

    - ``per_example=True`` (the paper's ``E_x |·|``): ``Σ_n |s_{n,h}|``. With a loss that is the batch
      *mean* of per-example losses (cross-entropy's default) ``s_{n,h} = (1/N) ∂L_n/∂ξ_h``, so this is the
      batch average of ``|∂L_n/∂ξ_h|``; a sum-reduced loss scales every score by ``N`` (same ranking).
      The consuming layer's input must have the batch on dim 0 (checked against the model's first input).
    - ``per_example=False`` (the authors' code, which accumulates ``|head_mask.grad|`` per batch):
      ``|Σ_n s_{n,h}|`` = ``|∂L_batch/∂ξ_h|``.

    Scores are averaged over the batches since the last pruning step, then, with ``normalize_layers``,
    each group's (layer's) score vector is divided by its L2 norm, as Michel et al. do before their
    global ranking (so ``comparable = True``: ChannelPruner's ``"auto"`` normalisation ranks them as they
    are). Shape ``(n_units,)``, float64, higher = keep.

    Args:
        per_example: see above.
        normalize_layers: divide each group's scores by their L2 norm (sec. 4.1).
        units: ``"heads"`` (default): score only head groups (:func:`head_group_ids`); other groups get
            no score and are left unpruned. ``"all"``: the same gate on every group with a consuming layer
            (FFN neurons, channels), as Prasanna et al. 2020 do for BERT's MLPs.
        missing: a selected group without a consuming conv / linear layer: ``"error"`` (ConfigError at
            :meth:`attach`, naming it) or ``"skip"``.

    Raises:
        ConfigError: bad arguments; no head group among the pruner's groups (``units="heads"``); a group
            without a consuming layer (``missing="error"``); ``per_example`` with a consuming layer whose
            dim 0 is not the batch (names the module); :meth:`scores` before any backward pass.
    """

    name = "michel"
    needs_data = True
    comparable = True

    def __init__(
        self,
        per_example: bool = True,
        normalize_layers: bool = True,
        units: str = "heads",
        missing: str = "error",
    ) -> None:
        if units not in ("heads", "all"):
            raise ConfigError(f"michel: units must be 'heads' or 'all', got {units!r}")
        if missing not in ("error", "skip"):
            raise ConfigError(f"michel: missing must be 'error' or 'skip', got {missing!r}")
        self.per_example = bool(per_example)
        self.normalize_layers = bool(normalize_layers)
        self.units = units
        self.missing = missing
        self.handles: list[Any] = []
        self.n_units: dict[int, int] = {}  # scored group -> its unit count
        self.sums: dict[int, np.ndarray] = {}  # group -> Σ over batches of the batch's |·| scores
        self.batches: dict[int, int] = {}  # group -> number of batches in sums
        self._pending: dict[int, dict[int, torch.Tensor]] = {}  # forward pass -> group -> (N, n_units)
        self._pass = 0
        self._batch_size: int | None = None

    # -- hooks ------------------------------------------------------------------------------------
    def attach(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> None:
        if self.handles:
            return
        ids = head_group_ids(graph, group_ids) if self.units == "heads" else list(group_ids)
        if not ids:
            raise ConfigError(
                "michel: no attention-head group among the prunable groups (the graph found no head split); "
                "use units='all' to gate every group's channels"
            )
        plan: list[tuple[int, int, Member, nn.Module]] = []
        for gi in ids:
            g = graph.groups[gi]
            cons = consumer_members(g, model)
            if not cons:
                if self.missing == "skip":
                    continue
                raise ConfigError(
                    f"michel: group {g.name} has no consuming conv/linear layer to gate "
                    f"(members {[f'{m.name}:{m.dim}' for m in g.members][:6]}); use missing='skip'"
                )
            self.n_units[gi] = g.n_units
            for m in cons:
                plan.append((gi, g.n_units, m, model.get_submodule(m.module) if m.module else model))
        self.handles.append(model.register_forward_pre_hook(self._root_hook, with_kwargs=True))
        for gi, n_units, m, mod in plan:
            self.handles.append(mod.register_forward_pre_hook(self._gate_hook(gi, n_units, m, mod)))

    def _root_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pass += 1
        first = next((t for t in _iter_inputs(args, kwargs) if isinstance(t, torch.Tensor) and t.dim()), None)
        self._batch_size = None if first is None else int(first.shape[0])

    def _gate_hook(self, gi: int, n_units: int, m: Member, mod: nn.Module) -> Callable:
        channel_last = not isinstance(mod, nn.modules.conv._ConvNd)
        onehot = torch.zeros(m.unit_of.size, n_units, dtype=torch.float64)
        onehot[torch.arange(m.unit_of.size), torch.from_numpy(m.unit_of)] = 1.0

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
                return None
            z = args[0]
            if self.per_example and (z.dim() < 2 or (self._batch_size and z.shape[0] != self._batch_size)):
                raise ConfigError(
                    f"michel: the input of {m.module} has shape {tuple(z.shape)}, whose dim 0 is not the "
                    f"batch ({self._batch_size}); use per_example=False"
                )
            alias = z.view_as(z) if z.requires_grad else z.detach().requires_grad_(True)
            act = z.detach()
            key = self._pass

            def grad_hook(grad: torch.Tensor) -> None:
                a, g = (act, grad) if channel_last else (act.movedim(1, -1), grad.movedim(1, -1))
                n = a.shape[0] if self.per_example else 1
                per = (a.double() * g.double()).reshape(n, -1, a.shape[-1]).sum(1)  # (N, C)
                unit = per @ onehot.to(per.device)  # (N, n_units): signed ∂L/∂ξ contributions
                slot = self._pending.setdefault(key, {})
                slot[gi] = slot[gi] + unit if gi in slot else unit

            alias.register_hook(grad_hook)
            return (alias, *args[1:])

        return pre_hook

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # -- statistics -------------------------------------------------------------------------------
    def _flush(self) -> None:
        for per_group in self._pending.values():
            for gi, unit in per_group.items():
                batch = unit.abs().sum(0) if self.per_example else unit.sum(0).abs()
                self.sums[gi] = self.sums.get(gi, 0.0) + batch.cpu().numpy()
                self.batches[gi] = self.batches.get(gi, 0) + 1
        self._pending = {}

    def has_stats(self) -> bool:
        self._flush()
        return bool(self.batches)

    def missing_stats_message(self) -> str:
        return (
            "criterion 'michel' needs head-gate gradients: run loss.backward() on calibration batches "
            "(the pruner's hooks record them) or pass data=(x, y) batches to the pruner"
        )

    def raw_scores(self) -> dict[int, np.ndarray]:
        """``{group: (n_units,) E|∂L/∂ξ|}`` before the per-layer normalisation (batches since the last
        pruning step)."""
        self._flush()
        return {gi: total / self.batches[gi] for gi, total in self.sums.items()}

    def scores(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> GroupScores:
        if not self.has_stats():
            raise ConfigError(self.missing_stats_message())
        raw = self.raw_scores()
        out = {}
        for gi in group_ids:
            if gi not in self.n_units:
                continue
            s = raw.get(gi, np.zeros(self.n_units[gi]))
            if self.normalize_layers:
                s = s / (float(np.linalg.norm(s)) + 1e-20)  # Michel et al.'s ε
            out[gi] = s
        return out

    def after_prune(self) -> None:
        self._flush()
        self.sums, self.batches = {}, {}


def _iter_inputs(args: tuple, kwargs: dict) -> Iterable[Any]:
    """The positional then keyword inputs of a call, in order."""
    yield from args
    yield from kwargs.values()


def collect(
    criterion: GroupCriterion,
    model: nn.Module,
    graph: DependencyGraph,
    group_ids: Sequence[int],
    data: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> None:
    """Run forward/backward on ``data`` (a batch ``(x, y)`` or an iterable of batches; ``x`` a tensor, a tuple
    of positional inputs or a dict of keyword inputs, e.g. a Hugging Face batch) and feed the
    criterion's statistics. The model's ``.grad`` fields and train/eval mode are restored afterwards.

    ``loss_fn(output, y)`` defaults to cross-entropy (classification logits ``(N, classes)``).
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    batches: Iterable = (
        [data]
        if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, dict))
        else data
    )
    params = list(model.parameters())
    saved = [p.grad for p in params]
    detach_after = not getattr(criterion, "handles", True)
    if detach_after:
        criterion.attach(model, graph, group_ids)
    try:
        with torch.enable_grad():
            for batch in batches:
                x, y = batch[0], batch[1]
                for p in params:
                    p.grad = None
                out = model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, tuple) else model(x)
                loss_fn(out, y).backward()
                criterion.accumulate(model, graph, group_ids)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        if detach_after:
            criterion.detach()

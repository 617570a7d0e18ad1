"""Group-sparse regularised training before structured removal: DepGraph's group-level sparse learning and
GReg's growing regularisation, as training hooks for any group criterion, ending in one call of the
structured driver.

Both penalise, for the coupled groups ``g`` of the dependency graph that the driver prunes
(:class:`~secateur.pruners.channel.ChannelPruner`'s groups) and their prunable units ``k`` (a channel, a
head), the L2 norm of **every** parameter slice that belongs to the unit::

    ||w_{g,k}||_2 = sqrt( Σ_{parameter members m of g} Σ_{indices i of m in unit k} ||m[..., i, ...]||² )

i.e. the producer rows (filters, biases), the norm layer's scale and shift, and the consumer columns (the next
layers' input slices) together; buffers (BatchNorm running statistics) are not trained and are skipped. The
per-unit coefficient ``c_{g,k} >= 0`` differs:

* :class:`GroupSparsityPenalty` (Fang et al. 2023, "DepGraph: Towards Any Structural Pruning", CVPR,
  sec. 3.3, eq. 7-8): ``P = λ Σ_g Σ_k γ_{g,k} ||w_{g,k}||_2^p`` over every unit, with
  ``γ_{g,k} = 2^{α (I_g^max - I_{g,k}) / (I_g^max - I_g^min)}`` from the group's unit importances ``I`` (any
  registered group criterion's scores; higher = keep), so the least important unit of a group is pushed
  ``2^α`` times harder than the most important one. ``p = 2`` (default) is eq. 7 as printed
  (``I_{g,k} = Σ_w ||w[k]||²``; gradient ``2 λ γ w``, so each unit decays geometrically at its own rate;
  Torch-Pruning's ``GroupNormPruner(reg=r)`` adds ``r γ w``, i.e. ``λ = r / 2``); ``p = 1`` is the group
  lasso (the penalty of the norm itself: its gradient ``λ γ w / ||w||`` has the same size however small the
  unit already is, so it also drags the important units down by ``λ`` per unit of step). After training,
  :meth:`finalize` removes the ``sparsity`` fraction chosen by the same criterion (the shrunk units score
  lowest) through the driver.
* :class:`GrowingRegularization` (Wang et al. 2021, "Neural Pruning via Growing Regularization", ICLR,
  sec. 3.2, GReg-1): the units to remove are chosen *first* (the driver's
  :meth:`~secateur.pruners.channel.ChannelPruner.select` with the criterion, model untouched); only they are
  penalised, ``P = (λ_t / 2) Σ_{chosen (g,k)} ||w_{g,k}||²`` (gradient ``λ_t w``), with
  ``λ_t = min(δ · (1 + floor(t / K)), τ)`` at optimizer step ``t``: it starts at ``δ`` and grows by ``δ``
  every ``K`` steps up to the ceiling ``τ``. :meth:`finalize` removes exactly the chosen units.

Two ways to apply the penalty, the same gradient (tested in float64):

* **gradient edit** (the default, and what the Trainer hook does): after ``loss.backward()`` and before
  ``optimizer.step()``, :meth:`GroupPenalty.add_gradient` adds ``∂P/∂w`` to each parameter's ``.grad`` in
  place, as the papers' reference code does (Torch-Pruning's ``regularize``, GReg's update) and as
  :class:`~secateur.methods.slimming.SlimmingPenalty` does. Why: no autograd graph over every group
  parameter (less memory, one no-grad pass per step); the coefficients ``γ`` and ``λ_t`` are constants of
  the step, not differentiated; the group lasso's subgradient at ``||w|| = 0`` is taken as 0 explicitly; and
  a data-dependent criterion (Taylor) reads the *task* gradients before the penalty is added.
* **loss term**: ``loss = task_loss + reg.penalty(step)`` (differentiable scalar; use one form, not both).

In the user's own loop, one call per step::

    reg = GroupSparsityPenalty(model, x, sparsity=0.5, lam=1e-3, criterion="l1", target="macs")
    for step, (xb, yb) in enumerate(loader):
        loss = F.cross_entropy(model(xb), yb); opt.zero_grad(); loss.backward()
        reg.add_gradient(step)                           # before opt.step()
        opt.step()
    model, plan = reg.finalize()                          # the driver removes the near-zero units; fine-tune

or as a :class:`secateur.train.Trainer` callback (``callbacks=[reg]``: ``on_after_backward`` calls
:meth:`~GroupPenalty.add_gradient` at ``trainer.global_step``). With a ``torch.amp.GradScaler``, unscale the
gradients (``scaler.unscale_(opt)``) before :meth:`~GroupPenalty.add_gradient`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.criteria.group import GroupCriterion, effective_tensor, stored_parameter
from secateur.errors import ConfigError, did_you_mean
from secateur.graph.groups import DependencyGraph, Group
from secateur.pruners.channel import ChannelPruner
from secateur.pruners.oneshot import remove_units

__all__ = [
    "GroupPenalty",
    "GroupSparsityPenalty",
    "GrowingRegularization",
    "importance_scaling",
    "unit_norms",
]

#: Groups to regularise and prune: names (``"conv1.weight:0"``, :attr:`Group.name`), indices into
#: ``graph.groups``, or ``f(graph) -> indices``.
GroupChoice = Iterable[str | int] | Callable[[DependencyGraph], Iterable[int]]


# ----------------------------------------------------------------------------------------------- checks
def _number(value: object, name: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a finite float ``>= minimum`` (``> minimum`` with ``strict``); ConfigError naming
    ``name``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        ok = float(value) > minimum if strict else float(value) >= minimum
    if not ok:
        rel = ">" if strict else ">="
        raise ConfigError(f"{name} must be a finite number {rel} {minimum:g}, got {value!r}")
    return float(value)


def _count(value: object, name: str) -> int:
    """``value`` as an int >= 1; ConfigError naming ``name``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or int(value) < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _group_picker(
    groups: GroupChoice | None, owner: str
) -> Callable[[DependencyGraph], Iterable[int]] | None:
    """``groups`` as the driver's ``f(graph) -> indices``; names resolve against the traced graph.

    The function raises ConfigError for a name the graph lacks (with the closest names), before the driver
    attaches anything."""
    if groups is None:
        return None
    if callable(groups):
        return groups  # the driver checks what it returns
    if isinstance(groups, str):
        groups = [groups]
    chosen = list(groups)

    def pick(graph: DependencyGraph) -> list[int]:
        by_name = {g.name: gi for gi, g in enumerate(graph.groups)}
        out = []
        for item in chosen:
            if isinstance(item, str):
                if item not in by_name:
                    raise ConfigError(
                        f"{owner}: groups names {item!r}, which this model's graph lacks"
                        f"{did_you_mean(item, by_name)}; its prunable groups: "
                        f"{[g.name for g in graph.groups if g.n_prunable][:12]}"
                    )
                out.append(by_name[item])
            else:
                out.append(item)  # an index: the driver checks its range
        return out

    return pick


# ------------------------------------------------------------------------------------------- unit norms
class _MemberView:
    """A parameter member of a group: its name, dim and unit map as a tensor, for per-unit reductions."""

    def __init__(self, name: str, dim: int, unit_of: np.ndarray, n_units: int) -> None:
        self.name = name
        self.dim = dim
        self.unit_of = torch.from_numpy(np.ascontiguousarray(unit_of, dtype=np.int64))
        self.n_units = n_units
        self.identity = unit_of.size == n_units and bool((unit_of == np.arange(n_units)).all())

    def per_unit(self, per_index: torch.Tensor) -> torch.Tensor:
        """``(size of dim,)`` -> ``(n_units,)`` sums over each unit's indices (differentiable)."""
        if self.identity:
            return per_index
        out = per_index.new_zeros(self.n_units)
        return out.index_add(0, self.unit_of.to(per_index.device), per_index)

    def per_index(self, per_unit: torch.Tensor) -> torch.Tensor:
        """``(n_units,)`` -> ``(size of dim,)``: each index gets its unit's value."""
        return per_unit if self.identity else per_unit[self.unit_of.to(per_unit.device)]


def _param_members(group: Group) -> list[_MemberView]:
    return [_MemberView(m.name, m.dim, m.unit_of, group.n_units) for m in group.members if not m.is_buffer]


def _squared_unit_norms(model: nn.Module, members: Sequence[_MemberView]) -> torch.Tensor | None:
    """``Σ_members`` per-unit sums of squares, ``(n_units,)``, in the parameters' dtype; differentiable when
    grad mode is on (read through element masks, as forward sees the weights)."""
    total = None
    for mv in members:
        t = effective_tensor(model, mv.name)
        sq = (t * t).movedim(mv.dim, 0).reshape(t.shape[mv.dim], -1).sum(1)
        part = mv.per_unit(sq)
        total = part if total is None else total + part.to(total.dtype)
    return total


def unit_norms(model: nn.Module, group: Group) -> np.ndarray:
    """``||w_{g,k}||_2`` for every unit ``k`` of ``group``: the L2 norm over every parameter slice of the unit
    (producer rows and biases, norm scale and shift, consumer columns; buffers skipped), read through masks.

    Returns a float64 array of shape ``(group.n_units,)`` (units: the weights' own). A group without
    parameter members gives zeros.
    """
    with torch.no_grad():
        sq = _squared_unit_norms(model, _param_members(group))
    if sq is None:
        return np.zeros(group.n_units)
    return sq.detach().double().cpu().sqrt().numpy()


# --------------------------------------------------------------------------------------------- the hook
class GroupPenalty:
    """Base of the group-sparsity training hooks: ``P = Σ_g Σ_k c_{g,k} ||w_{g,k}||_2^p`` over the driver's
    groups (see the module docstring), applied as a gradient edit (:meth:`add_gradient`, the Trainer hook)
    or a loss term (:meth:`penalty`), then :meth:`finalize` removes units through the structured driver.

    Subclasses give the per-unit coefficients (:meth:`coefficients`) and the removal (:meth:`selection`).

    Args:
        model: the network, trained in place (nothing is registered on it: no hooks, no masks).
        example_inputs: a tensor, tuple or dict of inputs for the trace (and MACs, and the oracle).
        sparsity: the fraction in [0, 1) of ``target`` that :meth:`finalize` removes (GReg: chooses now).
        criterion: a registered group criterion name (:data:`~secateur.criteria.group.GROUP_CRITERIA`), a
            :class:`~secateur.criteria.group.GroupCriterion` or ``f(group, model) -> (n_units,) scores``; the
            same one ranks units for the coefficients and for the removal. Groups it does not score are
            neither penalised nor pruned.
        power: ``p``, 2 (squared norm) or 1 (group lasso).
        allocation, target, protect, round_to, data, loss_fn, criterion_kwargs, normalize, granularity:
            as :class:`~secateur.pruners.channel.ChannelPruner` (the driver this builds once and uses for the
            groups, the scores, the selection and the removal).
        groups: only these groups: names such as ``"layer1.0.conv1.weight:0"`` (:attr:`Group.name`),
            indices into the graph's groups, or ``f(graph) -> indices``. Default: every prunable group.
        **driver: further :class:`~secateur.pruners.channel.ChannelPruner` arguments (``prune_outputs``,
            ``prune_normalized``, ``untraced``, ``seed``, ``graph``, ``latency``).

    Raises:
        ConfigError: a bad argument (named); an unknown criterion (with the registered names); a group name
            the traced graph lacks (with the closest names); and as ChannelPruner. The model is unchanged.
        GraphError / UnsupportedOpError / UntracedModuleError: from tracing (the model is unchanged).
    """

    name = "group_penalty"

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        sparsity: float,
        *,
        criterion: str | GroupCriterion | Callable[[Group, nn.Module], Any] = "l1",
        power: int = 2,
        allocation: str = "uniform",
        target: str = "channels",
        protect: Sequence[str] = (),
        round_to: int = 1,
        groups: GroupChoice | None = None,
        granularity: str = "channel",
        data: Any = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        criterion_kwargs: Mapping[str, Any] | None = None,
        normalize: str = "auto",
        **driver: Any,
    ) -> None:
        if power not in (1, 2) or isinstance(power, bool):
            raise ConfigError(f"{type(self).__name__}: power must be 1 or 2, got {power!r}")
        self.power = int(power)
        self.model = model
        self.pruner = ChannelPruner(
            model,
            example_inputs,
            schedule=sparsity,
            criterion=criterion,
            allocation=allocation,
            target=target,
            protect=protect,
            round_to=round_to,
            data=data,
            loss_fn=loss_fn,
            criterion_kwargs=dict(criterion_kwargs or {}),
            normalize=normalize,
            granularity=granularity,
            groups=_group_picker(groups, type(self).__name__),
            **driver,
        )
        self.sparsity = float(sparsity)
        self.graph = self.pruner.graph
        self.group_ids = list(self.pruner.group_ids)
        self._members = {gi: _param_members(self.graph.groups[gi]) for gi in self.group_ids}
        self.removed_units: dict[str, list[int]] = {}
        self.removed_norms: dict[str, list[float]] = {}
        self.finished = False

    # -- coefficients (subclasses) ---------------------------------------------------------------------
    def coefficients(self, step: int) -> dict[int, np.ndarray]:  # pragma: no cover - abstract
        """``{group index: (n_units,) float64 c_{g,k} >= 0}`` at optimizer step ``step`` (omitted: 0)."""
        raise NotImplementedError

    def selection(self) -> dict[int, np.ndarray]:  # pragma: no cover - abstract
        """``{group index: sorted unit indices}`` that :meth:`finalize` removes."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Called once per :meth:`add_gradient` before the coefficients: a data-dependent criterion reads the
        task gradients now in ``.grad``."""
        if self.pruner.criterion.needs_data:
            self.pruner.accumulate()

    # -- the penalty ---------------------------------------------------------------------------------------
    def norms(self) -> dict[str, np.ndarray]:
        """``{group name: (n_units,) float64 ||w_{g,k}||_2}``, regularised groups (:func:`unit_norms`)."""
        return {
            self.graph.groups[gi].name: unit_norms(self.model, self.graph.groups[gi]) for gi in self.group_ids
        }

    def penalty(self, step: int = 0) -> torch.Tensor:
        """``P`` at optimizer step ``step``: a differentiable scalar (the parameters' dtype) to add to the
        task loss before ``backward()``. Use this or :meth:`add_gradient`, not both.

        The group lasso's (``p = 1``) gradient at a unit of norm exactly 0 is 0 here too (no NaN)."""
        self._check_live()
        coefs = self.coefficients(int(step))
        total: torch.Tensor | None = None
        for gi, c in coefs.items():
            if not np.any(c):
                continue
            sq = _squared_unit_norms(self.model, self._members[gi])
            if sq is None:
                continue
            ct = torch.as_tensor(c, dtype=sq.dtype, device=sq.device)
            if self.power == 2:
                term = (ct * sq).sum()
            else:
                pos = sq > 0
                root = torch.where(pos, sq, torch.ones_like(sq)).sqrt()
                term = (ct * torch.where(pos, root, torch.zeros_like(sq))).sum()
            total = term if total is None else total + term
        if total is None:
            p = next(self.model.parameters())
            return torch.zeros((), dtype=p.dtype, device=p.device)
        return total

    @torch.no_grad()
    def add_gradient(self, step: int) -> None:
        """Add ``∂P/∂w`` at optimizer step ``step`` to every regularised parameter's ``.grad`` (in place; a
        parameter without a gradient gets the penalty's alone; frozen ones, ``requires_grad=False``, are
        skipped). Call after ``loss.backward()`` and before ``optimizer.step()``: once per step.

        Per member slice of unit ``k``: ``c_k w / ||w_{g,k}||`` (``p = 1``; 0 where the norm is 0) or
        ``2 c_k w`` (``p = 2``), ``w`` as forward sees it (a masked entry gets 0)."""
        self._check_live()
        self._prepare()
        for gi, c in self.coefficients(int(step)).items():
            if not np.any(c):
                continue
            members = self._members[gi]
            sq = _squared_unit_norms(self.model, members)
            if sq is None:
                continue
            ct = torch.as_tensor(c, dtype=sq.dtype, device=sq.device)
            if self.power == 2:
                scale = 2.0 * ct
            else:
                pos = sq > 0
                scale = torch.where(pos, ct / torch.where(pos, sq, torch.ones_like(sq)).sqrt(), 0.0)
            for mv in members:
                p = stored_parameter(self.model, mv.name)
                if not p.requires_grad:
                    continue
                w = effective_tensor(self.model, mv.name).detach()
                shape = [1] * w.dim()
                shape[mv.dim] = -1
                delta = mv.per_index(scale).to(w.dtype).view(shape) * w
                if p.grad is None:
                    p.grad = delta.clone()
                else:
                    p.grad.add_(delta)

    # -- Trainer hooks ---------------------------------------------------------------------------------------
    def on_after_backward(self, trainer: Any) -> None:
        """Trainer hook (gradients present, before ``optimizer.step()``): :meth:`add_gradient` at
        ``trainer.global_step`` (optimizer steps done)."""
        self.add_gradient(int(trainer.global_step))

    # -- removal -------------------------------------------------------------------------------------------
    def finalize(self, verify: bool = True) -> tuple[nn.Module, dict]:
        """Remove :meth:`selection`'s units physically through the structured driver's applier
        (:func:`~secateur.pruners.oneshot.remove_units`: one transaction, the float64 oracle inside with
        ``verify``) and return ``(model, plan)``; fine-tune afterwards. ``removed_units`` records the removed
        unit indices (``{group name: [k, ...]}``) and ``removed_norms`` their ``||w_{g,k}||_2`` just before
        removal (``{group name: [norm, ...]}``, same order).

        Raises:
            ConfigError: already finalized, or NaN/Inf in the example inputs with ``verify``.
            CompactionError / IncompatibleGroupError: removal failed; the model is unchanged.
        """
        self._check_live()
        try:
            removed = {gi: rm for gi, rm in self.selection().items() if rm.size}
            norms = {gi: unit_norms(self.model, self.graph.groups[gi]) for gi in removed}
            out = remove_units(self.model, self.graph, removed, self.pruner.example_inputs, verify=verify)
        finally:
            self.pruner.close()
        self.removed_units = {self.graph.groups[gi].name: rm.tolist() for gi, rm in removed.items()}
        self.removed_norms = {
            self.graph.groups[gi].name: norms[gi][rm].tolist() for gi, rm in removed.items()
        }
        self.finished = True
        return out

    def close(self) -> None:
        """Remove the criterion's hooks (Fisher's) without pruning; :meth:`finalize` does it too."""
        self.pruner.close()

    def _check_live(self) -> None:
        if self.finished:
            raise ConfigError(f"{type(self).__name__} already finalized its model; build a new one")

    def _by_name(self, state: Mapping[str, Any], key: str) -> dict[int, np.ndarray]:
        """``state[key]``'s ``{group name: list}`` as ``{group index: array}``; ConfigError for unknown
        names."""
        index = {self.graph.groups[gi].name: gi for gi in self.group_ids}
        out = {}
        for name, values in dict(state.get(key) or {}).items():
            if name not in index:
                raise ConfigError(
                    f"{type(self).__name__} state names group {name!r}, which this model's graph lacks"
                    f"{did_you_mean(name, index)}"
                )
            out[index[name]] = np.asarray(values)
        return out


class GroupSparsityPenalty(GroupPenalty):
    """DepGraph's group-level sparse learning (Fang et al. 2023, CVPR, sec. 3.3, eq. 7-8) as a training hook.

    ``P = λ Σ_g Σ_k γ_{g,k} ||w_{g,k}||_2^p`` over every prunable unit ``k`` of every group ``g`` the
    criterion scores, ``||w_{g,k}||_2`` over all of the unit's parameter slices (:func:`unit_norms`), and
    ``γ_{g,k} = 2^{α (I_g^max - I_{g,k}) / (I_g^max - I_g^min)}`` (eq. 8; ``γ = 1`` when a group's units all
    score the same) from the criterion's scores ``I`` over the group's prunable units; non-prunable units get
    ``γ = 0``. ``γ`` is recomputed every ``update_every`` steps (the scores move as the weights shrink).
    :meth:`finalize` removes the ``sparsity`` fraction of ``target`` chosen by the same criterion and
    allocation: ``prune_channels``'s selection, on this driver.

    Args:
        lam: ``λ >= 0`` (units: loss per unit of weight norm for ``p = 1``, per squared norm for ``p = 2``).
        alpha: ``α >= 0``; ``γ`` spans ``[1, 2^α]`` (DepGraph and Torch-Pruning use 4).
        power: 2 (eq. 7's squared norm, default) or 1 (the group lasso).
        update_every: recompute ``γ`` every this many optimizer steps (>= 1).
        Other arguments: see :class:`GroupPenalty`.

    Choosing ``λ``: with SGD at learning rate ``η`` and momentum ``m``, the penalty alone (``p = 2``) scales a
    unit's weights by about ``1 - 2 η λ γ / (1 - m)`` per step, so over ``T`` steps the units to remove
    (``γ`` near ``2^α``) should reach ~0 (``2 η λ 2^α T / (1 - m)`` of several units) while ``γ ≈ 1`` units
    lose little. benchmarks/group_sparsity.py: ``λ = 5e-3``, ``α = 4``, ``η = 0.01``, ``m = 0.9``, 150 steps.

    Raises:
        ConfigError: negative or non-finite ``lam`` / ``alpha``, bad ``power`` / ``update_every``, and as
            :class:`GroupPenalty`; the model is unchanged.
    """

    name = "group_sparsity"

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        sparsity: float,
        *,
        lam: float = 1e-4,
        alpha: float = 4.0,
        update_every: int = 1,
        power: int = 2,
        **kwargs: Any,
    ) -> None:
        self.lam = _number(lam, "GroupSparsityPenalty: lam")
        self.alpha = _number(alpha, "GroupSparsityPenalty: alpha")
        self.update_every = _count(update_every, "GroupSparsityPenalty: update_every")
        super().__init__(model, example_inputs, sparsity, power=power, **kwargs)
        self.gamma: dict[int, np.ndarray] = {}
        self.updated_at: int | None = None

    def refresh(self, step: int) -> dict[int, np.ndarray]:
        """Recompute ``γ`` from the criterion's current scores (eq. 8); returns ``{group index: (n_units,)}``.

        Raises:
            ConfigError: a data-dependent criterion without statistics and without ``data``."""
        scores = self.pruner.scores()  # statistics keep accumulating: finalize's selection reads them too
        gamma = {}
        for gi, s in scores.items():
            gamma[gi] = importance_scaling(s, self.graph.groups[gi].prunable, self.alpha)
        self.gamma = gamma
        self.updated_at = int(step)
        return gamma

    def coefficients(self, step: int) -> dict[int, np.ndarray]:
        """``λ γ_{g,k}``, ``γ`` refreshed when ``update_every`` steps have passed since the last refresh."""
        if self.updated_at is None or step - self.updated_at >= self.update_every or step < self.updated_at:
            self.refresh(step)
        return {gi: self.lam * g for gi, g in self.gamma.items()}

    def selection(self) -> dict[int, np.ndarray]:
        """The driver's selection of ``sparsity`` by the criterion on the current (shrunk) weights."""
        return self.pruner.select(self.sparsity)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the last ``γ`` per group name and the step it was computed at."""
        return {
            "gamma": {self.graph.groups[gi].name: g.tolist() for gi, g in self.gamma.items()},
            "updated_at": self.updated_at,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ConfigError: a group name this model's graph lacks."""
        self.gamma = {gi: g.astype(float) for gi, g in self._by_name(state, "gamma").items()}
        self.updated_at = state.get("updated_at")


def importance_scaling(scores: np.ndarray, prunable: np.ndarray, alpha: float) -> np.ndarray:
    """DepGraph's eq. 8: ``γ_k = 2^{α (I_max - I_k) / (I_max - I_min)}`` over the prunable units.

    Args:
        scores: ``(n_units,)`` importances (higher = keep).
        prunable: ``(n_units,)`` bool; other units get ``γ = 0`` (not penalised).
        alpha: ``α >= 0``.

    Returns ``(n_units,)`` float64 in ``[1, 2^α]`` on prunable units (all 1 when they score the same).
    """
    s = np.asarray(scores, dtype=float)
    keep = np.asarray(prunable, dtype=bool)
    out = np.zeros(s.shape)
    if not keep.any():
        return out
    hi, lo = float(s[keep].max()), float(s[keep].min())
    span = hi - lo
    if span <= 1e-12 * max(abs(hi), abs(lo), 1e-300):
        out[keep] = 1.0
    else:
        out[keep] = np.exp2(alpha * (hi - s[keep]) / span)
    return out


class GrowingRegularization(GroupPenalty):
    """GReg-1 (Wang et al. 2021, "Neural Pruning via Growing Regularization", ICLR, sec. 3.2) as a training
    hook: choose the units to remove first, then push exactly them to zero with an L2 penalty whose
    coefficient grows, then remove them.

    At construction the driver selects ``sparsity`` of ``target`` by the criterion (model untouched;
    :attr:`chosen`). At optimizer step ``t`` the penalty is ``(λ_t / 2) Σ_{chosen (g,k)} ||w_{g,k}||²`` with
    ``λ_t = min(δ · (1 + floor(t / K)), τ)`` (:meth:`coefficient`): ``δ`` for the first ``K`` steps, then
    ``δ`` more every ``K`` steps, never above ``τ``. Kept units are not penalised. :meth:`finalize` removes
    exactly the chosen units (check :meth:`chosen_norms` first: GReg removes them once they are negligible).

    Args:
        delta: ``δ > 0`` (the paper: 1e-4).
        every: ``K >= 1`` optimizer steps between increases (the paper: 10 on CIFAR, 5 on ImageNet).
        ceiling: ``τ >= δ`` (the paper: 1).
        Other arguments: see :class:`GroupPenalty` (``power`` is 2 here).

    With SGD at learning rate ``η`` and momentum ``m`` the chosen units' weights are scaled by about
    ``1 - η λ_t / (1 - m)`` per step; benchmarks/group_sparsity.py uses ``δ = 0.05``, ``K = 5``, ``τ = 1``
    with ``η = 0.01``, ``m = 0.9`` for 150 steps (removed units' norms ~3e-3 of ~1).

    Raises:
        ConfigError: non-positive ``delta``, ``ceiling < delta``, bad ``every``, a selection that removes
            nothing (``sparsity`` too small for any group), and as :class:`GroupPenalty`; the model is
            unchanged.
    """

    name = "greg"

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        sparsity: float,
        *,
        delta: float = 1e-4,
        every: int = 10,
        ceiling: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self.delta = _number(delta, "GrowingRegularization: delta", strict=True)
        self.every = _count(every, "GrowingRegularization: every")
        self.ceiling = _number(ceiling, "GrowingRegularization: ceiling", minimum=self.delta)
        if "power" in kwargs:
            raise ConfigError("GrowingRegularization: power is 2 (GReg's L2 penalty); do not pass it")
        super().__init__(model, example_inputs, sparsity, power=2, **kwargs)
        try:
            chosen = self.pruner.select(self.sparsity)
        except BaseException:
            self.pruner.close()
            raise
        self.chosen = {gi: rm for gi, rm in chosen.items() if rm.size}
        if not self.chosen:
            self.pruner.close()
            raise ConfigError(
                f"GrowingRegularization: sparsity {self.sparsity:g} of {self.pruner.target} selects no unit "
                f"in {len(self.group_ids)} groups; raise it"
            )

    def coefficient(self, step: int) -> float:
        """``λ_t = min(δ · (1 + floor(t / K)), τ)`` at optimizer step ``t = step`` (>= 0)."""
        return min(self.delta * (1 + max(int(step), 0) // self.every), self.ceiling)

    def coefficients(self, step: int) -> dict[int, np.ndarray]:
        """``λ_t / 2`` on the chosen units, 0 elsewhere (penalty ``(λ_t/2)||w||²``, gradient ``λ_t w``)."""
        lam = self.coefficient(step)
        out = {}
        for gi, rm in self.chosen.items():
            c = np.zeros(self.graph.groups[gi].n_units)
            c[rm] = lam / 2.0
            out[gi] = c
        return out

    def _prepare(self) -> None:
        """The choice is fixed: no statistics are read during training."""

    def chosen_norms(self) -> dict[str, np.ndarray]:
        """``{group name: ||w_{g,k}||_2 of the chosen units}`` (float64): are they negligible yet?"""
        return {
            self.graph.groups[gi].name: unit_norms(self.model, self.graph.groups[gi])[rm]
            for gi, rm in self.chosen.items()
        }

    def selection(self) -> dict[int, np.ndarray]:
        """The units chosen at construction."""
        return dict(self.chosen)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the chosen units per group name (``λ_t`` is a function of the step)."""
        return {"chosen": {self.graph.groups[gi].name: rm.tolist() for gi, rm in self.chosen.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the choice of a run being resumed).

        Raises:
            ConfigError: a group name this model's graph lacks, or a unit index outside the group."""
        chosen = {gi: rm.astype(np.int64) for gi, rm in self._by_name(state, "chosen").items()}
        for gi, rm in chosen.items():
            g = self.graph.groups[gi]
            if rm.size and (rm.min() < 0 or rm.max() >= g.n_units):
                raise ConfigError(f"GrowingRegularization state: unit index outside group {g.name!r}")
        self.chosen = {gi: np.unique(rm) for gi, rm in chosen.items() if rm.size}

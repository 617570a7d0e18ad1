"""Group criteria from gradients: Taylor (Molchanov et al. 2019) and Fisher (Theis et al. 2018)."""


from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.criteria.group.base import (
    GroupCriterion,
    GroupScores,
    effective_tensor,
    producer_members,
    register_group_criterion,
    rows_by_index,
    stored_parameter,
    unit_sum,
)
from secateur.criteria.group.functional import TaylorAccumulator
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group, Member


# ----------------------------------------------------------------------------------------------------
# data-dependent criteria
# ----------------------------------------------------------------------------------------------------
@register_group_criterion("taylor")
class TaylorCriterion(GroupCriterion):
    """First-order Taylor group importance (Molchanov et al. 2019, eq. 4), averaged over mini-batches and
    smoothed by :class:`~secateur.criteria.group.functional.TaylorAccumulator` (EMA momentum 0.9).

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
                per_index = (rows_by_index(w, m.dim) * rows_by_index(g, m.dim)).sum(1).cpu().numpy()
                total += unit_sum(per_index, m, group.n_units)
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

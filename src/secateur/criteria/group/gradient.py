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


#: Where :class:`FisherCriterion` puts a group's gates.
FISHER_GATES = ("producer", "norm")


def fisher_gate_points(group: Group, model: nn.Module, gate: str = "producer") -> list[tuple[str, Member]]:
    """``(module path, member)`` of the modules at whose output a group's units are gated.

    ``"producer"``: every conv / linear layer producing the group (the output-channel dim of its weight).
    ``"norm"``: the group's BatchNorm layers (dim 0 of their scale, or of their running mean when they
    have no affine scale), where the channels a conv produced leave its BatchNorm; a group without any
    falls back to its producers. One entry per module.
    """
    if gate == "norm":
        seen: dict[str, Member] = {}
        for m in group.members:
            if m.dim != 0 or not m.name.endswith((".weight", ".running_mean")) or m.module in seen:
                continue
            mod = model.get_submodule(m.module) if m.module else model
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                seen[m.module] = m
        if seen:
            return list(seen.items())
    return [(m.module, m) for m in producer_members(group, model)]


@register_group_criterion("fisher")
class FisherCriterion(GroupCriterion):
    """Fisher pruning (Theis et al. 2018, eq. 8-9; Crowley et al. 2018): a gate ``z_u = 1`` on each unit,
    ``Δ_u = 1/(2N) Σ_n (∂L_n/∂z_u)^2`` with ``∂L_n/∂z_u = Σ_{gate points} Σ_{positions, s∈u} a_{ns} g_{ns}``
    (``g = ∂L/∂a``).

    The units of a group share one gate, so the per-sample contributions of every gate point of the group
    (several in a residual group) are summed *before* squaring. Gate points
    (:func:`fisher_gate_points`): the producing conv / linear outputs (``gate="producer"``, default) or the
    group's BatchNorm outputs (``gate="norm"``: removing a channel removes what its BatchNorm outputs, the
    gate of Crowley et al.'s code, after BN and ReLU, which gives the same derivative).

    :meth:`attach` registers a forward hook on every gate point and a forward pre-hook on the model (which
    numbers the forward passes); when a gate point's output requires grad, a tensor hook on it receives
    ``g``. The per-sample sums of a pass are squared and added to the group's statistics when the next
    pass starts, at :meth:`accumulate`, or when scores are read; scores are ``sum / (2 · N)`` over the
    samples of the passes since the last pruning step.

    Args:
        gate: ``"producer"`` or ``"norm"``.

    Raises:
        ConfigError: an unknown gate; :meth:`scores` before any backward pass ran through the hooks.
    """

    name = "fisher"
    needs_data = True
    comparable = True

    def __init__(self, gate: str = "producer") -> None:
        if gate not in FISHER_GATES:
            raise ConfigError(f"fisher: gate must be one of {FISHER_GATES}, got {gate!r}")
        self.gate = gate
        self.sums: dict[int, np.ndarray] = {}  # group -> Σ_n (∂L_n/∂z)^2 per unit
        self.counts: dict[int, int] = {}  # group -> N
        self.pending: dict[tuple[int, int], torch.Tensor] = {}  # (group, pass) -> (N, n_units) ∂L_n/∂z
        self.handles: list[Any] = []  # one forward hook per gate point
        self.points: list[tuple[int, str]] = []  # (group index, module path) of every hooked gate point
        self._pass = 0
        self._pass_hook: Any = None

    def attach(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> None:
        if self.handles:
            return
        for gi in group_ids:
            g = graph.groups[gi]
            for path, m in fisher_gate_points(g, model, self.gate):
                mod = model.get_submodule(path) if path else model
                self.handles.append(mod.register_forward_hook(self._hook(gi, g.n_units, m, mod)))
                self.points.append((gi, path))
        self._pass_hook = model.register_forward_pre_hook(self._next_pass)

    def _next_pass(self, module: nn.Module, args: Any) -> None:
        self.fold()  # the previous passes' backward (if any) is complete
        self._pass += 1

    def _hook(self, gi: int, n_units: int, m: Member, mod: nn.Module) -> Callable:
        channel_first = isinstance(mod, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase))
        index = torch.from_numpy(m.unit_of)

        def forward_hook(module: nn.Module, args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                return
            act, key = out.detach(), (gi, self._pass)

            def grad_hook(grad: torch.Tensor) -> None:
                a, g = (act, grad) if channel_first else (act.movedim(-1, 1), grad.movedim(-1, 1))
                per = (a.double() * g.double()).reshape(a.shape[0], a.shape[1], -1).sum(2)  # (N, C)
                unit = per.new_zeros(per.shape[0], n_units).index_add_(1, index.to(per.device), per)
                self.pending[key] = self.pending[key] + unit if key in self.pending else unit

            out.register_hook(grad_hook)

        return forward_hook

    def fold(self) -> None:
        """Square the per-sample gate derivatives of the finished passes and add them to the statistics."""
        for (gi, _), per in self.pending.items():
            self.sums[gi] = self.sums.get(gi, 0.0) + per.pow(2).sum(0).cpu().numpy()
            self.counts[gi] = self.counts.get(gi, 0) + per.shape[0]
        self.pending = {}

    def accumulate(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> None:
        self.fold()

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        if self._pass_hook is not None:
            self._pass_hook.remove()
        self.handles, self.points, self._pass_hook = [], [], None

    def has_stats(self) -> bool:
        self.fold()
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
        for gi, total in self.sums.items():
            if gi in out:
                out[gi] = total / (2.0 * self.counts[gi])
        return out

    def after_prune(self) -> None:
        self.sums, self.counts, self.pending = {}, {}, {}

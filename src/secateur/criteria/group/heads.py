"""Attention-head importance of Michel et al. 2019 ("Are Sixteen Heads Really Better than One?")."""


from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.criteria.group.base import (
    GroupCriterion,
    GroupScores,
    consumer_members,
    head_group_ids,
    iter_inputs,
    register_group_criterion,
)
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Member


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
        first = next((t for t in iter_inputs(args, kwargs) if isinstance(t, torch.Tensor) and t.dim()), None)
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

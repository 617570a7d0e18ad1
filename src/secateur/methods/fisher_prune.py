"""Fisher pruning as used by Crowley et al. 2018 ("A Closer Look at Structured Pruning for Neural
Network Compression", sec. 3), after Theis et al. 2018 ("Faster gaze prediction with dense networks
and Fisher pruning", sec. 2.2, eq. 8-9).

Each channel ``c`` gets a virtual gate ``z_c = 1`` multiplying its activation; removing the channel
sets ``z_c = 0``, and the loss increase is estimated from the empirical Fisher information:
``Δ_c = 1/(2N) Σ_n (∂L_n/∂z_c)² = 1/(2N) Σ_n (Σ_{h,w} a_{nchw} g_{nchw})²`` with ``g = ∂L/∂a``. The
signal is accumulated over the fine-tuning steps since the last removal; then the single channel with
the smallest ``Δ`` in the whole network is removed, the accumulators are reset, and training goes on
(one channel at a time, fine-tuning steps in between, Crowley et al. sec. 3).

The statistic is the ``"fisher"`` group criterion with its gates at the BatchNorm outputs
(:class:`~secateur.criteria.group.FisherCriterion` ``gate="norm"``; the producing conv/linear outputs for a
group without BatchNorm). Channels tied by a residual sum form one group of the dependency graph
(:mod:`secateur.graph`) and share one gate, so ``∂L/∂z`` sums the contributions of every gated point of the
group *per sample* before squaring. The one channel to remove is the structured driver's global choice
(:meth:`ChannelPruner.select <secateur.pruners.channel.ChannelPruner.select>` of one unit, raw scores:
every group and member keeps a unit), and removal is physical, through
:func:`secateur.train.compact_in_training` (the driver's compaction, with the optimizer rebound).
:class:`FisherPruner` is the training hook that says when.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from secateur.compact import make_plan, restoring
from secateur.compact.verify import oracle_check
from secateur.criteria.group import FisherCriterion
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph
from secateur.pruners.channel import ChannelPruner
from secateur.train.rebind import compact_in_training

__all__ = ["FisherPruner"]


class FisherPruner:
    """Accumulate Fisher channel scores during training; remove one channel at a time.

    Own loop::

        fp = FisherPruner(model, example_inputs)
        for step, (x, y) in enumerate(loader):
            loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
            fp.update()                                   # fold this batch into Δ
            if (step + 1) % k == 0: fp.prune_one(opt)     # remove argmin Δ, reset Δ

    As a :class:`~secateur.train.Trainer` callback, ``every`` and ``total`` say when and how many:
    ``on_step_end`` calls :meth:`update` and, every ``every`` steps while fewer than ``total`` channels
    were removed, :meth:`prune_one` (the trainer's optimizer follows the resized parameters, state sliced).

    Args:
        model: trained network; changed in place by :meth:`prune_one`.
        example_inputs: inputs for tracing the dependency graph (retraced after each removal).
        protect: module name patterns never pruned.
        every, total: callback schedule (steps between removals, number of removals).
        verify: run the oracle (:func:`secateur.compact.verify.oracle_check`: the compacted model equals the
            masked one in float64 on ``example_inputs``) inside each removal's transaction (default True;
            costs a copy of the model and two float64 forwards per removal).

    Attributes:
        criterion: the :class:`~secateur.criteria.group.FisherCriterion` (``gate="norm"``) holding ``Δ``
            since the last removal; its hooks are on the model between construction and :meth:`detach`.
        removed: list of ``{"group", "unit", "fisher", "step"}`` in removal order.

    Raises:
        ConfigError: a model with no prunable channel group, bad ``every``/``total``.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        protect: Sequence[str] = (),
        every: int = 50,
        total: int = 0,
        verify: bool = True,
    ) -> None:
        for v, what, lo in ((every, "every", 1), (total, "total", 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"FisherPruner: {what} must be an int >= {lo}, got {v!r}")
        self.model = model
        self.example_inputs = example_inputs
        self.protect = tuple(protect)
        self.every = every
        self.total = total
        self.verify = verify
        self.removed: list[dict[str, Any]] = []
        self.criterion = FisherCriterion(gate="norm")
        self._build()
        if not self.group_ids:
            raise ConfigError(f"FisherPruner: {type(model).__name__} has no prunable channel group to score")

    # -- bookkeeping ----------------------------------------------------------------------------
    def _build(self) -> None:
        """Trace the graph, reset the statistics and hook the gates of every group with a unit to spare."""
        self.detach()
        self.graph = DependencyGraph.build(self.model, self.example_inputs, protect=self.protect)
        self.group_ids = [gi for gi, g in enumerate(self.graph.groups) if g.n_prunable > 0 and g.n_units > 1]
        self.criterion.after_prune()
        self.criterion.attach(self.model, self.graph, self.group_ids)

    @property
    def points(self) -> list[tuple[int, str]]:
        """``(group index, module path)`` of every gate point hooked now."""
        return self.criterion.points

    @property
    def _handles(self) -> list[Any]:
        return self.criterion.handles

    def update(self) -> None:
        """Fold the gate gradients of the last backward pass into ``Δ`` (call after backward)."""
        self.criterion.fold()

    def scores(self) -> dict[str, torch.Tensor]:
        """``{group name: (n_units,) float64 Δ}`` over the samples seen since the last removal (empty before
        any backward pass)."""
        if not self.criterion.has_stats():
            return {}
        raw = self.criterion.scores(self.model, self.graph, self.group_ids)
        return {self.graph.groups[gi].name: torch.from_numpy(s) for gi, s in raw.items()}

    def detach(self) -> None:
        """Remove the hooks (the model is left as it is)."""
        self.criterion.detach()

    @torch.no_grad()
    def prune_one(self, optimizer: torch.optim.Optimizer | None = None, step: int | None = None) -> dict:
        """Remove the channel with the smallest ``Δ`` over all groups through the graph, reset ``Δ`` and
        retrace. The channel is the structured driver's choice
        (:meth:`ChannelPruner.select <secateur.pruners.channel.ChannelPruner.select>` of one unit, global,
        raw scores); compaction goes through :func:`secateur.train.compact_in_training`: resized parameters
        become new ``nn.Parameter`` objects, and ``optimizer`` (if given) holds them afterwards, with its
        state (momentum, Adam moments) sliced at the kept indices.

        Transactional: if compaction or the oracle (``verify``) fails or is interrupted (any
        ``BaseException``), the model is left as it was (:func:`secateur.compact.compact`), the hooks are put
        back with the statistics gathered so far, and the exception is re-raised.

        Returns the removal record.

        Raises:
            ConfigError: no score was accumulated, no channel can go, or ``verify`` with NaN/Inf in the
                example inputs. CompactionError: compaction or the oracle failed (nothing changed).
        """
        scores = self.scores()
        if not scores:
            raise ConfigError("FisherPruner.prune_one: no Fisher signal yet; train (forward+backward) first")
        driver = ChannelPruner(
            self.model,
            self.example_inputs,
            schedule=0.0,
            criterion=self.criterion,
            allocation="global",
            normalize="none",
            graph=self.graph,
            groups=self.group_ids,
        )
        n_units = sum(self.graph.groups[gi].n_prunable for gi in driver.group_ids)
        if driver.max_fraction * n_units < 1 - 1e-9:
            raise ConfigError("FisherPruner.prune_one: every group is down to its last channel")
        removed = {gi: rm for gi, rm in driver.select(1.0 / n_units).items() if rm.size}
        ((gi, units),) = removed.items()
        g, u = self.graph.groups[gi], int(units[0])
        plan = make_plan(self.graph, removed)
        shapes = {n: tuple(t.shape) for n, t in self._named().items() if n in plan["tensors"]}
        self.detach()
        with restoring(lambda: self._resume(shapes)):
            check = oracle_check(self.model, plan, self.example_inputs) if self.verify else None
            compact_in_training(self.model, plan, optimizer, check=check)
        rec = {"group": g.name, "unit": u, "fisher": float(scores[g.name][u]), "step": step}
        self.removed.append(rec)
        self._build()
        return rec

    def _named(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(self.model.named_buffers(remove_duplicate=False))
        return named

    def _resume(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """After a failed :meth:`prune_one`: the hooks go back (statistics kept) when the model is unchanged
        (``shapes``: the planned tensors' shapes before), as compaction guarantees; if it was interrupted
        after the compaction itself had completed (while the optimizer was being rebound), the model is
        compacted and the graph is traced again."""
        named = self._named()
        if all(n in named and tuple(named[n].shape) == s for n, s in shapes.items()):
            self.criterion.attach(self.model, self.graph, self.group_ids)
        else:
            self._build()

    # -- Trainer integration ----------------------------------------------------------------------
    def on_step_end(self, trainer: Any) -> None:
        """Trainer hook: :meth:`update`, and :meth:`prune_one` every ``every`` steps until ``total``."""
        self.update()
        if len(self.removed) < self.total and trainer.global_step % self.every == 0:
            self.prune_one(trainer.optimizer, trainer.global_step)

    def on_train_end(self, trainer: Any) -> None:
        """Trainer hook: :meth:`detach`."""
        self.detach()

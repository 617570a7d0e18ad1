"""Fisher pruning as used by Crowley et al. 2018 ("A Closer Look at Structured Pruning for Neural
Network Compression", sec. 3), after Theis et al. 2018 ("Faster gaze prediction with dense networks
and Fisher pruning", sec. 2.2, eq. 8-9).

Each channel ``c`` gets a virtual gate ``z_c = 1`` multiplying its activation; removing the channel
sets ``z_c = 0``, and the loss increase is estimated from the empirical Fisher information:
``Δ_c = 1/(2N) Σ_n (∂L_n/∂z_c)² = 1/(2N) Σ_n (Σ_{h,w} a_{nchw} g_{nchw})²`` with ``g = ∂L/∂a``. The
signal is accumulated over the fine-tuning steps since the last removal; then the single channel with
the smallest ``Δ`` in the whole network is removed, the accumulators are reset, and training goes on
(one channel at a time, fine-tuning steps in between, Crowley et al. sec. 3).

Residual coupling: channels tied by a residual sum form one group of the dependency graph
(:mod:`secateur.graph`) and share one gate, so ``∂L/∂z`` sums the contributions of every gated point
of the group *per sample* before squaring. Gate points are the BatchNorm layers of a group (the
producing conv/linear layers when it has none). Removal is physical, through the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.compact import make_plan, restoring
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph
from secateur.train.rebind import compact_in_training

__all__ = ["FisherPruner"]

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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

    Attributes:
        fisher: ``{group name: (n_units,) float64 Δ}`` accumulated since the last removal.
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
    ) -> None:
        for v, what, lo in ((every, "every", 1), (total, "total", 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"FisherPruner: {what} must be an int >= {lo}, got {v!r}")
        self.model = model
        self.example_inputs = example_inputs
        self.protect = tuple(protect)
        self.every = every
        self.total = total
        self.removed: list[dict[str, Any]] = []
        self._handles: list[Any] = []
        self._build()
        if not self.points:
            raise ConfigError(f"FisherPruner: {type(model).__name__} has no prunable channel group to score")

    # -- bookkeeping ----------------------------------------------------------------------------
    def _build(self) -> None:
        self.detach()
        self.graph = DependencyGraph.build(self.model, self.example_inputs, protect=self.protect)
        # gate points: (group index, module path, unit_of) -- BN layers of the group, else producers
        self.points: list[tuple[int, str, np.ndarray]] = []
        for gi, g in enumerate(self.graph.groups):
            if g.n_prunable == 0 or g.n_units < 2:
                continue
            bns, prods = [], []
            for m in g.members:
                if m.is_buffer or m.dim != 0 or not m.name.endswith(".weight"):
                    continue
                mod = self.model.get_submodule(m.module)
                if isinstance(mod, nn.modules.batchnorm._NormBase):
                    bns.append((gi, m.module, m.unit_of))
                elif isinstance(mod, _PRODUCERS):
                    prods.append((gi, m.module, m.unit_of))
            self.points += bns or prods
        self.fisher: dict[str, torch.Tensor] = {}
        self._pending: dict[int, torch.Tensor] = {}
        self._batches = 0
        self._attach()

    def _attach(self) -> None:
        """Put the forward hooks on the gate points (statistics are kept)."""
        for gi, path, unit_of in self.points:
            mod = self.model.get_submodule(path)
            self._handles.append(mod.register_forward_hook(self._hook(gi, unit_of)))

    def _hook(self, gi: int, unit_of: np.ndarray) -> Any:
        n_units = self.graph.groups[gi].n_units
        idx = torch.from_numpy(unit_of)

        def fwd(mod: nn.Module, _args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or not out.requires_grad or out.is_meta:
                return
            a = out.detach()
            chan_last = isinstance(mod, nn.Linear) and out.dim() > 2

            def bwd(grad: torch.Tensor) -> None:
                prod = a * grad
                if chan_last:
                    prod = prod.movedim(-1, 1)
                per = prod.reshape(prod.shape[0], prod.shape[1], -1).sum(2).double()  # (N, C)
                units = per.new_zeros(per.shape[0], n_units).index_add_(1, idx.to(per.device), per)
                self._pending[gi] = self._pending.get(gi, 0) + units

            out.register_hook(bwd)

        return fwd

    def update(self) -> None:
        """Fold the gate gradients of the last backward pass into ``fisher`` (call after backward)."""
        if not self._pending:
            return
        for gi, per_sample in self._pending.items():
            name = self.graph.groups[gi].name
            d = per_sample.pow(2).sum(0) / (2 * per_sample.shape[0])
            self.fisher[name] = self.fisher.get(name, torch.zeros_like(d)) + d
        self._pending = {}
        self._batches += 1

    def scores(self) -> dict[str, torch.Tensor]:
        """``{group name: (n_units,) Δ}``, averaged over the batches seen since the last removal."""
        self.update()
        return {k: v / max(self._batches, 1) for k, v in self.fisher.items()}

    def detach(self) -> None:
        """Remove the hooks (the model is left as it is)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def prune_one(self, optimizer: torch.optim.Optimizer | None = None, step: int | None = None) -> dict:
        """Remove the channel with the smallest ``Δ`` over all groups through the graph, reset ``Δ`` and
        retrace. Compaction goes through :func:`secateur.train.compact_in_training`: resized parameters
        become new ``nn.Parameter`` objects, and ``optimizer`` (if given) holds them afterwards, with its
        state (momentum, Adam moments) sliced at the kept indices.

        Transactional: if compaction fails or is interrupted (any ``BaseException``), the model is left as
        it was (:func:`secateur.compact.compact`), the hooks are put back with the statistics gathered so
        far, and the exception is re-raised.

        Returns the removal record. Raises ConfigError if no score was accumulated or no channel can go.
        """
        scores = self.scores()
        if not scores:
            raise ConfigError("FisherPruner.prune_one: no Fisher signal yet; train (forward+backward) first")
        best: tuple[float, int, int] | None = None
        for gi, g in enumerate(self.graph.groups):
            s = scores.get(g.name)
            if s is None or g.n_units < 2:
                continue
            for u in np.nonzero(g.prunable)[0]:
                if any(np.all(m.unit_of == u) for m in g.members):
                    continue  # the unit is a whole member: removing it would empty a layer
                cand = (float(s[u]), gi, int(u))
                if best is None or cand < best:
                    best = cand
        if best is None:
            raise ConfigError("FisherPruner.prune_one: every group is down to its last channel")
        value, gi, u = best
        g = self.graph.groups[gi]
        plan = make_plan(self.graph, {gi: [u]})
        shapes = {n: tuple(t.shape) for n, t in self._named().items() if n in plan["tensors"]}
        self.detach()
        with restoring(lambda: self._resume(shapes)):
            compact_in_training(self.model, plan, optimizer)
        rec = {"group": g.name, "unit": u, "fisher": value, "step": step}
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
            self._attach()
        else:
            self._build()

    # -- Trainer integration ----------------------------------------------------------------------
    def on_step_end(self, trainer: Any) -> None:
        self.update()
        if len(self.removed) < self.total and trainer.global_step % self.every == 0:
            self.prune_one(trainer.optimizer, trainer.global_step)

    def on_train_end(self, trainer: Any) -> None:
        self.detach()

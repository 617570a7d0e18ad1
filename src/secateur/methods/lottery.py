"""Lottery tickets: iterative magnitude pruning (IMP) with weight rewinding.

Frankle & Carbin 2019, "The Lottery Ticket Hypothesis", algorithm of sec. 1 (iterative pruning,
resetting the surviving weights to their initial values ``θ_0``), and Frankle et al. 2020,
"Linear Mode Connectivity and the Lottery Ticket Hypothesis", sec. 5, which rewinds instead to
the weights ``θ_k`` of an early iteration ``k > 0`` (needed for deeper networks). One round:

1. train the (masked) network;
2. prune ``rate`` of the *remaining* weights by magnitude, globally or layer by layer, so after
   ``r`` rounds the sparsity is ``1 - (1 - rate)^r``;
3. rewind every surviving parameter to its value saved at iteration ``k`` (pruned entries stay
   exactly zero), and train again from iteration ``k``.

Everything that is a parameter or a floating-point buffer (biases, BatchNorm affine parameters and
running statistics) is rewound, as the authors' code restores the whole saved state; masks are not.
Optimizer state and the learning-rate schedule position are the training loop's business: the
paper restarts training at iteration ``k`` of the same schedule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from secateur.errors import ConfigError
from secateur.masks.element import ElementMask, set_mask
from secateur.pruners.element import Pruner
from secateur.scope import Scope


class LotteryTicket:
    """Iterative magnitude pruning with rewinding to iteration ``rewind_step``.

    Use with your own loop::

        lt = LotteryTicket(model, rewind_step=k, rate=0.2, rounds=R)   # attaches masks
        for r in range(R + 1):
            for step, batch in enumerate(batches):       # step = optimizer steps done, from 0
                lt.observe(step)                         # saves θ_k when step == k (before step k+1)
                ...; opt.step()
            if r < R:
                lt.next_round()                          # prune rate of the remaining, rewind to θ_k

    or as a :class:`secateur.train.Trainer` callback (``on_train_begin``/``on_step_end`` save
    ``θ_k`` when ``trainer.global_step == k``; ``on_train_end`` calls :meth:`next_round` while
    rounds remain), one Trainer per round.

    Args:
        model: the network; its scoped weights get element masks (in place).
        rewind_step: ``k``, optimizer steps done when the weights are saved (0 = initialisation,
            saved at construction).
        rate: fraction (not percent) of the remaining weights pruned each round, in (0, 1).
        rounds: number of prune-and-rewind rounds ``R``.
        allocation: ``"global"`` (conv nets in Frankle & Carbin 2019) or ``"layerwise"``.
        scope: which weights; default every conv and linear weight.

    Raises:
        ConfigError: bad ``rate``, ``rounds`` or ``rewind_step``; :meth:`next_round` before
            ``θ_k`` was saved or after the last round.
    """

    def __init__(
        self,
        model: nn.Module,
        rewind_step: int = 0,
        rate: float = 0.2,
        rounds: int = 1,
        allocation: str = "global",
        scope: Scope | None = None,
    ) -> None:
        if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0:
            raise ConfigError(f"rewind_step must be an int >= 0, got {rewind_step!r}")
        if not isinstance(rate, (int, float)) or not 0.0 < rate < 1.0:
            raise ConfigError(f"rate must be a fraction in (0, 1) of the remaining weights, got {rate!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"rounds must be an int >= 1, got {rounds!r}")
        if allocation not in ("global", "layerwise"):
            raise ConfigError(f"lottery allocation must be 'global' or 'layerwise', got {allocation!r}")
        self.model = model
        self.rewind_step = rewind_step
        self.rate = float(rate)
        self.rounds = rounds
        self.pruner = Pruner(model, 0.0, criterion="magnitude", allocation=allocation, scope=scope)
        self.round = 0
        self.saved: dict[str, torch.Tensor] | None = None
        if rewind_step == 0:
            self.capture()

    # -- state -----------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        masks = {id(m.mask) for m in self.model.modules() if isinstance(m, ElementMask)}
        out = {f"param:{n}": p for n, p in self.model.named_parameters()}
        for n, b in self.model.named_buffers():
            if id(b) not in masks and b.is_floating_point():
                out[f"buffer:{n}"] = b
        return out

    @torch.no_grad()
    def capture(self) -> None:
        """Save ``θ_k``: a copy of every parameter (stored, unmasked values) and float buffer."""
        self.saved = {n: t.detach().clone() for n, t in self._tensors().items()}

    def observe(self, step: int) -> None:
        """Call with the number of optimizer steps done; saves ``θ_k`` at ``step == rewind_step``."""
        if step == self.rewind_step and self.saved is None:
            self.capture()

    def target_sparsity(self, round_: int) -> float:
        """Sparsity of the scoped weights after ``round_`` rounds: ``1 - (1 - rate)^round_``."""
        return 1.0 - (1.0 - self.rate) ** round_

    @torch.no_grad()
    def rewind(self) -> None:
        """Restore ``θ_k`` into every parameter and float buffer; masked entries are re-zeroed.

        Raises:
            ConfigError: nothing was saved yet.
        """
        if self.saved is None:
            raise ConfigError(
                f"no weights saved at iteration {self.rewind_step}: call observe(step) (or use the "
                "Trainer callbacks) during training before rewinding"
            )
        current = self._tensors()
        for n, t in current.items():
            t.copy_(self.saved[n])
        masks = self.pruner.masks()
        for tgt in self.pruner.targets:
            set_mask(tgt.module, masks[tgt.name], tgt.param_name)

    def next_round(self) -> dict[str, torch.Tensor]:
        """Prune ``rate`` of the remaining scoped weights by magnitude, then :meth:`rewind`.

        Returns the new boolean keep-masks ``{name: mask}``.

        Raises:
            ConfigError: ``θ_k`` not saved yet, or all ``rounds`` done.
        """
        if self.saved is None:
            self.rewind()  # raises the explanatory error
        if self.round >= self.rounds:
            raise ConfigError(f"all {self.rounds} lottery rounds are done")
        self.round += 1
        masks = self.pruner.prune_to(self.target_sparsity(self.round))
        self.rewind()
        return masks

    # -- Trainer callbacks -------------------------------------------------------------------------
    def on_train_begin(self, trainer: Any) -> None:
        self.observe(int(trainer.global_step))

    def on_step_end(self, trainer: Any) -> None:
        self.observe(int(trainer.global_step))

    def on_train_end(self, trainer: Any) -> None:
        if self.round < self.rounds:
            self.next_round()

"""The protocol every pruner follows, so a training loop, a callback or a recipe drives any of them alike.

torch.ao.pruning's lesson: a sparsifier implements *what* (scores, allocation, how a decision takes effect)
and inherits *when* (the schedule at each optimizer step) and the training-loop hooks. Both drivers,
:class:`~secateur.pruners.element.Pruner` (element masks) and
:class:`~secateur.pruners.channel.ChannelPruner` (structured: masks, then compaction), subclass
:class:`PrunerBase` and answer the same verbs:

========================  =====================================================================
``step(step)``            apply the schedule at optimizer step ``step``; True if masks changed
``sparsity()``            the achieved fraction (0 to 1) of what the pruner's amount refers to
``finalize()``            make the pruning permanent and return the model (bake masks / compact)
``state_dict()``          JSON-able state for resume; ``load_state_dict(state)`` restores it
``on_train_begin`` ...    the :class:`secateur.train.Trainer` callback hooks, defined here once
========================  =====================================================================
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["PrunerBase"]


class PrunerBase:
    """Base class of the pruners: the Trainer callback hooks in terms of :meth:`step`.

    Subclasses implement :meth:`step`, :meth:`sparsity`, :meth:`finalize`, :meth:`state_dict` and
    :meth:`load_state_dict`; data-dependent ones override :meth:`on_after_backward`.
    """

    def step(self, step: int) -> bool:  # pragma: no cover - abstract
        """Apply the schedule at training step ``step`` (optimizer steps done). True if masks changed."""
        raise NotImplementedError

    def sparsity(self) -> float:  # pragma: no cover - abstract
        """The achieved fraction (in [0, 1]) of the pruner's target that is pruned."""
        raise NotImplementedError

    def finalize(self) -> nn.Module:  # pragma: no cover - abstract
        """Make the pruning permanent (no masks, no hooks) and return the model."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """JSON-able state for resuming (masks themselves live in the model's state_dict)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:  # pragma: no cover - abstract
        """Restore :meth:`state_dict`."""
        raise NotImplementedError

    # -- the trainer callback protocol (secateur.train.Trainer, and the HF / Lightning callbacks) ----------
    def on_train_begin(self, trainer: Any) -> None:
        """Trainer callback: apply the schedule at the starting step (a one-shot schedule prunes here)."""
        self.step(int(trainer.global_step))

    def on_after_backward(self, trainer: Any) -> None:
        """Trainer callback after ``loss.backward()``, before ``optimizer.step()``: a no-op by default
        (data-dependent pruners read gradients here)."""

    def on_step_end(self, trainer: Any) -> None:
        """Trainer callback after an optimizer step: apply the schedule at ``trainer.global_step``."""
        self.step(int(trainer.global_step))

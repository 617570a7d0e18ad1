"""The protocol every pruner follows, so a training loop, a callback or a recipe drives any of them alike.

torch.ao.pruning's lesson: a sparsifier implements *what* (scores, allocation, how a decision takes effect)
and inherits *when* (the schedule at each optimizer step) and the training-loop hooks. Both drivers,
:class:`~secateur.pruners.element.Pruner` (element masks) and
:class:`~secateur.pruners.channel.ChannelPruner` (structured: masks, then compaction), subclass
:class:`PrunerBase` and answer the same verbs:

========================  =====================================================================
``step(step)``            apply the schedule at optimizer step ``step``; True if masks changed
``prune_to(sparsity)``    the one hook a pruner implements: score, allocate, mask (``update_mask``)
``sparsity()``            the achieved fraction (0 to 1) of what the pruner's amount refers to
``finalize()``            make the pruning permanent and return the model (bake masks / compact)
``state_dict()``          JSON-able state for resume; ``load_state_dict(state)`` restores it
``on_train_begin`` ...    the :class:`secateur.train.Trainer` callback hooks, defined here once
========================  =====================================================================
"""

from __future__ import annotations

import numbers
from typing import Any

from torch import nn

from secateur._validate import check_ratio, check_sparsity
from secateur.schedules import OneShot, Schedule

__all__ = ["PrunerBase", "check_schedule"]


def check_schedule(schedule: object) -> Schedule:
    """``schedule`` as a schedule object: a number is a one-shot sparsity (checked to be in [0, 1)).

    Args:
        schedule: an object with ``update_at`` and ``sparsity_at`` (:mod:`secateur.schedules`), or a real
            number, the fraction (0 to 1) to prune once at step 0.

    Raises:
        ConfigError: a string (even ``"0.5"``), a bool or another object without ``update_at`` /
            ``sparsity_at``, naming ``schedule``; a number outside [0, 1).
    """
    if hasattr(schedule, "update_at") and hasattr(schedule, "sparsity_at"):
        return schedule  # type: ignore[return-value]
    if isinstance(schedule, bool) or not isinstance(schedule, numbers.Real):
        check_ratio(schedule, "schedule (a one-shot sparsity)")
    return OneShot(check_sparsity(float(schedule), "schedule (a one-shot sparsity)"))


class PrunerBase:
    """Base class of the pruners: :meth:`step` (the schedule) and the Trainer callback hooks, defined once.

    :meth:`step` is a template method (torch.ao.pruning's ``BaseSparsifier.step`` / ``update_mask`` split):
    it asks ``schedule.update_at(step)`` whether ``step`` is a pruning step and for its sparsity target,
    calls the one hook :meth:`prune_to` (score, allocate, mask) and keeps the bookkeeping
    (:attr:`last_update`, :attr:`history`, what :meth:`state_dict` saves).

    Subclasses set :attr:`schedule` (see :func:`check_schedule`), :attr:`last_update` (None) and
    :attr:`history` (``[]``) in their constructor and implement :meth:`prune_to`, :meth:`sparsity` and
    :meth:`finalize`; they may refine :meth:`_before_step` (run at every step, pruning or not),
    :meth:`_history_entry`, :meth:`state_dict` / :meth:`load_state_dict` (calling these), and
    data-dependent ones :meth:`on_after_backward`.
    """

    schedule: Schedule
    #: the last step at which masks changed (None: never); a step at or before it is not applied again
    last_update: int | None
    #: one entry per mask change: ``{"step", "target", ...}`` (:meth:`_history_entry`)
    history: list[dict[str, Any]]

    # -- the hook ----------------------------------------------------------------------------------------
    def prune_to(self, sparsity: float) -> Any:  # pragma: no cover - abstract
        """Score, allocate and mask so that ``sparsity`` (a fraction, 0 to 1) is pruned (pruned stays so)."""
        raise NotImplementedError

    def sparsity(self) -> float:  # pragma: no cover - abstract
        """The achieved fraction (in [0, 1]) of the pruner's target that is pruned."""
        raise NotImplementedError

    def finalize(self) -> nn.Module:  # pragma: no cover - abstract
        """Make the pruning permanent (no masks, no hooks) and return the model."""
        raise NotImplementedError

    # -- the schedule (template method) --------------------------------------------------------------------
    def step(self, step: int) -> bool:
        """Apply the schedule at training step ``step`` (optimizer steps done). True if masks changed.

        A step at or before :attr:`last_update` does nothing (a resumed or repeated call cannot prune twice);
        otherwise ``schedule.update_at(step)`` gives the sparsity target, or None when masks must not change.

        Raises:
            whatever :meth:`prune_to` raises (ConfigError for an unreachable target, ...); the bookkeeping
            is then unchanged.
        """
        self._before_step()
        if self.last_update is not None and step <= self.last_update:
            return False
        target = self.schedule.update_at(step)
        if target is None:
            return False
        self.prune_to(target)
        self.last_update = step
        self.history.append(self._history_entry(step, target))
        return True

    def _before_step(self) -> None:
        """Run at every :meth:`step`, before the schedule is asked (nothing by default)."""

    def _history_entry(self, step: int, target: float) -> dict[str, Any]:
        """The :attr:`history` entry of a mask change at ``step`` to ``target``: step, target, sparsity."""
        return {"step": step, "target": target, "sparsity": self.sparsity()}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for resuming: last update step, history (masks live in the model's state_dict)."""
        return {"last_update": self.last_update, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (last update step and history)."""
        self.last_update = state.get("last_update")
        self.history = list(state.get("history", []))

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

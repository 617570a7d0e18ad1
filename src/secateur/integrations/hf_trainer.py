"""A Hugging Face ``transformers.Trainer`` callback that drives a :class:`secateur.Pruner`.

The schedule is a function of the number of optimizer steps done, which is exactly
``TrainerState.global_step`` when ``on_step_end`` fires (after the optimizer step, with gradient
accumulation counted once per optimizer step). Create the pruner *before* the ``Trainer`` so the
optimizer is built over the masked model's parameters (masks are parametrizations; the stored
weights stay the same ``Parameter`` objects). Masks are buffers, so the Trainer's checkpoints
carry them.

Under multi-process training (``torchrun`` / ``accelerate launch``), masks are synchronised from
rank 0 and checked after each update, as in :mod:`secateur.train.ddp`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from secateur._optional import require
from secateur.integrations._stepping import PrunerStepping

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

# the base class must exist when this module is imported: a missing transformers names the extra to install
TrainerCallback = require("transformers", "secateur.integrations.hf_trainer").TrainerCallback

__all__ = ["PruningCallback"]


class PruningCallback(PrunerStepping, TrainerCallback):
    """Call ``pruner.step(state.global_step)`` at train begin and after every optimizer step.

    Args:
        pruner: a :class:`secateur.Pruner` (anything with ``step(int) -> bool``).
        sync: when a process group with more than one rank is initialised, broadcast the masks
            from rank 0 and check their digest after each update (:func:`secateur.train.ddp.sync_masks`).

    Attributes:
        updates: ``(global_step, sparsity)`` for each step at which the masks changed (sparsity as a
            fraction of the scoped weights).

    Raises:
        secateur.train.ddp.MaskMismatchError: ranks disagree after an update (with ``sync``).
    """

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._step(state.global_step)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._after_backward()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._step(state.global_step)

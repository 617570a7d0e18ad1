"""The stepping logic shared by the framework callbacks (Hugging Face ``Trainer``, Lightning).

Each framework calls its own hook names after an optimizer step; both end in
:meth:`PrunerStepping._step`, which asks the pruner's schedule whether masks change at this
optimizer step, keeps the ranks of a multi-process run in agreement, and records the update.
"""

from __future__ import annotations

from typing import Any


class PrunerStepping:
    """Mixin holding a pruner and driving it from a framework's optimizer-step count.

    Args:
        pruner: a :class:`secateur.Pruner` or :class:`secateur.ChannelPruner` (anything with the
            :class:`~secateur.pruners.base.PrunerBase` verbs: ``step(int) -> bool``, ``sparsity()``).
        sync: when a process group with more than one rank is initialised, broadcast the masks
            from rank 0 and check their digest after each update (:func:`secateur.train.ddp.sync_masks`).

    Attributes:
        updates: ``(global_step, sparsity)`` for each step at which the masks changed (``sparsity()``: the
            achieved fraction of the pruner's target; NaN for an object without ``sparsity()``).

    Raises:
        secateur.train.ddp.MaskMismatchError: ranks disagree after an update (with ``sync``).
    """

    def __init__(self, pruner: Any, *, sync: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # the framework's callback base, next in the MRO
        self.pruner = pruner
        self.sync = sync
        self.updates: list[tuple[int, float]] = []

    def _after_backward(self) -> None:
        """Gradients are present, the optimizer has not stepped: forward to ``pruner.on_after_backward``
        when it has one (a Taylor/Fisher ChannelPruner reads its statistics there)."""
        fn = getattr(self.pruner, "on_after_backward", None)
        if fn is not None:
            fn(None)

    def _step(self, step: int) -> None:
        """``pruner.step(step)``; on a mask change, sync the ranks and record ``(step, sparsity)``."""
        if not self.pruner.step(int(step)):
            return
        if self.sync:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                from secateur.train.ddp import sync_masks

                sync_masks(self.pruner)
        has_sparsity = callable(getattr(self.pruner, "sparsity", None))
        sparsity = self.pruner.sparsity() if has_sparsity else float("nan")
        self.updates.append((int(step), sparsity))

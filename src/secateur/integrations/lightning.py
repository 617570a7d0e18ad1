"""A PyTorch Lightning callback that drives a :class:`secateur.Pruner` (Lightning is optional).

Lightning is imported only when ``PruningCallback`` is first accessed, so this module imports
without it; accessing the class without Lightning raises ``ImportError`` with the install command.
``lightning.pytorch`` is preferred, with ``pytorch_lightning`` as a fallback (Lightning accepts
only callbacks derived from its own ``Callback`` class, so the base is whichever is installed).

``trainer.global_step`` counts optimizer steps, matching the pruner's schedule; with gradient
accumulation, ``on_train_batch_end`` fires on every micro-batch but the pruner acts once per step.
The pruner's state (last update, history) is saved in Lightning checkpoints; the masks are
buffers of the model, so they are saved with its ``state_dict``. Create the pruner before
``trainer.fit`` (before Lightning wraps the model in DDP).
"""

from __future__ import annotations

from typing import Any

from secateur.integrations._stepping import PrunerStepping

__all__ = ["PruningCallback"]  # noqa: F822 - built on first access by the module __getattr__

_CLASS: type | None = None


def _callback_base() -> type:
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError:
        try:
            from pytorch_lightning.callbacks import Callback
        except ImportError as exc:
            raise ImportError(
                "secateur.integrations.lightning needs PyTorch Lightning: pip install lightning"
            ) from exc
    return Callback


def _build() -> type:
    base = _callback_base()

    class PruningCallback(PrunerStepping, base):  # type: ignore[misc, valid-type]
        """Call ``pruner.step(trainer.global_step)`` at train start and after every training batch.

        Args:
            pruner: a :class:`secateur.Pruner` (anything with ``step(int) -> bool``).
            sync: with an initialised multi-rank process group, broadcast masks from rank 0 and
                check their digest after each update (:func:`secateur.train.ddp.sync_masks`).

        Attributes:
            updates: ``(global_step, sparsity)`` at each mask change (sparsity: fraction of the
                scoped weights).

        Raises:
            ImportError: (on first access of the class) Lightning is not installed.
            secateur.train.ddp.MaskMismatchError: ranks disagree after an update (with ``sync``).
        """

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._step(trainer.global_step)

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            self._after_backward()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            self._step(trainer.global_step)

        def state_dict(self) -> dict[str, Any]:
            return dict(self.pruner.state_dict()) if hasattr(self.pruner, "state_dict") else {}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            if hasattr(self.pruner, "load_state_dict"):
                self.pruner.load_state_dict(state_dict)

    PruningCallback.__module__ = __name__
    PruningCallback.__qualname__ = "PruningCallback"
    return PruningCallback


def __getattr__(name: str) -> Any:
    global _CLASS
    if name == "PruningCallback":
        if _CLASS is None:
            _CLASS = _build()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""A minimal in-memory batch iterator.

For datasets that fit in memory as tensors (MNIST-sized), ``torch.utils.data.DataLoader`` over a
per-item ``Dataset`` spends most of its time calling ``__getitem__`` and collating single examples.
:class:`TensorLoader` slices (or gathers, when shuffling) whole batches at once instead: one
shuffled epoch of Fashion-MNIST at batch size 128 takes about 0.06 s on CPU against about 0.27 s
for ``DataLoader(TensorDataset(...))``, and more against datasets that decode per item. It also
makes the shuffle order a pure function of ``(seed, epoch)`` so an interrupted training resumes
with the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from secateur.errors import ConfigError

__all__ = ["StepLoader", "TensorLoader"]


class TensorLoader:
    """Iterate over ``(x[i:j], y[i:j])`` batches of two preloaded tensors.

    Each ``iter(loader)`` is one epoch. With ``shuffle=True`` the order of epoch ``e`` is
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``, independent of the
    global RNG. The epoch counter advances when an iteration *starts* (so a ``break`` still
    consumes the epoch); :meth:`set_epoch` overrides it, and :meth:`state_dict` /
    :meth:`load_state_dict` save and restore it.

    Without shuffling the batches are views of ``x`` and ``y`` (no copy): modify them in place
    only if you mean to modify the dataset. With shuffling they are fresh tensors.

    Args:
        x: inputs, shape ``(N, ...)``, any dtype and device.
        y: targets, shape ``(N, ...)``, same ``N``.
        batch_size: examples per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: reshuffle every epoch.
        seed: base seed of the shuffle.
        drop_last: skip a final batch smaller than ``batch_size``.

    Raises:
        ConfigError: ``x`` and ``y`` differ in length, ``x`` is 0-dimensional, or ``batch_size`` < 1.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if x.dim() == 0 or y.dim() == 0:
            raise ConfigError("TensorLoader needs tensors with a leading example dimension, got a scalar")
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"TensorLoader: x has {x.shape[0]} examples but y has {y.shape[0]}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"TensorLoader: batch_size must be a positive int, got {batch_size!r}")
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self._epoch = 0

    @property
    def num_examples(self) -> int:
        """Number of examples ``N``."""
        return int(self.x.shape[0])

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will use (0 before the first)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration be epoch ``epoch`` (its shuffle uses ``seed + epoch``).

        Raises:
            ConfigError: ``epoch`` is negative.
        """
        if epoch < 0:
            raise ConfigError(f"TensorLoader: epoch must be >= 0, got {epoch}")
        self._epoch = int(epoch)

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = self.num_examples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor | None:
        """The permutation (int64, shape ``(N,)``, on CPU) used in ``epoch``; ``None`` when not shuffling."""
        if not self.shuffle:
            return None
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=g)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = self.order(self._epoch)
        self._epoch += 1
        if perm is not None and perm.device != self.x.device:
            perm = perm.to(self.x.device)
        return self._batches(perm)

    def _batches(self, perm: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.batch_size
        for b in range(len(self)):
            lo, hi = b * bs, min((b + 1) * bs, self.num_examples)
            if perm is None:
                yield self.x[lo:hi], self.y[lo:hi]
            else:
                idx = perm[lo:hi]
                yield self.x[idx], self.y[idx.to(self.y.device)]

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch": e, "seed": s}``: what is needed to replay the same order after a restart."""
        return {"epoch": self._epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the epoch (and seed) saved by :meth:`state_dict`.

        Raises:
            ConfigError: ``state`` lacks ``"epoch"`` or holds a negative one.
        """
        if "epoch" not in state:
            raise ConfigError(f"TensorLoader state must contain 'epoch', got keys {sorted(state)}")
        self.set_epoch(int(state["epoch"]))
        if "seed" in state:
            self.seed = int(state["seed"])

    def __repr__(self) -> str:
        return (
            f"TensorLoader(n={self.num_examples}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"seed={self.seed}, drop_last={self.drop_last}, epoch={self._epoch})"
        )


class StepLoader:
    """Exactly ``steps`` batches of ``base`` (cycling over its epochs 0, 1, ...), presented as one epoch.

    Why: comparisons need the *same* fine-tuning budget in optimizer steps for every method, whatever
    the dataset size; built afresh from loaders with the same seed, every method sees the same batches.
    ``base`` must have ``set_epoch(e)`` (e.g. :class:`TensorLoader`). ``len()`` is ``steps``.
    """

    def __init__(self, base: Any, steps: int) -> None:
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"StepLoader: steps must be an int >= 1, got {steps!r}")
        self.base = base
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        done, epoch = 0, 0
        while done < self.steps:
            self.base.set_epoch(epoch)
            for batch in self.base:
                yield batch
                done += 1
                if done == self.steps:
                    return
            epoch += 1

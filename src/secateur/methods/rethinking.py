"""Rethinking the value of network pruning (Liu et al. 2019, ICLR): train the pruned architecture
from scratch and compare with fine-tuning the pruned weights.

The paper's two from-scratch budgets (sec. 4, "Training budget"):

- **Scratch-E**: the same number of epochs as used to train the large model.
- **Scratch-B**: the same computation budget: epochs scaled by ``dense MACs / pruned MACs``
  (a smaller model does more epochs for the same compute). The paper caps the factor at 2 when
  the pruned model saves more than 2x the FLOPs (``max_factor``; ``None`` removes the cap).

The procedure is: prune (and, for structured pruning, compact) the trained model; copy it;
:func:`reinitialize` the copy (keeping any element masks, as the paper does for unstructured
pruning); train it for the Scratch-E or Scratch-B budget; fine-tune the pruned weights as the
baseline; compare accuracies at equal budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from secateur.errors import ConfigError
from secateur.masks.element import attach_mask, element_mask, set_mask


@dataclass(frozen=True)
class ScratchBudgets:
    """Training lengths (in epochs, possibly fractional for Scratch-B) for one comparison."""

    scratch_e: float
    scratch_b: float
    factor: float


def scratch_budgets(
    epochs: float, dense_macs: float, pruned_macs: float, max_factor: float | None = 2.0
) -> ScratchBudgets:
    """Scratch-E and Scratch-B budgets of Liu et al. 2019, sec. 4.

    Args:
        epochs: epochs used to train the large (dense) model.
        dense_macs, pruned_macs: MACs of one forward pass of each (e.g. from
            :func:`secateur.analysis.count_macs`; use ``sparse_macs`` for a masked model).
        max_factor: cap of ``dense_macs / pruned_macs`` (2 in the paper); ``None`` for no cap.

    Returns:
        :class:`ScratchBudgets` with ``scratch_e = epochs`` and
        ``scratch_b = epochs * min(dense/pruned, max_factor)``.

    Raises:
        ConfigError: non-positive inputs, or pruned MACs above dense MACs.
    """
    if epochs <= 0 or dense_macs <= 0 or pruned_macs <= 0:
        raise ConfigError(
            f"epochs and MACs must be > 0, got epochs={epochs}, dense={dense_macs}, pruned={pruned_macs}"
        )
    if pruned_macs > dense_macs:
        raise ConfigError(f"pruned MACs {pruned_macs} exceed dense MACs {dense_macs}")
    factor = dense_macs / pruned_macs
    if max_factor is not None:
        factor = min(factor, max_factor)
    return ScratchBudgets(float(epochs), float(epochs) * factor, factor)


def scratch_b_steps(epochs: float, steps_per_epoch: int, budgets: ScratchBudgets) -> int:
    """Scratch-B budget in optimizer steps: ``ceil(budgets.scratch_b * steps_per_epoch)``."""
    if epochs <= 0 or steps_per_epoch < 1:
        raise ConfigError("epochs must be > 0 and steps_per_epoch >= 1")
    return math.ceil(budgets.scratch_b * steps_per_epoch)


@torch.no_grad()
def reinitialize(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Re-initialise every module that has ``reset_parameters`` (in place), keeping element masks.

    Masked parameters are re-drawn by the module's own initialiser, then the mask is applied
    again, so the architecture (and the sparsity pattern) is kept and only the values are new.
    Parameter objects are kept, so an optimizer built on the model stays valid (its state is
    stale: build a new one for from-scratch training). Returns ``model``.

    Raises:
        ConfigError: a masked parameter whose module has no ``reset_parameters``.
    """
    if seed is not None:
        torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        names = [n for n in getattr(module, "parametrizations", {}) if element_mask(module, n) is not None]
        if not callable(reset):
            if names:
                raise ConfigError(
                    f"{type(module).__name__} is masked but has no reset_parameters to re-initialise"
                )
            continue
        masks = {n: element_mask(module, n).mask.clone() for n in names}  # type: ignore[union-attr]
        for n in names:
            parametrize.remove_parametrizations(module, n, leave_parametrized=False)
        reset()
        for n, m in masks.items():
            attach_mask(module, n)
            set_mask(module, m, n)
    return model

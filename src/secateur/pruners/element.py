"""Pruner: the element-wise sparsifier that ties scope, criterion, allocation and schedule.

It follows torch.ao.pruning's split of *what* (scope, criterion, allocation) from *when*
(schedule): call :meth:`Pruner.step` after each optimizer step of your own loop (or pass the
pruner as a callback to :class:`secateur.train.Trainer`) and the schedule decides when masks
change. Masks are parametrizations (see :mod:`secateur.masks`), so pruned weights stay exactly
zero through training; :meth:`Pruner.finalize` bakes them into plain weights.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from secateur._validate import check_model, check_sparsity
from secateur.allocation.element import get_allocation
from secateur.criteria import Criterion, get_criterion
from secateur.errors import ConfigError
from secateur.masks import attach_mask, detach_masks, get_mask, set_mask
from secateur.masks.element import element_mask
from secateur.pruners.base import PrunerBase, check_schedule
from secateur.schedules import Schedule
from secateur.scope import Scope, Target


class Pruner(PrunerBase):
    """Element-wise pruning of the parameters selected by ``scope``.

    Args:
        model: the network; its scoped weights get masks (in place) at construction.
        schedule: a :mod:`secateur.schedules` object, or a float for one-shot pruning at step 0.
        criterion: a registered criterion name ("magnitude", "random", "snip", "grasp", "synflow",
            "taylor", "lamp", ...; see :func:`secateur.criteria.available_criteria`) or an instance.
        allocation: "global" (one threshold over all scoped weights), "layerwise", "uniform",
            "global_capped", "erk", "lamp", or an allocation callable.
        scope: a :class:`Scope`; default: every conv and linear weight.
        data: a batch ``(x, y)`` or an iterable of batches, for data-dependent criteria.
        example_inputs: an input tensor, for criteria that need only a shape (SynFlow).
        criterion_kwargs: extra arguments for the criterion's constructor.

    Raises:
        InvalidModelError: ``model`` is not an ``nn.Module`` (e.g. the string ``"resnet"``) or has
            tensors on the meta device.
        ConfigError / ScopeError: a schedule that is neither a schedule object nor a number (a
            sparsity given as a string is named), bad sparsity, unknown criterion or allocation, a
            pattern that matches nothing or does not compile, non-floating-point weights. Validation
            happens before any mask is attached, so on error the model is untouched.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule | float,
        criterion: str | Criterion = "magnitude",
        allocation: str | Any = "global",
        scope: Scope | None = None,
        *,
        data: Any = None,
        example_inputs: Any = None,
        criterion_kwargs: dict[str, Any] | None = None,
    ) -> None:
        check_model(model)
        schedule = check_schedule(schedule)
        if criterion_kwargs is not None and not isinstance(criterion_kwargs, dict):
            raise ConfigError(
                f"criterion_kwargs must be a dict of keyword arguments, got {type(criterion_kwargs).__name__}"
            )
        self.model = model
        self.schedule = schedule
        context = {"model": model, "data": data, "example_inputs": example_inputs}
        self.criterion = get_criterion(criterion, context, **(criterion_kwargs or {}))
        self.allocate = get_allocation(allocation)
        self.allocation = allocation
        self.scope = scope or Scope()
        self.targets: list[Target] = self.scope.resolve(model)
        self.last_update = None
        self.history = []
        attached = []
        try:
            for t in self.targets:
                fresh = element_mask(t.module, t.param_name) is None
                attach_mask(t.module, t.param_name)
                if fresh:
                    attached.append(t)
        except Exception:
            from torch.nn.utils import parametrize

            for t in attached:
                parametrize.remove_parametrizations(t.module, t.param_name, leave_parametrized=False)
            raise

    # -- masks -------------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """Current boolean keep-masks, ``{"<module path>.weight": mask}``."""
        return {t.name: get_mask(t.module, t.param_name) for t in self.targets}

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> dict[str, torch.Tensor]:
        """Score, allocate and apply masks so that ``sparsity`` of the scoped weights are zero.

        Already-pruned weights stay pruned. Returns the new masks.
        """
        sparsity = check_sparsity(sparsity)
        scores = self.criterion.scores(self.targets)
        masks = self.allocate(scores, sparsity, previous=self.masks())
        for t in self.targets:
            set_mask(t.module, masks[t.name], t.param_name)
        return masks

    def sparsity(self) -> float:
        """Fraction of scoped weights that are masked (0 to 1)."""
        total = pruned = 0
        for m in self.masks().values():
            total += m.numel()
            pruned += int((~m).sum())
        return pruned / max(total, 1)

    def layer_sparsity(self) -> dict[str, float]:
        """Per scoped parameter, the fraction masked."""
        return {n: float((~m).float().mean()) for n, m in self.masks().items()}

    # -- schedule: PrunerBase.step calls prune_to at each scheduled step --------------------------
    def finalize(self) -> nn.Module:
        """Bake masks into plain weights (exact zeros) and drop the parametrizations.

        Warns (``UserWarning``) when the schedule has not finished: a schedule sized for more steps
        than were trained would otherwise bake an intermediate sparsity silently.
        """
        steps = list(getattr(self.schedule, "update_steps", []) or [])
        # reached already (e.g. prune_to called by hand)? Exact counts floor per layer: allow one weight short
        # per masked tensor
        masks = self.masks()
        slack = len(masks) / max(sum(m.numel() for m in masks.values()), 1)
        done = bool(steps) and self.sparsity() >= self.schedule.sparsity_at(max(steps)) - slack
        if steps and not done and (self.last_update is None or self.last_update < max(steps)):
            warnings.warn(
                f"Pruner.finalize(): the schedule has not finished (last mask update at step "
                f"{self.last_update}, schedule ends at step {max(steps)}); baking sparsity "
                f"{self.sparsity():.4f} instead of {self.schedule.sparsity_at(max(steps)):.4f}. "
                "Size the schedule to your number of optimizer steps.",
                stacklevel=2,
            )
        return detach_masks(self.model)

"""Network slimming (Liu et al. 2017, "Learning Efficient Convolutional Networks through Network
Slimming", ICCV, sec. 3.1-3.3).

Training adds ``λ Σ_γ |γ|`` over the BatchNorm scales to the loss (eq. 1) so that unimportant
channels' scales go to zero; its subgradient adds ``λ·sign(γ)`` to every ``∂L/∂γ`` (sec. 3.2): the
training hook :class:`SlimmingPenalty`. Then channels are removed under one *global* threshold on ``|γ|``
(the ``sparsity``-quantile over all channels, sec. 3.3) by the structured driver with the ``"bn_scale"``
criterion (:class:`~secateur.criteria.group.BNScaleCriterion`): :func:`slim`. The slim network is then
fine-tuned.

:func:`prune_scored` (the driver call for a criterion that scores only some groups, such as SCOP's) is
shared by the channel methods of :mod:`secateur.methods`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from secateur.criteria.group import BNScaleCriterion, GroupCriterion
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph
from secateur.pruners.oneshot import prune_channels

__all__ = ["SlimmingPenalty", "prune_scored", "scored_groups", "slim"]


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and getattr(m, "weight", None) is not None
    ]


class SlimmingPenalty:
    """The sparsity penalty ``λ Σ |γ|`` over every affine BatchNorm scale (Liu et al. 2017, eq. 1).

    Liu et al. train with the penalty's subgradient: after backward, ``λ·sign(γ)`` is added to each
    ``∂L/∂γ`` (sec. 3.2; their reference code edits ``γ.grad`` exactly so). Two equivalent ways:

    * own loop, gradient edit (the paper's form)::

          loss.backward(); sp.add_subgradient(); opt.step()

    * own loop, loss term: ``loss = task_loss + sp.penalty()`` (same gradient wherever ``γ ≠ 0``).

    As a :class:`~secateur.train.Trainer` callback it does the first: ``on_after_backward`` calls
    :meth:`add_subgradient` (gradients present, before ``optimizer.step()``). Nothing is registered on
    the model, so nothing is left behind.

    Args:
        model: a network with BatchNorm layers (``affine=True``).
        lam: λ >= 0 (the paper uses 1e-4 to 1e-5 on CIFAR).

    Raises:
        ConfigError: λ < 0 or a model without affine BatchNorm layers.
    """

    def __init__(self, model: nn.Module, lam: float = 1e-4) -> None:
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ConfigError(f"SlimmingPenalty: lam must be a number >= 0, got {lam!r}")
        self.bns = _bn_layers(model)
        if not self.bns:
            raise ConfigError(
                f"SlimmingPenalty: {type(model).__name__} has no BatchNorm layer with a scale γ"
            )
        self.lam = float(lam)

    def penalty(self) -> torch.Tensor:
        """``λ Σ_γ |γ|`` (eq. 1), a scalar with a graph to the scales; add it to your loss."""
        return self.lam * sum(bn.weight.abs().sum() for _, bn in self.bns)

    @torch.no_grad()
    def add_subgradient(self) -> None:
        """Add ``λ·sign(γ)`` to every BatchNorm scale's ``.grad`` (shape ``(C,)``), in place; call after
        ``loss.backward()`` and before ``optimizer.step()`` (sec. 3.2). A scale without a gradient gets
        ``λ·sign(γ)`` alone; frozen scales (``requires_grad=False``) are skipped. Use this or
        :meth:`penalty`, not both."""
        if self.lam == 0.0:
            return
        for _, bn in self.bns:
            w = bn.weight
            if not w.requires_grad:
                continue
            step = self.lam * torch.sign(w.detach())
            if w.grad is None:
                w.grad = step
            else:
                w.grad.add_(step)

    def on_after_backward(self, trainer: Any) -> None:
        """Trainer hook: :meth:`add_subgradient`."""
        self.add_subgradient()


def scored_groups(criterion: GroupCriterion, model: nn.Module) -> Callable[[DependencyGraph], list[int]]:
    """``f(graph) -> indices`` of the prunable groups ``criterion`` scores (``group_scores`` not None), for
    the structured driver's ``groups``."""

    def pick(graph: DependencyGraph) -> list[int]:
        return [
            gi
            for gi, g in enumerate(graph.groups)
            if g.n_prunable > 0 and criterion.group_scores(g, model) is not None
        ]

    return pick


def prune_scored(
    model: nn.Module,
    example_inputs: Any,
    criterion: GroupCriterion,
    sparsity: float,
    allocation: str = "global",
    protect: Sequence[str] = (),
    verify: bool = True,
) -> tuple[nn.Module, dict]:
    """Remove the ``sparsity`` fraction of the channels of the groups ``criterion`` scores, lowest scores
    first, in place: :func:`~secateur.pruners.oneshot.prune_channels` restricted to those groups
    (:func:`scored_groups`) with raw scores (``normalize="none"``).

    Args:
        criterion: a group criterion whose ``group_scores`` is None for the groups it leaves alone.
        sparsity: fraction in [0, 1) of the scored groups' prunable units: ranked over all of them at once
            (``allocation="global"``: one threshold on the raw scores) or of each group (``"uniform"``).
            Every group and every member keeps at least one unit.
        protect: module name patterns never pruned. verify: run the oracle (float64, masked vs compacted)
            inside the transaction (default True).

    Returns ``(model, plan)`` as :func:`~secateur.pruners.oneshot.prune_channels`.

    Raises:
        ConfigError: sparsity outside [0, 1), unknown allocation, no group scored; and as
            :func:`~secateur.pruners.oneshot.prune_channels` (the model is then unchanged).
    """
    return prune_channels(
        model,
        example_inputs,
        sparsity,
        criterion=criterion,
        allocation=allocation,
        normalize="none",
        protect=protect,
        groups=scored_groups(criterion, model),
        verify=verify,
    )


def slim(
    model: nn.Module,
    example_inputs: Any,
    sparsity: float,
    protect: Sequence[str] = (),
    verify: bool = True,
) -> tuple[nn.Module, dict]:
    """Network slimming's pruning step: remove the ``sparsity`` fraction of channels with the smallest
    ``|γ|`` under one global threshold (Liu et al. 2017, sec. 3.3), through the dependency graph.

    Only groups holding a BatchNorm scale are candidates (``"bn_scale"`` with ``missing="skip"``);
    ``sparsity`` is a fraction of those channels. Returns ``(model, plan)``; fine-tune afterwards.

    Raises:
        ConfigError: a model without an affine BatchNorm layer, and as :func:`prune_scored`.
    """
    if not _bn_layers(model):
        raise ConfigError(f"slim: {type(model).__name__} has no BatchNorm layer with a scale γ")
    return prune_scored(
        model, example_inputs, BNScaleCriterion(missing="skip"), sparsity, "global", protect, verify
    )

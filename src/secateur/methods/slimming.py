"""Network slimming (Liu et al. 2017, "Learning Efficient Convolutional Networks through Network
Slimming", ICCV, sec. 3.1-3.3).

Training adds ``λ Σ_γ |γ|`` over the BatchNorm scales to the loss (eq. 1) so that unimportant
channels' scales go to zero; its subgradient adds ``λ·sign(γ)`` to every ``∂L/∂γ`` (sec. 3.2). Then
channels are removed under one *global* threshold on ``|γ|`` (the ``ratio``-quantile over all
channels, sec. 3.3), physically, through the dependency graph (:mod:`secateur.graph`), and the
slim network is fine-tuned.

:func:`prune_groups` (global or per-group ranking of any per-unit score, then one transactional
compaction) is shared by the other channel methods of :mod:`secateur.methods`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.allocation.structured import choose_units, ensure_member_nonempty
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group
from secateur.pruners.oneshot import remove_units

__all__ = ["SlimmingPenalty", "bn_group_scores", "prune_groups", "slim"]

GroupScore = Callable[[Group, nn.Module], "np.ndarray | None"]


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


def _unit_mean(values: np.ndarray, unit_of: np.ndarray, n_units: int) -> np.ndarray:
    s = np.bincount(unit_of, weights=values, minlength=n_units)
    return s / np.maximum(np.bincount(unit_of, minlength=n_units), 1)


def bn_group_scores(group: Group, model: nn.Module) -> np.ndarray | None:
    """Per-unit ``|γ|`` of a group, averaged over its BatchNorm members (residual groups couple
    several); ``None`` when no BatchNorm scale belongs to the group (slimming leaves it alone)."""
    per_bn = []
    for m in group.members:
        if m.is_buffer or m.dim != 0 or not m.name.endswith(".weight"):
            continue
        mod = model.get_submodule(m.module)
        if isinstance(mod, nn.modules.batchnorm._NormBase):
            g = mod.weight.detach().abs().double().cpu().numpy()
            per_bn.append(_unit_mean(g, m.unit_of, group.n_units))
    if not per_bn:
        return None
    return np.mean(per_bn, axis=0)


def prune_groups(
    model: nn.Module,
    example_inputs: Any,
    score_fn: GroupScore,
    ratio: float,
    ranking: str = "global",
    protect: Sequence[str] = (),
    graph: DependencyGraph | None = None,
    verify: bool = False,
) -> tuple[nn.Module, dict]:
    """Remove the lowest-scoring channels through the dependency graph, in place (transactional).

    Args:
        score_fn: ``f(group, model) -> (n_units,) array`` (higher = keep) or ``None`` to skip the group.
        ratio: fraction in [0, 1) of the scored prunable units removed: over all scored groups at once
            (``ranking="global"``, one threshold) or from each group (``"group"``). Every group and every
            member keeps at least one unit, so the realised fraction may be a little lower.
        protect: module name patterns never pruned. verify: run the masked-vs-compacted oracle.

    Returns ``(model, plan)`` as :func:`secateur.pruners.oneshot.prune_channels`.

    Raises:
        ConfigError: ratio outside [0, 1), unknown ranking, a score of the wrong shape (names the group).
        CompactionError: compaction failed; the model is unchanged.
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio must be a fraction in [0, 1), got {ratio!r}")
    if ranking not in ("global", "group"):
        raise ConfigError(f"ranking must be 'global' or 'group', got {ranking!r}")
    if graph is None:
        graph = DependencyGraph.build(model, example_inputs, protect=protect)
    scored: dict[int, np.ndarray] = {}
    for gi, g in enumerate(graph.groups):
        if g.n_prunable == 0:
            continue
        s = score_fn(g, model)
        if s is None:
            continue
        s = np.asarray(s, dtype=float)
        if s.shape != (g.n_units,):
            raise ConfigError(f"score for group {g.name} has shape {s.shape}, expected ({g.n_units},)")
        scored[gi] = s
    removed: dict[int, np.ndarray] = {}
    if ranking == "group":
        for gi, s in scored.items():
            removed[gi] = choose_units(graph.groups[gi], s, ratio)
    else:
        cands = [
            (float(s[u]), gi, int(u))
            for gi, s in scored.items()
            for u in np.nonzero(graph.groups[gi].prunable)[0]
        ]
        k = int(math.floor(ratio * len(cands) + 1e-9))
        cands.sort(key=lambda c: (c[0], c[1], c[2]))
        per: dict[int, list[int]] = {}
        for _, gi, u in cands[:k]:
            per.setdefault(gi, []).append(u)
        for gi, units in per.items():
            g = graph.groups[gi]
            if len(units) >= g.n_units:  # keep the best unit of a group that would vanish
                units = [u for u in units if u != int(np.argmax(scored[gi]))]
            removed[gi] = np.array(sorted(units), dtype=np.int64)
    removed = {
        gi: ensure_member_nonempty(graph.groups[gi], rm, scored[gi]) for gi, rm in removed.items() if rm.size
    }
    removed = {gi: rm for gi, rm in removed.items() if rm.size}
    return remove_units(model, graph, removed, example_inputs, verify=verify)


def slim(
    model: nn.Module,
    example_inputs: Any,
    ratio: float,
    protect: Sequence[str] = (),
    verify: bool = False,
) -> tuple[nn.Module, dict]:
    """Network slimming's pruning step: remove the ``ratio`` fraction of channels with the smallest
    ``|γ|`` under one global threshold (Liu et al. 2017, sec. 3.3), through the dependency graph.

    Only groups holding a BatchNorm scale are candidates; ``ratio`` is a fraction of those channels.
    Returns ``(model, plan)``; fine-tune afterwards. Raises as :func:`prune_groups`.
    """
    if not _bn_layers(model):
        raise ConfigError(f"slim: {type(model).__name__} has no BatchNorm layer with a scale γ")
    return prune_groups(model, example_inputs, bn_group_scores, ratio, "global", protect, verify=verify)

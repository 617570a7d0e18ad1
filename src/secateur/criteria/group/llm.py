"""Group criteria of structured LLM pruning: LLM-Pruner (Ma et al. 2023) and Wanda-sp (An et al. 2024).

Both score a unit by summing a per-weight importance over every weight the unit's removal takes away (for an
attention head: its query/key/value rows and output-projection columns; for an FFN neuron: its gate/up rows
and down-projection column), so they apply to any dependency-graph group, not only to decoder layers.
Registered names:

- ``"llm_pruner"`` (:class:`LLMPrunerTaylor`, ``variant="element1"`` | ``"vector"`` | ``"element2"``):
  LLM-Pruner's Taylor importance of the loss change, from gradients (``needs_data``). Not ``"taylor"``:
  that name is Molchanov et al.'s criterion (:class:`~secateur.criteria.group.gradient.TaylorCriterion`),
  whose unit score is the *squared* summed ``w·g`` averaged over batches, while LLM-Pruner takes ``|·|`` of
  the mean-gradient products, per index (element-wise) or per unit (vector-wise).
- ``"wanda_sp"`` (:class:`WandaStructured`): Wanda's ``|W_ij| · ||X_j||`` summed over the unit's weights,
  from forward activations only (``needs_backward = False``).

Data: the driver's :func:`~secateur.criteria.group.collect` (``ChannelPruner(data=..., loss_fn=...)``) runs
the passes each needs: forward + backward per batch for ``"llm_pruner"`` (per sample for ``element2``,
``per_sample = True``), forward only for ``"wanda_sp"``. For a Hugging Face causal LM,
:func:`secateur.llm.calibration.causal_lm_data` and :func:`secateur.llm.calibration.causal_lm_loss` give the
batches and the next-token loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.criteria.activations import InputStats
from secateur.criteria.group.base import (
    GroupCriterion,
    GroupScores,
    effective_tensor,
    register_group_criterion,
    rows_by_index,
    stored_parameter,
    unit_sum,
)
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group, Member

__all__ = ["TAYLOR_VARIANTS", "LLMPrunerTaylor", "WandaStructured", "linear_out_dim"]

#: LLM-Pruner's importance estimates (Ma et al. 2023, sec. 3.2).
TAYLOR_VARIANTS = ("vector", "element1", "element2")


def linear_out_dim(mod: nn.Module) -> int | None:
    """The weight dimension that indexes outputs of a Linear-like module: 0 for ``nn.Linear``, 1 for
    Hugging Face GPT-2's ``Conv1D`` (weight stored ``(in, out)``); None for anything else (convolutions
    included). The class hierarchy is read, not the name, so a masked (parametrized) module still counts."""
    if isinstance(mod, nn.Linear):
        return 0
    w = getattr(mod, "weight", None)
    is_conv1d = any(c.__name__ == "Conv1D" for c in type(mod).__mro__)
    return 1 if is_conv1d and isinstance(w, torch.Tensor) and w.dim() == 2 else None


class _MemberSumCriterion(GroupCriterion):
    """A data-dependent criterion whose unit score sums, over the group's parameter members, a score per
    index of the member's dim (:meth:`member_scores`). A group none of whose members is scored is left out
    of :meth:`scores` (no statistics reached it: the driver leaves it whole); :meth:`scores` raises until
    statistics exist."""

    needs_data = True

    def member_scores(self, m: Member, model: nn.Module) -> torch.Tensor | None:  # pragma: no cover
        """``(size of m.dim,)`` float64 scores of member ``m`` (a parameter), or None if it is not scored."""
        raise NotImplementedError

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray | None:
        """``(n_units,)`` float64: the sum over members of their per-index scores, by unit; None when no
        member is scored."""
        total, seen = np.zeros(group.n_units), False
        with torch.no_grad():
            for m in group.members:
                per_index = None if m.is_buffer else self.member_scores(m, model)
                if per_index is not None:
                    total += unit_sum(per_index.cpu().numpy(), m, group.n_units)
                    seen = True
        return total if seen else None

    def scores(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> GroupScores:
        if not self.has_stats():
            raise ConfigError(self.missing_stats_message())
        out = {gi: self.group_scores(graph.groups[gi], model) for gi in group_ids}
        return {gi: s for gi, s in out.items() if s is not None}


@register_group_criterion("llm_pruner")
class LLMPrunerTaylor(_MemberSumCriterion):
    """LLM-Pruner's group importance (Ma, Fang & Wang 2023, "LLM-Pruner: On the Structural Pruning of Large
    Language Models", sec. 3.2, eq. 3-5), summed over the group.

    With ``w`` a weight, ``g = ∂L/∂w`` the mean gradient over the backward passes seen by :meth:`accumulate`
    and ``F = mean_n g_n^2`` (the diagonal Fisher approximation of the Hessian the paper uses, from
    per-sample gradients), the importance of one index ``i`` of a member (a row or column slice ``s_i`` of a
    parameter) is

    - ``"vector"`` (vector-wise, eq. 3): ``|Σ_{k∈s_i} w_k g_k|``;
    - ``"element1"`` (element-wise, first order, eq. 5 without the Hessian term): ``Σ_{k∈s_i} |w_k g_k|``;
    - ``"element2"`` (element-wise, second order, eq. 5): ``Σ_{k∈s_i} |w_k g_k - ½ w_k² F_k|``.

    A unit's score is the sum over its indices in every member (the paper's "summation" aggregation): for
    a head, its query/key/value rows and output-projection columns; for an MLP channel its gate and up rows
    and its down-projection column. Scores are ``(n_units,)`` float64, higher = keep; they estimate a loss
    change, so ``comparable = True``. Buffers and parameters without gradient contribute nothing.

    ``element2`` needs per-sample gradients: ``per_sample`` is then True, so the driver's
    :func:`~secateur.criteria.group.collect` runs one sample per backward; in an own loop call
    :meth:`accumulate` after the backward of each single sample.

    Args:
        variant: ``"element1"`` (default, the paper's best on LLaMA-7B), ``"vector"`` or ``"element2"``.

    Raises:
        ConfigError: unknown ``variant``; :meth:`scores` before any gradient was accumulated.
    """

    name = "llm_pruner"
    comparable = True

    def __init__(self, variant: str = "element1") -> None:
        if variant not in TAYLOR_VARIANTS:
            raise ConfigError(f"llm_pruner: variant must be one of {TAYLOR_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.per_sample = variant == "element2"
        self.grad_sum: dict[str, torch.Tensor] = {}
        self.sq_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def accumulate(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> None:
        """Add the gradients now in ``.grad`` of the groups' parameter members (float64) to the sums."""
        names = {m.name for gi in group_ids for m in graph.groups[gi].members if not m.is_buffer}
        with torch.no_grad():
            for name in sorted(names):
                g = stored_parameter(model, name).grad
                if g is None:
                    continue
                g = g.detach().double()
                if name in self.grad_sum:
                    self.grad_sum[name] += g
                    if self.per_sample:
                        self.sq_sum[name] += g * g
                else:
                    self.grad_sum[name] = g.clone()
                    if self.per_sample:
                        self.sq_sum[name] = g * g
                self.count[name] = self.count.get(name, 0) + 1

    def has_stats(self) -> bool:
        return bool(self.count)

    def member_scores(self, m: Member, model: nn.Module) -> torch.Tensor | None:
        if m.name not in self.count:
            return None
        n = self.count[m.name]
        w = effective_tensor(model, m.name).detach().double()
        wg = w * (self.grad_sum[m.name] / n)
        if self.variant == "vector":
            return rows_by_index(wg, m.dim).sum(1).abs()
        if self.variant == "element1":
            return rows_by_index(wg, m.dim).abs().sum(1)
        fisher = self.sq_sum[m.name] / n
        return rows_by_index(wg - 0.5 * w * w * fisher, m.dim).abs().sum(1)

    def after_prune(self) -> None:
        self.grad_sum, self.sq_sum, self.count = {}, {}, {}


@register_group_criterion("wanda_sp")
class WandaStructured(_MemberSumCriterion):
    """Wanda's weight-times-activation score summed over a structured group (Wanda-sp).

    Wanda (Sun et al. 2023, eq. 1) scores a weight ``W_ij`` (output ``i``, input ``j`` of a Linear) by
    ``|W_ij| * ||X_j||_2``, ``X_j`` the ``j``-th input feature over all calibration tokens. The structured
    variant (Wanda-sp, as defined as a baseline by An et al. 2024, "Fluctuation-based Adaptive Structured
    Pruning for Large Language Models", sec. 4) scores a unit by the sum of these over every weight the
    unit's removal takes away: for each Linear-like weight member (``nn.Linear``, GPT-2's ``Conv1D``:
    :func:`linear_out_dim`), the rows ``i`` it owns (output side: ``Σ_j |W_ij| ||X_j||``) or the columns
    ``j`` it owns (input side: ``||X_j|| Σ_i |W_ij|``). Biases, norm scales and convolutions are not scored
    (Wanda scores Linear weights only); a group with no Linear-like weight member gets no score (the driver
    leaves it whole). Scores are ``(n_units,)`` float64, higher = keep.

    :meth:`attach` installs forward hooks that accumulate ``Σ_t x_tj²`` (:class:`InputStats`, float64) for
    every Linear-like module of the groups, and a forward pre-hook on the model that reads the
    ``attention_mask`` keyword input (bool ``(B, S)``) of each call so that padding tokens are left out
    (a call without it counts every token). Only forward passes are needed (``needs_backward = False``:
    the driver's :func:`~secateur.criteria.group.collect` runs them under ``no_grad``). A layer whose input
    width no longer matches its statistics (the model was compacted since) is not recorded.

    Raises:
        ConfigError: :meth:`scores` before any input was seen.
    """

    name = "wanda_sp"
    needs_backward = False

    def __init__(self) -> None:
        self.stats: dict[str, InputStats] = {}
        self.handles: list[Any] = []
        self.token_mask: torch.Tensor | None = None

    def attach(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> None:
        """Hook the Linear-like modules owning weight members of ``group_ids`` (once)."""
        if self.handles:
            return
        paths = sorted(
            {
                m.module
                for gi in group_ids
                for m in graph.groups[gi].members
                if not m.is_buffer and m.name.endswith(".weight")
            }
        )
        for path in paths:
            mod = model.get_submodule(path)
            od = linear_out_dim(mod)
            if od is None or path in self.stats:
                continue
            self.stats[path] = InputStats(mod.weight.shape[1 - od])
            self.handles.append(mod.register_forward_hook(self._hook(path)))
        self.handles.append(model.register_forward_pre_hook(self._read_mask, with_kwargs=True))

    def _read_mask(self, _mod: nn.Module, _args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self.token_mask = mask.bool() if isinstance(mask, torch.Tensor) else None

    def _hook(self, path: str) -> Callable:
        def hook(_mod: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0]
            if x.shape[-1] == self.stats[path].in_features:
                self.stats[path].add(x.detach(), self.token_mask)

        return hook

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def has_stats(self) -> bool:
        return any(s.n_tokens for s in self.stats.values())

    def missing_stats_message(self) -> str:
        return (
            "criterion 'wanda_sp' needs activations: run forward passes through the model after attach() "
            "(pass data= batches to the pruner)"
        )

    def member_scores(self, m: Member, model: nn.Module) -> torch.Tensor | None:
        if m.module not in self.stats or not m.name.endswith(".weight"):
            return None
        od = linear_out_dim(model.get_submodule(m.module))
        if od is None:
            return None
        w = effective_tensor(model, m.name).detach().double().abs()
        w = w if od == 0 else w.T  # (out, in)
        s = w * self.stats[m.module].sq_sum.sqrt().to(w.device).unsqueeze(0)
        return s.sum(1) if m.dim == od else s.sum(0)

    def after_prune(self) -> None:
        for s in self.stats.values():
            s.n_tokens = 0
            s.sq_sum.zero_()

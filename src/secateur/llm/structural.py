"""Structural pruning of decoder LLMs: attention heads and MLP channels physically removed (LLM-Pruner).

LLM-Pruner (Ma, Fang & Wang 2023, "LLM-Pruner: On the Structural Pruning of Large Language Models") finds
the coupled structures of each decoder layer (an attention head: its query/key/value rows and its
output-projection columns; an MLP channel: a gate/up row and a down-projection column), scores each group
by a first-order Taylor estimate of the loss change on a few calibration texts, removes the same fraction
of every group inside a range of layers (the first and last layers are kept: they matter most) and
fine-tunes briefly (LoRA in the paper; not done here).

Here every step is an existing piece of secateur:

- **groups**: :class:`secateur.graph.DependencyGraph` traced from one forward pass. Under grouped-query
  attention (GQA) the coupled unit is one key/value head with the query heads that read it, so removing
  a unit removes ``num_attention_heads / num_key_value_heads`` query heads and one KV head together.
- **criteria**: :class:`LLMPrunerTaylor` (the paper's eq. 3-5) and :class:`WandaStructured` (Wanda's
  ``|W| * ||X||`` summed over a group) are :class:`~secateur.criteria.group.GroupCriterion` pieces;
  ``"random"`` is :class:`~secateur.criteria.group.RandomCriterion`.
- **allocation**: per layer uniform, :func:`secateur.allocation.structured.choose_units` in each group.
- **surgery**: :func:`secateur.pruners.oneshot.remove_units` (plan, masks, transactional compaction, float64
  oracle), which also updates the Hugging Face config where every layer agrees on the new size.

When only a range of layers is pruned the layers no longer share one head count / FFN width, which a
Hugging Face config cannot express (``from_pretrained`` of ``config.json`` alone would build the dense
shapes); the plan records the per-layer sizes, so save with :func:`secateur.save_pretrained` (reloaded by
:func:`secateur.from_pretrained`) or :func:`secateur.save` / :func:`secateur.load`. Pruning every layer alike
gives a config that plain ``transformers`` ``from_pretrained`` reloads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.allocation.structured import choose_units, ensure_member_nonempty
from secateur.criteria.group import (
    GroupCriterion,
    GroupScores,
    RandomCriterion,
    effective_tensor,
    stored_parameter,
)
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group, Member
from secateur.llm.calibration import InputStats
from secateur.llm.oneshot import find_blocks, is_linear_like
from secateur.pruners.oneshot import remove_units

CRITERIA = ("taylor", "wanda", "random")
TAYLOR_VARIANTS = ("vector", "element1", "element2")
KINDS = ("heads", "mlp")

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]

__all__ = [
    "CRITERIA",
    "KINDS",
    "TAYLOR_VARIANTS",
    "LLMPrunerTaylor",
    "WandaStructured",
    "calibration_batches",
    "causal_lm_loss",
    "decoder_groups",
    "prune_decoder",
    "structural_scores",
]


# ----------------------------------------------------------------------------------------------------
# calibration data
# ----------------------------------------------------------------------------------------------------
def calibration_batches(calibration: Any) -> list[Batch]:
    """Normalise calibration data to a list of ``{"input_ids": (B, S) long, "attention_mask": (B, S)}``.

    Accepts a token-id tensor ``(B, S)`` or ``(S,)``, one tokeniser output (a mapping with
    ``input_ids``), or an iterable of either (e.g. :func:`secateur.llm.tokenized_batches`). A missing
    ``attention_mask`` means every token is real.

    Raises:
        ConfigError: no batch, a batch without ``input_ids``, or ids that are not an integer tensor.
    """
    if isinstance(calibration, (torch.Tensor, Mapping)):
        calibration = [calibration]
    out: list[Batch] = []
    for i, b in enumerate(calibration):
        if isinstance(b, torch.Tensor):
            b = {"input_ids": b}
        if not isinstance(b, Mapping) or "input_ids" not in b:
            raise ConfigError(
                f"calibration batch {i}: expected a token-id tensor or a mapping with input_ids"
            )
        ids = b["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() not in (1, 2):
            raise ConfigError(f"calibration batch {i}: input_ids must be an integer tensor (B, S) or (S,)")
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        mask = b.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.reshape(ids.shape)
        out.append({"input_ids": ids, "attention_mask": mask})
    if not out:
        raise ConfigError("no calibration batch given")
    return out


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy of a Hugging Face causal LM on ``batch`` (padding ignored), a scalar.

    Labels are the input ids with padded positions set to -100; the model shifts them itself.

    Raises:
        ConfigError: the model returned no ``loss`` (pass ``loss_fn=``).
    """
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels, use_cache=False)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ConfigError(
            f"{type(model).__name__} returned no loss for labels=; use a *ForCausalLM model or pass loss_fn"
        )
    return loss


# ----------------------------------------------------------------------------------------------------
# criteria
# ----------------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as ``(t.shape[dim], -1)`` float64: one row per index of ``dim``."""
    return t.detach().double().movedim(dim, 0).reshape(t.shape[dim], -1)


def _unit_sum(per_index: torch.Tensor, m: Member, n_units: int) -> np.ndarray:
    return np.bincount(m.unit_of, weights=per_index.cpu().numpy(), minlength=n_units)


class _MemberSumCriterion(GroupCriterion):
    """A data-dependent criterion whose unit score sums, over the group's parameter members, a score per
    index of the member's dim (:meth:`member_scores`); :meth:`scores` raises until statistics exist."""

    needs_data = True

    def member_scores(self, m: Member, model: nn.Module) -> torch.Tensor | None:  # pragma: no cover
        """``(size of m.dim,)`` scores of member ``m`` (a parameter), or None when it is not scored."""
        raise NotImplementedError

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray:
        total = np.zeros(group.n_units)
        with torch.no_grad():
            for m in group.members:
                per_index = None if m.is_buffer else self.member_scores(m, model)
                if per_index is not None:
                    total += _unit_sum(per_index, m, group.n_units)
        return total

    def scores(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> GroupScores:
        if not self.has_stats():
            raise ConfigError(self.missing_stats_message())
        return super().scores(model, graph, group_ids)


class LLMPrunerTaylor(_MemberSumCriterion):
    """LLM-Pruner's group importance (Ma et al. 2023, sec. 3.2, eq. 3-5), summed over the group.

    With ``w`` a weight, ``g = ∂L/∂w`` the mean gradient over the calibration batches seen by
    :meth:`accumulate` and ``F = mean_n g_n^2`` (the diagonal Fisher approximation of the Hessian the paper
    uses, from per-sample gradients), the importance of one index ``i`` of a member (a row or column
    slice ``s_i`` of a parameter) is

    - ``"vector"`` (vector-wise, eq. 3): ``|Σ_{k∈s_i} w_k g_k|``;
    - ``"element1"`` (element-wise, first order, eq. 5 without the Hessian term): ``Σ_{k∈s_i} |w_k g_k|``;
    - ``"element2"`` (element-wise, second order, eq. 5): ``Σ_{k∈s_i} |w_k g_k - ½ w_k² F_k|``.

    A unit's score is the sum over its indices in every member (the paper's "summation" aggregation):
    for a head, its query/key/value rows and output-projection columns; for an MLP channel its gate and
    up rows and its down-projection column. Scores are ``(n_units,)`` float64, higher = keep.

    ``element2`` needs per-sample gradients: call :meth:`accumulate` after the backward of each single
    sequence (:func:`structural_scores` does). Buffers and parameters without gradient contribute nothing.

    Raises:
        ConfigError: unknown ``variant``; :meth:`scores` before any gradient was accumulated.
    """

    name = "llm_pruner_taylor"
    comparable = True

    def __init__(self, variant: str = "element1") -> None:
        if variant not in TAYLOR_VARIANTS:
            raise ConfigError(f"taylor variant must be one of {TAYLOR_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.grad_sum: dict[str, torch.Tensor] = {}
        self.sq_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def accumulate(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> None:
        names = {m.name for gi in group_ids for m in graph.groups[gi].members if not m.is_buffer}
        with torch.no_grad():
            for name in sorted(names):
                g = stored_parameter(model, name).grad
                if g is None:
                    continue
                g = g.detach().double()
                if name in self.grad_sum:
                    self.grad_sum[name] += g
                    if self.variant == "element2":
                        self.sq_sum[name] += g * g
                else:
                    self.grad_sum[name] = g.clone()
                    if self.variant == "element2":
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
            return _rows(wg, m.dim).sum(1).abs()
        if self.variant == "element1":
            return _rows(wg, m.dim).abs().sum(1)
        fisher = self.sq_sum[m.name] / n
        return _rows(wg - 0.5 * w * w * fisher, m.dim).abs().sum(1)

    def after_prune(self) -> None:
        self.grad_sum, self.sq_sum, self.count = {}, {}, {}


def _out_dim(mod: nn.Module) -> int:
    """Dimension of a Linear-like weight that indexes outputs: 0 for nn.Linear, 1 for GPT-2's Conv1D."""
    return 0 if isinstance(mod, nn.Linear) else 1


class WandaStructured(_MemberSumCriterion):
    """Wanda's weight-times-activation score summed over a structured group (Wanda-sp).

    Wanda (Sun et al. 2023, eq. 1) scores a weight ``W_ij`` (output ``i``, input ``j`` of a Linear) by
    ``|W_ij| * ||X_j||_2``, ``X_j`` the ``j``-th input feature over all calibration tokens. The structured
    variant (Wanda-sp, as defined as a baseline by An et al. 2024, "Fluctuation-based Adaptive Structured
    Pruning for Large Language Models", sec. 4) scores a channel group by the sum of these over every
    weight the group removes: for each Linear weight member, the rows ``i`` it owns (output side:
    ``Σ_j |W_ij| ||X_j||``) or the columns ``j`` it owns (input side: ``||X_j|| Σ_i |W_ij|``). Biases and
    norm scales are not scored (Wanda scores weights only). Scores are ``(n_units,)`` float64.

    :meth:`attach` installs forward hooks that accumulate ``Σ_t x_tj²`` with
    :class:`~secateur.llm.calibration.InputStats` for every Linear of the groups; set ``token_mask``
    (bool ``(B, S)``) before each forward to leave padding out.

    Raises:
        ConfigError: :meth:`scores` before any input was seen.
    """

    name = "wanda_sp"

    def __init__(self) -> None:
        self.stats: dict[str, InputStats] = {}
        self.handles: list[Any] = []
        self.token_mask: torch.Tensor | None = None

    def attach(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> None:
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
            if not is_linear_like(mod) or path in self.stats:
                continue
            in_features = mod.weight.shape[1 - _out_dim(mod)]
            self.stats[path] = InputStats(in_features)
            self.handles.append(mod.register_forward_hook(self._hook(path)))

    def _hook(self, path: str) -> Callable:
        def hook(_mod: nn.Module, args: tuple, _out: Any) -> None:
            self.stats[path].add(args[0].detach(), self.token_mask)

        return hook

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def has_stats(self) -> bool:
        return any(s.n_tokens for s in self.stats.values())

    def missing_stats_message(self) -> str:
        return "criterion 'wanda' needs activations: run forward passes on calibration text after attach()"

    def member_scores(self, m: Member, model: nn.Module) -> torch.Tensor | None:
        if m.module not in self.stats or not m.name.endswith(".weight"):
            return None
        od = _out_dim(model.get_submodule(m.module))
        w = effective_tensor(model, m.name).detach().double().abs()
        w = w if od == 0 else w.T  # (out, in)
        s = w * self.stats[m.module].sq_sum.sqrt().to(w.device).unsqueeze(0)
        return s.sum(1) if m.dim == od else s.sum(0)

    def after_prune(self) -> None:
        for s in self.stats.values():
            s.n_tokens = 0
            s.sq_sum.zero_()


# ----------------------------------------------------------------------------------------------------
# groups of the decoder layers
# ----------------------------------------------------------------------------------------------------
def _head_classes(graph: DependencyGraph) -> np.ndarray:
    parts = [ev.classes for ev in graph.splits if ev.kind == "heads" and ev.classes is not None]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def _check_what(what: Sequence[str]) -> None:
    bad = [w for w in what if w not in KINDS]
    if bad or not what or isinstance(what, str):
        raise ConfigError(f"what must be a non-empty subset of {KINDS}, got {what!r}")


def decoder_groups(
    model: nn.Module,
    graph: DependencyGraph,
    layers: Iterable[int] | None = None,
    what: Sequence[str] = KINDS,
    blocks: str | None = None,
) -> dict[int, tuple[int, str]]:
    """``{group index: (layer index, "heads" | "mlp")}`` for the prunable groups of the selected layers.

    A group belongs to layer ``i`` when every member lives under ``<blocks>.<i>.`` (groups spanning
    layers, like the residual stream, never do). It is ``"heads"`` when its channels were split into
    attention heads during the trace (one unit = one head, or one KV head with its query heads under
    GQA), ``"mlp"`` when its units are single channels (FFN neurons).

    Args:
        layers: layer indices (default: all but the first and the last, as LLM-Pruner keeps them).
        what: which kinds to return.
        blocks: attribute path of the layers' ``ModuleList`` (default: found by
            :func:`secateur.llm.find_blocks`).

    Raises:
        ConfigError: unknown kind, a layer index out of range, no layers, or no blocks found.
    """
    _check_what(what)
    path, mods = find_blocks(model, blocks)
    n = len(mods)
    chosen = list(range(1, n - 1)) if layers is None else [int(i) for i in layers]
    if not chosen:
        raise ConfigError(f"no layers to prune among {n} (by default the first and last are kept)")
    out_of_range = [i for i in chosen if not 0 <= i < n]
    if out_of_range:
        raise ConfigError(f"layers {out_of_range} out of range: {type(model).__name__} has {n} layers")
    chosen_set = set(chosen)
    pat = re.compile(re.escape(path) + r"\.(\d+)(\.|$)")
    heads = _head_classes(graph)
    out: dict[int, tuple[int, str]] = {}
    for gi, g in enumerate(graph.groups):
        if g.n_prunable == 0:
            continue
        idx = {int(mt.group(1)) if (mt := pat.match(m.module)) else -1 for m in g.members}
        if len(idx) != 1 or (layer := idx.pop()) not in chosen_set:
            continue
        if heads.size and np.isin(g.classes, heads).any():
            kind = "heads"
        elif g.unit_size == 1:
            kind = "mlp"
        else:
            continue
        if kind in what:
            out[gi] = (layer, kind)
    return out


# ----------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------
def _example_inputs(batches: list[Batch]) -> dict[str, Any]:
    b = batches[0]
    return {"input_ids": b["input_ids"][:2], "attention_mask": b["attention_mask"][:2], "use_cache": False}


def _make_criterion(criterion: str | GroupCriterion, taylor: str, seed: int) -> GroupCriterion:
    if isinstance(criterion, GroupCriterion):
        return criterion
    if criterion == "taylor":
        return LLMPrunerTaylor(taylor)
    if criterion == "wanda":
        return WandaStructured()
    if criterion == "random":
        return RandomCriterion(seed)
    raise ConfigError(f"unknown criterion {criterion!r}: use one of {CRITERIA} or a GroupCriterion")


def _run_taylor(
    model: nn.Module,
    crit: GroupCriterion,
    graph: DependencyGraph,
    gids: list[int],
    batches: list[Batch],
    loss_fn: LossFn,
    per_sample: bool,
) -> None:
    params = list(model.parameters())
    saved = [(p.grad, p.requires_grad) for p in params]
    crit.attach(model, graph, gids)
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for b in batches:
                parts = (
                    [{k: v[i : i + 1] for k, v in b.items()} for i in range(b["input_ids"].shape[0])]
                    if per_sample
                    else [b]
                )
                for part in parts:
                    for p in params:
                        p.grad = None
                    loss_fn(model, part).backward()
                    crit.accumulate(model, graph, gids)
    finally:
        crit.detach()
        for p, (g, rg) in zip(params, saved):
            p.grad = g
            p.requires_grad_(rg)


def _run_forward(
    model: nn.Module, crit: GroupCriterion, graph: DependencyGraph, gids: list[int], batches: list[Batch]
) -> None:
    crit.attach(model, graph, gids)
    try:
        with torch.no_grad():
            for b in batches:
                crit.token_mask = b["attention_mask"].bool()  # type: ignore[attr-defined]
                model(**b, use_cache=False)
    finally:
        crit.detach()


def structural_scores(
    model: nn.Module,
    calibration: Any,
    criterion: str | GroupCriterion = "taylor",
    layers: Iterable[int] | None = None,
    what: Sequence[str] = KINDS,
    taylor: str = "element1",
    graph: DependencyGraph | None = None,
    loss_fn: LossFn | None = None,
    blocks: str | None = None,
    seed: int = 0,
) -> tuple[DependencyGraph, dict[int, tuple[int, str]], GroupScores]:
    """Score the heads and MLP channels of the selected decoder layers on calibration text.

    Runs the calibration batches through ``model`` (eval mode; forward + backward of ``loss_fn`` for
    ``"taylor"``, one sequence at a time for ``taylor="element2"``; forward only for ``"wanda"``). The
    model's weights, ``.grad`` fields, ``requires_grad`` flags and train/eval mode are left as they were.

    Args:
        calibration: see :func:`calibration_batches`.
        criterion: ``"taylor"`` (:class:`LLMPrunerTaylor`), ``"wanda"`` (:class:`WandaStructured`),
            ``"random"`` or a :class:`~secateur.criteria.group.GroupCriterion`.
        taylor: the Taylor variant, ``"vector"``, ``"element1"`` or ``"element2"``.
        graph: a graph already traced on this model (default: traced on the first calibration batch).
        loss_fn: ``loss_fn(model, batch) -> scalar`` (default :func:`causal_lm_loss`).
        layers, what, blocks: as :func:`decoder_groups`.

    Returns:
        ``(graph, selection, scores)``: ``selection`` as :func:`decoder_groups`, ``scores`` maps each
        selected group index to ``(n_units,)`` float64 scores (higher = keep).

    Raises:
        ConfigError: bad arguments, or no prunable head/MLP group in the selected layers.
        UnsupportedOpError / GraphError: from tracing.
    """
    batches = calibration_batches(calibration)
    crit = _make_criterion(criterion, taylor, seed)
    if graph is None:
        graph = DependencyGraph.build(model, _example_inputs(batches))
    selection = decoder_groups(model, graph, layers, what, blocks)
    if not selection:
        raise ConfigError(
            f"no prunable {'/'.join(what)} group in the selected layers of {type(model).__name__}"
        )
    gids = sorted(selection)
    was_training = model.training
    model.eval()
    try:
        if crit.needs_data and isinstance(crit, WandaStructured):
            _run_forward(model, crit, graph, gids, batches)
        elif crit.needs_data:
            per_sample = isinstance(crit, LLMPrunerTaylor) and crit.variant == "element2"
            _run_taylor(model, crit, graph, gids, batches, loss_fn or causal_lm_loss, per_sample)
        scores = crit.scores(model, graph, gids)
    finally:
        model.train(was_training)
    return graph, selection, scores


def _ratios(ratio: float | Mapping[str, float], what: Sequence[str]) -> dict[str, float]:
    r = dict(ratio) if isinstance(ratio, Mapping) else {k: ratio for k in what}
    for k, v in r.items():
        if k not in KINDS:
            raise ConfigError(f"ratio given for unknown kind {k!r}; kinds are {KINDS}")
        if not (isinstance(v, (int, float)) and 0.0 <= float(v) < 1.0 and math.isfinite(v)):
            raise ConfigError(f"ratio for {k} must be a fraction in [0, 1), got {v!r}")
    return {k: float(r.get(k, 0.0)) for k in what}


def prune_decoder(
    model: nn.Module,
    calibration: Any,
    ratio: float | Mapping[str, float] = 0.2,
    layers: Iterable[int] | None = None,
    criterion: str | GroupCriterion = "taylor",
    what: Sequence[str] = KINDS,
    taylor: str = "element1",
    round_to: int = 1,
    seed: int = 0,
    verify: bool = True,
    loss_fn: LossFn | None = None,
    blocks: str | None = None,
) -> tuple[nn.Module, dict]:
    """LLM-Pruner-style structural pruning of a decoder LLM: heads and MLP channels physically removed.

    In each selected layer, ``floor(ratio * n)`` of the ``n`` units of the attention-head group and of
    the MLP-channel group are removed (the lowest scores; LLM-Pruner's per-layer uniform ratio, Ma et al.
    2023, sec. 3.3), at least one unit is kept, then the model is compacted in place. Under GQA a head unit
    is one KV head with its ``num_attention_heads / num_key_value_heads`` query heads, so ``ratio`` counts
    KV heads (e.g. 4 KV heads at ratio 0.3 lose 1).

    Args:
        model: a Hugging Face decoder (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
            ``GPT2LMHeadModel``...) or any model whose layers sit in a ``ModuleList`` (``blocks``).
        calibration: a few tokenised texts (:func:`calibration_batches`; LLM-Pruner uses 10 sequences).
        ratio: fraction of units removed per group, in [0, 1); or ``{"heads": r1, "mlp": r2}``.
        layers: indices of the layers to prune (default: all but the first and last).
        criterion: ``"taylor"``, ``"wanda"``, ``"random"`` or a GroupCriterion (:func:`structural_scores`).
        what: ``("heads", "mlp")`` or one of them.
        taylor: ``"element1"`` (default, the paper's best on LLaMA-7B), ``"vector"`` or ``"element2"``.
        round_to: kept MLP channel counts are multiples of this (heads are never rounded).
        verify: run the float64 oracle (masked copy vs compacted model on the first calibration
            sequences, :func:`secateur.compact.check_equivalence`: finite, within 1e-6 × each output's
            magnitude) inside the compaction transaction.
        loss_fn: loss for the Taylor criterion (default :func:`causal_lm_loss`).

    Returns:
        ``(model, plan)``; ``plan`` is the JSON plan of :func:`secateur.compact.make_plan` (per-tensor kept
        indices, module attributes, config changes). ``model.config`` is updated where every layer agrees
        (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``, ``head_dim``); otherwise
        the plan lists ``_inconsistent_<key>`` and the model must be saved with its plan
        (:func:`secateur.save_pretrained` or :func:`secateur.save`).

    Raises:
        ConfigError: bad ratio, criterion, variant, layers or kinds (the model is untouched).
        CompactionError: compaction or the oracle failed; the model is restored as it was.

    Transactional: scoring leaves weights, ``.grad`` fields, ``requires_grad`` and mode as they were (in
    ``finally``), and the compaction (:func:`secateur.pruners.oneshot.remove_units`) restores the model
    bit-identical on any exception or ``KeyboardInterrupt``, which is then re-raised.
    """
    _check_what(what)
    ratios = _ratios(ratio, what)
    if not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to must be a positive int, got {round_to!r}")
    batches = calibration_batches(calibration)
    graph, selection, scores = structural_scores(
        model, batches, criterion, layers, what, taylor, loss_fn=loss_fn, blocks=blocks, seed=seed
    )
    removed: dict[int, np.ndarray] = {}
    for gi, (_layer, kind) in selection.items():
        g = graph.groups[gi]
        s = np.asarray(scores[gi], dtype=float)
        rm = choose_units(g, s, ratios[kind], round_to if kind == "mlp" else 1)
        rm = ensure_member_nonempty(g, rm, s)
        if rm.size:
            removed[gi] = rm
    return remove_units(model, graph, removed, _example_inputs(batches), verify=verify)

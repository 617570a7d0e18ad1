"""Structural pruning of decoder LLMs: attention heads and MLP channels physically removed (LLM-Pruner).

LLM-Pruner (Ma, Fang & Wang 2023, "LLM-Pruner: On the Structural Pruning of Large Language Models") finds
the coupled structures of each decoder layer (an attention head: its query/key/value rows and its
output-projection columns; an MLP channel: a gate/up row and a down-projection column), scores each group
by a first-order Taylor estimate of the loss change on a few calibration texts, removes the same fraction
of every group inside a range of layers (the first and last layers are kept: they matter most) and
fine-tunes briefly (LoRA in the paper; not done here).

:func:`prune_decoder` is a thin call of the one structured driver,
:class:`secateur.pruners.channel.ChannelPruner`:

- **groups**: its :class:`secateur.graph.DependencyGraph`, restricted by a group filter
  (:func:`decoder_layer_groups`: the head and MLP groups of the chosen layers). Under grouped-query
  attention (GQA) the coupled unit is one key/value head with the query heads that read it, so removing
  a unit removes ``num_attention_heads / num_key_value_heads`` query heads and one KV head together.
- **criteria**: any registered group criterion (:data:`secateur.criteria.group.GROUP_CRITERIA`); the LLM
  ones are ``"llm_pruner"`` (:class:`~secateur.criteria.group.llm.LLMPrunerTaylor`, the paper's eq. 3-5) and
  ``"wanda_sp"`` (:class:`~secateur.criteria.group.llm.WandaStructured`), fed by the driver's data
  collection (:func:`secateur.criteria.group.collect`) on :func:`~secateur.llm.calibration.causal_lm_data`
  batches with :func:`~secateur.llm.calibration.causal_lm_loss`.
- **allocation**: the driver's ``"uniform"`` allocation of ``"channels"`` (:meth:`ChannelPruner.select`):
  the same fraction of every group; one selection per distinct (sparsity, round_to) of the kinds.
- **surgery**: :func:`secateur.pruners.oneshot.remove_units` (plan, masks, transactional compaction, float64
  oracle), which also updates the Hugging Face config where every layer agrees on the new size.

When only a range of layers is pruned the layers no longer share one head count / FFN width, which a
Hugging Face config cannot express (``from_pretrained`` of ``config.json`` alone would build the dense
shapes); the plan records the per-layer sizes, so save with :func:`secateur.save_pretrained` (reloaded by
:func:`secateur.from_pretrained`) or :func:`secateur.save` / :func:`secateur.load`. Pruning every layer alike
gives a config that plain ``transformers`` ``from_pretrained`` reloads.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur._torch import eval_mode
from secateur._validate import check_round_to, check_sparsity
from secateur.criteria.group import GroupCriterion, GroupScores, head_group_ids
from secateur.criteria.group.llm import LLMPrunerTaylor, WandaStructured
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group
from secateur.llm.calibration import Batch, calibration_batches, causal_lm_data, causal_lm_loss
from secateur.llm.oneshot import find_blocks
from secateur.pruners.channel import ChannelPruner
from secateur.pruners.oneshot import remove_units

KINDS = ("heads", "mlp")

Criterion = str | GroupCriterion | Callable[[Group, nn.Module], Any]
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]

__all__ = [
    "KINDS",
    "Batch",
    "LLMPrunerTaylor",
    "WandaStructured",
    "calibration_batches",
    "causal_lm_data",
    "causal_lm_loss",
    "decoder_groups",
    "decoder_layer_groups",
    "prune_decoder",
    "structural_scores",
]


# ----------------------------------------------------------------------------------------------------
# groups of the decoder layers
# ----------------------------------------------------------------------------------------------------
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
    attention heads during the trace (:func:`secateur.criteria.group.head_group_ids`: one unit = one head,
    or one KV head with its query heads under GQA), ``"mlp"`` when its units are single channels (FFN
    neurons).

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
    heads = set(head_group_ids(graph))
    out: dict[int, tuple[int, str]] = {}
    for gi, g in enumerate(graph.groups):
        if g.n_prunable == 0:
            continue
        idx = {int(mt.group(1)) if (mt := pat.match(m.module)) else -1 for m in g.members}
        if len(idx) != 1 or (layer := idx.pop()) not in chosen_set:
            continue
        if gi in heads:
            kind = "heads"
        elif g.unit_size == 1:
            kind = "mlp"
        else:
            continue
        if kind in what:
            out[gi] = (layer, kind)
    return out


def decoder_layer_groups(
    layers: Iterable[int] | None = None, what: Sequence[str] = KINDS, blocks: str | None = None
) -> Callable[[DependencyGraph], list[int]]:
    """A group filter for the structured driver (``ChannelPruner(groups=...)``): ``f(graph)`` returns the
    sorted indices of :func:`decoder_groups` of ``graph.model`` (the head and/or MLP groups of ``layers``).

    E.g. ``ChannelPruner(model, x, schedule=0.3, criterion="llm_pruner", groups=decoder_layer_groups(),
    allocation="global", target="macs", data=causal_lm_data(texts), loss_fn=causal_lm_loss)`` ranks the
    heads and neurons of the inner layers globally under a MAC target.

    Raises (when called):
        ConfigError: as :func:`decoder_groups`.
    """
    _check_what(what)
    chosen = None if layers is None else list(layers)

    def groups(graph: DependencyGraph) -> list[int]:
        return sorted(decoder_groups(graph.model, graph, chosen, what, blocks))

    return groups


# ----------------------------------------------------------------------------------------------------
# scoring and selection through the driver
# ----------------------------------------------------------------------------------------------------
def _example_inputs(batches: list[Batch]) -> dict[str, Any]:
    b = batches[0]
    return {"input_ids": b["input_ids"][:2], "attention_mask": b["attention_mask"][:2], "use_cache": False}


@contextlib.contextmanager
def _scoring_state(model: nn.Module) -> Iterator[None]:
    """Eval mode (:func:`secateur._torch.eval_mode`) and ``requires_grad`` on every parameter while scoring
    (gradients reach frozen weights too); each module's mode and each parameter's flag are put back
    afterwards, whatever happens."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        try:
            for p, _ in flags:
                p.requires_grad_(True)
            yield
        finally:
            for p, rg in flags:
                p.requires_grad_(rg)


def structural_scores(
    model: nn.Module,
    data: Any,
    criterion: Criterion = "llm_pruner",
    layers: Iterable[int] | None = None,
    what: Sequence[str] = KINDS,
    criterion_kwargs: Mapping[str, Any] | None = None,
    graph: DependencyGraph | None = None,
    loss_fn: LossFn | None = None,
    blocks: str | None = None,
    seed: int = 0,
) -> tuple[DependencyGraph, dict[int, tuple[int, str]], GroupScores]:
    """Score the heads and MLP channels of the selected decoder layers on calibration text, through the
    driver (:meth:`ChannelPruner.scores`, which collects the criterion's statistics with
    :func:`secateur.criteria.group.collect`).

    The model runs in eval mode on :func:`~secateur.llm.calibration.causal_lm_data` batches: forward and
    backward of ``loss_fn`` for gradient criteria (one sequence at a time for ``llm_pruner`` variant
    ``"element2"``), forward only for ``"wanda_sp"``. The model's weights, ``.grad`` fields,
    ``requires_grad`` flags and train/eval modes are left as they were.

    Args:
        data: calibration text, see :func:`~secateur.llm.calibration.calibration_batches`.
        criterion: a registered group criterion name (``"llm_pruner"``, ``"wanda_sp"``, ``"random"``,
            ``"taylor"``, ...), a :class:`~secateur.criteria.group.GroupCriterion` or ``f(group, model)``.
        criterion_kwargs: its constructor arguments (``{"variant": "vector"}`` for ``"llm_pruner"``).
        graph: a graph already traced on this model (default: traced on the first two sequences).
        loss_fn: ``loss_fn(output, labels) -> scalar`` (default
            :func:`~secateur.llm.calibration.causal_lm_loss`, the model's own next-token loss).
        layers, what, blocks: as :func:`decoder_groups`. seed: for ``"random"``.

    Returns:
        ``(graph, selection, scores)``: ``selection`` as :func:`decoder_groups`, ``scores`` maps each
        scored group index to ``(n_units,)`` float64 scores (higher = keep).

    Raises:
        ConfigError: bad arguments (unknown criterion or variant, layers, kinds), or no prunable head/MLP
            group in the selected layers.
        UnsupportedOpError / GraphError: from tracing.
    """
    batches = calibration_batches(data)
    if graph is None:
        graph = DependencyGraph.build(model, _example_inputs(batches))
    selection = decoder_groups(model, graph, layers, what, blocks)
    if not selection:
        raise ConfigError(
            f"no prunable {'/'.join(what)} group in the selected layers of {type(model).__name__}"
        )
    scorer = ChannelPruner(
        model,
        _example_inputs(batches),
        schedule=0.0,
        criterion=criterion,
        criterion_kwargs=dict(criterion_kwargs or {}),
        allocation="uniform",
        graph=graph,
        groups=sorted(selection),
        data=causal_lm_data(batches),
        loss_fn=loss_fn or causal_lm_loss,
        seed=seed,
    )
    try:
        with _scoring_state(model):
            scores = scorer.scores()
    finally:
        scorer.close()
    return graph, selection, scores


def _sparsities(sparsity: float | Mapping[str, float], what: Sequence[str]) -> dict[str, float]:
    r = dict(sparsity) if isinstance(sparsity, Mapping) else {k: sparsity for k in what}
    for k, v in r.items():
        if k not in KINDS:
            raise ConfigError(f"sparsity given for unknown kind {k!r}; kinds are {KINDS}")
        check_sparsity(v, f"sparsity for {k}")
    return {k: float(r.get(k, 0.0)) for k in what}


def prune_decoder(
    model: nn.Module,
    data: Any,
    sparsity: float | Mapping[str, float] = 0.2,
    layers: Iterable[int] | None = None,
    criterion: Criterion = "llm_pruner",
    what: Sequence[str] = KINDS,
    round_to: int = 1,
    seed: int = 0,
    verify: bool = True,
    loss_fn: LossFn | None = None,
    blocks: str | None = None,
    criterion_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict]:
    """LLM-Pruner-style structural pruning of a decoder LLM: heads and MLP channels physically removed.

    In each selected layer, ``floor(sparsity * n)`` of the ``n`` units of the attention-head group and of
    the MLP-channel group are removed (the lowest scores; LLM-Pruner's per-layer uniform ratio, Ma et al.
    2023, sec. 3.3), at least one unit is kept, then the model is compacted in place. Under GQA a head unit
    is one KV head with its ``num_attention_heads / num_key_value_heads`` query heads, so ``sparsity``
    counts KV heads (e.g. 4 KV heads at sparsity 0.3 lose 1).

    A thin call of the structured driver: :func:`structural_scores` (:meth:`ChannelPruner.scores` over the
    :func:`decoder_groups` of the layers), one :meth:`ChannelPruner.select` (``"uniform"`` allocation of
    ``"channels"``) per distinct (sparsity, round_to) of the kinds, merged into one
    :func:`~secateur.pruners.oneshot.remove_units`.

    Args:
        model: a Hugging Face decoder (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
            ``GPT2LMHeadModel``...) or any model whose layers sit in a ``ModuleList`` (``blocks``).
        data: a few tokenised texts (:func:`~secateur.llm.calibration.calibration_batches`; LLM-Pruner uses
            10 sequences).
        sparsity: fraction of units removed per group, in [0, 1); or ``{"heads": s1, "mlp": s2}``.
        layers: indices of the layers to prune (default: all but the first and last).
        criterion: a registered group criterion name, an instance or ``f(group, model) -> scores``
            (:func:`structural_scores`). ``"llm_pruner"`` (default; LLM-Pruner's Taylor importance),
            ``"wanda_sp"`` (Wanda-sp), ``"random"``; ``"taylor"`` is Molchanov et al.'s criterion, as
            everywhere.
        criterion_kwargs: the criterion's arguments: ``{"variant": "element1"}`` (default, the paper's best
            on LLaMA-7B), ``"vector"`` or ``"element2"`` for ``"llm_pruner"``.
        what: ``("heads", "mlp")`` or one of them.
        round_to: kept MLP channel counts are multiples of this (heads are never rounded).
        seed: seed of ``"random"``.
        verify: run the float64 oracle (masked copy vs compacted model on the first calibration
            sequences, :func:`secateur.compact.check_equivalence`: finite, within 1e-6 × each output's
            magnitude) inside the compaction transaction, as every structured entry point does.
        loss_fn: ``loss_fn(output, labels)`` for gradient criteria (default
            :func:`~secateur.llm.calibration.causal_lm_loss`, the model's own next-token loss).
        blocks: as :func:`decoder_groups`.

    Returns:
        ``(model, plan)``; ``plan`` is the JSON plan of :func:`secateur.compact.make_plan` (per-tensor kept
        indices, module attributes, config changes). ``model.config`` is updated where every layer agrees
        (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``, ``head_dim``); otherwise
        the plan lists ``_inconsistent_<key>`` and the model must be saved with its plan
        (:func:`secateur.save_pretrained` or :func:`secateur.save`).

    Raises:
        ConfigError: bad sparsity, criterion, variant, layers or kinds (the model is untouched).
        CompactionError: compaction or the oracle failed; the model is restored as it was.

    Transactional: scoring leaves weights, ``.grad`` fields, ``requires_grad`` and modes as they were (in
    ``finally``), and the compaction (:func:`secateur.pruners.oneshot.remove_units`) restores the model
    bit-identical on any exception or ``KeyboardInterrupt``, which is then re-raised.
    """
    _check_what(what)
    sparsities = _sparsities(sparsity, what)
    round_to = check_round_to(round_to)
    batches = calibration_batches(data)
    graph, selection, scores = structural_scores(
        model, batches, criterion, layers, what, criterion_kwargs, loss_fn=loss_fn, blocks=blocks, seed=seed
    )
    settings: dict[tuple[float, int], list[int]] = {}
    for gi, (_layer, kind) in sorted(selection.items()):
        if sparsities[kind] > 0 and gi in scores:
            settings.setdefault((sparsities[kind], round_to if kind == "mlp" else 1), []).append(gi)
    by_name = {graph.groups[gi].name: s for gi, s in scores.items()}
    removed: dict[int, np.ndarray] = {}
    for (s, r), gids in settings.items():
        selector = ChannelPruner(
            model,
            _example_inputs(batches),
            schedule=s,
            criterion=lambda group, _model: by_name[group.name],  # the scores computed above
            allocation="uniform",
            round_to=r,
            graph=graph,
            groups=gids,
        )
        removed.update({gi: rm for gi, rm in selector.select(s).items() if rm.size})
    removed = dict(sorted(removed.items()))  # the plan lists groups in graph order
    return remove_units(model, graph, removed, _example_inputs(batches), verify=verify)

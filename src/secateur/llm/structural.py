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

Width pruning with a Hugging Face result (Minitron-style width pruning, Muralidharan et al. 2024, without
its embedding channels): ``uniform=True`` prunes every layer by the same counts, checks *before* changing
anything that the rewritten config (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``;
``head_dim`` kept) builds the pruned shapes (:func:`secateur.llm.loadable.planned_config_mismatch`), so
``model.save_pretrained`` then plain ``transformers`` ``from_pretrained`` reload it. Under grouped-query
attention ``gqa="kv_groups"`` (default) removes whole KV groups, ``gqa="query_heads"`` the same number of
query heads in every KV group (:mod:`secateur.llm.gqa`; the only way under MQA, e.g. Gemma 3 270M). ``target=
"nonembedding_params"`` makes ``sparsity`` a fraction of the parameters outside the embeddings and LM head
(:func:`parameter_counts`), reached by the same exact count in every layer.

When only a range of layers is pruned the layers no longer share one head count / FFN width, which a
Hugging Face config cannot express (``from_pretrained`` of ``config.json`` alone would build the dense
shapes): the model's own ``save_pretrained`` then raises :class:`~secateur.llm.loadable.UnloadableConfigError`
naming the field (:func:`secateur.llm.loadable.refuse_plain_save`), and the plan records the per-layer sizes,
so save with :func:`secateur.save_pretrained` (reloaded by :func:`secateur.from_pretrained`) or
:func:`secateur.save` / :func:`secateur.load`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur._torch import eval_mode
from secateur._validate import check_round_to, check_sparsity
from secateur.allocation.structured import build_cost_model
from secateur.compact import compact, make_plan, mask_model
from secateur.compact.verify import verified_compact
from secateur.criteria.group import GroupCriterion, GroupScores, head_group_ids
from secateur.criteria.group.llm import LLMPrunerTaylor, WandaStructured
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group
from secateur.llm.calibration import Batch, calibration_batches, causal_lm_data, causal_lm_loss
from secateur.llm.gqa import (
    QueryHeads,
    add_query_heads,
    even_query_removal,
    query_head_groups,
    with_query_groups,
)
from secateur.llm.loadable import planned_config_mismatch, refuse_plain_save
from secateur.llm.oneshot import find_blocks
from secateur.pruners.channel import ChannelPruner
from secateur.pruners.oneshot import remove_units

KINDS = ("heads", "mlp")
#: What ``prune_decoder``'s ``sparsity`` is a fraction of: each group's units (``"channels"``: heads or KV
#: groups, MLP channels, as the driver's per-group fraction), all parameters (``"params"``, embeddings
#: included, as the driver's ``target="params"``) or the parameters outside the embeddings and LM head
#: (``"nonembedding_params"``, Kaplan et al. 2020's N).
TARGETS = ("channels", "params", "nonembedding_params")
#: Head removal under grouped-query attention: whole KV groups, or query heads evenly in every KV group.
GQA_MODES = ("kv_groups", "query_heads")

Criterion = str | GroupCriterion | Callable[[Group, nn.Module], Any]
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]

__all__ = [
    "GQA_MODES",
    "KINDS",
    "TARGETS",
    "Batch",
    "LLMPrunerTaylor",
    "WandaStructured",
    "calibration_batches",
    "causal_lm_data",
    "causal_lm_loss",
    "decoder_groups",
    "decoder_layer_groups",
    "parameter_counts",
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


def _layer_indices(
    model: nn.Module, layers: Iterable[int] | None, blocks: str | None
) -> tuple[str, list[int], int]:
    """``(blocks path, chosen layer indices, number of layers)``; default: all but the first and the last."""
    path, mods = find_blocks(model, blocks)
    n = len(mods)
    chosen = list(range(1, n - 1)) if layers is None else [int(i) for i in layers]
    if not chosen:
        raise ConfigError(f"no layers to prune among {n} (by default the first and last are kept)")
    out_of_range = [i for i in chosen if not 0 <= i < n]
    if out_of_range:
        raise ConfigError(f"layers {out_of_range} out of range: {type(model).__name__} has {n} layers")
    return path, chosen, n


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
    path, chosen, _n = _layer_indices(model, layers, blocks)
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
# scoring through the driver
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


@dataclasses.dataclass
class _Scored:
    """What scoring found: ``graph`` (the traced one, plus the query-head groups under
    ``gqa="query_heads"``), ``base`` (the traced graph), ``selection`` and ``scores`` keyed by group index of
    ``graph``, ``queries`` (group index -> :class:`QueryHeads`) and ``all_heads`` (every GQA attention module
    of the model, for the config's head count)."""

    graph: DependencyGraph
    base: DependencyGraph
    selection: dict[int, tuple[int, str]]
    scores: GroupScores
    queries: dict[int, QueryHeads]
    all_heads: list[QueryHeads]


def _check_choice(value: object, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")


def _query_selection(
    model: nn.Module,
    base: DependencyGraph,
    layers: Iterable[int] | None,
    what: Sequence[str],
    blocks: str | None,
) -> tuple[DependencyGraph, dict[int, QueryHeads], list[QueryHeads]]:
    """The graph with the query-head groups of the selected layers, those groups, and every GQA module."""
    _, chosen, _ = _layer_indices(model, layers, blocks)
    every = query_head_groups(model, base, None, blocks)
    mine = [q for q in every if q.layer in set(chosen)] if "heads" in what else []
    if "heads" in what and not mine:
        raise ConfigError(
            f"gqa='query_heads': no grouped-query attention in the selected layers of {type(model).__name__} "
            "(every attention module has as many key/value heads as query heads); use gqa='kv_groups'"
        )
    graph, gids = with_query_groups(base, mine)
    return graph, dict(zip(gids, mine)), every


def _score(
    model: nn.Module,
    batches: list[Batch],
    criterion: Criterion,
    layers: Iterable[int] | None,
    what: Sequence[str],
    criterion_kwargs: Mapping[str, Any] | None,
    graph: DependencyGraph | None,
    loss_fn: LossFn | None,
    blocks: str | None,
    seed: int,
    gqa: str,
) -> _Scored:
    """:func:`structural_scores` with everything prune_decoder needs afterwards."""
    _check_choice(gqa, GQA_MODES, "gqa")
    base = graph if graph is not None else DependencyGraph.build(model, _example_inputs(batches))
    if gqa == "kv_groups":
        selection = decoder_groups(model, base, layers, what, blocks)
        graph, queries, every = base, {}, []
    else:
        selection = decoder_groups(model, base, layers, ["mlp"], blocks) if "mlp" in what else {}
        graph, queries, every = _query_selection(model, base, layers, what, blocks)
        selection.update({gi: (q.layer, "heads") for gi, q in queries.items()})
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
    return _Scored(graph, base, selection, scores, queries, every)


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
    gqa: str = "kv_groups",
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
        gqa: ``"kv_groups"`` (a head unit is one KV head with its query heads, the traced group) or
            ``"query_heads"`` (a head unit is one query head: the query-head groups of
            :mod:`secateur.llm.gqa`, appended to the returned graph's groups).
        layers, what, blocks: as :func:`decoder_groups`. seed: for ``"random"``.

    Returns:
        ``(graph, selection, scores)``: ``selection`` as :func:`decoder_groups` (with the query-head groups
        as ``"heads"`` under ``gqa="query_heads"``), ``scores`` maps each scored group index to
        ``(n_units,)`` float64 scores (higher = keep).

    Raises:
        ConfigError: bad arguments (unknown criterion, variant, gqa mode, layers, kinds), no prunable
            head/MLP group in the selected layers, or ``gqa="query_heads"`` without grouped-query attention.
        UnsupportedOpError / GraphError: from tracing.
    """
    batches = calibration_batches(data)
    sc = _score(model, batches, criterion, layers, what, criterion_kwargs, graph, loss_fn, blocks, seed, gqa)
    return sc.graph, sc.selection, sc.scores


# ----------------------------------------------------------------------------------------------------
# how much: per-group fractions, or exact per-layer counts for a parameter target
# ----------------------------------------------------------------------------------------------------
def _sparsities(sparsity: float | Mapping[str, float], what: Sequence[str]) -> dict[str, float]:
    r = dict(sparsity) if isinstance(sparsity, Mapping) else {k: sparsity for k in what}
    for k, v in r.items():
        if k not in KINDS:
            raise ConfigError(f"sparsity given for unknown kind {k!r}; kinds are {KINDS}")
        check_sparsity(v, f"sparsity for {k}")
    return {k: float(r.get(k, 0.0)) for k in what}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"params", "embedding_params", "nonembedding_params"}`` of ``model``, each tensor counted once.

    Embedding parameters are the weights of every ``nn.Embedding`` (token and position tables) and of the
    output embeddings (``model.get_output_embeddings()``, the LM head; nothing more when it is tied to the
    token table); non-embedding parameters are the rest (Kaplan et al. 2020, "Scaling Laws for Neural
    Language Models", sec. 2.1: N excludes the vocabulary and position embeddings).
    """
    unique = {id(p): p for p in model.parameters()}
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(getattr(out_emb, "weight", None), torch.Tensor):
        emb.add(id(out_emb.weight))
    total = sum(p.numel() for p in unique.values())
    embedding = sum(unique[i].numel() for i in emb if i in unique)
    return {"params": total, "embedding_params": embedding, "nonembedding_params": total - embedding}


def _common_size(sizes: set[int], kind: str) -> int:
    if len(sizes) != 1:
        raise ConfigError(
            f"the selected layers' {kind} groups have different sizes {sorted(sizes)} (pruned before?): a "
            "parameter target needs the same count in every layer; use target='channels'"
        )
    return sizes.pop()


def _mlp_steps(n: int, round_to: int) -> list[int]:
    """MLP channel counts removable from a group of ``n`` (kept count a multiple of ``round_to``, >= 1)."""
    return [0] + sorted(n - round_to * j for j in range(1, n // round_to + 1) if n - round_to * j > 0)


def _target_candidates(
    model: nn.Module,
    scored: Any,
    target: str,
    sparsity: float,
    what: Sequence[str],
    round_to: int = 1,
    heads_allowed: Callable[[int], bool] | None = None,
) -> list[dict[str, float]]:
    """The per-kind fractions (``{"heads": s_h, "mlp": s_m}``) of every way to remove at least ``sparsity``
    of ``target`` (``"params"`` or ``"nonembedding_params"``, :func:`parameter_counts`) with equal counts in
    every selected layer, fewest head units first.

    Each selected layer loses ``h`` head units (KV groups, or query heads per KV group) and ``c`` MLP
    channels. For each ``h`` (allowed by ``heads_allowed``) the smallest ``c`` reaching the target is taken
    (kept counts multiples of ``round_to``), so the overshoot is below one MLP step of every layer; with no
    MLP kind, the smallest ``h`` reaching it is the one candidate. The parameters a pair removes are counted
    by the driver's cost model (:func:`secateur.allocation.structured.build_cost_model`, exact for weights and
    biases). The fractions make the driver's ``floor(s · n)`` give ``h`` and ``c``.

    Args:
        scored: what :func:`structural_scores` scored (the internal ``_Scored``: graph, selection, query
            heads).
        heads_allowed: ``f(h) -> bool``, whether removing ``h`` head units per layer is allowed (e.g. the
            head count must divide ``hidden_size`` for transformers to accept the config); default: all.

    Raises:
        ConfigError: unreachable target (names the most that can go), or layers of different sizes.
    """
    denominator = parameter_counts(model)["params" if target == "params" else "nonembedding_params"]
    kinds = {k: [gi for gi, (_, kk) in scored.selection.items() if kk == k] for k in what}
    cost = build_cost_model(model, scored.graph, sorted(scored.selection), "params", None)
    heads, mlp = kinds.get("heads", []), kinds.get("mlp", [])
    if scored.queries:
        n_h = _common_size({scored.queries[gi].n_rep for gi in heads}, "query-head") if heads else 1
    else:
        n_h = _common_size({scored.graph.groups[gi].n_units for gi in heads}, "head") if heads else 1
    n_m = _common_size({scored.graph.groups[gi].n_units for gi in mlp}, "MLP") if mlp else 1

    def removed(h: int, c: int) -> float:
        rm: dict[int, np.ndarray] = {}
        for gi in heads:
            q = scored.queries.get(gi)
            rm[gi] = even_query_removal(q, np.zeros(q.n_heads), h) if q else np.arange(h, dtype=np.int64)
        rm.update({gi: np.arange(c, dtype=np.int64) for gi in mlp})
        return cost.total - cost.state(rm).remaining()

    goal = sparsity * denominator - 1e-6
    steps = _mlp_steps(n_m, round_to) if mlp else [0]
    pairs = []
    for h in range(n_h if heads else 1):
        if h and heads_allowed is not None and not heads_allowed(h):
            continue
        lo, hi = 0, len(steps)
        while lo < hi:  # smallest MLP step reaching the goal with h head units
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if removed(h, steps[mid]) >= goal else (mid + 1, hi)
        if lo < len(steps):
            pairs.append((h, steps[lo]))
    if not pairs:
        most = removed(n_h - 1 if heads else 0, steps[-1]) / max(denominator, 1)
        raise ConfigError(
            f"target {sparsity:.4g} of {target} is unreachable: every selected layer keeps one head unit and "
            f"{round_to} MLP channel(s) (and, with uniform=True, a head count its config accepts), which "
            f"removes at most {most:.4g}"
        )
    if not mlp:
        pairs = pairs[:1]
    out = []
    for h, c in pairs:
        fractions = {}
        if "heads" in what:
            fractions["heads"] = h / n_h if heads else 0.0
        if "mlp" in what:
            fractions["mlp"] = c / n_m if mlp else 0.0
        out.append(fractions)
    return out


def _calibration_loss(model: nn.Module, plan: dict, batches: list[Batch], loss_fn: LossFn | None) -> float:
    """Mean over the calibration batches of ``loss_fn`` (default: the model's own next-token loss) of a copy
    of ``model`` masked by ``plan`` (what the compacted model computes), in eval mode without gradients; the
    model is not changed. Memory: one copy of the model."""
    masked = mask_model(copy.deepcopy(model), plan)
    fn = loss_fn or causal_lm_loss
    with eval_mode(masked), torch.no_grad():
        losses = [float(fn(masked(**x), y)) for x, y in causal_lm_data(batches)]
    return sum(losses) / len(losses)


def _best_candidate(
    model: nn.Module,
    sc: Any,
    candidates: list[dict[str, float]],
    round_to: int,
    batches: list[Batch],
    loss_fn: LossFn | None,
) -> dict[str, float]:
    """The candidate whose pruned model has the lowest calibration loss (ties: the first, fewer heads); the
    only one when there is one."""
    if len(candidates) == 1:
        return candidates[0]
    losses = []
    for fractions in candidates:
        removed, queries = _selection(model, sc, fractions, round_to, batches)
        plan = _full_plan(model, sc, removed, queries)
        losses.append(_calibration_loss(model, plan, batches, loss_fn))
    return candidates[min(range(len(candidates)), key=lambda i: (losses[i], i))]


# ----------------------------------------------------------------------------------------------------
# prune_decoder
# ----------------------------------------------------------------------------------------------------
def _uniform_layers(model: nn.Module, layers: Iterable[int] | None, blocks: str | None) -> list[int]:
    """Every layer index: ``uniform=True`` prunes them all alike (the config holds one value per field)."""
    _, mods = find_blocks(model, blocks)
    every = list(range(len(mods)))
    if layers is not None and sorted({int(i) for i in layers}) != every:
        raise ConfigError(
            f"uniform=True prunes every layer alike (a Hugging Face config holds one head count and one MLP "
            f"width): omit layers= or list all {len(every)} layers of {type(model).__name__}, got "
            f"{sorted(int(i) for i in layers)}"
        )
    return every


def _check_target(target: str, sparsity: Any, what: Sequence[str]) -> dict[str, float] | float:
    """Validated sparsity: per-kind fractions for ``"channels"``, one fraction for parameter targets."""
    _check_choice(target, TARGETS, "target")
    if target == "channels":
        return _sparsities(sparsity, what)
    if isinstance(sparsity, Mapping):
        raise ConfigError(
            f"with target={target!r} sparsity is one fraction of the parameters (the split between heads and "
            f"MLP channels is prune_decoder's), got {dict(sparsity)!r}; use what= to prune one kind"
        )
    return check_sparsity(sparsity, f"sparsity (fraction of {target})")


def _selection(
    model: nn.Module,
    sc: _Scored,
    sparsities: Mapping[str, float],
    round_to: int,
    batches: list[Batch],
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """``(removed units of traced groups, removed query heads by index into sc.all_heads)``: one
    :meth:`ChannelPruner.select` (uniform allocation) per distinct (sparsity, round_to) of the traced groups,
    and the even per-KV-group removal of the query-head groups."""
    settings: dict[tuple[float, int], list[int]] = {}
    queries: dict[int, np.ndarray] = {}
    for gi, (_layer, kind) in sorted(sc.selection.items()):
        s = sparsities.get(kind, 0.0)
        if s <= 0 or gi not in sc.scores:
            continue
        q = sc.queries.get(gi)
        if q is not None:
            rm = even_query_removal(q, sc.scores[gi], min(math.floor(s * q.n_rep + 1e-9), q.n_rep - 1))
            if rm.size:
                queries[next(i for i, a in enumerate(sc.all_heads) if a.attention == q.attention)] = rm
            continue
        settings.setdefault((s, round_to if kind == "mlp" else 1), []).append(gi)
    by_name = {sc.graph.groups[gi].name: s for gi, s in sc.scores.items()}
    removed: dict[int, np.ndarray] = {}
    for (s, r), gids in settings.items():
        selector = ChannelPruner(
            model,
            _example_inputs(batches),
            schedule=s,
            criterion=lambda group, _model: by_name[group.name],  # the scores computed above
            allocation="uniform",
            round_to=r,
            graph=sc.base,
            groups=gids,
        )
        removed.update({gi: rm for gi, rm in selector.select(s).items() if rm.size})
    return dict(sorted(removed.items())), queries  # the plan lists groups in graph order


def _full_plan(
    model: nn.Module, sc: _Scored, removed: Mapping[int, np.ndarray], queries: Mapping[int, np.ndarray]
) -> dict:
    """The plan of the traced groups' removal (:func:`make_plan`) plus the query heads (under GQA mode
    ``"query_heads"``, :func:`~secateur.llm.gqa.add_query_heads`)."""
    plan = make_plan(sc.base, removed)
    if sc.all_heads:
        add_query_heads(model, plan, queries, sc.all_heads)
    return plan


def _loadable_heads(model: nn.Module, sc: _Scored) -> Callable[[int], bool]:
    """``f(h)``: whether the config with ``h`` head units removed from every selected layer (KV groups, or
    query heads per KV group) is one transformers accepts and that builds those shapes
    (:func:`~secateur.llm.loadable.planned_config_mismatch`, MLP left whole)."""
    heads = [gi for gi, (_, kind) in sc.selection.items() if kind == "heads"]
    index = {a.attention: i for i, a in enumerate(sc.all_heads)}

    def allowed(h: int) -> bool:
        queries = {
            index[q.attention]: even_query_removal(q, np.zeros(q.n_heads), h)
            for gi in heads
            if (q := sc.queries.get(gi)) is not None
        }
        removed = {gi: np.arange(h, dtype=np.int64) for gi in heads if gi not in sc.queries}
        return planned_config_mismatch(model, _full_plan(model, sc, removed, queries)) is None

    return allowed


def _heads_requested(what: Sequence[str], sparsity: Any, target: str) -> bool:
    if "heads" not in what:
        return False
    return target != "channels" or sparsity.get("heads", 0.0) > 0


def _require_heads(model: nn.Module, sc: _Scored, gqa: str) -> None:
    if any(kind == "heads" for _, kind in sc.selection.values()):
        return
    raise ConfigError(
        f"no prunable attention-head group in the selected layers of {type(model).__name__} with "
        f"gqa={gqa!r}: a unit is one key/value head with the query heads reading it, and a layer keeps one "
        "(a model with a single KV head, multi-query attention such as Gemma 3 270M, has none); use "
        "gqa='query_heads' (the same number of query heads in every KV group) or what=('mlp',)"
    )


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
    *,
    target: str = "channels",
    gqa: str = "kv_groups",
    uniform: bool = False,
) -> tuple[nn.Module, dict]:
    """LLM-Pruner-style structural (width) pruning of a decoder LLM: heads and MLP channels removed.

    In each selected layer the same number of the lowest-scoring units of the attention-head group and of
    the MLP-channel group are removed (LLM-Pruner's per-layer uniform ratio, Ma et al. 2023, sec. 3.3), at
    least one unit is kept, then the model is compacted in place. With ``target="channels"`` (default) the
    number is ``floor(sparsity * n)`` of each group's ``n`` units. With a parameter target, every selected
    layer loses the same ``h`` head units and ``c`` MLP channels: for each ``h`` the smallest ``c`` whose
    removal reaches ``sparsity`` of the parameters (counted by the driver's cost model, exact for weights and
    biases; MLP steps of ``round_to``), so the overshoot is below one MLP step per layer; among those pairs
    (one per head count) the one whose pruned model (masked copy) has the lowest ``loss_fn`` on ``data`` is
    kept (a search over width combinations as Minitron's, Muralidharan et al. 2024, sec. 3, here
    without retraining; ties: fewer heads). Cost: one masked copy of the model and one pass over ``data`` per
    head count tried. With ``uniform=True`` only head counts whose config transformers accepts are tried (it
    wants ``hidden_size % num_attention_heads == 0`` even where ``head_dim`` is explicit).

    Heads under grouped-query attention (``Hq`` query heads over ``Hkv`` KV heads, ``n_rep = Hq / Hkv``),
    always a valid ratio afterwards:

    - ``gqa="kv_groups"`` (default): a head unit is one KV head with its ``n_rep`` query heads (the traced
      group), so ``sparsity`` counts KV heads (4 KV heads at 0.3 lose 1); a layer keeps one KV head, so a
      single-KV-head (MQA) model has no head unit to remove.
    - ``gqa="query_heads"``: ``r = floor(sparsity * n_rep)`` query heads go in *every* KV group
      (:mod:`secateur.llm.gqa`), all KV heads stay, ``num_attention_heads`` becomes ``Hkv (n_rep - r)``.

    A thin call of the structured driver: :func:`structural_scores` (:meth:`ChannelPruner.scores` over the
    :func:`decoder_groups` of the layers, or the query-head groups), one :meth:`ChannelPruner.select`
    (``"uniform"`` allocation of ``"channels"``) per distinct (sparsity, round_to) of the kinds (query heads:
    :func:`~secateur.llm.gqa.even_query_removal` of the same scores), one plan and one transactional
    compaction under the float64 oracle.

    Args:
        model: a Hugging Face decoder (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
            ``Gemma3ForCausalLM``, ``GPT2LMHeadModel``...) or any model whose layers sit in a ``ModuleList``
            (``blocks``).
        data: a few tokenised texts (:func:`~secateur.llm.calibration.calibration_batches`; LLM-Pruner uses
            10 sequences).
        sparsity: with ``target="channels"``, the fraction of units removed per group, in [0, 1), or
            ``{"heads": s1, "mlp": s2}``; with a parameter target, one fraction of those parameters.
        layers: indices of the layers to prune (default: all but the first and last; all with ``uniform``).
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
        target: what ``sparsity`` is a fraction of (:data:`TARGETS`): ``"channels"`` (each group's units),
            ``"params"`` (all parameters, embeddings included, as the driver's ``target="params"``) or
            ``"nonembedding_params"`` (parameters outside the embeddings and LM head,
            :func:`parameter_counts`: "20% fewer non-embedding parameters" is ``sparsity=0.2``). Embeddings
            are never pruned here.
        gqa: ``"kv_groups"`` or ``"query_heads"`` (above; :data:`GQA_MODES`).
        uniform: prune every layer by the same counts and require a result plain ``transformers`` loads: the
            rewritten config (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``; head
            size unchanged, ``head_dim`` written where the config had none) must build the pruned shapes,
            checked on the meta device before anything changes; ``model.save_pretrained`` then
            ``AutoModelForCausalLM.from_pretrained`` reload it.

    Returns:
        ``(model, plan)``; ``plan`` is the JSON plan of :func:`secateur.compact.make_plan` (per-tensor kept
        indices, module attributes, config changes; query heads added by
        :func:`secateur.llm.gqa.add_query_heads`). ``model.config`` is updated where every layer agrees;
        otherwise the plan lists ``_inconsistent_<key>``, ``model.save_pretrained`` raises
        :class:`~secateur.llm.loadable.UnloadableConfigError` naming the field, and the model is saved with
        its plan (:func:`secateur.save_pretrained` or :func:`secateur.save`).

    Raises:
        ConfigError: bad sparsity, target, gqa, criterion, variant, layers or kinds; heads asked for where
            there is no head unit (MQA with ``gqa="kv_groups"``) or no GQA (``gqa="query_heads"``); an
            unreachable parameter target; ``uniform=True`` with a layer subset or on a model whose config
            cannot express the pruned widths (names the field or tensor). The model is untouched.
        CompactionError: compaction or the oracle failed; the model is restored as it was.

    Transactional: scoring leaves weights, ``.grad`` fields, ``requires_grad`` and modes as they were (in
    ``finally``), and the compaction restores the model bit-identical on any exception or
    ``KeyboardInterrupt``, which is then re-raised.
    """
    _check_what(what)
    checked = _check_target(target, sparsity, what)
    _check_choice(gqa, GQA_MODES, "gqa")
    round_to = check_round_to(round_to)
    if uniform:
        layers = _uniform_layers(model, layers, blocks)
    batches = calibration_batches(data)
    sc = _score(model, batches, criterion, layers, what, criterion_kwargs, None, loss_fn, blocks, seed, gqa)
    if _heads_requested(what, checked, target):
        _require_heads(model, sc, gqa)
    if isinstance(checked, float):
        allowed = _loadable_heads(model, sc) if uniform else None
        candidates = _target_candidates(model, sc, target, checked, what, round_to, allowed)
        sparsities = _best_candidate(model, sc, candidates, round_to, batches, loss_fn)
    else:
        sparsities = checked
    removed, queries = _selection(model, sc, sparsities, round_to, batches)
    x = _example_inputs(batches)
    plan = _full_plan(model, sc, removed, queries)
    if uniform:
        why = planned_config_mismatch(model, plan)
        if why is not None:
            raise ConfigError(
                f"uniform=True: the config of {type(model).__name__} cannot express the pruned model: {why}. "
                "Nothing was changed. Prune only what the config expresses (e.g. what=('mlp',)), or use "
                "uniform=False and save with secateur.save_pretrained / secateur.save (plan alongside)"
            )
    if queries:
        if verify:
            verified_compact(model, plan, x)
        else:
            compact(model, plan)
    else:  # the driver's applier: on an oracle failure it names the groups at fault
        _, plan = remove_units(model, sc.base, removed, x, verify=verify)
    refuse_plain_save(model, plan)
    return model, plan

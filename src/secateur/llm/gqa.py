"""Query-head pruning under grouped-query and multi-query attention (GQA, MQA), keeping ``Hq / Hkv`` whole.

Under GQA an attention layer has ``Hq = num_attention_heads`` query heads and ``Hkv = num_key_value_heads``
key/value heads, and query head ``h`` reads KV head ``h // n_rep`` with ``n_rep = Hq / Hkv`` (transformers'
``repeat_kv`` and SDPA's ``enable_gqa``; Ainslie et al. 2023, "GQA"). MQA is ``Hkv = 1``. A pruned layer stays
valid for that code only if every KV head keeps the same number of query heads. Two removals are:

- **whole KV groups**: a KV head with the ``n_rep`` query heads that read it. The dependency graph already
  couples them (a unit of the layer's head group), so this is the ordinary group removal of the driver
  (``prune_decoder(gqa="kv_groups")``). It needs ``Hkv > 1`` (a layer keeps one KV head).
- **query heads evenly in every KV group** (this module): ``r`` query heads of each KV group go, every KV
  head stays, ``n_rep`` becomes ``n_rep - r`` and ``num_attention_heads`` becomes ``Hkv (n_rep - r)``
  (``prune_decoder(gqa="query_heads")``). Under MQA this is the only way heads can go.

For the second, :func:`query_head_groups` describes each attention module's query heads as a
:class:`~secateur.graph.groups.Group` of ``Hq`` units (one per query head) over the query-side dims (query
projection rows and bias, output projection columns), so that any registered group criterion scores them
through the driver (:meth:`secateur.pruners.channel.ChannelPruner.scores` on :func:`with_query_groups`'s
graph); :func:`even_query_removal` picks the ``r`` lowest of each KV group and :func:`add_query_heads`
writes the removal into a plan (kept indices, the module's ``num_key_value_groups``, the config's head count),
which the transactional compaction applies under the float64 oracle.

Fused query/key/value projections (Falcon: one ``query_key_value`` Linear; ``multi_query=True`` outputs
``Hq`` query heads, then the key and the value head, split ``[Hq, 1, 1]``; the new decoder architecture
outputs ``(Hkv, n_rep + 2, head_dim)``, each KV group's queries then its key and value) trace as a split into
``Hq + 2 Hkv`` heads. The module's own head count and query-per-KV attribute (``num_heads``,
``num_key_value_groups``) say so; the query slots are matched to the output projection's query heads by
atom class, and the group gets ``Hq`` prunable units (the query heads) plus one frozen unit per key/value
slot, so the fused rows of the keys and values are never sliced.

The structure is read from the trace, not from module names: the head splits (``view`` of a channel dim into
``(heads, head_dim)``) recorded in the attention module give ``Hq``, ``Hkv`` and ``head_dim``; the graph's
group holding the query channels gives the members, and every query-side index is checked to belong to the
head the split says (``index // head_dim``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from torch import nn

from secateur.compact.plan import CONFIG_HEAD_KEYS, HEAD_ATTRS, WIDTH_ATTRS, config_owner, hf_configs
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group, Member
from secateur.llm.oneshot import find_blocks

__all__ = [
    "KV_GROUP_ATTRS",
    "QueryHeads",
    "add_query_heads",
    "even_query_removal",
    "query_head_groups",
    "with_query_groups",
]

#: Module attributes holding the query heads per KV head (``n_rep``), updated when query heads go.
KV_GROUP_ATTRS = ("num_key_value_groups", "num_queries_per_kv", "n_rep")


@dataclasses.dataclass
class QueryHeads:
    """The query heads of one attention module.

    Attributes:
        attention: the attention module's path (``"model.layers.3.self_attn"``).
        layer: the index of its decoder layer.
        n_heads: ``Hq``, query heads. n_kv_heads: ``Hkv``, key/value heads. head_dim: size of one head.
        kv_of: ``(Hq,)`` int64, the KV head each query head reads.
        group: a group of ``Hq`` units, one per query head, whose members are the query-side dims (query
            projection rows and bias, output projection columns) with ``unit_of = index // head_dim``; it is
            not one of the traced graph's groups (see :func:`with_query_groups`). Under a fused QKV
            projection it has ``Hq + 2 Hkv`` units: units ``0..Hq-1`` are the query heads, the rest (the
            fused key and value rows) are frozen (``prunable`` False) and never removed.
    """

    attention: str
    layer: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    kv_of: np.ndarray
    group: Group

    @property
    def n_rep(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads


def _head_splits(graph: DependencyGraph) -> dict[str, list]:
    """The traced head splits by innermost module path."""
    out: dict[str, list] = {}
    for ev in graph.splits:
        if ev.kind == "heads" and ev.classes is not None and len(ev.classes):
            out.setdefault(ev.module_paths[0], []).append(ev)
    return out


def _group_holding(graph: DependencyGraph, path: str, classes: np.ndarray) -> Group | None:
    """The group of ``graph`` with a member under ``path`` that holds every class in ``classes``."""
    prefix = path + "."
    for g in graph.groups:
        if any(m.name.startswith(prefix) for m in g.members) and np.isin(classes, g.classes).all():
            return g
    return None


def _check_inside(m: Member, path: str) -> None:
    """Query heads coupled to a member outside the attention module ``path`` cannot go on their own.

    Raises:
        ConfigError: naming the member and dim, and ``gqa='kv_groups'`` as the way in.
    """
    if not m.name.startswith(path + "."):
        raise ConfigError(
            f"the query heads of {path} are coupled to {m.name} (dim {m.dim}) outside the attention "
            "module: they cannot be removed on their own; use gqa='kv_groups'"
        )


def _query_members(
    g: Group, path: str, n_heads: int, n_kv: int, head_dim: int, q_classes: np.ndarray
) -> list:
    """Members of ``g`` on the query side (dim size ``Hq · head_dim``), each checked against the split."""
    out = []
    for m in g.members:
        _check_inside(m, path)
        size = m.unit_of.size
        if size == n_kv * head_dim:
            continue  # a key/value dim: kept whole
        if size != n_heads * head_dim:
            raise ConfigError(
                f"{m.name} dim {m.dim} has {size} indices, neither {n_heads} query heads nor {n_kv} "
                f"key/value heads of size {head_dim}: cannot tell its query heads in {path}"
            )
        heads = np.arange(size) // head_dim
        if not np.array_equal(g.classes[m.unit_of], q_classes[heads]):
            raise ConfigError(
                f"{m.name} dim {m.dim}: its indices are not laid out as (query head, head_dim) in the order "
                f"of {path}'s head split; use gqa='kv_groups'"
            )
        out.append(Member(m.name, m.dim, heads.astype(np.int64), m.aliases, m.is_buffer))
    return out


def _kv_of(splits: list, q_ev, n_heads: int, n_kv: int) -> np.ndarray:
    """The KV head of each query head: the graph's coupling where it unites them, else ``h // n_rep``."""
    kv = np.arange(n_heads, dtype=np.int64) // (n_heads // n_kv)
    for ev in splits:
        if ev.n_outer == n_kv and np.isin(q_ev.classes, ev.classes).all():
            kv = np.array([int(np.flatnonzero(ev.classes == c)[0]) for c in q_ev.classes], dtype=np.int64)
            break
    if not (np.bincount(kv, minlength=n_kv) == n_heads // n_kv).all():
        raise ConfigError(f"the query heads do not read their KV heads {n_heads // n_kv} each: {kv.tolist()}")
    return kv


def _kv_heads(module: nn.Module, path: str, counts: list[int]) -> int:
    """``Hkv``: the smaller traced head count, or, when the trace split channels into one head count only
    (a single KV head is not split: MQA), ``Hq / n_rep`` from the module's query-per-KV attribute
    (:data:`KV_GROUP_ATTRS`; ``Hq`` when it has none: multi-head attention)."""
    rep = next((v for a in KV_GROUP_ATTRS if isinstance(v := module.__dict__.get(a), int)), None)
    if len(counts) > 1:
        if rep is not None and rep != counts[-1] // counts[0]:
            raise ConfigError(f"{path}: traced {counts[-1]} query over {counts[0]} KV heads, but n_rep={rep}")
        return counts[0]
    if rep is None or isinstance(rep, bool) or rep < 1 or counts[0] % rep:
        return counts[0]
    return counts[0] // rep


def _one_attention(graph: DependencyGraph, path: str, layer: int, splits: list) -> QueryHeads | None:
    """The :class:`QueryHeads` of the attention module at ``path``, or None when every query head has its own
    KV head (multi-head attention)."""
    counts = sorted({ev.n_outer for ev in splits})
    module = graph.model.get_submodule(path)
    fused = _fused_query_heads(module, counts)
    if fused is not None:  # one query head per KV head (n_rep 1) is multi-head attention: nothing to do
        return None if fused[0] == fused[1] else _fused_attention(graph, path, layer, splits, *fused)
    n_heads, n_kv = counts[-1], _kv_heads(module, path, counts)
    dims = {ev.inner for ev in splits}
    if n_heads == n_kv:
        return None
    if len(counts) > 2 or len(dims) != 1 or n_heads % n_kv:
        raise ConfigError(
            f"{path}: head splits {[(e.n_outer, e.inner) for e in splits]} are not one GQA layout"
        )
    head_dim = dims.pop()
    q_ev = next(ev for ev in splits if ev.n_outer == n_heads)
    g = _group_holding(graph, path, q_ev.classes)
    if g is None:
        raise ConfigError(f"{path}: no group of the graph holds its query heads")
    members = _query_members(g, path, n_heads, n_kv, head_dim, q_ev.classes)
    if not members:
        raise ConfigError(f"{path}: no parameter holds its query heads")
    group = Group(
        name=f"{members[0].name}:{members[0].dim}[query heads]",
        n_units=n_heads,
        members=members,
        prunable=np.ones(n_heads, dtype=bool),
        reasons=[],
        classes=np.zeros(n_heads, dtype=np.int64),  # set by with_query_groups (labels no traced atom has)
    )
    return QueryHeads(path, layer, n_heads, n_kv, head_dim, _kv_of(splits, q_ev, n_heads, n_kv), group)


def _int_attr(module: nn.Module, names: Sequence[str]) -> int | None:
    """The first of ``names`` that ``module`` holds as an int (not a bool), else None."""
    for a in names:
        v = module.__dict__.get(a)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _fused_query_heads(module: nn.Module, counts: list[int]) -> tuple[int, int] | None:
    """``(Hq, Hkv)`` when the trace split one fused projection into ``Hq + 2 Hkv`` heads (the module's head
    count ``Hq`` and query-per-KV ``n_rep >= 1``): with one KV head that is the only split (multi-query),
    with several the KV-group split ``Hkv`` is traced too (Falcon's ``(Hkv, n_rep + 2, head_dim)``); else
    None."""
    n_heads, rep = _int_attr(module, HEAD_ATTRS), _int_attr(module, KV_GROUP_ATTRS)
    if n_heads is None or rep is None or rep < 1 or n_heads % rep:
        return None
    n_kv = n_heads // rep
    slots = n_heads + 2 * n_kv
    if (counts == [slots] and n_kv == 1) or (counts == [n_kv, slots] and n_kv > 1):
        return n_heads, n_kv
    return None


def _fused_attention(
    graph: DependencyGraph, path: str, layer: int, splits: list, n_heads: int, n_kv: int
) -> QueryHeads:
    """The :class:`QueryHeads` of a fused query/key/value projection traced as a split into ``n_heads +
    2 n_kv`` slots. The output projection (a member of ``n_heads · head_dim`` indices) gives the atom class of
    each query head; each slot of the fused projection with that class is one of its query heads, in order
    (under MQA every query slot has a class of its own; under Falcon's grouped layout a KV group's slots
    share one, its ``n_rep`` query slots first, then its key and value). The remaining slots become frozen
    units ``n_heads..`` (the key and value rows stay whole). The float64 oracle of the compaction checks the
    result."""
    slots = n_heads + 2 * n_kv
    ev = next(e for e in splits if e.n_outer == slots)
    head_dim = ev.inner
    g = _group_holding(graph, path, ev.classes)
    if g is None:
        raise ConfigError(f"{path}: no group of the graph holds its fused query/key/value heads")
    q_classes = None
    members = []
    for m in g.members:
        _check_inside(m, path)
        size, idx = m.unit_of.size, np.arange(m.unit_of.size)
        cls = g.classes[m.unit_of]
        if size == n_heads * head_dim:  # the output projection's columns: one query head per head_dim
            heads = cls[::head_dim]
            if not np.array_equal(cls, heads[idx // head_dim]):
                raise ConfigError(f"{m.name} dim {m.dim}: not laid out as ({n_heads} query heads, head_dim)")
            if q_classes is not None and not np.array_equal(heads, q_classes):
                raise ConfigError(f"{m.name} dim {m.dim}: its query heads are in another order than {path}'s")
            q_classes = heads
            members.append((m, idx // head_dim))
        elif size == slots * head_dim:  # the fused projection's rows
            if not np.array_equal(cls, ev.classes[idx // head_dim]):
                raise ConfigError(f"{m.name} dim {m.dim}: not laid out as {path}'s head split")
            members.append((m, None))
        else:
            raise ConfigError(
                f"{m.name} dim {m.dim} has {size} indices, neither {n_heads} query heads nor the {slots} "
                f"fused query/key/value heads of size {head_dim} in {path}"
            )
    if q_classes is None:
        raise ConfigError(f"{path}: no output projection reads its query heads")
    slot_unit = np.full(slots, -1, dtype=np.int64)
    for h, c in enumerate(q_classes.tolist()):
        free = np.flatnonzero((ev.classes == c) & (slot_unit < 0))
        if not free.size:
            raise ConfigError(f"{path}: query head {h} has no slot of its own in the fused projection")
        slot_unit[free[0]] = h
    slot_unit[slot_unit < 0] = np.arange(n_heads, slots)
    kv_ev = next((e for e in splits if e.n_outer == n_kv), None)
    kv_of = (
        np.zeros(n_heads, dtype=np.int64)
        if kv_ev is None
        else np.array([int(np.flatnonzero(kv_ev.classes == c)[0]) for c in q_classes], dtype=np.int64)
    )
    if not (np.bincount(kv_of, minlength=n_kv) == n_heads // n_kv).all():
        raise ConfigError(f"{path}: the query heads do not read their KV heads {n_heads // n_kv} each")
    out = [
        Member(
            m.name,
            m.dim,
            heads if heads is not None else slot_unit[np.arange(m.unit_of.size) // head_dim],
            m.aliases,
            m.is_buffer,
        )
        for m, heads in members
    ]
    group = Group(
        name=f"{out[0].name}:{out[0].dim}[query heads]",
        n_units=slots,
        members=out,
        prunable=np.arange(slots) < n_heads,
        reasons=[f"{path}: units {n_heads}..{slots - 1} are the fused key/value heads (kept whole)"],
        classes=np.zeros(slots, dtype=np.int64),  # set by with_query_groups
    )
    return QueryHeads(path, layer, n_heads, n_kv, head_dim, kv_of, group)


def query_head_groups(
    model: nn.Module, graph: DependencyGraph, layers: Iterable[int] | None = None, blocks: str | None = None
) -> list[QueryHeads]:
    """The query heads of every GQA/MQA attention module in the selected decoder layers, in layer order.

    An attention module is a module where the trace split channels into heads with two head counts
    (``Hq`` query heads over ``Hkv < Hq`` key/value heads, one head size). Its query-side dims are the
    members of the graph group holding the query split's channels whose size is ``Hq · head_dim``; those of
    size ``Hkv · head_dim`` (keys, values) are kept whole. Multi-head attention modules (``Hq == Hkv``) are
    skipped.

    The query units are prunable even where the traced group is frozen, provided every member of that group
    lives inside the attention module: under MQA the graph freezes the query heads because the single KV
    head is broadcast to them, which removing query heads does not touch. The float64 oracle of the
    compaction checks the result either way.

    Args:
        layers: decoder layer indices (default: all). blocks: as :func:`secateur.llm.find_blocks`.

    Raises:
        ConfigError: a layer index out of range; an attention module whose query heads are coupled outside
            it or not laid out as ``(head, head_dim)`` (names the module and the tensor).
    """
    path, mods = find_blocks(model, blocks)
    n = len(mods)
    chosen = set(range(n)) if layers is None else {int(i) for i in layers}
    bad = sorted(i for i in chosen if not 0 <= i < n)
    if bad:
        raise ConfigError(f"layers {bad} out of range: {type(model).__name__} has {n} layers")
    pat = re.compile(re.escape(path) + r"\.(\d+)\.")
    out = []
    for attn, splits in _head_splits(graph).items():
        mt = pat.match(attn + ".")
        if mt is None or int(mt.group(1)) not in chosen:
            continue
        q = _one_attention(graph, attn, int(mt.group(1)), splits)
        if q is not None:
            out.append(q)
    return sorted(out, key=lambda q: (q.layer, q.attention))


def with_query_groups(
    graph: DependencyGraph, heads: Sequence[QueryHeads]
) -> tuple[DependencyGraph, list[int]]:
    """A graph of the same model whose groups are ``graph.groups`` followed by the query-head groups of
    ``heads``, and the indices of those in it, so that the driver (:class:`secateur.ChannelPruner` with
    ``graph=`` and ``groups=``) and every group criterion score query heads like any group.

    The added groups get atom class labels that no traced atom has (each ``QueryHeads.group`` is replaced by
    its labelled copy, the one in the returned graph). Use the result for scoring only: plans
    of query heads are written by :func:`add_query_heads` (the graph's own plan, ``make_plan``, does not
    know that removing query heads changes ``n_rep``).
    """
    top = max((int(g.classes.max()) for g in graph.groups if g.classes.size), default=-1) + 1
    added = []
    for q in heads:
        n = q.group.n_units  # Hq, plus the frozen key/value units of a fused projection
        g = dataclasses.replace(q.group, classes=np.arange(top, top + n, dtype=np.int64))
        top += n
        q.group = g
        added.append(g)
    derived = DependencyGraph(
        graph.model, list(graph.groups) + added, graph.splits, graph.n_ops, graph.prune_normalized
    )
    first = len(graph.groups)
    return derived, list(range(first, first + len(added)))


def even_query_removal(heads: QueryHeads, scores: np.ndarray, per_kv: int) -> np.ndarray:
    """The ``per_kv`` lowest-scoring query heads of every KV group (ties: lower index first), sorted int64.

    Args:
        scores: ``(Hq,)``, higher = keep (or one per unit of ``heads.group``: the first ``Hq`` are the query
            heads). per_kv: query heads removed per KV head, ``0 <= per_kv < n_rep``.

    Raises:
        ConfigError: ``per_kv`` outside ``[0, n_rep)`` or scores of another shape.
    """
    scores = np.asarray(scores, dtype=float)
    if scores.shape == (heads.group.n_units,):
        scores = scores[: heads.n_heads]
    if scores.shape != (heads.n_heads,):
        raise ConfigError(f"{heads.attention}: {scores.shape} scores for {heads.n_heads} query heads")
    if not 0 <= per_kv < heads.n_rep:
        raise ConfigError(
            f"{heads.attention}: {per_kv} query heads per KV head cannot go (each of the "
            f"{heads.n_kv_heads} KV heads has {heads.n_rep} and keeps at least one)"
        )
    out = []
    for j in range(heads.n_kv_heads):
        own = np.flatnonzero(heads.kv_of == j)
        out.extend(own[np.argsort(scores[own], kind="stable")[:per_kv]].tolist())
    return np.array(sorted(out), dtype=np.int64)


def _attribute_changes(module: nn.Module, q: QueryHeads, kept: int) -> dict[str, list[int]]:
    """``{attr: [old, new]}`` of the module's integers that count query heads, KV groups or their width."""
    width = {a: (q.n_heads * q.head_dim, kept * q.head_dim) for a in WIDTH_ATTRS}
    wanted = {
        **{a: (q.n_rep, kept // q.n_kv_heads) for a in KV_GROUP_ATTRS},
        **{a: (q.n_heads, kept) for a in HEAD_ATTRS},
        **width,
    }
    out = {}
    for a, (old, new) in wanted.items():
        v = module.__dict__.get(a)
        if isinstance(v, int) and not isinstance(v, bool) and v == old and old != new:
            out[a] = [old, new]
    return out


def add_query_heads(
    model: nn.Module,
    plan: dict,
    removed: Mapping[int, np.ndarray],
    heads: Sequence[QueryHeads],
) -> dict:
    """Write the removal of query heads into ``plan`` (changed in place and returned).

    Args:
        plan: a plan of :func:`secateur.compact.make_plan` (other groups' removals); its tensors must not
            already slice a query-side dim.
        removed: ``{index into heads: removed query heads}``, each an even removal
            (:func:`even_query_removal`).
        heads: the :class:`QueryHeads` of *every* GQA attention module of the model (those not in
            ``removed`` keep their head count, which the config vote needs).

    Adds: the kept indices of each query-side member, a ``"groups"`` entry per module, the module integers
    counting query heads per KV head (``num_key_value_groups``), heads (``num_heads``...) or their width, and
    the config's head count (:data:`secateur.compact.plan.CONFIG_HEAD_KEYS` equal to ``Hq``) where every
    attention module agrees on the new count (else ``_inconsistent_<key>``, as :func:`make_plan` does), plus
    ``head_dim`` where the config has none (it would derive another one from the new head count).

    Raises:
        ConfigError: an uneven removal, or a plan that already slices a query-side dim.
    """
    counts: dict[str, list[tuple[int, int, int]]] = {}  # config key -> (old, new, head_dim) of its modules
    for i, q in enumerate(heads):
        rm = np.asarray(removed.get(i, ()), dtype=np.int64)
        per_kv = np.bincount(q.kv_of[rm], minlength=q.n_kv_heads) if rm.size else np.zeros(q.n_kv_heads)
        if len(set(per_kv.tolist())) != 1:
            raise ConfigError(f"{q.attention}: query heads {rm.tolist()} are not the same number per KV head")
        kept = q.n_heads - rm.size
        counts.setdefault(config_owner(model, q.attention), []).append((q.n_heads, kept, q.head_dim))
        if not rm.size:
            continue
        for m in q.group.members:
            dims = plan["tensors"].setdefault(m.name, {})
            if str(m.dim) in dims:
                raise ConfigError(
                    f"the plan already slices {m.name} dim {m.dim}: prune KV groups or query heads"
                )
            dims[str(m.dim)] = np.flatnonzero(~np.isin(m.unit_of, rm)).tolist()
        plan["groups"].append({"group": q.group.name, "n_units": q.group.n_units, "removed": rm.tolist()})
        attrs = _attribute_changes(model.get_submodule(q.attention), q, kept)
        if attrs:
            plan.setdefault("attributes", {}).setdefault(q.attention, {}).update(attrs)
    _config_head_counts(model, plan, counts)
    return plan


def _config_head_counts(model: nn.Module, plan: dict, counts: Mapping[str, list[tuple[int, int]]]) -> None:
    """Write the config's head count (``[old, new]``) where the attention modules under it agree on the new
    one, else ``_inconsistent_<key>`` (the plan's convention: the config keeps its value)."""
    cfgs = hf_configs(model)
    for ck, pairs in counts.items():
        cfg = cfgs.get(ck)
        if cfg is None or all(old == new for old, new, _ in pairs):
            continue
        olds, news = {old for old, _, _ in pairs}, sorted({new for _, new, _ in pairs})
        section = plan.setdefault("config", {}).setdefault(ck, {})
        for k in CONFIG_HEAD_KEYS:
            value = getattr(cfg, k, None)
            if not isinstance(value, int) or isinstance(value, bool) or olds != {value}:
                continue
            section.pop(k, None)
            if len(news) == 1:
                section[k] = [value, news[0]]
            else:
                section["_inconsistent_" + k] = [value, news]
            if getattr(cfg, "head_dim", None) is None:  # it would derive another head size from the new count
                section["head_dim"] = [None, pairs[0][2]]
            break

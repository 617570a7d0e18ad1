"""The pruning plan: what compaction removes, as plain JSON data.

:func:`make_plan` turns ``{group index: unit indices to remove}`` of a
:class:`~secateur.graph.groups.DependencyGraph` into ``{"version", "tensors": {qualname: {dim: kept
indices}}, "groups", "attributes": {module path: {attr: [old, new]}}, "config": {config key: {key: [old,
new]}}}`` (plus ``"norms"`` for mask-aware norms): the kept indices of every tensor dim, the module
attributes that count heads (``num_heads`` and the like, :data:`HEAD_ATTRS`, :data:`KV_HEAD_ATTRS`,
:data:`WIDTH_ATTRS`) and the Hugging Face config keys (:data:`CONFIG_HEAD_KEYS`, :data:`CONFIG_KV_KEYS`,
:data:`CONFIG_FF_KEYS`, :data:`CONFIG_HIDDEN_KEYS`) whose values change, a config key only where every
layer agrees on the new value. :func:`check_plan` is the shape check of an in-memory plan (plans read from
files are validated by :mod:`secateur.io.validate`). Applying a plan: :mod:`secateur.compact.apply`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from torch import nn

from secateur.errors import CompactionError, IncompatibleGroupError
from secateur.graph.groups import DependencyGraph, Group
from secateur.graph.symbolic import ShapeConflictError, attribute_changes, read_attributes, solve

from .hf_configs import family_config_changes
from .norms import norm_plan

__all__ = [
    "CONFIG_FF_DEFAULTS",
    "CONFIG_FF_KEYS",
    "CONFIG_HEAD_KEYS",
    "CONFIG_HIDDEN_KEYS",
    "CONFIG_KV_KEYS",
    "HEAD_ATTRS",
    "KV_HEAD_ATTRS",
    "PLAN_VERSION",
    "WIDTH_ATTRS",
    "ModuleLookup",
    "check_plan",
    "config_owner",
    "hf_configs",
    "make_plan",
]


#: Version of the plan format (``plan["version"]``).
PLAN_VERSION = 1
#: Module attributes holding a head count, updated when heads go (attention modules of torch, HF, timm).
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "attention_heads", "num_attn_heads")
#: Module attributes holding a key/value head count (grouped-query attention).
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "num_key_value_heads_per_partition")
#: Module attributes holding ``heads * head size``, updated beside a head count.
WIDTH_ATTRS = (
    "all_head_size",
    "attn_dim",
    "inner_dim",
    "split_size",
    "inner_size",
    "hidden_size_per_partition",
    "projection_size",
    "dim_head_total",
)
#: Hugging Face config keys of the attention head count.
CONFIG_HEAD_KEYS = (
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
)
#: Hugging Face config keys of the key/value head count.
CONFIG_KV_KEYS = ("num_key_value_heads", "n_kv_heads", "multi_query_group_num")
#: Hugging Face config keys of the feed-forward (MLP) width.
CONFIG_FF_KEYS = (
    "intermediate_size",
    "n_inner",
    "d_ff",
    "ffn_dim",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "hidden_dim",
    "ffn_hidden_size",
)
#: Feed-forward config keys whose ``None`` means a multiple of another key (GPT-2 family: ``n_inner=None`` is
#: ``4 * n_embd``): ``{key: (base key, factor)}``; a pruned width is then written explicitly.
CONFIG_FF_DEFAULTS = {"n_inner": ("n_embd", 4)}
#: Hugging Face config keys of the residual width of a transformer; aliases a config maps onto another key
#: (GPT-2's hidden_size -> n_embd) are skipped when written.
CONFIG_HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim")


def _attr(obj: Any, name: str) -> Any:
    """``getattr(obj, name, None)``, fast when a module lacks the attribute: ``nn.Module.__getattr__``
    raises (slowly) for every missing name, and most names looked for (num_heads, config...) are missing."""
    d = getattr(obj, "__dict__", None)
    if d is not None and name in d:
        return d[name]
    cls = type(obj)
    if (
        isinstance(obj, nn.Module)
        and cls.__getattr__ is nn.Module.__getattr__
        and cls.__getattribute__ is object.__getattribute__
        and not hasattr(cls, name)
        and name not in d.get("_parameters", ())
        and name not in d.get("_buffers", ())
        and name not in d.get("_modules", ())
    ):
        return None
    return getattr(obj, name, None)


def make_plan(graph: DependencyGraph, removed: Mapping[int, Any]) -> dict:
    """The pruning plan: JSON-serialisable dict.

    Args:
        graph: the traced graph.
        removed: ``{group index in graph.groups: unit indices to remove}``.

    Returns ``{"version", "tensors": {qualname: {dim(str): kept indices}}, "groups": [...],
    "attributes": {module path: {attr: [old, new]}}, "config": {config path: {key: [old, new]}}}``, plus
    ``"norms": {module path: {"dim", "size", "kept"}}`` when norm modules lose channels of the dim they
    normalise (graphs built with ``prune_normalized=True``; :func:`secateur.compact.norms.norm_plan`).
    Raises CompactionError if a removal empties a member or touches an unprunable unit.
    """
    model = graph.model
    tensors: dict[str, dict[str, list[int]]] = {}
    groups_out = []
    kept_units: dict[int, np.ndarray] = {}
    gone: dict[int, np.ndarray] = {}
    for gi, units in removed.items():
        g = graph.groups[gi]
        if isinstance(units, np.ndarray):
            rm = units.astype(np.int64, copy=False).ravel()
            if rm.size > 1 and not (rm[1:] > rm[:-1]).all():  # already sorted and unique: as np.unique gives
                rm = np.unique(rm)
        else:
            rm = np.unique(np.asarray(list(units), dtype=np.int64))
        if rm.size == 0:
            continue
        if rm[0] < 0 or rm[-1] >= g.n_units:
            raise CompactionError(f"group {g.name}: unit index out of range 0..{g.n_units - 1}")
        if not g.prunable[rm].all():
            raise CompactionError(
                f"group {g.name}: units {rm[~g.prunable[rm]].tolist()} are not prunable "
                f"({'; '.join(g.reasons) or 'frozen'})"
            )
        keep_mask = np.ones(g.n_units, dtype=bool)
        keep_mask[rm] = False
        keep = np.flatnonzero(keep_mask)
        kept_units[gi] = keep
        gone[gi] = rm
        groups_out.append({"group": g.name, "n_units": g.n_units, "removed": rm.tolist()})
        keep_list = None
        kept_of: dict[int, list[int]] = {}  # members sharing one unit map (the graph shares them): once
        for m in g.members:
            kept = kept_of.get(id(m.unit_of))
            if kept is None:
                if _is_identity(m.unit_of, g.n_units):  # index i is unit i: the kept units are the indices
                    if keep_list is None:
                        keep_list = keep.tolist()
                    kept = keep_list
                else:
                    kept = np.nonzero(keep_mask[m.unit_of])[0].tolist()  # indices whose unit stays
                kept_of[id(m.unit_of)] = kept
            kept = kept.copy()  # each member its own list (plans are data a caller may edit)
            if not kept:
                raise CompactionError(
                    f"group {g.name}: removing units {rm.tolist()} empties {m.name} dim {m.dim}"
                )
            tensors.setdefault(m.name, {})[str(m.dim)] = kept
    index = _class_index(graph)
    attributes, events = _head_attributes(graph, kept_units, index)
    _stored_sizes(graph, gone, attributes, {n.rpartition(".")[0] for n in tensors})
    norms = norm_plan(graph, gone)
    plan = {
        "version": PLAN_VERSION,
        "tensors": tensors,
        "groups": groups_out,
        "attributes": attributes,
        "config": {},
    }
    if norms:
        plan["norms"] = norms
    plan["config"] = _config_changes(model, graph, kept_units, attributes, events, index)
    return plan


def check_plan(plan: Any) -> None:
    """Refuse an in-memory plan that is not shaped like one (before anything is changed).

    Checks the structure only: a mapping whose ``"tensors"`` is a mapping of ``{dim: kept indices}``
    mappings, and, where present, ``"attributes"`` / ``"config"`` mappings of ``{key: [old, new]}`` and a
    ``"norms"`` mapping. Whether names, dims and indices fit the model is found while applying it
    (:func:`secateur.compact.apply.compact`, which rolls back).

    Raises:
        CompactionError: naming the section (and tensor or module) that is malformed.
    """
    if not isinstance(plan, Mapping) or not isinstance(plan.get("tensors"), Mapping):
        raise CompactionError(f"a plan is a mapping with a 'tensors' mapping, got {type(plan).__name__}")
    for name, dims in plan["tensors"].items():
        if not isinstance(dims, Mapping):
            raise CompactionError(
                f"plan tensor {name!r}: expected a mapping {{dim: kept indices}}, got {type(dims).__name__}"
            )
    for section in ("attributes", "config"):
        entries = plan.get(section)
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            raise CompactionError(f"plan {section!r} must be a mapping, got {type(entries).__name__}")
        for where, changes in entries.items():
            if not isinstance(changes, Mapping) or not all(
                isinstance(v, (list, tuple)) and len(v) == 2 for v in changes.values()
            ):
                raise CompactionError(f"plan {section!r} entry {where!r}: expected {{key: [old, new]}}")
    norms = plan.get("norms")
    if norms is not None and not isinstance(norms, Mapping):
        raise CompactionError(f"plan 'norms' must be a mapping, got {type(norms).__name__}")


def _is_identity(unit_of: np.ndarray, n: int) -> bool:
    """``unit_of == arange(n)``: one index per unit, in order (most channel members)."""
    return (
        unit_of.size == n
        and (n == 0 or (unit_of[0] == 0 and unit_of[-1] == n - 1))
        and (n < 3 or bool((unit_of[1:] > unit_of[:-1]).all()))
    )


def _class_index(graph: DependencyGraph) -> tuple[np.ndarray, np.ndarray]:
    """``(group_of, unit_of)``: for every atom class label, the index of the group holding it and its unit
    there (``-1`` where no listed group holds it). Every class belongs to one group; if several listed it,
    the later one would win (as a dict filled in group order would)."""
    groups = graph.groups
    if not groups:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    sizes = np.array([g.n_units for g in groups], dtype=np.int64)
    cls = np.concatenate([np.asarray(g.classes, dtype=np.int64) for g in groups])
    n = int(cls.max()) + 1 if cls.size else 0
    group_of = np.full(n, -1, dtype=np.int64)
    unit_of = np.full(n, -1, dtype=np.int64)
    group_of[cls] = np.repeat(np.arange(len(groups), dtype=np.int64), sizes)
    unit_of[cls] = np.arange(cls.size, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return group_of, unit_of


def _lookup_classes(
    index: tuple[np.ndarray, np.ndarray], classes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Group and unit of each class in ``classes`` (``-1`` for classes no group holds)."""
    group_of, unit_of = index
    c = np.asarray(classes, dtype=np.int64)
    ok = (c >= 0) & (c < group_of.size)
    if not ok.any():
        return np.full(c.shape, -1, dtype=np.int64), np.full(c.shape, -1, dtype=np.int64)
    cc = np.where(ok, c, 0)
    return np.where(ok, group_of[cc], -1), np.where(ok, unit_of[cc], -1)


def _head_attributes(
    graph: DependencyGraph, kept_units: dict[int, np.ndarray], index: tuple | None = None
) -> tuple[dict, list]:
    """num_heads-like attributes of the modules where a channel dim was split into heads, and the
    changed head splits as ``(innermost module path, old count, new count)``."""
    if index is None:
        index = _class_index(graph)
    attrs: dict[str, dict[str, list]] = {}
    events: list[tuple[str, int, int]] = []
    modules = ModuleLookup(graph.model)
    values: dict[tuple[str, str], Any] = {}  # (module path, attribute) -> value, each read once
    # attributes the shape ops read: their values are solved from what the code does (_stored_sizes)
    traced = read_attributes(getattr(graph, "shape_uses", ()))

    def read(path: str, a: str) -> Any:
        if (path, a) not in values:
            values[(path, a)] = _attr(modules[path], a)
        return values[(path, a)]

    for ev in graph.splits:
        if ev.kind != "heads" or ev.classes is None or len(ev.classes) == 0:
            continue
        gids, units = _lookup_classes(index, ev.classes)
        if (gids < 0).any():
            continue
        gi = int(gids[0])
        if gi in kept_units:  # units of this split kept in the group of its first unit
            keep = np.zeros(graph.groups[gi].n_units, dtype=bool)
            keep[kept_units[gi]] = True
            n_new = int(keep[units[units < keep.size]].sum())
        else:
            n_new = ev.n_outer
        if n_new == ev.n_outer:  # unchanged layers vote for the old count (a config holds one value)
            events.append((ev.module_paths[0], ev.n_outer, n_new))
            continue
        events.append((ev.module_paths[0], ev.n_outer, n_new))
        for path in ev.module_paths[:2]:
            hit = False
            for names in (HEAD_ATTRS, KV_HEAD_ATTRS):
                for a in names:
                    v = read(path, a)
                    if isinstance(v, int) and not isinstance(v, bool) and v == ev.n_outer:
                        attrs.setdefault(path, {})[a] = [v, n_new]
                        hit = True
            if hit:
                for a in WIDTH_ATTRS:
                    v = read(path, a)
                    if isinstance(v, int) and not isinstance(v, bool) and v == ev.n_outer * ev.inner:
                        attrs.setdefault(path, {})[a] = [v, n_new * ev.inner]
                hd = read(path, "head_dim")
                if isinstance(hd, int) and hd != ev.inner and (path, "head_dim") not in traced:
                    cls = type(modules[path]).__name__
                    raise IncompatibleGroupError(
                        f"module {path} ({cls}): its head_dim {hd} differs from the head size "
                        f"{ev.inner} the trace saw, so its heads cannot be removed consistently; protect it"
                    )
                break
    return attrs, events


def _new_size_counter(graph: DependencyGraph, gone: Mapping[int, np.ndarray]) -> Callable[[np.ndarray], int]:
    """``new_size(classes)``: how many indices of a dim (given by their atom classes) stay when the units
    ``gone`` (``{group index: removed units}``) are removed; classes no group holds always stay."""
    n = 1 + max((int(g.classes.max()) for g in graph.groups if len(g.classes)), default=-1)
    removed = np.zeros(max(n, 0), dtype=bool)
    for gi, rm in gone.items():
        removed[np.asarray(graph.groups[gi].classes)[np.asarray(rm, dtype=np.int64)]] = True

    def new_size(classes: np.ndarray) -> int:
        c = np.asarray(classes)
        inside = c[c < removed.size]
        return int(c.size - removed[inside].sum())

    return new_size


#: Layer attributes that compaction refreshes from the sliced weights (see
#: :func:`~secateur.compact.apply.compact`): not repeated in a plan's ``"attributes"`` when shape ops
#: read them.
REFRESHED_ATTRS = frozenset(
    "nf nx in_features out_features in_channels out_channels num_features num_embeddings embedding_dim "
    "num_channels".split()
)


def _stored_sizes(
    graph: DependencyGraph, gone: Mapping[int, np.ndarray], attributes: dict, sliced: set[str]
) -> None:
    """Add to ``attributes`` the module attributes that the model's shape ops read (``num_heads``,
    ``head_dim``, a stored split size or tuple: :mod:`secateur.graph.symbolic`) with their values after
    removing ``gone``; an attribute those ops read and that must keep its value overrides a guess of
    :func:`_head_attributes`. ``sliced``: paths of the modules with a sliced tensor (their
    :data:`REFRESHED_ATTRS` follow the weights and are not listed).

    Raises:
        ShapeConflictError: a size the model's code computes cannot match the pruned tensors (a literal on
            a pruned dim, a formula whose sources do not shrink with it), naming the op, module, file and
            line, and the groups whose removal alone causes it.
    """
    uses = getattr(graph, "shape_uses", None)
    if not uses or not gone:
        return
    solution = solve(uses, _new_size_counter(graph, gone))
    if solution.conflicts:
        raise _conflict_error(graph, gone, solution.conflicts)
    for (path, name, index), (old, new) in solution.values.items():
        if index is None and new == old and name in attributes.get(path, {}):
            del attributes[path][name]  # the code reads it where its size does not change
            if not attributes[path]:
                del attributes[path]
    for path, changes in attribute_changes(solution).items():
        for name, change in changes.items():
            if not (path in sliced and name in REFRESHED_ATTRS):
                attributes.setdefault(path, {})[name] = change


def _conflict_error(
    graph: DependencyGraph, gone: Mapping[int, np.ndarray], conflicts: list[str]
) -> ShapeConflictError:
    """The error for sizes that cannot match, naming the groups whose removal alone causes a conflict
    (each tried alone: no forward pass, only the recorded sizes)."""
    bad: dict[int, str] = {}
    if len(gone) == 1:
        bad = {gi: conflicts[0] for gi in gone}
    else:
        for gi, rm in gone.items():
            alone = solve(graph.shape_uses, _new_size_counter(graph, {gi: rm}))
            if alone.conflicts:
                bad[gi] = alone.conflicts[0]
    if bad:
        lines = "\n".join(f"  group {graph.groups[gi].name}: {why}" for gi, why in bad.items())
    else:
        lines = "\n".join(f"  {why}" for why in conflicts[:5]) + "\n  (only these groups together)"
    return ShapeConflictError(
        f"removing these units makes a size that the model's code computes wrong (the sizes of shape ops "
        f"are traced to module attributes, tensor sizes and literals); the model is unchanged:\n{lines}\n"
        f"Protect those modules, or pass skip_incompatible=True to leave these groups whole.",
        bad,
    )


def hf_configs(model: nn.Module) -> dict[str, Any]:
    """The Hugging Face configs of ``model`` a plan may change, by key: ``""`` for ``model.config`` and
    ``"text_config"``, ``"vision_config"``, ``"audio_config"``, ``"encoder"``, ``"decoder"`` for its
    sub-configs (those that exist and have ``to_dict``). ``{}`` for a model without a config. A plan's
    ``"config"`` section is keyed the same way."""
    cfg = getattr(model, "config", None)
    out: dict[str, Any] = {}
    if cfg is None or not hasattr(cfg, "to_dict"):
        return out
    out[""] = cfg
    for k in ("text_config", "vision_config", "audio_config", "encoder", "decoder"):
        sub = getattr(cfg, k, None)
        if sub is not None and hasattr(sub, "to_dict"):
            out[k] = sub
    return out


def config_owner(model: nn.Module, path: str) -> str:
    """The key (in :func:`hf_configs`) of the Hugging Face config that the module at ``path`` was built from:
    that of its closest ancestor (itself included) whose ``.config`` is one of the model's configs, ``""``
    (``model.config``) when none is. A plan's ``"config"`` section is keyed the same way.

    Raises:
        AttributeError: ``path`` is not a submodule of ``model``.
    """
    ids = {id(c): k for k, c in hf_configs(model).items()}
    modules = ModuleLookup(model)
    while True:
        c = _attr(modules[path], "config")
        if c is not None and id(c) in ids:
            return ids[id(c)]
        if not path:
            return ""
        path = path.rpartition(".")[0]


_LAYER_INDEX = re.compile(r"\.\d+\.")


def _layer_free_key(g: Group) -> tuple[str, ...]:
    """A group's members with layer indices blanked: the same group of another layer has the same key."""
    return tuple(sorted(_LAYER_INDEX.sub(".#.", m.name) + f":{m.dim}" for m in g.members))


def _config_changes(
    model: nn.Module,
    graph: DependencyGraph,
    kept_units: dict[int, np.ndarray],
    attributes: dict,
    events: list,
    index: tuple | None = None,
) -> dict:
    """Hugging Face config keys to update, only where every layer agrees on the new value."""
    cfgs = hf_configs(model)
    if not cfgs:
        return {}
    changes: dict[str, dict[str, list]] = {}
    # which config does a module path use: the closest ancestor with a .config attribute
    cfg_ids = {id(c): k for k, c in cfgs.items()}

    modules = ModuleLookup(model)
    memo: dict[str, str] = {}

    def cfg_key_of(path: str) -> str:
        key = memo.get(path)
        if key is None:
            c = _attr(modules[path], "config")
            if c is not None and id(c) in cfg_ids:
                key = cfg_ids[id(c)]
            else:
                key = cfg_key_of(path.rpartition(".")[0]) if path else ""
            memo[path] = key
        return key

    values: dict[tuple[str, str], Any] = {}  # config values read once (HF config getattr is slow)

    def value(ck: str, k: str) -> Any:
        if (ck, k) not in values:
            v = getattr(cfgs[ck], k, None)
            if v is None and k in CONFIG_FF_DEFAULTS:  # the width the model derives from another key
                base, factor = CONFIG_FF_DEFAULTS[k]
                b = getattr(cfgs[ck], base, None)
                v = factor * b if isinstance(b, int) and not isinstance(b, bool) else None
            values[(ck, k)] = v
        return values[(ck, k)]

    layer_free: dict[int, tuple[str, ...]] = {}

    def layer_free_key(gi: int) -> tuple[str, ...]:
        if gi not in layer_free:
            layer_free[gi] = _layer_free_key(graph.groups[gi])
        return layer_free[gi]

    proposals: dict[tuple[str, str], set] = {}
    norm_groups = _norm_groups(graph, index)
    for gi, g in enumerate(graph.groups):  # the residual width: a group normalised by norm modules
        if gi not in norm_groups:  # those left whole (frozen ones too) vote for the old width
            continue
        ck = cfg_key_of(g.members[0].module)
        cfg = cfgs[ck]
        aliases = getattr(cfg, "attribute_map", {}) or {}
        for k in CONFIG_HIDDEN_KEYS:
            if k not in aliases and value(ck, k) == g.n_units:
                new = int(kept_units[gi].size) if gi in kept_units else g.n_units
                proposals.setdefault((ck, k), set()).add(new)
    for path, old, new in events:
        ck = cfg_key_of(path)
        for k in CONFIG_HEAD_KEYS + CONFIG_KV_KEYS:
            if value(ck, k) == old:
                proposals.setdefault((ck, k), set()).add(new)
    pruned_kinds = set()
    for gi, keep in kept_units.items():
        g = graph.groups[gi]
        if gi in norm_groups:
            continue
        if any(True for p in attributes for m in g.members if m.module.startswith(p) and p):
            continue
        pruned_kinds.add(layer_free_key(gi))
        ck = cfg_key_of(g.members[0].module)
        for k in CONFIG_FF_KEYS:
            if value(ck, k) == g.n_units:
                proposals.setdefault((ck, k), set()).add(int(keep.size))
    for gi, g in enumerate(graph.groups):  # the same group in layers left alone keeps the old width
        if gi in kept_units or gi in norm_groups or layer_free_key(gi) not in pruned_kinds:
            continue
        ck = cfg_key_of(g.members[0].module)
        for k in CONFIG_FF_KEYS:
            if value(ck, k) == g.n_units:
                proposals.setdefault((ck, k), set()).add(g.n_units)
    for (ck, k), vals in proposals.items():
        cfg = cfgs[ck]
        old = getattr(cfg, k)
        if len(vals) == 1:
            changes.setdefault(ck, {})[k] = [old, vals.pop()]
        else:
            changes.setdefault(ck, {})["_inconsistent_" + k] = [old, sorted(vals)]
    for ck, d in changes.items():
        cfg = cfgs[ck]
        hd = getattr(cfg, "head_dim", None)
        hidden = getattr(cfg, "hidden_size", None)
        if any(k in d for k in CONFIG_HEAD_KEYS):
            heads_key = next(k for k in CONFIG_HEAD_KEYS if k in d)
            if hd is None and hidden is not None:
                d["head_dim"] = [None, hidden // d[heads_key][0]]
        elif any(k in d for k in CONFIG_HIDDEN_KEYS) and hd is None and isinstance(hidden, int):
            # the head width is no longer hidden_size // heads: record it (models reading head_dim use it)
            counts = [getattr(cfg, k, None) for k in CONFIG_HEAD_KEYS]
            heads = next((h for h in counts if isinstance(h, int) and not isinstance(h, bool)), None)
            if heads:
                d["head_dim"] = [None, hidden // heads]
    # --- issue 17 hook (owner: HF config writers, secateur.compact.hf_configs): family-specific forms ---
    return family_config_changes(cfgs, changes)


def _norm_groups(graph: DependencyGraph, index: tuple | None = None) -> set[int]:
    """Indices of the groups holding the normalised channels of norm modules (graphs built with
    ``prune_normalized=True``): residual widths, whose config keys are :data:`CONFIG_HIDDEN_KEYS`."""
    wanted = [ev.classes for ev in graph.splits if ev.kind == "norm" and ev.classes is not None]
    if not wanted:
        return set()
    gids, _ = _lookup_classes(_class_index(graph) if index is None else index, np.concatenate(wanted))
    gids = gids[gids >= 0]
    return set(np.flatnonzero(np.bincount(gids)).tolist()) if gids.size else set()


class ModuleLookup:
    """Submodules by qualified path, cached: ``lookup[path]`` is the submodule at ``path`` (``""``: the
    model), resolved one name at a time through the parents' ``_modules`` and remembered, instead of a
    ``get_submodule`` walk per query (paths that are not plain submodule chains fall back to
    ``get_submodule``, which raises ``AttributeError`` for a path the model lacks). ``known``: modules
    already found by path (e.g. :attr:`secateur.graph.tracer.ModelWalk.by_path`), taken as they are."""

    def __init__(self, model: nn.Module, known: Mapping[str, nn.Module] | None = None) -> None:
        self.model = model
        self.by_path: dict[str, nn.Module] = {"": model}
        if known:
            self.by_path.update(known)

    def __getitem__(self, path: str) -> nn.Module:
        mod = self.by_path.get(path)
        if mod is None:
            parent, _, name = path.rpartition(".")
            try:
                mod = self[parent]._modules.get(name) if name else None
            except AttributeError:
                mod = None
            if mod is None:  # not a chain of registered submodules: get_submodule resolves it or raises
                mod = self.model.get_submodule(path)
            self.by_path[path] = mod
        return mod

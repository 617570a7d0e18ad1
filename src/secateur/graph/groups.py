"""Dependency graph and channel groups.

A **group** is a set of coupled channel spaces: ``n_units`` units (a channel, an attention head, a whole conv
group) that can only be removed together across every **member** (a parameter or buffer dimension). Criteria
score units by reading each member's slice; allocations choose how many units of each group go.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import gc
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur._torch import ExampleInputs, iter_tensors
from secateur.errors import ConfigError, UntracedModuleError, UntracedModuleWarning
from secateur.graph.atoms import connected_labels
from secateur.graph.symbolic import ShapeUse, render
from secateur.graph.tracer import ParamDim, SplitEvent, run_trace
from secateur.graph.untraced import MODES, freeze_around, holders, untraced_message, untraced_modules


@dataclasses.dataclass
class Member:
    """One parameter/buffer dimension in a group.

    ``unit_of``: int64 array, shape ``(size of that dim,)``: the group unit each index belongs to.
    """

    name: str
    dim: int
    unit_of: np.ndarray
    aliases: tuple[str, ...] = ()
    is_buffer: bool = False

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    def indices(self, unit: int) -> np.ndarray:
        """Indices of this dim that belong to ``unit`` (may be empty)."""
        return np.nonzero(self.unit_of == unit)[0]


@dataclasses.dataclass
class Group:
    """Coupled channels that are pruned together.

    Attributes:
        name: readable id, the first member's ``"module.param:dim"``.
        n_units: number of units (channels, heads, conv groups).
        members: every parameter/buffer dim sliced when units go.
        prunable: bool array ``(n_units,)``; False for units frozen by an op or protected by the user.
        reasons: why some units are frozen (first few), for messages.
        unit_size: indices per unit in the first member (e.g. head_dim for heads, 1 for channels).
    """

    name: str
    n_units: int
    members: list[Member]
    prunable: np.ndarray
    reasons: list[str]
    classes: np.ndarray  # atom class label of each unit, shape (n_units,)

    @property
    def unit_size(self) -> int:
        m = self.members[0]
        return int(m.unit_of.size // max(self.n_units, 1))

    @property
    def n_prunable(self) -> int:
        return int(self.prunable.sum())

    def param_slices(self) -> Iterator[tuple[str, int, list[torch.Tensor]]]:
        """Yield ``(qualname, dim, [index tensor of unit u for u in range(n_units)])`` for every member.

        A criterion reads ``param.index_select(dim, idx)`` for each unit; indices are int64 tensors.
        """
        for m in self.members:
            order = np.argsort(m.unit_of, kind="stable")
            counts = np.bincount(m.unit_of, minlength=self.n_units)
            chunks = np.split(order, np.cumsum(counts)[:-1])
            yield m.name, m.dim, [torch.from_numpy(c) for c in chunks]

    def __repr__(self) -> str:
        return (
            f"Group({self.name!r}, n_units={self.n_units}, prunable={self.n_prunable}, "
            f"members={[f'{m.name}:{m.dim}' for m in self.members]})"
        )


class DependencyGraph:
    """Channel groups of a model, traced from one forward pass on ``example_inputs`` (one per input of an
    :class:`~secateur.graph.ExampleInputs`).

    Build with :meth:`build`. ``groups`` lists every group (prunable or not); ``prunable_groups()`` those
    with at least one prunable unit.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[Group],
        splits: list[SplitEvent],
        n_ops: int,
        prune_normalized: bool = False,
        shape_uses: list[ShapeUse] | None = None,
    ) -> None:
        self.model = model
        self.groups = groups
        self.splits = splits
        self.n_ops = n_ops
        self.prune_normalized = prune_normalized
        # shape ops whose sizes come from module attributes, tensor sizes or literals (graph.symbolic)
        self.shape_uses: list[ShapeUse] = list(shape_uses or [])

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_inputs: Any,
        protect: Sequence[str] = (),
        prune_outputs: bool = False,
        device: str = "auto",
        prune_normalized: bool = False,
        untraced: str = "error",
    ) -> DependencyGraph:
        """Trace ``model`` on ``example_inputs`` (tensor, tuple of args or dict of kwargs) and group channels.

        ``example_inputs`` may be a :class:`~secateur.graph.ExampleInputs` of several such inputs: each is
        traced and the couplings of all traces are merged (cover every branch of a data-dependent ``if``).

        Args:
            protect: module name patterns (fnmatch, or regex if prefixed ``re:``) whose parameters are never
                pruned (their groups become unprunable).
            prune_outputs: allow pruning dims that reach the model's outputs (classes, vocabulary).
            device: ``"auto"`` (meta tensors, real ones if the model reads values), ``"meta"`` or ``"real"``.
            prune_normalized: also allow pruning the dims that normalisation *modules* normalise over
                (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm(1, C)``, Hugging Face ``*RMSNorm`` /
                ``*LayerNorm`` classes, :func:`secateur.graph.norms.register_norm`): the hidden size of a
                transformer. Masks made by :func:`secateur.compact.mask_model` and
                :class:`secateur.ChannelPruner` then compute those norms' statistics over the kept channels
                only (:mod:`secateur.compact.norms`), so the masked model still equals the compacted one.
                Default False: such dims stay frozen (``'layer_norm' normalises over a channel dim``).
            untraced: what to do with modules that have parameters but that no trace reached (a branch not
                taken, a training-only head; see :mod:`secateur.graph.untraced`): ``"error"`` (default)
                raises UntracedModuleError naming them; ``"freeze"`` keeps them whole, freezes every channel
                their nearest traced ancestor reads or makes (one more trace) and warns
                (UntracedModuleWarning).

        Raises:
            InvalidModelError: ``model`` is not an ``nn.Module`` or has tensors on the meta device.
            ConfigError: an example input holds an id outside an embedding's table (names the input and
                the layer), or ``untraced`` is not ``"error"``/``"freeze"``.
            UnsupportedOpError: an op without a rule ran on a tensor carrying channels (names op and module).
            UntracedModuleError: ``untraced="error"`` and some parameterised modules were never reached.
            GraphError: the forward pass failed.
        """
        from secateur.graph.rules import MODULE_RULES, RULES

        module_rules = MODULE_RULES
        if prune_normalized:
            from secateur.graph.norms import norm_module_rules

            module_rules = {**norm_module_rules(model), **MODULE_RULES}  # rules users registered win
        if untraced not in MODES:
            raise ConfigError(f"untraced must be one of {MODES}, got {untraced!r}")
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a trace allocates many small objects and frees them by refcount: no cycles to collect
        try:
            tracer, out = run_trace(model, example_inputs, RULES, module_rules, device)
            missing = untraced_modules(tracer)
            if missing:
                if untraced == "error":
                    raise UntracedModuleError(untraced_message(tracer, missing))
                by_holder = holders(tracer, missing)
                tracer, out = run_trace(model, example_inputs, RULES, module_rules, device, list(by_holder))
                lines = freeze_around(tracer, by_holder)
                warnings.warn(
                    "untraced='freeze': " + "; ".join(lines) + ". The oracle checks the traced inputs only.",
                    UntracedModuleWarning,
                    stacklevel=2,
                )
            atoms = tracer.atoms
            if not prune_outputs:
                for t in iter_tensors(out):
                    for d in tracer.dims(t):
                        if d is not None:
                            atoms.freeze(d, "reaches a model output (pass prune_outputs=True to allow)")
            labels = atoms.solve()
            for ev in tracer.splits:
                ev.classes = labels[ev.atoms]
            tracer.sym.label(labels)
            uses = tracer.sym.uses
            if isinstance(example_inputs, ExampleInputs) and len(example_inputs) > 1:
                tracer.splits = _distinct_splits(tracer.splits)
                uses = _distinct_uses(uses)
            groups = _make_groups(tracer.param_dims, labels, atoms.frozen, protect)
        finally:
            if gc_was_enabled:
                gc.enable()
        return cls(model, groups, tracer.splits, tracer.n_ops, prune_normalized, uses)

    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.n_prunable > 0]

    def group_of(self, name: str, dim: int) -> Group | None:
        """The group holding parameter ``name`` along ``dim`` (aliases accepted), or None."""
        for g in self.groups:
            for m in g.members:
                if m.dim == dim and (m.name == name or name in m.aliases):
                    return g
        return None

    def __repr__(self) -> str:
        return f"DependencyGraph({len(self.groups)} groups, {len(self.prunable_groups())} prunable)"


def _distinct_splits(splits: list[SplitEvent]) -> list[SplitEvent]:
    """One event per (modules, shape, op, kind, unit classes): each trace of several inputs records the
    same reshape again."""
    seen: set[tuple] = set()
    out = []
    for ev in splits:
        cls = ev.classes.tobytes() if ev.classes is not None else None
        key = (ev.module_paths, ev.n_outer, ev.inner, ev.op, ev.kind, cls)
        if key not in seen:
            seen.add(key)
            out.append(ev)
    return out


def _distinct_uses(uses: list[ShapeUse]) -> list[ShapeUse]:
    """One record per (op, place, sizes, formulas, classes): each trace of several inputs records the same
    shape op again."""
    seen: set[tuple] = set()
    out = []
    for u in uses:
        key = (
            u.where,
            u.site,
            tuple(
                (p.label, p.size, render(p.expr), None if p.classes is None else p.classes.tobytes())
                for p in u.positions
            ),
        )
        if key not in seen:
            seen.add(key)
            out.append(u)
    return out


def _match(name: str, patterns: Sequence[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") or name == p:
            return True
    return False


def _make_groups(
    param_dims: dict[tuple[str, int], ParamDim],
    labels: np.ndarray,
    frozen: list[tuple[np.ndarray, str]],
    protect: Sequence[str],
) -> list[Group]:
    pds = list(param_dims.values())
    if not pds:
        return []
    n = labels.size
    # members bound to the same atoms array (a weight dim bound to the activation it met, BatchNorm
    # statistics...) have the same classes: each distinct array is looked up and linked once
    slot: dict[int, int] = {}
    arrays: list[np.ndarray] = []
    member_slot = []
    for pd in pds:
        j = slot.get(id(pd.atoms))
        if j is None:
            j = slot[id(pd.atoms)] = len(arrays)
            arrays.append(pd.atoms)
        member_slot.append(j)
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    cls_all = labels[np.concatenate(arrays)]  # class of every index of every distinct array
    # a second union-find over classes joins the classes of one member: its group (vectorised)
    first_cls = cls_all[starts]
    root = connected_labels(n, np.repeat(first_cls, sizes), cls_all)
    # units: the classes present in each group, in increasing order (what np.unique per group gives)
    present = np.zeros(n, dtype=bool)
    present[cls_all] = True
    pres = np.flatnonzero(present)
    order = np.argsort(root[pres], kind="stable")
    cls_sorted = pres[order]  # classes grouped by root, increasing within a group
    root_sorted = root[cls_sorted]
    block_start = np.flatnonzero(np.r_[True, root_sorted[1:] != root_sorted[:-1]])
    block_end = np.r_[block_start[1:], root_sorted.size]
    spans = zip(block_start.tolist(), block_end.tolist())
    block_of_root = dict(zip(root_sorted[block_start].tolist(), spans))
    unit_of_cls = np.zeros(n, dtype=np.int64)
    unit_of_cls[cls_sorted] = np.arange(cls_sorted.size, dtype=np.int64) - np.repeat(
        block_start, block_end - block_start
    )
    unit_all = unit_of_cls[cls_all]
    # first reason per frozen class
    frozen_mask = np.zeros(n, dtype=bool)
    first_reason = np.full(n, -1, dtype=np.int64)
    reasons_text = [why for _, why in frozen]
    if frozen:
        cls = labels[np.concatenate([a for a, _ in frozen])]
        rid = np.concatenate([np.full(a.size, k, dtype=np.int64) for k, (a, _) in enumerate(frozen)])
        frozen_mask[cls] = True
        order = np.argsort(rid, kind="stable")[::-1]  # earliest reason written last
        first_reason[cls[order]] = rid[order]
    by_root: dict[int, list[int]] = {}
    root_of_slot = root[first_cls].tolist()
    for i, j in enumerate(member_slot):
        by_root.setdefault(root_of_slot[j], []).append(i)
    starts_l, ends_l = starts.tolist(), ends.tolist()
    views: dict[int, np.ndarray] = {}  # one unit map per distinct atoms array, shared by its members
    groups = []
    for r, members_idx in by_root.items():
        b0, b1 = block_of_root[r]
        classes = cls_sorted[b0:b1]
        members = []
        modules = set()
        for i in members_idx:
            pd = pds[i]
            j = member_slot[i]
            unit_of = views.get(j)
            if unit_of is None:
                unit_of = views[j] = unit_all[starts_l[j] : ends_l[j]]
            members.append(Member(pd.name, pd.dim, unit_of, pd.aliases, pd.is_buffer))
            modules.add(pd.name.rpartition(".")[0])
        prunable = ~frozen_mask[classes]
        rids = first_reason[classes]
        reasons = [reasons_text[k] for k in dict.fromkeys(rids[rids >= 0].tolist())][:5]
        if len(modules) == 1 and not prunable.any():
            continue  # kernel dims, input channels of a stem, classifier rows: not worth listing
        if protect:
            hit = [
                m.name
                for m in members
                if _match(m.module, protect) or any(_match(a.rpartition(".")[0], protect) for a in m.aliases)
            ]
            if hit:
                prunable[:] = False
                reasons.append(f"protected by the user ({hit[0]})")
        first = members[0]
        groups.append(
            Group(f"{first.name}:{first.dim}", int(classes.size), members, prunable, reasons, classes)
        )
    return groups

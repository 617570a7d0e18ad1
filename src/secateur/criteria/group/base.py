"""The group-criterion interface, its registry, reading members through masks, and statistics collection."""


from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group, Member
from secateur.registry import Registry

GroupScores = dict[int, np.ndarray]
NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)



# ----------------------------------------------------------------------------------------------------
# reading members through masks
# ----------------------------------------------------------------------------------------------------
def owner(model: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    path, _, attr = qualname.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def effective_tensor(model: nn.Module, qualname: str) -> torch.Tensor:
    """The tensor forward sees for parameter/buffer ``qualname`` (masked through a parametrization)."""
    mod, attr = owner(model, qualname)
    return getattr(mod, attr)


def stored_parameter(model: nn.Module, qualname: str) -> torch.Tensor:
    """The stored tensor behind ``qualname`` (the optimizer's Parameter, ``.original`` if masked)."""
    mod, attr = owner(model, qualname)
    if parametrize.is_parametrized(mod, attr):
        return mod.parametrizations[attr].original
    return getattr(mod, attr)


def rows_by_index(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as a matrix ``(t.shape[dim], -1)``, float64 (one row per index of ``dim``)."""
    t = t.detach().double()
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)


def unit_sum(values: np.ndarray, m: Member, n_units: int) -> np.ndarray:
    return np.bincount(m.unit_of, weights=values, minlength=n_units)


def unit_mean(values: np.ndarray, m: Member, n_units: int) -> np.ndarray:
    return unit_sum(values, m, n_units) / np.maximum(np.bincount(m.unit_of, minlength=n_units), 1)


def weight_dims(mod: nn.Module) -> tuple[int, int] | None:
    """Dimensions ``(output channels, input channels)`` of ``mod.weight``, or None if ``mod`` is not a
    conv / linear layer."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return (1, 0) if mod.transposed else (0, 1)
    if isinstance(mod, nn.Linear):
        return (0, 1)
    if type(mod).__name__ == "Conv1D":  # Hugging Face GPT-2: weight (in, out)
        return (1, 0)
    return None


def weight_members(group: Group, model: nn.Module, side: int) -> list[Member]:
    """Members that are dim ``weight_dims(module)[side]`` of a conv / linear ``weight``."""
    out = []
    for m in group.members:
        if m.is_buffer or not m.name.endswith(".weight"):
            continue
        dims = weight_dims(model.get_submodule(m.module) if m.module else model)
        if dims is not None and dims[side] == m.dim:
            out.append(m)
    return out


def producer_members(group: Group, model: nn.Module) -> list[Member]:
    """Members that are the output-channel dim of a conv / linear ``weight`` (the layers producing the
    group's channels). Several for residual groups; none for e.g. a group of embedding columns."""
    return weight_members(group, model, 0)


def consumer_members(group: Group, model: nn.Module) -> list[Member]:
    """Members that are the input-channel dim of a conv / linear ``weight``: the layers reading the group's
    channels (for attention heads, the output projection that consumes the concatenated head outputs)."""
    return weight_members(group, model, 1)


def head_group_ids(graph: DependencyGraph, group_ids: Sequence[int] | None = None) -> list[int]:
    """Indices (into ``graph.groups``) of the groups whose units are attention heads: groups holding the
    units of a traced head split (a view of a channel dim into ``(heads, head_dim)``). ``group_ids``
    restricts the search (default: all groups)."""
    wanted = [ev.classes for ev in graph.splits if ev.kind == "heads" and ev.classes is not None]
    if not wanted:
        return []
    classes = np.unique(np.concatenate(wanted))
    ids = range(len(graph.groups)) if group_ids is None else group_ids
    return [gi for gi in ids if np.isin(graph.groups[gi].classes, classes).any()]


def mean_normalised_sum(parts: list[np.ndarray], n_units: int) -> np.ndarray:
    total = np.zeros(n_units)
    for p in parts:
        total += p / max(float(np.mean(np.abs(p))), 1e-30)
    return total


# ----------------------------------------------------------------------------------------------------
# interface and registry
# ----------------------------------------------------------------------------------------------------
class GroupCriterion:
    """Base class: scores the units of graph groups.

    Attributes:
        name: registry name.
        needs_data: True when scores come from gradients/activations (statistics must be collected).
        comparable: True when raw scores are on one scale across groups (estimates of a loss change), so
            a global ranking needs no per-group normalisation.
        needs_backward: for a data-dependent criterion, whether :func:`collect` runs a loss and a backward
            pass per batch (gradients: Taylor, Fisher, LLM-Pruner); False: forward passes only, under
            ``no_grad``, no loss (activation statistics recorded by hooks: Wanda-sp).
        per_sample: whether :func:`collect` feeds each batch one sample at a time (per-sample gradients:
            LLM-Pruner's ``element2`` Fisher term), calling :meth:`accumulate` after each.
    """

    name = "base"
    needs_data = False
    comparable = False
    needs_backward = True
    per_sample = False

    def scores(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> GroupScores:
        """``{group index: (n_units,) float64 scores}`` for ``group_ids`` (indices into ``graph.groups``)."""
        return {gi: self.group_scores(graph.groups[gi], model) for gi in group_ids}

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- statistics (data-dependent criteria) ------------------------------------------------------
    def attach(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> None:
        """Install hooks (Fisher). Called once by the pruner; a no-op by default."""

    def detach(self) -> None:
        """Remove hooks installed by :meth:`attach`."""

    def accumulate(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> None:
        """Read the gradients now in ``.grad`` (after a backward) into the statistics; no-op by default."""

    def has_stats(self) -> bool:
        """Whether :meth:`scores` can be computed now (always for data-free criteria)."""
        return True

    def after_prune(self) -> None:
        """Called after masks changed; clears per-interval statistics."""

    def missing_stats_message(self) -> str:
        return (
            f"criterion {self.name!r} needs gradients: call pruner.accumulate() after loss.backward() in "
            "your loop, use the pruner as a Trainer callback, or pass data=(x, y) batches to the pruner"
        )


Factory = Callable[..., GroupCriterion]

#: Group (structured) criteria by name: every structured entry point resolves names here.
GROUP_CRITERIA: Registry[Factory] = Registry("group criterion")


def register_group_criterion(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering a :class:`GroupCriterion` factory under ``name``."""
    return GROUP_CRITERIA.register(name)


def available_group_criteria() -> list[str]:
    """Registered group criterion names."""
    return GROUP_CRITERIA.list()


def get_group_criterion(
    spec: str | GroupCriterion | Callable[[Group, nn.Module], Any], **kwargs: Any
) -> GroupCriterion:
    """A criterion from its name (``kwargs`` go to its constructor), an instance, or a callable
    ``f(group, model) -> (n_units,) scores`` (wrapped in :class:`FunctionCriterion`).

    Raises:
        ConfigError: unknown name (lists the registered ones) or bad constructor arguments.
    """
    if isinstance(spec, GroupCriterion):
        return spec
    if isinstance(spec, str):
        factory = GROUP_CRITERIA.get(spec)
        try:
            return factory(**kwargs)
        except TypeError as e:
            raise ConfigError(f"group criterion {spec!r}: bad arguments {sorted(kwargs)}: {e}") from e
    if callable(spec):
        return FunctionCriterion(spec)
    raise ConfigError(f"criterion must be a name, a GroupCriterion or a callable, got {type(spec).__name__}")


class FunctionCriterion(GroupCriterion):
    """Wraps ``f(group, model) -> (n_units,) scores`` (array-like, higher = keep)."""

    name = "function"

    def __init__(self, fn: Callable[[Group, nn.Module], Any]) -> None:
        self.fn = fn

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray:
        s = self.fn(group, model)
        if isinstance(s, torch.Tensor):
            s = s.detach().cpu().double().numpy()
        return np.asarray(s, dtype=float)



def iter_inputs(args: tuple, kwargs: dict) -> Iterable[Any]:
    """The positional then keyword inputs of a call, in order."""
    yield from args
    yield from kwargs.values()


def split_samples(x: Any, y: Any) -> list[tuple[Any, Any]]:
    """One batch ``(x, y)`` as ``[(x_i, y_i)]``, one pair per sample: every tensor in ``x`` (a tensor, a tuple
    of positional inputs or a dict of keyword inputs) and ``y`` whose dim 0 has the batch size (that of the
    first tensor of ``x``) is sliced ``[i : i + 1]``; other values (``use_cache=False``, None) are passed as
    they are.

    Raises:
        ConfigError: ``x`` holds no tensor (no batch size to split by).
    """
    first = next((t for t in iter_inputs(*_as_call(x)) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    if first is None:
        raise ConfigError("per-sample collection needs a tensor input with the batch on dim 0")
    n = first.shape[0]

    def take(v: Any, i: int) -> Any:
        return v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v

    out = []
    for i in range(n):
        if isinstance(x, dict):
            xi: Any = {k: take(v, i) for k, v in x.items()}
        elif isinstance(x, tuple):
            xi = tuple(take(v, i) for v in x)
        else:
            xi = take(x, i)
        out.append((xi, take(y, i)))
    return out


def _as_call(x: Any) -> tuple[tuple, dict]:
    """``x`` (a tensor, a tuple of positional inputs or a dict of keyword inputs) as ``(args, kwargs)``."""
    if isinstance(x, dict):
        return (), x
    return (x if isinstance(x, tuple) else (x,)), {}


def collect(
    criterion: GroupCriterion,
    model: nn.Module,
    graph: DependencyGraph,
    group_ids: Sequence[int],
    data: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> None:
    """Run forward/backward on ``data`` (a batch ``(x, y)`` or an iterable of batches; ``x`` a tensor, a tuple
    of positional inputs or a dict of keyword inputs, e.g. a Hugging Face batch) and feed the
    criterion's statistics. The model's ``.grad`` fields are restored afterwards; its train/eval mode is
    used as it is (a caller scoring calibration data puts the model in eval mode).

    ``loss_fn(output, y)`` defaults to cross-entropy (classification logits ``(N, classes)``). For a Hugging
    Face causal LM, :func:`secateur.llm.calibration.causal_lm_data` gives ``(x, labels)`` batches whose ``x``
    carries ``labels=`` and :func:`secateur.llm.calibration.causal_lm_loss` reads the model's own loss.

    The criterion says which passes it needs: ``needs_backward = False`` gets forward passes only (under
    ``no_grad``, no loss computed, :meth:`GroupCriterion.accumulate` not called: its hooks record);
    ``per_sample = True`` gets each batch one sample at a time (:func:`split_samples`).
    """
    batches: Iterable = (
        [data]
        if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, dict))
        else data
    )
    backward = criterion.needs_backward
    loss_fn = loss_fn or nn.functional.cross_entropy
    params = list(model.parameters())
    saved = [p.grad for p in params]
    detach_after = not getattr(criterion, "handles", True)
    if detach_after:
        criterion.attach(model, graph, group_ids)
    try:
        with torch.enable_grad() if backward else torch.no_grad():
            for batch in batches:
                x, y = batch[0], batch[1]
                for xi, yi in split_samples(x, y) if criterion.per_sample else [(x, y)]:
                    args, kwargs = _as_call(xi)
                    if not backward:
                        model(*args, **kwargs)
                        continue
                    for p in params:
                        p.grad = None
                    loss_fn(model(*args, **kwargs), yi).backward()
                    criterion.accumulate(model, graph, group_ids)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        if detach_after:
            criterion.detach()

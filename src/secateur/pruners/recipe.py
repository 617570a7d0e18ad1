"""Recipe: a pruning run as one declarative object, the same in Python and in YAML.

A recipe names the pieces of the grammar (granularity, criterion, allocation, sparsity, schedule,
target, scope / protect) and the fine-tuning budget. It is plain validated data (pydantic, frozen):
``secateur.Recipe(...)`` in Python and a ``recipe.yaml`` file hold the same object, and
:meth:`Recipe.to_yaml` / :meth:`Recipe.from_yaml` convert between them without loss (peft's
``LoraConfig`` is the model: one config object per use, serialisable). :meth:`Recipe.build` turns
it into the pruner that carries it out in any training loop; ``secateur prune`` (the CLI, in
:mod:`secateur.app.run`) runs it end to end.

Schedules are written in fractions of the fine-tuning run, so the same recipe works for any
dataset size; :meth:`ScheduleSpec.build` turns them into optimizer-step counts once the number of
steps is known. Unknown keys and bad values raise :class:`~secateur.errors.ConfigError` naming the
field and the allowed values, with a did-you-mean suggestion for a misspelt key or choice at any
nesting level (the same from ``Recipe(...)``, :meth:`Recipe.from_dict` and :meth:`Recipe.from_yaml`).

Example: the shipped ``taylor_channels_2x`` recipe, in Python and as YAML::

    recipe = secateur.Recipe(
        granularity="channel", criterion="taylor", allocation="global", target="macs", sparsity=0.5,
        schedule={"kind": "iterative", "steps": 5, "end": 0.5}, finetune={"epochs": 2, "lr": 0.02},
    )

    granularity: channel
    criterion: taylor
    allocation: global
    target: macs
    sparsity: 0.5
    schedule: {kind: iterative, steps: 5, end: 0.5}
    finetune: {epochs: 2, lr: 0.02}
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import re
import stat
import types
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from secateur.errors import ConfigError, did_you_mean
from secateur.schedules import Cubic, Iterative, OneShot
from secateur.scope import Scope

__all__ = [
    "MAX_RECIPE_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "ONESHOT_METHODS",
    "FinetuneSpec",
    "NMAllocation",
    "Recipe",
    "ScheduleSpec",
    "ScopeSpec",
]

#: Most YAML nodes a recipe may expand to, aliases counted at every use (a recipe has tens).
MAX_YAML_NODES = 10_000
#: Deepest nesting of mappings/sequences in a recipe.
MAX_YAML_DEPTH = 32
#: Largest recipe file read, in bytes.
MAX_RECIPE_BYTES = 1 << 20
#: Criteria that prune N:M from calibration statistics in one shot and live in :mod:`secateur.llm`
#: (Wanda, Sun et al. 2023; SparseGPT, Frantar & Alistarh 2023): :func:`secateur.llm.prune_linears`
#: applies them to a model's Linear layers; :meth:`Recipe.build` does not (pruners sit below llm).
ONESHOT_METHODS = ("wanda", "sparsegpt")

_NM = re.compile(r"^(\d+):(\d+)$")
#: Where the recipe being validated comes from, for error messages (a file, "(YAML text)", "(Python)").
_SOURCE: ContextVar[str] = ContextVar("secateur_recipe_source", default="(Python)")
_MODULE_TYPES = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d, "Linear": nn.Linear}


# ----------------------------------------------------------------------------------------------------
# safe, bounded YAML
# ----------------------------------------------------------------------------------------------------
class _RecipeLimit(Exception):
    """A recipe document over a size limit (nesting depth, alias expansion)."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (no Python objects) with bounded nesting and bounded alias expansion.

    An alias (``*a``) re-uses the node of its anchor (``&a``), so a document of a few lines can stand for
    billions of nodes once expanded (the "billion laughs" alias bomb), which any later traversal (validation,
    ``model_dump``, :meth:`Recipe.to_yaml`) pays for. Each document's node graph is measured as its expanded
    tree (shared nodes counted at every use, memoised so measuring is linear) and refused above
    :data:`MAX_YAML_NODES`; a recursive alias (a node containing itself) is refused too; nesting deeper than
    :data:`MAX_YAML_DEPTH` is refused while composing (before Python's recursion limit).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _RecipeLimit(f"nests deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        if node is not None:
            size = _expanded_size(node, {}, set())
            if size > MAX_YAML_NODES:
                raise _RecipeLimit(
                    f"expands to more than {MAX_YAML_NODES} nodes once its aliases are expanded "
                    "(an alias bomb?); write the values out or use fewer aliases"
                )
        return node


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Nodes in the tree ``node`` expands to (an alias counted at each use), capped just above the limit."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise _RecipeLimit("holds a recursive alias (a node that contains itself)")
    active.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children: list = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, memo, active)
        if total > MAX_YAML_NODES:
            total = MAX_YAML_NODES + 1
            break
    active.discard(key)
    memo[key] = total
    return total


def _json_like_size(value: Any, memo: dict[int, int], active: set[int], depth: int = 0) -> int:
    """Expanded size of a plain-data value (dicts, lists, scalars), shared objects counted at each use.

    Raises ValueError: a recursive structure, nesting deeper than :data:`MAX_YAML_DEPTH`."""
    if not isinstance(value, (dict, list, tuple)):
        return 1
    key = id(value)
    if key in memo:
        return memo[key]
    if key in active:
        raise ValueError("holds a recursive structure (a value that contains itself)")
    if depth > MAX_YAML_DEPTH:
        raise ValueError(f"nests deeper than {MAX_YAML_DEPTH} levels")
    active.add(key)
    items = [v for kv in value.items() for v in kv] if isinstance(value, dict) else list(value)
    total = 1
    for v in items:
        total += _json_like_size(v, memo, active, depth + 1)
        if total > MAX_YAML_NODES:
            total = MAX_YAML_NODES + 1
            break
    active.discard(key)
    memo[key] = total
    return total


def parse_yaml(text: str, source: str) -> Any:
    """One YAML document, safe types only, nesting and alias expansion bounded (:class:`_BoundedLoader`).

    Raises:
        ConfigError: invalid YAML, a document over the limits, or several documents; names ``source``.
    """
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _RecipeLimit as e:
        raise ConfigError(f"invalid recipe {source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid recipe {source}: not valid YAML: {e}") from None
    finally:
        loader.dispose()


def read_recipe_file(p: Path) -> str:
    """The text of the recipe file ``p``: a regular file (a FIFO would block) of at most
    :data:`MAX_RECIPE_BYTES`, UTF-8.

    Raises:
        ConfigError: a missing file, a folder/FIFO/device, a file over the limit, or text that is not UTF-8.
    """
    try:
        st = os.stat(p)
    except OSError as e:
        raise ConfigError(f"invalid recipe {p}: cannot read it: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"invalid recipe {p}: not a regular file (a folder, FIFO or device)")
    if st.st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"invalid recipe {p}: {st.st_size} bytes, more than the {MAX_RECIPE_BYTES} allowed")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"invalid recipe {p}: cannot read it as UTF-8 text: {e}") from None


# ----------------------------------------------------------------------------------------------------
# the data model
# ----------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    """Frozen, no unknown keys, no coercion (``"0.5"`` is not a number); tuples are read as lists, so
    Python callers may write ``protect=("fc",)``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _tuples_as_lists(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
        return data


class ScopeSpec(_Strict):
    """Which layers may be pruned (see :class:`secateur.scope.Scope`); patterns are fnmatch globs or
    ``"re:..."`` regexes. Element and N:M granularities only (channel pruning selects with ``protect``)."""

    types: list[Literal["Conv1d", "Conv2d", "Conv3d", "Linear"]] = ["Conv1d", "Conv2d", "Conv3d", "Linear"]
    include: list[str] | None = None
    exclude: list[str] = []
    exclude_first: bool = False
    exclude_last: bool = False


class ScheduleSpec(_Strict):
    """When to prune, in fractions of the fine-tuning steps (the amount is :attr:`Recipe.sparsity`).

    kind: ``one_shot`` (at ``start``), ``iterative`` (``steps`` equal stages between ``start`` and
    ``end``, linear or geometric), ``cubic`` (Zhu & Gupta 2017, ``updates`` mask updates from
    ``start`` to ``end``). A run with fewer optimizer steps between ``start`` and ``end`` than stages or
    updates gets one per step (the final sparsity is still reached at ``end``).
    """

    kind: Literal["one_shot", "iterative", "cubic"] = "one_shot"
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(0.6, ge=0.0, le=1.0)
    steps: int = Field(5, ge=1)
    updates: int = Field(20, ge=1)
    mode: Literal["linear", "geometric"] = "linear"

    @model_validator(mode="after")
    def _order(self) -> ScheduleSpec:
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) must not be before start ({self.start})")
        return self

    def build(self, total_steps: int, sparsity: float) -> OneShot | Iterative | Cubic:
        """The concrete schedule reaching ``sparsity`` (a fraction in [0, 1)) for a run of ``total_steps``
        optimizer steps (step 0 = before training).

        Raises:
            ConfigError: ``sparsity`` outside [0, 1) (from the schedule classes).
        """
        start = int(self.start * total_steps)
        span = max(1, int(self.end * total_steps) - start)
        if self.kind == "one_shot":
            return OneShot(sparsity, at=start)
        if self.kind == "iterative":
            stages = min(
                self.steps, span + 1
            )  # a run too short for every stage gets fewer, still reaching sparsity
            every = max(1, span // max(1, stages - 1)) if stages > 1 else 1
            return Iterative(sparsity, steps=stages, every=every, start=start, mode=self.mode)
        n = min(self.updates, span)
        return Cubic(final_sparsity=sparsity, start=start, every=max(1, span // n), n=n)


class FinetuneSpec(_Strict):
    """Fine-tuning while/after pruning: passed to :class:`secateur.train.Trainer` by the runner."""

    epochs: int = Field(1, ge=0)
    lr: float = Field(0.01, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    #: After pruning (and fine-tuning), re-estimate BatchNorm running statistics on this many training
    #: batches (adaptive BN, Li et al. 2020, EagleEye); 0 disables. Stale statistics are most of the
    #: accuracy collapse right after one-shot pruning.
    recalibrate_bn: int = Field(50, ge=0)


class Recipe(_Strict):
    """A whole pruning run, as data: build it in Python (``secateur.Recipe(...)``) or read it from YAML.

    Fields (all optional except ``sparsity`` for element and channel granularity):

    - ``granularity``: ``"element"`` (single weights), ``"channel"`` (coupled channel groups, removed
      physically), or ``"N:M"`` such as ``"2:4"`` (N kept of every M consecutive input weights of each
      output row; sparsity ``1 - N/M``). In YAML write ``"2:4"`` in quotes (unquoted YAML 1.1 reads
      ``2:4`` as the base-60 number 124).
    - ``criterion``: an element criterion (:func:`secateur.criteria.available_criteria`) for element and
      N:M granularity, a group criterion (:func:`secateur.criteria.group.available_group_criteria`) for
      channel granularity, or ``"wanda"`` / ``"sparsegpt"`` (:data:`ONESHOT_METHODS`) for N:M.
      ``criterion_kwargs`` go to its constructor.
    - ``allocation``: element allocations (``global``, ``layerwise``, ``erk``, ...) or ``global`` /
      ``uniform`` for channels; default ``global``. N:M takes none (the pattern allocates).
    - ``sparsity``: the fraction in [0, 1) of ``target`` removed at the end of the schedule.
    - ``schedule``: a :class:`ScheduleSpec`, a mapping of its fields, or its kind alone (``"cubic"``).
    - ``target``: what ``sparsity`` is a fraction of: ``weights`` (element, N:M), ``channels``
      (prunable units), ``params``, ``macs`` or ``latency`` (of the whole model; channel granularity);
      default ``weights`` or ``channels`` by granularity.
    - ``scope`` (element, N:M) and ``protect`` (module-name patterns never pruned, every granularity).
    - ``round_to`` (channel counts rounded to a multiple), ``data_batches`` (training batches given to
      data-dependent criteria as ``data``), ``finetune`` (:class:`FinetuneSpec`), ``seed`` (the runner's
      seed, also given to a criterion that draws random numbers, such as ``random``, unless
      ``criterion_kwargs`` names its own ``seed``).
    - ``name``, ``description`` and ``suits`` (which models it suits, shown by ``secateur recipes``).

    Raises:
        ConfigError: from the constructor and every loader: an unknown key, a value of the wrong type
            or out of range, a criterion or allocation that is unknown or does not fit the granularity;
            the message names each field at fault, with a did-you-mean suggestion.
    """

    name: str = ""
    description: str = ""
    suits: str = ""
    granularity: str = "element"
    criterion: str = "magnitude"
    criterion_kwargs: dict[str, Any] = {}
    allocation: str | None = None
    target: Literal["weights", "channels", "params", "macs", "latency"] | None = None
    sparsity: float | None = Field(None, ge=0.0, lt=1.0)
    schedule: ScheduleSpec = ScheduleSpec()
    scope: ScopeSpec = ScopeSpec()
    protect: list[str] = []
    round_to: int = Field(1, ge=1)
    data_batches: int = Field(1, ge=1)
    finetune: FinetuneSpec = FinetuneSpec()
    seed: int = 0

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(_format_error(e, _SOURCE.get())) from None

    # -- validation ------------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _defaults_by_granularity(cls, data: Any) -> Any:
        """Fill ``target`` and ``allocation`` from the granularity when absent, so the object holds the
        values it runs with (and dumps them)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        g = data.get("granularity", "element")
        if "schedule" in data and isinstance(data["schedule"], str):
            data["schedule"] = {"kind": data["schedule"]}
        if data.get("target") is None and isinstance(g, str):
            data["target"] = "channels" if g == "channel" else "weights"
        if data.get("allocation") is None and g in ("element", "channel"):
            # element: one ranking over all layers; channel: the driver's default, one fraction per group
            data["allocation"] = "global" if g == "element" else "uniform"
        return data

    @field_validator("granularity", mode="before")
    @classmethod
    def _granularity_form(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            raise ValueError(
                f"got the number {v}: YAML reads an unquoted N:M such as 2:4 as a base-60 number; "
                'write it in quotes ("2:4")'
            )
        return v

    @field_validator("granularity")
    @classmethod
    def _known_granularity(cls, v: str) -> str:
        if v in ("element", "channel"):
            return v
        match = _NM.match(v)
        if match is None:
            hint = did_you_mean(v, ["element", "channel"])
            raise ValueError(
                f"expected 'element', 'channel' or an N:M pattern such as '2:4', got {v!r}{hint}"
            )
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {v!r}")
        return v

    @field_validator("criterion_kwargs")
    @classmethod
    def _bounded_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        if _json_like_size(v, {}, set()) > MAX_YAML_NODES:
            raise ValueError(
                f"expands to more than {MAX_YAML_NODES} values (shared sub-structures counted at each use)"
            )
        return v

    @field_validator("protect")
    @classmethod
    def _compiled_patterns(cls, v: list[str]) -> list[str]:
        from secateur._validate import check_name_patterns

        try:
            check_name_patterns(v, "protect")
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("protect: ")) from None
        return v

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, v: str) -> str:
        allowed = sorted(set(_element_criteria()) | set(_group_criteria()) | set(ONESHOT_METHODS))
        if v not in allowed:
            raise ValueError(f"unknown criterion {v!r}{did_you_mean(v, allowed)}; allowed: {allowed}")
        return v

    @field_validator("allocation")
    @classmethod
    def _known_allocation(cls, v: str | None) -> str | None:
        allowed = sorted(set(_element_allocations()) | set(_channel_allocations()))
        if v is not None and v not in allowed:
            raise ValueError(f"unknown allocation {v!r}{did_you_mean(v, allowed)}; allowed: {allowed}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        g = self.granularity
        if g == "channel":
            self._check_channel()
        elif g == "element":
            if self.criterion not in _element_criteria():
                raise ValueError(_misfit("criterion", self.criterion, g, _element_criteria()))
            if self.target != "weights":
                raise ValueError(
                    f"target {self.target!r} needs granularity 'channel' (element pruning targets 'weights')"
                )
        else:
            self._check_nm()
        if g in ("element", "channel") and self.sparsity is None:
            raise ValueError(
                f"granularity {g!r} needs a sparsity (the fraction of {self.target!r} to remove)"
            )
        return self

    def _check_channel(self) -> None:
        if self.criterion not in _group_criteria():
            raise ValueError(_misfit("criterion", self.criterion, "channel", _group_criteria()))
        if self.allocation not in _channel_allocations():
            raise ValueError(_misfit("allocation", self.allocation, "channel", _channel_allocations()))
        if self.target == "weights":
            raise ValueError("granularity 'channel' takes target 'channels', 'params', 'macs' or 'latency'")
        if self.scope != ScopeSpec():
            raise ValueError(
                "granularity 'channel' selects with 'protect' (module-name patterns never pruned), "
                "not 'scope'"
            )

    def _check_nm(self) -> None:
        g = self.granularity
        allowed = sorted(set(_element_criteria()) | set(ONESHOT_METHODS))
        if self.criterion not in allowed:
            raise ValueError(_misfit("criterion", self.criterion, g, allowed))
        if self.allocation is not None:
            raise ValueError(
                f"granularity {g!r} takes no allocation (the N:M pattern keeps N of every M weights of each "
                f"row); remove allocation {self.allocation!r}"
            )
        if self.target != "weights":
            raise ValueError(f"granularity {g!r} prunes weights; target {self.target!r} needs 'channel'")
        if self.schedule.kind != "one_shot":
            raise ValueError(f"granularity {g!r} is applied in one shot; schedule kind must be 'one_shot'")
        if self.sparsity is not None and not math.isclose(self.sparsity, self.nm_sparsity, abs_tol=1e-12):
            raise ValueError(
                f"granularity {g!r} removes {self.nm_sparsity:g} of the weights; sparsity {self.sparsity} "
                "disagrees (leave it out)"
            )

    # -- derived values --------------------------------------------------------------------------
    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M granularity, else None."""
        match = _NM.match(self.granularity)
        return (int(match[1]), int(match[2])) if match else None

    @property
    def nm_sparsity(self) -> float:
        """``1 - N/M`` for an N:M granularity (raises ConfigError otherwise)."""
        if self.nm is None:
            raise ConfigError(f"granularity {self.granularity!r} is not N:M")
        n, m = self.nm
        return 1.0 - n / m

    @property
    def final_sparsity(self) -> float:
        """The fraction of the target removed at the end: ``sparsity``, or ``1 - N/M`` for N:M."""
        return self.nm_sparsity if self.nm is not None else float(self.sparsity or 0.0)

    @property
    def is_oneshot_method(self) -> bool:
        """True for N:M with Wanda or SparseGPT (run by :func:`secateur.llm.prune_linears`, not build)."""
        return self.nm is not None and self.criterion in ONESHOT_METHODS

    def to_scope(self) -> Scope:
        """The :class:`~secateur.scope.Scope` of the element / N:M pruning (``protect`` joins ``exclude``)."""
        s = self.scope
        return Scope(
            types=tuple(_MODULE_TYPES[t] for t in s.types),
            include=s.include,
            exclude=tuple(s.exclude) + tuple(self.protect),
            exclude_first=s.exclude_first,
            exclude_last=s.exclude_last,
        )

    def total_steps(self, steps_per_epoch: int) -> int:
        """Fine-tuning optimizer steps, ``ceil(epochs * steps_per_epoch)``; at least 1, so a zero-epoch
        run can still prune at step 0."""
        return max(1, math.ceil(self.finetune.epochs * steps_per_epoch))

    # -- conversions -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "(dict)") -> Recipe:
        """Validate a recipe mapping (as YAML holds it).

        Raises:
            ConfigError: not a mapping, an unknown key or a bad value; names ``source`` and each field.
        """
        if not isinstance(data, dict):
            raise ConfigError(
                f"invalid recipe {source}: expected a mapping at the top level, got {type(data).__name__}"
            )
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(
                    f"invalid recipe {source}: {key!r}: unknown key (keys are names); "
                    f"allowed: {list(cls.model_fields)}"
                )
        token = _SOURCE.set(source)
        try:
            return cls(**data)
        finally:
            _SOURCE.reset(token)

    @classmethod
    def from_yaml(cls, source: str | os.PathLike[str]) -> Recipe:
        """A recipe from a YAML file (a path) or from YAML text.

        A :class:`~pathlib.Path`, or a one-line string naming an existing file or ending in ``.yaml`` /
        ``.yml``, is read as a file; any other string is YAML text. YAML is read with safe types only;
        nesting (:data:`MAX_YAML_DEPTH`) and alias expansion (:data:`MAX_YAML_NODES`, counted at every use
        of an alias) are bounded, so an alias bomb is refused here.

        Raises:
            ConfigError: a missing file, a file that is not regular or over :data:`MAX_RECIPE_BYTES`,
                invalid YAML, a document over the limits, an unknown key or a bad value (named, with the
                file). Values are strict: a number written as a string (``sparsity: "0.5"``) is refused.
        """
        if isinstance(source, os.PathLike) or _looks_like_path(source):
            p = Path(source)
            return cls.from_dict(parse_yaml(read_recipe_file(p), str(p)), str(p))
        if not isinstance(source, str):
            raise ConfigError(f"Recipe.from_yaml takes a path or YAML text, got {type(source).__name__}")
        return cls.from_dict(parse_yaml(source, "(YAML text)"), "(YAML text)")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (JSON/YAML types), every field written out except empty ones."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        """The recipe as YAML text; ``Recipe.from_yaml(recipe.to_yaml()) == recipe``."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=120)

    # -- running ---------------------------------------------------------------------------------
    def build(
        self,
        model: nn.Module,
        example_inputs: Any = None,
        data: Any = None,
        *,
        total_steps: int = 1,
    ) -> Any:
        """The pruner that carries the recipe out on ``model`` in any training loop.

        Element granularity: a :class:`~secateur.pruners.element.Pruner` (masks; ``finalize()`` bakes
        them). N:M with an element criterion: a ``Pruner`` with a one-shot schedule and the
        :class:`NMAllocation`. Channel granularity: a :class:`~secateur.pruners.channel.ChannelPruner`
        (traced on ``example_inputs`` in eval mode; ``finalize()`` compacts, verified). Drive it with
        ``pruner.step(step)`` after each optimizer step (or as a :class:`secateur.train.Trainer`
        callback), then ``model = pruner.finalize()``.

        Args:
            model: the network (masks are attached in place).
            example_inputs: inputs to trace (channel granularity; shape-only criteria such as SynFlow).
            data: a batch or an iterable of batches for data-dependent criteria (Taylor, SNIP, ...).
            total_steps: the optimizer steps of the run; the schedule's fractions are taken of it
                (:meth:`total_steps` computes it from the epochs).

        Raises:
            ConfigError: channel granularity without ``example_inputs``; Wanda/SparseGPT at N:M (one-shot
                calibration methods of :mod:`secateur.llm`: call :func:`secateur.llm.prune_linears`); and
                whatever the pruner raises on the model (a pattern that matches nothing, rows not divisible
                by M, ...), before any mask is attached.
        """
        from secateur.pruners.channel import ChannelPruner
        from secateur.pruners.element import Pruner

        if self.is_oneshot_method:
            n, m = self.nm  # type: ignore[misc]
            raise ConfigError(
                f"criterion {self.criterion!r} at granularity {self.granularity!r} is a one-shot calibration "
                f"method of secateur.llm, not a pruner driven by steps: call secateur.llm.prune_linears("
                f"model, data, method={self.criterion!r}, pattern=({n}, {m}), scope=recipe.to_scope()), "
                "or run the recipe with `secateur prune`"
            )
        if self.nm is not None:
            n, m = self.nm
            at = self.schedule.build(total_steps, self.nm_sparsity).update_steps[0]
            return Pruner(
                model,
                OneShot(self.nm_sparsity, at=at),
                criterion=self.criterion,
                allocation=NMAllocation(n, m),
                scope=self.to_scope(),
                data=data,
                example_inputs=example_inputs,
                criterion_kwargs=self._element_criterion_kwargs(),
            )
        schedule = self.schedule.build(total_steps, self.final_sparsity)
        if self.granularity == "element":
            return Pruner(
                model,
                schedule,
                criterion=self.criterion,
                allocation=self.allocation,
                scope=self.to_scope(),
                data=data,
                example_inputs=example_inputs,
                criterion_kwargs=self._element_criterion_kwargs(),
            )
        if example_inputs is None:
            raise ConfigError("granularity 'channel' needs example_inputs to trace the dependency graph")
        was_training = model.training
        model.eval()  # trace without touching BatchNorm statistics
        try:
            return ChannelPruner(
                model,
                example_inputs,
                schedule=schedule,
                criterion=self.criterion,
                allocation=self.allocation,
                target=self.target,
                protect=tuple(self.protect),
                round_to=self.round_to,
                data=data,
                criterion_kwargs=dict(self.criterion_kwargs),
                seed=self.seed,
            )
        finally:
            model.train(was_training)

    def _element_criterion_kwargs(self) -> dict[str, Any]:
        """``criterion_kwargs`` plus ``seed`` (:attr:`seed`) when the element criterion's constructor takes
        one and the kwargs do not name it (the rule :class:`~secateur.pruners.channel.ChannelPruner` applies
        to group criteria)."""
        from secateur.criteria.element.base import CRITERIA

        kwargs = dict(self.criterion_kwargs)
        if "seed" not in kwargs:
            try:
                takes_seed = "seed" in inspect.signature(CRITERIA.get(self.criterion)).parameters
            except (TypeError, ValueError):  # no signature to read (a builtin): pass nothing
                takes_seed = False
            if takes_seed:
                kwargs["seed"] = self.seed
        return kwargs

    def data_from(self, loader: Iterable[Any] | None) -> Any:
        """What :meth:`build` takes as ``data`` from a training loader: its first batch when
        ``data_batches`` is 1, else a list of its first ``data_batches`` batches; None without a loader."""
        if loader is None:
            return None
        if self.data_batches == 1:
            return next(iter(loader), None)
        return list(itertools.islice(loader, self.data_batches))


class NMAllocation:
    """An element allocation that keeps the ``n`` highest scores of every ``m`` consecutive input weights of
    each output row (:func:`secateur.masks.patterns.nm_mask`), whatever sparsity is asked: sparsity is
    ``1 - n/m`` by construction (Mishra et al. 2021, NVIDIA 2:4).

    Called as ``allocate(scores, sparsity, previous=None) -> {name: bool keep-mask}`` (the
    :class:`~secateur.pruners.element.Pruner` allocation protocol); scores are ``(out, in)`` or conv
    ``(out, in, kh, kw)`` read as ``(out, in*kh*kw)`` rows.

    Raises:
        ConfigError: ``0 < n < m`` violated, or a row length not divisible by ``m`` (naming the layer).
    """

    def __init__(self, n: int, m: int) -> None:
        from secateur.masks.patterns import nm_mask

        nm_mask(torch.ones(1, m), n, m, layer="NMAllocation")  # validates n, m
        self.n, self.m = n, m

    def __call__(
        self,
        scores: dict[str, torch.Tensor],
        sparsity: float,
        previous: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        from secateur.masks.patterns import nm_mask

        return {name: nm_mask(s, self.n, self.m, layer=name) for name, s in scores.items()}

    def __repr__(self) -> str:
        return f"NMAllocation({self.n}, {self.m})"


# ----------------------------------------------------------------------------------------------------
# registries (read lazily: what is registered when the recipe is validated)
# ----------------------------------------------------------------------------------------------------
def _element_criteria() -> list[str]:
    from secateur.criteria import available_criteria

    return available_criteria()


def _group_criteria() -> list[str]:
    from secateur.criteria.group import available_group_criteria

    return available_group_criteria()


def _element_allocations() -> list[str]:
    from secateur.allocation.element import ALLOCATIONS

    return ALLOCATIONS.list()


def _channel_allocations() -> list[str]:
    from secateur.allocation.structured import ALLOCATIONS

    return list(ALLOCATIONS)


def _misfit(field: str, value: Any, granularity: str, allowed: Sequence[str]) -> str:
    return f"{field} {value!r} does not work at granularity {granularity!r}; allowed there: {sorted(allowed)}"


def _looks_like_path(source: Any) -> bool:
    if not isinstance(source, str) or "\n" in source:
        return False
    return source.endswith((".yaml", ".yml")) or os.path.isfile(source)


# ----------------------------------------------------------------------------------------------------
# error messages
# ----------------------------------------------------------------------------------------------------
def _unwrap_optional(ann: Any) -> Any:
    """``X | None`` -> ``X`` (the first non-None member of a union); anything else unchanged."""
    if get_origin(ann) in (Union, types.UnionType):
        members = [a for a in get_args(ann) if a is not type(None)]
        return members[0] if len(members) == 1 else ann
    return ann


def _annotation_at(loc: Sequence[str | int]) -> Any:
    """The type annotation of the recipe field at a pydantic error location, or None if unknown.

    Walks from :class:`Recipe` through nested spec models and list items (integer locations).
    """
    ann: Any = Recipe
    for part in loc:
        ann = _unwrap_optional(ann)
        if isinstance(part, int):
            if get_origin(ann) is not list:
                return None
            ann = get_args(ann)[0]
        elif isinstance(ann, type) and issubclass(ann, BaseModel) and part in ann.model_fields:
            ann = ann.model_fields[part].annotation
        else:
            return None
    return _unwrap_optional(ann)


def _keys_elsewhere(key: str) -> list[str]:
    """Dotted paths of the nested spec models (``schedule``, ``scope``, ...) that do have ``key``."""
    found = []
    for name, info in Recipe.model_fields.items():
        ann = _unwrap_optional(info.annotation)
        if isinstance(ann, type) and issubclass(ann, BaseModel) and key in ann.model_fields:
            found.append(name)
    if key in Recipe.model_fields:
        found.append("(top level)")
    return found


def _unknown_key_message(loc: Sequence[str | int]) -> str:
    key = loc[-1]
    parent = _annotation_at(loc[:-1])
    if not (isinstance(parent, type) and issubclass(parent, BaseModel)):
        return "unknown key"
    allowed = list(parent.model_fields)
    hint = ""
    if isinstance(key, str):  # a key of another section, exactly, says more than a close spelling here
        elsewhere = [p for p in _keys_elsewhere(key) if p != (".".join(map(str, loc[:-1])) or "(top level)")]
        if elsewhere:
            hint = f" ({key!r} is a key of {' and '.join(repr(p) for p in elsewhere)})"
    return f"unknown key{hint or did_you_mean(key, allowed)}; allowed: {allowed}"


def _format_error(e: ValidationError, source: str) -> str:
    parts = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _unknown_key_message(err["loc"])
        elif err["type"] == "literal_error":
            ann = _annotation_at(err["loc"])
            choices = get_args(ann) if get_origin(ann) is Literal else ()
            msg = f"{msg}, got {err.get('input')!r}{did_you_mean(err.get('input'), choices)}"
        elif err["type"].endswith("_type") and "input" in err:  # strict: "0.5" is not a number
            msg = f"{msg}, got {type(err['input']).__name__} {err['input']!r:.60}"
        parts.append(f"{field}: {msg}" if field else msg)  # a whole-recipe check names its fields itself
    return f"invalid recipe {source}: " + "; ".join(parts)

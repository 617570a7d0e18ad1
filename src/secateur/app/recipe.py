"""Recipes: a pruning run as declarative data (YAML or a dict), validated on load.

A recipe names the pieces of the grammar (scope, granularity, criterion, allocation, schedule,
target) and the fine-tuning budget. Schedules are written in fractions of the fine-tuning run, so
the same recipe works for any dataset size; :meth:`ScheduleSpec.build` turns them into concrete
step counts once the number of steps is known. Unknown keys and bad values raise
:class:`~secateur.errors.ConfigError` naming the field and the allowed values, with a
did-you-mean suggestion (:func:`did_you_mean`) for a misspelt key or choice at any nesting level.

Example (``secateur/app/recipes/gmp90.yaml``)::

    granularity: element
    criterion: magnitude
    allocation: global
    schedule: {kind: cubic, sparsity: 0.9, start: 0.0, end: 0.6, updates: 20}
    finetune: {epochs: 2, lr: 0.05}
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from secateur.errors import ConfigError, did_you_mean
from secateur.schedules import Cubic, Iterative, OneShot

#: Most YAML nodes a recipe may expand to, aliases counted at every use (a recipe has tens).
MAX_YAML_NODES = 10_000
#: Deepest nesting of mappings/sequences in a recipe.
MAX_YAML_DEPTH = 32
#: Largest recipe file read, in bytes.
MAX_RECIPE_BYTES = 1 << 20


class _RecipeLimit(Exception):
    """A recipe document over a size limit (nesting depth, alias expansion)."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (no Python objects) with bounded nesting and bounded alias expansion.

    An alias (``*a``) re-uses the node of its anchor (``&a``), so a document of a few lines can stand for
    billions of nodes once expanded (the "billion laughs" alias bomb), which any later traversal (validation,
    ``model_dump``, :func:`dump_recipe`) pays for. Each document's node graph is measured as its expanded
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ScopeSpec(_Strict):
    """Which layers may be pruned (see :class:`secateur.scope.Scope`); patterns are fnmatch globs."""

    types: list[Literal["Conv1d", "Conv2d", "Conv3d", "Linear"]] = ["Conv1d", "Conv2d", "Conv3d", "Linear"]
    include: list[str] | None = None
    exclude: list[str] = []
    exclude_first: bool = False
    exclude_last: bool = False


class ScheduleSpec(_Strict):
    """When to prune, in fractions of the fine-tuning steps.

    kind: ``one_shot`` (at ``start``), ``iterative`` (``steps`` equal stages between ``start`` and
    ``end``, linear or geometric), ``cubic`` (Zhu & Gupta 2017, ``updates`` mask updates from
    ``start`` to ``end``). ``sparsity`` is the final fraction removed, in [0, 1).
    """

    kind: Literal["one_shot", "iterative", "cubic"] = "cubic"
    sparsity: float = Field(ge=0.0, lt=1.0)
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

    def build(self, total_steps: int) -> OneShot | Iterative | Cubic:
        """The concrete schedule for a run of ``total_steps`` optimizer steps (step 0 = before training)."""
        start = int(self.start * total_steps)
        span = max(1, int(self.end * total_steps) - start)
        if self.kind == "one_shot":
            return OneShot(self.sparsity, at=start)
        if self.kind == "iterative":
            every = max(1, span // max(1, self.steps - 1)) if self.steps > 1 else 1
            return Iterative(self.sparsity, steps=self.steps, every=every, start=start, mode=self.mode)
        n = min(self.updates, span)
        return Cubic(final_sparsity=self.sparsity, start=start, every=max(1, span // n), n=n)


class FinetuneSpec(_Strict):
    """Fine-tuning while/after pruning: passed to :class:`secateur.train.Trainer`."""

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
    """A whole pruning run. ``target`` says what the schedule's sparsity is a fraction of:
    ``weights`` (scoped weights, element granularity), ``channels`` (prunable units), ``params``,
    ``macs`` or ``latency`` (of the whole model, latency as measured on CPU at the example inputs;
    channel granularity)."""

    name: str = ""
    description: str = ""
    granularity: Literal["element", "channel", "n:m"] = "element"
    criterion: str = "magnitude"
    criterion_kwargs: dict[str, Any] = {}
    allocation: str = "global"
    schedule: ScheduleSpec
    target: Literal["weights", "channels", "params", "macs", "latency"] = "weights"
    scope: ScopeSpec = ScopeSpec()
    protect: list[str] = []
    round_to: int = Field(1, ge=1)
    n: int = Field(2, ge=1)
    m: int = Field(4, ge=1)
    finetune: FinetuneSpec = FinetuneSpec()
    seed: int = 0

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
        from secateur.criteria import available_criteria

        allowed = sorted(set(available_criteria()) | _CHANNEL_CRITERIA)
        if v not in allowed:
            raise ValueError(f"unknown criterion {v!r}{did_you_mean(v, allowed)}; allowed: {allowed}")
        return v

    @field_validator("allocation")
    @classmethod
    def _known_allocation(cls, v: str) -> str:
        from secateur.allocation.element import ALLOCATIONS, get_allocation

        get_allocation("global")  # registers the extra allocations
        allowed = sorted(set(ALLOCATIONS) | {"uniform"})
        if v not in allowed:
            raise ValueError(f"unknown allocation {v!r}{did_you_mean(v, allowed)}; allowed: {allowed}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.granularity == "element" and self.target not in ("weights",):
            raise ValueError(
                f"target {self.target!r} needs granularity 'channel' (element pruning targets 'weights')"
            )
        if self.granularity == "channel" and self.target == "weights":
            raise ValueError("granularity 'channel' takes target 'channels', 'params', 'macs' or 'latency'")
        if self.granularity == "n:m" and self.n >= self.m:
            raise ValueError(f"N:M needs n < m, got {self.n}:{self.m}")
        return self


_CHANNEL_CRITERIA = {"l1", "l2", "random", "bn_scale", "fpgm", "taylor", "fisher", "wanda", "sparsegpt"}


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
    hint = did_you_mean(key, allowed)
    if not hint and isinstance(key, str):
        elsewhere = [p for p in _keys_elsewhere(key) if p != (".".join(map(str, loc[:-1])) or "(top level)")]
        if elsewhere:
            hint = f" ({key!r} is a key of {' and '.join(repr(p) for p in elsewhere)})"
    return f"unknown key{hint}; allowed: {allowed}"


def _format_error(e: ValidationError, source: str) -> str:
    parts = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(recipe)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = _unknown_key_message(err["loc"])
        elif err["type"] == "literal_error":
            ann = _annotation_at(err["loc"])
            choices = get_args(ann) if get_origin(ann) is Literal else ()
            msg = f"{msg}, got {err.get('input')!r}{did_you_mean(err.get('input'), choices)}"
        elif err["type"].endswith("_type") and "input" in err:  # strict: "0.5" is not a number
            msg = f"{msg}, got {type(err['input']).__name__} {err['input']!r:.60}"
        parts.append(f"{field}: {msg}")
    return f"invalid recipe {source}: " + "; ".join(parts)


def recipe_from_dict(data: dict[str, Any], source: str = "(dict)") -> Recipe:
    """Validate a recipe dict.

    Raises:
        ConfigError: an unknown key or a bad value; the message names each field at fault.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"invalid recipe {source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def load_recipe(path_or_name: str | Path) -> Recipe:
    """Load a recipe from a YAML file, or a shipped recipe by name (see :func:`shipped_recipes`).

    YAML is read with safe types only; nesting (:data:`MAX_YAML_DEPTH`) and alias expansion
    (:data:`MAX_YAML_NODES`, counted at every use of an alias) are bounded, so an alias bomb is refused
    here instead of hanging a later :func:`dump_recipe`.

    Raises:
        ConfigError: a missing file, a file that is not regular or over :data:`MAX_RECIPE_BYTES`, invalid
            YAML, a document over the limits, an unknown key or a bad value (named, with the file). Values
            are strict: a number written as a string (``sparsity: "0.5"``) is refused, naming the field.
    """
    p = Path(path_or_name)
    if p.exists():
        text, source = _read_recipe_file(p), str(p)
    else:
        name = str(path_or_name).removesuffix(".yaml")
        if name not in shipped_recipes():
            raise ConfigError(
                f"recipe {str(path_or_name)!r} is neither a file nor a shipped recipe; "
                f"shipped: {shipped_recipes()}"
            )
        text = resources.files("secateur.app.recipes").joinpath(f"{name}.yaml").read_text()
        source = f"{name} (shipped)"
    return recipe_from_dict(_parse_yaml(text, source), source)


def _read_recipe_file(p: Path) -> str:
    """The text of the recipe file ``p``: a regular file (a FIFO would block) of at most
    :data:`MAX_RECIPE_BYTES`, UTF-8."""
    import os
    import stat

    st = os.stat(p)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"invalid recipe {p}: not a regular file (a folder, FIFO or device)")
    if st.st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"invalid recipe {p}: {st.st_size} bytes, more than the {MAX_RECIPE_BYTES} allowed")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"invalid recipe {p}: cannot read it as UTF-8 text: {e}") from None


def _parse_yaml(text: str, source: str) -> Any:
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


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship with the package."""
    folder = resources.files("secateur.app.recipes")
    return sorted(Path(f.name).stem for f in folder.iterdir() if f.name.endswith(".yaml"))


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML text (round-trips through :func:`load_recipe`)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def steps_for(recipe: Recipe, steps_per_epoch: int) -> int:
    """Total fine-tuning optimizer steps; at least 1 so a zero-epoch run can still prune at step 0."""
    return max(1, math.ceil(recipe.finetune.epochs * steps_per_epoch))

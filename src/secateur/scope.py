"""Scope: which parameters a pruner may touch.

A scope selects modules by type and by name pattern, minus excluded patterns, and can exclude the
first and last selected layers (the stem conv and the classifier, which most papers keep dense).
Patterns are shell-style globs matched against the full module path (``fnmatch``), e.g.
``"layer1.*"`` or ``"*.conv2"``, or regular expressions written ``"re:..."`` (searched in the path), the
dialect ``protect=`` uses in the structured pruners; every pattern must match at least one module, so a
typo is an error instead of a silently dense model, and a regex that does not compile is an error naming it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from secateur._validate import check_model, compile_name_pattern
from secateur.errors import ConfigError, ScopeError

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def path_matches(path: str, pattern: str, argname: str = "scope") -> bool:
    """Whether the module path ``path`` matches ``pattern``: a ``"re:..."`` regex (``re.search``) or a glob.

    Raises:
        ConfigError: ``pattern`` is not a string or its regex does not compile (named, with ``argname``).
    """
    rx = compile_name_pattern(pattern, argname)
    return bool(rx.search(path)) if rx is not None else fnmatch.fnmatchcase(path, pattern)


@dataclass(frozen=True)
class Target:
    """One prunable parameter: ``module.<param_name>`` found at ``path`` in the model."""

    path: str
    module: nn.Module = field(repr=False, compare=False)
    param_name: str = "weight"

    @property
    def name(self) -> str:
        """``"<path>.<param_name>"``, the key used in score, mask and report dictionaries."""
        return f"{self.path}.{self.param_name}" if self.path else self.param_name


@dataclass
class Scope:
    """Which modules' weights may be pruned.

    Attributes:
        types: module classes whose ``weight`` is prunable (default conv and linear layers).
        include: patterns (globs, or ``"re:..."`` regexes) of module paths to consider; ``None``: all.
        exclude: patterns of module paths never pruned (protected).
        exclude_first: protect the first selected module (registration order, which for the zoo
            and most models is the forward order), e.g. the stem conv.
        exclude_last: protect the last selected module, e.g. the classifier.
    """

    types: Sequence[type[nn.Module]] = DEFAULT_TYPES
    include: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    exclude_first: bool = False
    exclude_last: bool = False
    param_name: str = "weight"

    def resolve(self, model: nn.Module) -> list[Target]:
        """The list of :class:`Target` selected in ``model``, in registration order.

        Raises:
            InvalidModelError: ``model`` is not an ``nn.Module`` or has tensors on the meta device.
            ScopeError: a pattern matches no module, or nothing is selected.
            ConfigError: a pattern is not a string, a ``"re:"`` pattern does not compile (named), or a
                selected parameter is not floating point (e.g. an integer-typed model).
        """
        check_model(model)
        for what, patterns in (("include", self.include or []), ("exclude", self.exclude)):
            if isinstance(patterns, str):
                raise ConfigError(f"scope {what} must be a list of patterns, got the string {patterns!r}")
            for pattern in patterns:
                compile_name_pattern(pattern, f"scope {what}")
        named = [(p, m) for p, m in model.named_modules() if p]
        paths = [p for p, _ in named]
        for pattern in list(self.include or []) + list(self.exclude):
            if not any(path_matches(p, pattern) for p in paths):
                raise ScopeError(f"scope pattern {pattern!r} matches no module of {type(model).__name__}")
        types = tuple(self.types)
        selected: list[Target] = []
        for path, module in named:
            if not isinstance(module, types):
                continue
            if self.include is not None and not any(path_matches(path, p) for p in self.include):
                continue
            if any(path_matches(path, p) for p in self.exclude):
                continue
            if getattr(module, self.param_name, None) is None:
                continue
            selected.append(Target(path, module, self.param_name))
        if self.exclude_first and selected:
            selected = selected[1:]
        if self.exclude_last and selected:
            selected = selected[:-1]
        if not selected:
            raise ScopeError(
                f"scope selects no parameter in {type(model).__name__} "
                f"(types={[t.__name__ for t in types]}, include={self.include}, exclude={list(self.exclude)})"
            )
        for t in selected:
            w = getattr(t.module, t.param_name)
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                dtype = getattr(w, "dtype", type(w).__name__)
                raise ConfigError(
                    f"parameter {t.name} has dtype {dtype}; pruning needs floating-point weights"
                )
        return selected

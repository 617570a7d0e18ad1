"""Scope: which parameters a pruner may touch.

A scope selects modules by type and by name pattern, minus excluded patterns, and can exclude the
first and last selected layers (the stem conv and the classifier, which most papers keep dense).
Patterns are shell-style globs matched against the full module path (``fnmatch``), e.g.
``"layer1.*"`` or ``"*.conv2"``; every pattern must match at least one module, so a typo is an error
instead of a silently dense model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from secateur.errors import ConfigError, ScopeError

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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
        include: glob patterns of module paths to consider; ``None`` means all modules.
        exclude: glob patterns of module paths never pruned (protected).
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
            ScopeError: a pattern matches no module, or nothing is selected.
            ConfigError: a selected parameter is not floating point (e.g. an integer-typed model).
        """
        named = [(p, m) for p, m in model.named_modules() if p]
        paths = [p for p, _ in named]
        for pattern in list(self.include or []) + list(self.exclude):
            if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
                raise ScopeError(f"scope pattern {pattern!r} matches no module of {type(model).__name__}")
        types = tuple(self.types)
        selected: list[Target] = []
        for path, module in named:
            if not isinstance(module, types):
                continue
            if self.include is not None and not any(fnmatch.fnmatchcase(path, p) for p in self.include):
                continue
            if any(fnmatch.fnmatchcase(path, p) for p in self.exclude):
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

"""The criterion interface and its registry.

A criterion maps each scoped parameter to a tensor of scores of the same shape (element-wise
granularity); higher means more important, so the lowest scores are pruned first.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from secateur.registry import Registry
from secateur.scope import Target


class Criterion(Protocol):
    """Scores for each target: ``{target.name: Tensor of the parameter's shape}``."""

    name: str

    def scores(self, targets: Sequence[Target]) -> dict[str, torch.Tensor]: ...


#: Element criteria by name (recipes, the CLI and :class:`secateur.Pruner` resolve names here).
CRITERIA: Registry[Callable[..., Criterion]] = Registry("criterion")


def register_criterion(name: str) -> Callable[[Callable[..., Criterion]], Callable[..., Criterion]]:
    """Decorator registering a criterion factory under ``name`` (used by recipes and the CLI)."""
    return CRITERIA.register(name)


def available_criteria() -> list[str]:
    """Names of the registered criteria."""
    return CRITERIA.list()


def get_criterion(
    spec: str | Criterion, context: dict[str, object] | None = None, **kwargs: object
) -> Criterion:
    """Build a criterion from its registered name, or pass an instance through.

    ``context`` holds what the caller has (``model``, ``data``, ``example_inputs``); each entry is
    passed only if the criterion's factory takes an argument of that name and the value is not
    None, so data-free criteria ignore data and data-dependent ones get it. ``kwargs`` always pass.

    Raises:
        ConfigError: an unknown name (the message lists the registered ones), or the criterion's
            own errors (e.g. a data-dependent criterion built without data).
    """
    if not isinstance(spec, str):
        return spec
    factory = CRITERIA.get(spec)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {k: v for k, v in (context or {}).items() if k in params and v is not None and k not in kwargs}
    return factory(**extra, **kwargs)

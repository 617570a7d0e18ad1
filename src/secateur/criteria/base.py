"""The criterion interface and its registry.

A criterion maps each scoped parameter to a tensor of scores of the same shape (element-wise
granularity); higher means more important, so the lowest scores are pruned first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from secateur.errors import ConfigError
from secateur.scope import Target


class Criterion(Protocol):
    """Scores for each target: ``{target.name: Tensor of the parameter's shape}``."""

    name: str

    def scores(self, targets: Sequence[Target]) -> dict[str, torch.Tensor]: ...


_REGISTRY: dict[str, Callable[..., Criterion]] = {}


def register_criterion(name: str) -> Callable[[Callable[..., Criterion]], Callable[..., Criterion]]:
    """Decorator registering a criterion factory under ``name`` (used by recipes and the CLI)."""

    def deco(factory: Callable[..., Criterion]) -> Callable[..., Criterion]:
        _REGISTRY[name] = factory
        return factory

    return deco


def get_criterion(spec: str | Criterion, **kwargs: object) -> Criterion:
    """Build a criterion from its registered name, or pass an instance through.

    Raises:
        ConfigError: an unknown name (the message lists the registered ones).
    """
    if not isinstance(spec, str):
        return spec
    if spec not in _REGISTRY:
        raise ConfigError(f"unknown criterion {spec!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[spec](**kwargs)

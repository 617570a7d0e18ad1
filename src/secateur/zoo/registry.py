"""Name -> factory registry for the model zoo (timm-style).

A name lets recipes, the CLI and checkpoints refer to an architecture without pickling code:
:func:`create_model` records the name and arguments on the model (``model.secateur_zoo``), so a
model saved as plain tensors can be rebuilt later with :func:`rebuild_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from secateur.errors import ConfigError
from secateur.registry import Registry

__all__ = ["create_model", "list_models", "rebuild_model", "register_model"]

ModelFactory = Callable[..., nn.Module]

#: Zoo model factories by name.
MODELS: Registry[ModelFactory] = Registry("model")


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``factory(num_classes=..., in_chans=..., **kwargs) -> nn.Module`` as ``name``.

    Raises:
        ConfigError: ``name`` is empty or already registered (two families must not silently shadow).
    """
    if not name or not isinstance(name, str):
        raise ConfigError(f"register_model: name must be a non-empty string, got {name!r}")
    return MODELS.register(name)


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return MODELS.list()


def create_model(name: str, num_classes: int = 10, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` for inputs of shape (N, in_chans, 28, 28).

    The output has shape (N, num_classes) (logits). The model gets an attribute
    ``secateur_zoo = {"name", "num_classes", "in_chans", **kwargs}`` so it can be rebuilt.

    Raises:
        ConfigError: unknown ``name`` (the message lists the available ones), ``num_classes`` or
            ``in_chans`` < 1, or a family-specific bad keyword argument.
    """
    factory = MODELS.get(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"create_model({name!r}): num_classes must be an int >= 1, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ConfigError(f"create_model({name!r}): in_chans must be an int >= 1, got {in_chans!r}")
    try:
        model = factory(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as exc:  # an unexpected keyword argument: report it as a config problem
        raise ConfigError(f"create_model({name!r}): bad arguments {sorted(kwargs)}: {exc}") from exc
    model.secateur_zoo = {"name": name, "num_classes": num_classes, "in_chans": in_chans, **kwargs}
    return model


def rebuild_model(info: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its ``secateur_zoo`` record (as stored in a checkpoint's JSON).

    Raises:
        ConfigError: ``info`` has no ``"name"`` or names an unknown model.
    """
    if not isinstance(info, dict) or "name" not in info:
        raise ConfigError(f"rebuild_model: expected a dict with a 'name' key, got {info!r}")
    kwargs = dict(info)
    return create_model(kwargs.pop("name"), **kwargs)

"""Resolve a model specification string, as the CLI and recipes write it, into a module.

``zoo:NAME`` (secateur's zoo), ``hf:PATH`` (a Hugging Face checkpoint or config folder, loaded
offline), ``saved:PATH`` (a folder written by :func:`secateur.save`), or ``package.module:function``
(a user's factory, called with ``kwargs``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from secateur.errors import ConfigError, did_you_mean


def build_model(spec: str, **kwargs: Any) -> nn.Module:
    """Build the model named by ``spec`` (see the module docstring).

    Raises:
        ConfigError: an unknown scheme, a missing folder, or a factory that cannot be imported.
    """
    scheme, sep, rest = spec.partition(":")
    if not sep:
        from secateur.zoo import list_models

        hint = did_you_mean(spec, list_models())
        hint = f" (did you mean 'zoo:{hint.split(chr(39))[1]}'?)" if hint else ""
        raise ConfigError(
            f"model spec {spec!r}{hint}: use zoo:NAME, hf:PATH, saved:PATH or package.module:function"
        )
    if scheme == "zoo":
        from secateur.zoo import create_model

        return create_model(rest, **kwargs)
    if scheme == "saved":
        from secateur.io import load

        return load(rest)
    if scheme == "hf":
        path = Path(rest)
        if not path.is_dir():
            raise ConfigError(f"model spec {spec!r}: {path} is not a folder with a Hugging Face config")
        import transformers

        if (path / "model.safetensors").exists() or (path / "pytorch_model.bin").exists():
            return transformers.AutoModel.from_pretrained(str(path), local_files_only=True, **kwargs)
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        return transformers.AutoModel.from_config(config, **kwargs)
    try:
        factory = getattr(importlib.import_module(scheme), rest)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model spec {spec!r}: cannot import factory: {e}") from e
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model spec {spec!r}: factory returned {type(model).__name__}, not an nn.Module")
    model.secateur_factory = {"factory": spec, "kwargs": dict(kwargs)}  # lets save() rebuild it
    return model

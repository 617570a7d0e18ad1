"""Resolve a model specification string, as the CLI and recipes write it, into a module.

``zoo:NAME`` (secateur's zoo), ``hf:PATH`` (a Hugging Face checkpoint or config folder, loaded
offline as the class its ``config.json`` names in ``architectures``, e.g. ``Gemma3ForCausalLM`` with its
language-model head, or ``AutoModel`` when it names none), ``saved:PATH`` (a folder written by
:func:`secateur.save`), or ``package.module:function``
(a user's factory, called with ``kwargs``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from secateur.errors import ConfigError, did_you_mean


def build_model(spec: str, *, trust_factory: Sequence[str] = (), **kwargs: Any) -> nn.Module:
    """Build the model named by ``spec`` (see the module docstring).

    ``trust_factory``: for ``saved:PATH``, the user factory names (``package.module:function``) the folder's
    recorded architecture may be; passed to :func:`secateur.load`, which runs no other code a folder names.
    ``kwargs`` go to a zoo, Hugging Face or user factory.

    Raises:
        ConfigError: an unknown scheme, a missing folder or a file given as one (:func:`require_folder`),
            a factory that cannot be imported, or
            ``trust_factory`` given for a spec that is not ``saved:``.
        UntrustedCodeError: a ``saved:`` folder built by a user factory that ``trust_factory`` does not name.
    """
    scheme, sep, rest = spec.partition(":")
    if not sep:
        from secateur.zoo import list_models

        hint = did_you_mean(spec, list_models())
        hint = f" (did you mean 'zoo:{hint.split(chr(39))[1]}'?)" if hint else ""
        raise ConfigError(
            f"model spec {spec!r}{hint}: use zoo:NAME, hf:PATH, saved:PATH or package.module:function"
        )
    if trust_factory and scheme != "saved":
        raise ConfigError(
            f"model spec {spec!r}: trust_factory applies to saved:PATH folders only (a factory given as "
            "package.module:function is trusted already)"
        )
    if scheme == "zoo":
        from secateur.zoo import create_model

        return create_model(rest, **kwargs)
    if scheme == "saved":
        from secateur.io import load

        return load(require_folder(spec), trust_factory=list(trust_factory))
    if scheme == "hf":
        path = require_folder(spec)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model spec {spec!r}: {path} is not a folder with a Hugging Face config")
        return _hf_model(path, kwargs)
    try:
        factory = getattr(importlib.import_module(scheme), rest)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model spec {spec!r}: cannot import factory: {e}") from e
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model spec {spec!r}: factory returned {type(model).__name__}, not an nn.Module")
    model.secateur_factory = {"factory": spec, "kwargs": dict(kwargs)}  # lets save() rebuild it
    return model


def _hf_model(path: Path, kwargs: dict[str, Any]) -> nn.Module:
    """The model of a Hugging Face folder: the transformers class ``config.architectures[0]`` names (only a
    class of the transformers package itself is used), else ``AutoModel``; weights when the folder has them,
    else random initialisation from the config."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    if any((path / f).exists() for f in HF_WEIGHT_FILES):
        return cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    if cls is transformers.AutoModel:
        return transformers.AutoModel.from_config(config, **kwargs)
    return cls(config, **kwargs)


#: Files whose presence means a Hugging Face folder holds weights (else the model is built from its config).
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def require_folder(spec: str) -> Path:
    """The folder of an ``hf:`` or ``saved:`` spec, checked to be an existing folder.

    Raises:
        ConfigError: the path does not exist, or is a file (naming the folder to give instead when the file
            sits in a model folder, e.g. ``saved:run/model/plan.json`` -> ``saved:run/model``).
    """
    scheme, _, rest = spec.partition(":")
    path = Path(rest)
    if path.is_dir():
        return path
    if not path.exists():
        raise ConfigError(f"model spec {spec!r}: no such folder {path}")
    hint = ""
    if any((path.parent / f).is_file() for f in ("plan.json", "config.json")):
        hint = f" (did you mean '{scheme}:{path.parent}'?)"
    kind = "secateur.save wrote" if scheme == "saved" else "with a Hugging Face config.json"
    raise ConfigError(f"model spec {spec!r}: {path} is a file; give the folder {kind}{hint}")


def model_folder(spec: str) -> Path | None:
    """The folder of an ``hf:`` or ``saved:`` spec (where a tokenizer or image processor may be) or None."""
    scheme, _, rest = spec.partition(":")
    return Path(rest) if scheme in ("hf", "saved") else None


def saved_metadata(spec: str) -> dict[str, Any]:
    """The ``metadata`` a ``saved:`` folder's plan.json records (input spec, dense model, data, ...); ``{}``
    for other specs.

    Raises:
        ConfigError: the path is missing or a file (:func:`require_folder`).
        SerializationError / UnsafePathError: the plan file is missing or malformed (as
            :func:`secateur.io.validate.read_plan_file` says).
    """
    if not spec.startswith("saved:"):
        return {}
    from secateur.io.validate import read_plan_file

    meta = read_plan_file(require_folder(spec)).get("metadata")
    return dict(meta) if isinstance(meta, dict) else {}

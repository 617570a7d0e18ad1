"""The architecture record of a saved folder: how to rebuild the unpruned model, and whom to trust for it.

A record is a zoo entry, a Hugging Face config and class (only transformers' own classes; ``auto_map`` is
ignored), or a user factory ``"module:function"`` that runs only when the caller passes or trusts it.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from secateur._optional import require
from secateur.errors import (
    ConfigError,
    SecateurError,
    SerializationError,
    UntrustedCodeError,
)
from secateur.io.folder import (
    apply_plan,
)
from secateur.io.validate import (
    check_architecture_sizes,
    check_plan_fits,
    clean_hf_config,
    compare_shapes,
    is_factory_name,
    validate_architecture,
)

# ---------------------------------------------------------------------------------------- architecture

# ---------------------------------------------------------------------------------------- architecture
def _hf_original_config(model: nn.Module, plan: dict | None) -> dict[str, Any]:
    """The model's config as it was before the plan's config changes (they are [old, new] pairs)."""
    cfg = model.config.to_dict()
    for ck, changes in ((plan or {}).get("config") or {}).items():
        target = cfg if ck == "" else cfg.get(ck)
        if not isinstance(target, dict):
            continue
        for key, (old, _new) in changes.items():
            if key.startswith("_inconsistent_"):
                continue
            if old is None:
                target.pop(key, None)
            else:
                target[key] = old
    return cfg


def architecture_of(
    model: nn.Module, plan: dict | None = None, factory: str | None = None, factory_kwargs: dict | None = None
) -> dict[str, Any]:
    """A JSON record from which :func:`build_architecture` rebuilds the unpruned model.

    Order of preference: an explicit ``factory`` ("package.module:function", called with
    ``factory_kwargs``), the zoo record ``model.secateur_zoo``, a Hugging Face ``PreTrainedModel``
    (class path + the original config).

    Raises:
        SerializationError: none of these applies (pass ``factory=``).
    """
    if factory is not None:
        if not isinstance(factory, str) or not is_factory_name(factory):
            raise SerializationError(f"factory must look like 'package.module:function', got {factory!r}")
        return {"kind": "factory", "factory": factory, "kwargs": dict(factory_kwargs or {})}
    recorded = getattr(model, "secateur_factory", None)
    if isinstance(recorded, dict) and "factory" in recorded:
        return {"kind": "factory", "factory": recorded["factory"], "kwargs": dict(recorded.get("kwargs", {}))}
    zoo = getattr(model, "secateur_zoo", None)
    if isinstance(zoo, dict):
        return {"kind": "zoo", "record": dict(zoo)}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(model, "save_pretrained"):
        cls = type(model)
        return {
            "kind": "huggingface",
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "config_class": f"{type(config).__module__}:{type(config).__qualname__}",
            "config": _hf_original_config(model, plan),
        }
    raise SerializationError(
        f"cannot tell how to rebuild {type(model).__name__}: it is not from secateur's zoo nor a "
        "Hugging Face "
        "model; pass factory='package.module:function' (and factory_kwargs) to save()"
    )


def _import(path: str, what: str) -> Any:
    """The object named ``"package.module:attr"``; the caller decides the name is trusted (never a folder)."""
    mod_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise SerializationError(f"cannot import {what} {path!r}: {e}") from e
    return obj


def trusted_names(trust_factory: str | Iterable[str] | None) -> frozenset[str]:
    """``trust_factory`` as a set of ``"package.module:function"`` names (one string counts as one name).

    Raises:
        ConfigError: an entry that is not a string of that form (named).
    """
    if trust_factory is None:
        return frozenset()
    names = [trust_factory] if isinstance(trust_factory, str) else list(trust_factory)
    for n in names:
        if not isinstance(n, str) or not is_factory_name(n.strip()):
            raise ConfigError(f"trust_factory: expected names like 'mypkg.models:build', got {n!r}")
    return frozenset(n.strip() for n in names)


def _untrusted(name: str, source: str, what: str = "factory") -> UntrustedCodeError:
    return UntrustedCodeError(
        f"{source}: the architecture is built by the {what} {name!r}, code that the saved folder names; "
        "secateur runs no code a folder names. If you trust it, pass it yourself: "
        f"load(path, factory={name!r}) (or the function itself, factory=build), or allow this name: "
        f"load(path, trust_factory=[{name!r}])"
    )


def _hf_class(path: str, base: type, trusted: frozenset[str], source: str, field: str) -> type:
    """The class ``path`` (``"module:Class"``) among transformers' own classes, subclassing ``base``; a class
    outside transformers only when its name is in ``trusted``. transformers' ``auto_map`` / remote code is
    never consulted."""
    mod, _, name = path.partition(":")
    if mod.split(".")[0] != "transformers":
        if path not in trusted:
            raise _untrusted(path, source, f"class (architecture.{field})")
        cls = _import(path, "class")
    else:
        transformers = require("transformers", f"{source}: rebuilding a Hugging Face model")
        cls = getattr(transformers, name, None)
        if cls is None or not getattr(cls, "__module__", "").startswith("transformers."):
            try:
                cls = getattr(importlib.import_module(mod), name, None)
            except ImportError:
                cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise SerializationError(
            f"{source}: architecture.{field}: {path!r} is not a transformers {base.__name__} subclass"
        )
    return cls


def _named_factory(fn: Any, kwargs: dict[str, Any], name: str | None) -> Callable[[], nn.Module]:
    """A no-argument builder calling ``fn(**kwargs)``; it checks the result is a module and records ``name``
    (``model.secateur_factory``) so the model can be saved again."""

    def build() -> nn.Module:
        model = fn(**copy.deepcopy(kwargs))
        if not isinstance(model, nn.Module):
            raise SerializationError(
                f"factory {name or fn!r} returned {type(model).__name__}, not an nn.Module"
            )
        if name is not None:
            model.secateur_factory = {"factory": name, "kwargs": dict(kwargs)}
        return model

    return build


def architecture_builder(
    arch: dict[str, Any],
    source: str = "architecture",
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    trust_factory: str | Iterable[str] | None = (),
) -> tuple[Callable[[], nn.Module], bool]:
    """A no-argument function building the unpruned model an :func:`architecture_of` record describes, and
    whether that build is known to work on the meta device (zoo and Hugging Face: yes; a user factory: maybe).

    Code runs only where the caller says so: a zoo record builds a registered zoo model; a Hugging Face record
    builds a class among transformers' own (``auto_map`` ignored, no remote code); a ``factory`` record is
    built only when ``factory`` is given (a callable or a ``"package.module:function"`` the caller names; it
    overrides any recorded architecture and gets the recorded ``kwargs``) or when the recorded name is
    in ``trust_factory``. Nothing is imported or called by this function except a trusted factory's module.

    Raises:
        UntrustedCodeError: a factory (or a Hugging Face class outside transformers) the caller did not trust;
            the message says how to pass or allow it.
        SerializationError: an unknown kind or a class that is not a transformers model/config class.
    """
    validate_architecture(arch, source)
    trusted = trusted_names(trust_factory)
    kind = arch["kind"]
    kwargs = dict(arch.get("kwargs", {})) if kind == "factory" else {}
    if factory is not None:
        if isinstance(factory, str):
            if not is_factory_name(factory):
                raise ConfigError(f"factory must look like 'package.module:function', got {factory!r}")
            return _named_factory(_import(factory, "factory"), kwargs, factory), False
        if not callable(factory):
            raise ConfigError(
                f"factory must be a callable or a 'package.module:function' name, got {factory!r}"
            )
        qual = f"{getattr(factory, '__module__', '')}:{getattr(factory, '__qualname__', '')}"
        return _named_factory(factory, kwargs, qual if is_factory_name(qual) else None), False
    if kind == "factory":
        name = arch["factory"]
        if name not in trusted:
            raise _untrusted(name, source)
        return _named_factory(_import(name, "factory"), kwargs, name), False
    if kind == "zoo":
        record = dict(arch["record"])

        def build_zoo() -> nn.Module:
            from secateur.zoo import rebuild_model

            try:
                return rebuild_model(record)
            except ConfigError as e:
                raise SerializationError(f"{source}: architecture.record: {e}") from e

        return build_zoo, True
    hf = require("transformers", f"{source}: rebuilding a Hugging Face model")
    config_cls = _hf_class(arch["config_class"], hf.PretrainedConfig, trusted, source, "config_class")
    model_cls = _hf_class(arch["class"], hf.PreTrainedModel, trusted, source, "class")
    config = clean_hf_config(arch["config"], source)

    def build_hf() -> nn.Module:
        try:
            cfg = config_cls.from_dict(copy.deepcopy(config))
        except Exception as e:  # transformers validates configs with its own exception types
            raise SerializationError(f"{source}: architecture.config: {type(e).__name__}: {e}") from e
        return model_cls(cfg)

    return build_hf, True


def build_architecture(arch: dict[str, Any], *, trust_factory: str | Iterable[str] | None = ()) -> nn.Module:
    """Build the unpruned model described by an :func:`architecture_of` record (see
    :func:`architecture_builder` for what code may run: a factory only when its name is in ``trust_factory``).

    Raises:
        UntrustedCodeError: a factory not in ``trust_factory``.
        SerializationError: an unknown kind, a bad record, or a factory/class that cannot be imported.
    """
    return architecture_builder(arch, trust_factory=trust_factory)[0]()


def check_before_build(
    build: Callable[[], nn.Module],
    meta_ok: bool,
    arch: dict[str, Any],
    plan: dict | None,
    shapes: dict[str, tuple[int, ...]],
    source: str,
    weights: str,
    *,
    allow_missing: bool = False,
) -> None:
    """The size checks made before the real model is built (see :mod:`secateur.io.validate`).

    Architecture integers are bounded by the weights present (``shapes``, from the safetensors headers); the
    architecture is built on the meta device (no memory), the plan's indices are checked in range of it, the
    plan is applied to it, and the result must hold exactly the tensors ``shapes`` lists (``allow_missing``:
    tied aliases may be absent). A user factory that cannot build on the meta device skips the meta part.

    Raises:
        SerializationError: naming ``source`` (plan.json) or ``weights`` and the field or tensor at fault.
    """
    check_architecture_sizes(arch, shapes, source)
    try:
        with torch.device("meta"):
            meta = build()
    except SecateurError:
        raise
    except Exception as e:
        if not meta_ok:
            return  # a trusted user factory that does not run on the meta device: checked by the real load
        raise SerializationError(f"{source}: cannot build the architecture: {type(e).__name__}: {e}") from e
    check_plan_fits(meta, plan, source)
    apply_plan(meta, plan, f"{source}: the plan does not fit the model")
    compare_shapes(meta, shapes, weights, allow_missing=allow_missing)

"""Save and load pruned models without pickle.

A saved model is a folder with two files:

- ``plan.json``: how to rebuild the architecture (a zoo record, a Hugging Face config and class, or
  a user factory ``"module:function"`` with JSON keyword arguments), the structural pruning plan
  (kept indices per tensor, see :func:`secateur.compact.make_plan`) and the names of element masks;
- ``model.safetensors``: the weights as the model computes with them (masks applied), plus each
  element mask as a bool tensor under ``"__mask__/<module>.<param>"``.

Loading rebuilds the *original* architecture, re-applies the plan with the same transactional
compaction that pruned it, loads the weights strictly and re-attaches masks, so outputs are
reproduced exactly. Nothing is ever unpickled: a pickle file is refused with an error naming it.

A folder is data, never code: loading runs no code the folder names. Zoo and Hugging Face
architectures are rebuilt from secateur's zoo and transformers' own classes; a user factory only
when the caller passes it or allows its name (:func:`load`). The folder is validated before anything
is built (:mod:`secateur.io.validate`).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from secateur._validate import check_model
from secateur.errors import (
    CompactionError,
    ConfigError,
    SecateurError,
    SerializationError,
    UnsafePathError,
    UntrustedCodeError,
)
from secateur.io.validate import (
    check_architecture_sizes,
    check_plan_fits,
    clean_hf_config,
    compare_shapes,
    folder_file,
    is_factory_name,
    read_plan_file,
    regular_file,
    safetensors_shapes,
    validate_architecture,
    validate_plan,
)
from secateur.masks import set_mask
from secateur.masks.element import element_mask

FORMAT = "secateur"
VERSION = 1
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
MASK_PREFIX = "__mask__/"


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
        import transformers

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
    from transformers import PretrainedConfig, PreTrainedModel

    config_cls = _hf_class(arch["config_class"], PretrainedConfig, trusted, source, "config_class")
    model_cls = _hf_class(arch["class"], PreTrainedModel, trusted, source, "class")
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


# ---------------------------------------------------------------------------------------------- tensors
def _weights_and_masks(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Plain-named effective tensors (masks applied) and the names of masked parameters."""
    out: dict[str, torch.Tensor] = {}
    masks: list[str] = []
    for name, t in model.state_dict().items():
        if ".parametrizations." in name or name.startswith("parametrizations."):
            continue
        out[name] = t
    for path, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for pname in module.parametrizations.keys():
            full = f"{path}.{pname}" if path else pname
            out[full] = getattr(module, pname).detach()
            m = element_mask(module, pname)
            if m is not None:
                out[MASK_PREFIX + full] = m.mask
                masks.append(full)
    # safetensors needs contiguous tensors that share no memory (tied weights are stored twice).
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}, masks


def _plan_text(doc: dict[str, Any]) -> str:
    """``doc`` (the content of plan.json) as JSON text."""
    try:
        return json.dumps(doc, indent=1)
    except TypeError as e:
        raise SerializationError(f"plan or metadata is not JSON-serialisable: {e}") from e


def save(
    model: nn.Module,
    directory: str | os.PathLike[str],
    plan: dict | None = None,
    *,
    factory: str | None = None,
    factory_kwargs: dict | None = None,
    metadata: dict | None = None,
) -> Path:
    """Save ``model`` (pruned or not) to ``directory`` as ``plan.json`` + ``model.safetensors``.

    Args:
        model: the model, possibly compacted by ``plan`` and possibly carrying element masks.
        plan: the structural pruning plan that was applied to it (from ``prune_channels`` or a
            structured pruner); ``None`` if it was not compacted.
        factory, factory_kwargs: how to build the unpruned model when it is neither a zoo nor a
            Hugging Face model.
        metadata: extra JSON-able data stored in plan.json (e.g. accuracy, recipe).

    Returns the folder path.

    Raises:
        InvalidModelError: ``model`` is not an ``nn.Module`` or has tensors on the meta device.
        SerializationError: the architecture cannot be recorded, ``plan`` is malformed (as
            :func:`secateur.io.validate.validate_plan` says) or metadata is not JSON-serialisable.

    Loading a model built by a user factory needs the caller to trust that factory: see :func:`load`.
    """
    check_model(model)
    directory = Path(directory)
    if plan is not None:
        validate_plan(plan, "plan")  # a plan load() would refuse is refused now, before anything is written
    arch = architecture_of(model, plan, factory, factory_kwargs)
    tensors, masks = _weights_and_masks(model)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": arch,
        "plan": plan,
        "masks": masks,
        "metadata": metadata or {},
    }
    text = _plan_text(doc)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_p = directory / (WEIGHTS_FILE + ".tmp"), directory / (PLAN_FILE + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": FORMAT})
    tmp_p.write_text(text)
    os.replace(tmp_w, directory / WEIGHTS_FILE)
    os.replace(tmp_p, directory / PLAN_FILE)
    return directory


# ------------------------------------------------------------------------------------------------- load
def _refuse_pickle(path: Path) -> None:
    """Raise if ``path`` (a regular file the caller has confined) is a pickle or a torch.save archive."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise SerializationError(f"{path}: cannot read: {e}") from e
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise SerializationError(f"{path}: is a pickle file; secateur never unpickles (it can run code)")
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith(".pkl") for n in z.namelist()):
                    raise SerializationError(
                        f"{path}: is a torch.save archive (it holds a pickle); secateur never unpickles. "
                        "Re-save the weights with safetensors."
                    )
        except zipfile.BadZipFile:
            pass


def _refuse_pickles_in(directory: Path, suffixes: tuple[str, ...]) -> None:
    """Name a pickle among the folder's regular files with these suffixes (files leaving the folder or not
    regular are skipped, never opened)."""
    for p in sorted(directory.glob("*")):
        if p.suffix not in suffixes:
            continue
        try:
            folder_file(directory, p.name, "the folder")
        except UnsafePathError:
            continue
        if regular_file(p):
            _refuse_pickle(p)


def _read_plan(directory: Path) -> dict[str, Any]:
    """The validated plan.json document of ``directory`` (see :func:`secateur.io.validate.read_plan_file`)."""
    path = folder_file(directory, PLAN_FILE, "the folder")
    if not path.exists():
        _refuse_pickles_in(directory, (".pt", ".pth", ".bin", ".pkl", ".ckpt"))
        raise SerializationError(f"{path}: missing (not a folder written by secateur.save)")
    _refuse_pickle(path)
    return read_plan_file(directory, PLAN_FILE, fmt=FORMAT, version=VERSION)


def _open_folder(directory: str | os.PathLike[str], writer: str) -> tuple[Path, dict[str, Any]]:
    """The folder as a Path and its validated plan.json; a path that is no folder raises (naming ``writer``,
    function that writes such folders), after refusing it if it is a pickle file."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ConfigError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}")
    directory = Path(directory)
    if not directory.is_dir():
        if regular_file(directory):
            _refuse_pickle(directory)
        raise SerializationError(f"{directory}: not a folder written by {writer}")
    return directory, _read_plan(directory)


def _weights_path(directory: Path, name: str, what: str, missing: str = "missing") -> Path:
    """``directory/name`` confined to the folder, a regular file, present and not a pickle."""
    path = folder_file(directory, name, what)
    if not path.exists():
        raise SerializationError(f"{path}: {missing}")
    _refuse_pickle(path)
    return path


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file (already confined by :func:`_weights_path`)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SerializationError(f"{path}: cannot read safetensors ({e}); the file may be truncated") from e


def _apply_plan(model: nn.Module, plan: dict | None, misfit: str) -> None:
    """Compact ``model`` (the rebuilt original) by ``plan`` when there is one; a plan that does not fit
    raises SerializationError ``"<misfit>: <why>"``."""
    if not plan:
        return
    from secateur.compact import compact

    try:
        compact(model, plan)
    except CompactionError as e:
        raise SerializationError(f"{misfit}: {e}") from e


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
    _apply_plan(meta, plan, f"{source}: the plan does not fit the model")
    compare_shapes(meta, shapes, weights, allow_missing=allow_missing)


def load(
    directory: str | os.PathLike[str],
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    trust_factory: str | Iterable[str] | None = (),
) -> nn.Module:
    """Rebuild a model saved by :func:`save`: architecture, then the plan, then weights and masks.

    A saved folder is data: it never makes secateur run code it names. Zoo and Hugging Face architectures are
    rebuilt from secateur's zoo and transformers' own classes (a config's ``auto_map`` is ignored, no remote
    code). A model built by a user factory (``save(..., factory="mypkg.models:build")``) is rebuilt only when
    the caller vouches for the code, in one of two ways:

    - ``load(path, factory=build)`` (the function) or ``load(path, factory="mypkg.models:build")`` (a name the
      caller gives): the caller's factory builds the architecture, called with the recorded keyword arguments
      (it also overrides a zoo or Hugging Face record);
    - ``load(path, trust_factory=["mypkg.models:build"])``: the recorded factory is imported and called only
      if its name is in the list (one string counts as a one-name list).

    Before anything is built, the folder is validated (:mod:`secateur.io.validate`): files confined to the
    folder and regular, plan.json depth-limited and well-formed (kept indices unique, sorted, in range),
    architecture sizes bounded by the weights present, the architecture with its plan built on the meta
    device and compared with the safetensors header shapes.

    Args:
        directory: the folder holding plan.json and model.safetensors.
        factory: a callable or ``"package.module:function"`` building the unpruned architecture.
        trust_factory: factory names (``"package.module:function"``) the recorded factory may be.

    Returns the model with the plan applied, weights and element masks loaded.

    Raises:
        UntrustedCodeError: the folder's architecture is a factory the caller did not pass nor trust (nothing
            was imported or called); the message names both options.
        UnsafePathError: a file that resolves outside the folder or is not a regular file (FIFO, device).
        SerializationError: a missing, truncated or pickle file, a malformed or too deep plan, indices
            duplicated / unsorted / out of range, sizes the weights do not back, or weights that do not fit
            the rebuilt model; the message names the file and the field.
        ConfigError: ``factory`` or ``trust_factory`` of the wrong form.
    """
    directory, doc = _open_folder(directory, "secateur.save")
    if doc.get("layout") == "huggingface":  # written by secateur.save_pretrained
        from secateur.io.pretrained import from_pretrained

        return from_pretrained(directory, factory=factory, trust_factory=trust_factory)
    source = str(directory / PLAN_FILE)
    wpath = _weights_path(directory, WEIGHTS_FILE, "the folder")
    shapes = safetensors_shapes(wpath)
    arch, plan = doc["architecture"], doc.get("plan")
    build, meta_ok = architecture_builder(arch, source, factory=factory, trust_factory=trust_factory)
    plain = {k: v for k, v in shapes.items() if not k.startswith(MASK_PREFIX)}
    masks = {k[len(MASK_PREFIX) :]: v for k, v in shapes.items() if k.startswith(MASK_PREFIX)}
    if set(masks) != set(doc.get("masks", [])):
        raise SerializationError(f"{wpath}: masks {sorted(masks)} differ from those listed in plan.json")
    for full, shape in masks.items():
        if plain.get(full) != shape:
            raise SerializationError(
                f"{wpath}: mask for {full!r} has shape {shape}, its weight {plain.get(full, 'is absent')}"
            )
    check_before_build(build, meta_ok, arch, plan, plain, source, str(wpath))
    tensors = _read_safetensors(wpath)
    model = build()
    _apply_plan(model, plan, f"{source}: the plan does not fit the model")
    weights = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise SerializationError(f"{wpath}: weights do not fit the rebuilt model: {e}") from e
    for full in masks:
        path, _, pname = full.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError as e:
            raise SerializationError(f"{wpath}: mask for {full!r} names no module") from e
        try:
            set_mask(module, tensors[MASK_PREFIX + full], pname)
        except ConfigError as e:
            raise SerializationError(f"{wpath}: mask for {full!r}: {e}") from e
    return model

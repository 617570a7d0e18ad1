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
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from secateur.errors import CompactionError, SerializationError
from secateur.masks import set_mask
from secateur.masks.element import _element_mask

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
        if ":" not in factory:
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
    mod_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise SerializationError(f"cannot import {what} {path!r}: {e}") from e
    return obj


def build_architecture(arch: dict[str, Any]) -> nn.Module:
    """Build the unpruned model described by an :func:`architecture_of` record.

    Raises:
        SerializationError: an unknown kind or a factory/class that cannot be imported.
    """
    kind = arch.get("kind")
    if kind == "zoo":
        from secateur.zoo import rebuild_model

        return rebuild_model(arch["record"])
    if kind == "factory":
        return _import(arch["factory"], "factory")(**arch.get("kwargs", {}))
    if kind == "huggingface":
        config_cls = _import(arch["config_class"], "config class")
        model_cls = _import(arch["class"], "model class")
        config = config_cls.from_dict(copy.deepcopy(arch["config"]))
        return model_cls(config)
    raise SerializationError(f"unknown architecture kind {kind!r} (expected zoo, factory or huggingface)")


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
            m = _element_mask(module, pname)
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

    Returns the folder path. Raises SerializationError when the architecture cannot be recorded or
    metadata is not JSON-serialisable.
    """
    directory = Path(directory)
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
    """Raise if ``path`` is a pickle or a torch.save archive (which holds a pickle)."""
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


def _read_plan(directory: Path) -> dict[str, Any]:
    path = directory / PLAN_FILE
    if not path.exists():
        suffixes = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
        others = sorted(p.name for p in directory.glob("*") if p.suffix in suffixes)
        for o in others:
            _refuse_pickle(directory / o)
        raise SerializationError(f"{path}: missing (not a folder written by secateur.save)")
    _refuse_pickle(path)
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SerializationError(f"{path}: not valid JSON ({e}); the file may be truncated") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SerializationError(f"{path}: not a secateur plan (format field is {doc.get('format')!r})")
    if doc.get("version") != VERSION:
        raise SerializationError(
            f"{path}: plan version {doc.get('version')!r}, this secateur reads {VERSION}"
        )
    return doc


def _open_folder(directory: str | os.PathLike[str], writer: str) -> tuple[Path, dict[str, Any]]:
    """The folder as a Path and its plan.json; a path that is no folder raises (naming ``writer``, the
    function that writes such folders), after refusing it if it is a pickle file."""
    directory = Path(directory)
    if not directory.is_dir():
        if directory.exists():
            _refuse_pickle(directory)
        raise SerializationError(f"{directory}: not a folder written by {writer}")
    return directory, _read_plan(directory)


def _read_safetensors(path: Path, missing: str = "missing") -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; a missing, pickle or unreadable file raises (``missing``: what
    the message says when the file is absent)."""
    if not path.exists():
        raise SerializationError(f"{path}: {missing}")
    _refuse_pickle(path)
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


def load(directory: str | os.PathLike[str], *, factory: str | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save`: architecture, then the plan, then weights and masks.

    Args:
        directory: the folder holding plan.json and model.safetensors.
        factory: overrides the recorded factory ("package.module:function").

    Raises:
        SerializationError: a missing, truncated or pickle file, or a plan or weights that do not fit
            the rebuilt model; the message names the file and the fault.
    """
    directory, doc = _open_folder(directory, "secateur.save")
    if doc.get("layout") == "huggingface":  # written by secateur.save_pretrained
        from secateur.io.pretrained import from_pretrained

        return from_pretrained(directory)
    wpath = directory / WEIGHTS_FILE
    tensors = _read_safetensors(wpath)
    arch = dict(doc["architecture"])
    if factory is not None:
        arch = {"kind": "factory", "factory": factory, "kwargs": arch.get("kwargs", {})}
    model = build_architecture(arch)
    _apply_plan(model, doc.get("plan"), f"{directory / PLAN_FILE}: the plan does not fit the model")
    masks = {k[len(MASK_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise SerializationError(f"{wpath}: weights do not fit the rebuilt model: {e}") from e
    for full, mask in masks.items():
        path, _, pname = full.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError as e:
            raise SerializationError(f"{wpath}: mask for {full!r} names no module") from e
        set_mask(module, mask, pname)
    if set(masks) != set(doc.get("masks", [])):
        raise SerializationError(f"{wpath}: masks {sorted(masks)} differ from those listed in plan.json")
    return model

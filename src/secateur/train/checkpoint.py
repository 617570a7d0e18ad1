"""Pickle-free checkpoints: tensors in safetensors files, everything else in ``state.json``.

Layout of a checkpoint directory:

- ``model.safetensors``: ``model.state_dict()`` with its keys as they are (parametrized modules
  keep keys such as ``conv.parametrizations.weight.original``).
- ``optimizer.safetensors``: the optimizer's per-parameter tensors (momentum buffers, Adam moments).
- ``extra.safetensors``: tensors found in callback and loader states (only when there are any).
- ``state.json``: counters, history, RNG states (base64), schedule, optimizer hyperparameters,
  callback and loader states with tensors replaced by references into the safetensors files.

Every file carries the same random ``checkpoint_id`` (safetensors metadata / JSON field), so a
directory mixing files from two saves is detected instead of silently resumed. Nothing here
calls ``torch.save`` or ``pickle``: loading a checkpoint never runs code.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from secateur.errors import SerializationError

if TYPE_CHECKING:
    from secateur.train.trainer import Trainer

__all__ = [
    "FORMAT",
    "VERSION",
    "decode_tree",
    "encode_tree",
    "load_checkpoint",
    "load_model_weights",
    "read_state",
    "save_checkpoint",
]

FORMAT = "secateur.train.checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EXTRA_FILE = "extra.safetensors"
STATE_FILE = "state.json"


def encode_tree(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Turn nested dicts/lists/tuples of JSON scalars and tensors into JSON-able data.

    Tensors are moved into ``tensors`` under keys starting with ``prefix`` and replaced by
    ``{"__tensor__": key}``; tuples become ``{"__tuple__": [...]}`` and dicts with non-string keys
    ``{"__items__": [[key, value], ...]}`` so :func:`decode_tree` gives back the same structure.

    Raises:
        SerializationError: a value of another type (the message gives its path in the tree).
    """
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: encode_tree(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        items = []
        for i, (k, v) in enumerate(obj.items()):
            items.append(
                [encode_tree(k, f"{prefix}.k{i}", tensors), encode_tree(v, f"{prefix}.{i}", tensors)]
            )
        return {"__items__": items}
    raise SerializationError(
        f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint: only tensors, "
        "JSON scalars, lists, tuples and dicts are allowed (no pickle)"
    )


def decode_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`.

    Raises:
        SerializationError: a tensor reference that is not in ``tensors``.
    """
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            key = obj["__tensor__"]
            if key not in tensors:
                raise SerializationError(
                    f"checkpoint refers to tensor {key!r}, which no safetensors file holds"
                )
            return tensors[key]
        if set(obj) == {"__tuple__"}:
            return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {_hashable(decode_tree(k, tensors)): decode_tree(v, tensors) for k, v in obj["__items__"]}
        return {k: decode_tree(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], checkpoint_id: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "checkpoint_id": checkpoint_id})
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _load_tensors(path: Path, checkpoint_id: str | None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise SerializationError(f"cannot read {path}: {exc} (is it a safetensors file?)") from exc
    if checkpoint_id is not None and meta.get("checkpoint_id") != checkpoint_id:
        raise SerializationError(
            f"{path} belongs to another save than {path.parent / STATE_FILE} "
            f"(checkpoint_id {meta.get('checkpoint_id')!r} != {checkpoint_id!r}); "
            "the checkpoint is inconsistent"
        )
    return tensors


def _stateful(callbacks: list[Any]) -> list[Any]:
    """Callbacks that take part in checkpoints: those with a ``state_dict`` method."""
    return [cb for cb in callbacks if callable(getattr(cb, "state_dict", None))]


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory (tied weights); keys stay as state_dict has them
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(trainer: Trainer, directory: str | os.PathLike[str]) -> Path:
    """Write the trainer's full state to ``directory`` (created if missing); returns its path.

    Files are replaced one by one, ``state.json`` last; see the module docstring for the layout.

    Raises:
        SerializationError: a callback or loader state holds a value that is neither a tensor
            nor JSON data.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    checkpoint_id = uuid.uuid4().hex
    opt_tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    optimizer_tree = encode_tree(trainer.optimizer.state_dict(), "optimizer", opt_tensors)
    callbacks = [
        {"class": type(cb).__qualname__, "state": encode_tree(cb.state_dict(), f"callback{i}", extra)}
        for i, cb in enumerate(_stateful(trainer.callbacks))
    ]
    loader_sd = (
        trainer.train_loader.state_dict()
        if callable(getattr(trainer.train_loader, "state_dict", None))
        else None
    )
    state = {
        "format": FORMAT,
        "version": VERSION,
        "checkpoint_id": checkpoint_id,
        "trainer": trainer._json_state(),
        "optimizer": optimizer_tree,
        "callbacks": callbacks,
        "loader": None if loader_sd is None else encode_tree(loader_sd, "loader", extra),
        "model_zoo": getattr(trainer.model, "secateur_zoo", None),
        "files": [MODEL_FILE, OPTIMIZER_FILE] + ([EXTRA_FILE] if extra else []),
    }
    text = json.dumps(state, indent=1)
    _atomic_save_tensors(path / MODEL_FILE, _model_tensors(trainer.model), checkpoint_id)
    _atomic_save_tensors(path / OPTIMIZER_FILE, opt_tensors, checkpoint_id)
    if extra:
        _atomic_save_tensors(path / EXTRA_FILE, extra, checkpoint_id)
    _atomic_write_text(path / STATE_FILE, text)
    return path


def read_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and check ``state.json`` of a checkpoint directory.

    Raises:
        SerializationError: missing file, invalid JSON, or not a secateur trainer checkpoint.
    """
    file = Path(directory) / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SerializationError(f"cannot read checkpoint state {file}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise SerializationError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SerializationError(
            f"{file} is not a secateur trainer checkpoint (format field missing or wrong)"
        )
    if state.get("version") != VERSION:
        raise SerializationError(
            f"{file} has checkpoint version {state.get('version')!r}; this reader knows {VERSION}"
        )
    return state


def load_model_weights(model: nn.Module, directory: str | os.PathLike[str], strict: bool = True) -> nn.Module:
    """Load ``model.safetensors`` of a checkpoint into ``model`` (in place; returns it).

    Raises:
        SerializationError: unreadable file, or keys/shapes that do not fit ``model`` (the message
            lists missing and unexpected keys).
    """
    path = Path(directory)
    checkpoint_id = read_state(path).get("checkpoint_id") if (path / STATE_FILE).exists() else None
    tensors = _load_tensors(path / MODEL_FILE, checkpoint_id)
    try:
        model.load_state_dict(tensors, strict=strict)
    except RuntimeError as exc:
        own = set(model.state_dict())
        missing, unexpected = sorted(own - set(tensors)), sorted(set(tensors) - own)
        raise SerializationError(
            f"{path / MODEL_FILE} does not fit the model: missing keys {missing[:10]}, unexpected keys "
            f"{unexpected[:10]} (a pruner's parametrizations must be registered before loading): {exc}"
        ) from exc
    return model


def load_checkpoint(trainer: Trainer, directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Restore model, optimizer, callbacks, loader, counters, history and RNG states into ``trainer``.

    Callback states are restored first, so a pruner can re-register its parametrizations before
    the model's state dict (with their keys) is loaded. Returns the parsed ``state.json``.

    Raises:
        SerializationError: unreadable or inconsistent files, a different number or kind of
            callbacks, or an optimizer state that does not fit the model's parameters.
    """
    path = Path(directory)
    state = read_state(path)
    cid = state["checkpoint_id"]
    trainer._check_json_state(state["trainer"])  # before anything is changed
    extra = _load_tensors(path / EXTRA_FILE, cid) if EXTRA_FILE in state.get("files", []) else {}
    saved_cbs = state.get("callbacks", [])
    live = _stateful(trainer.callbacks)
    saved_names = [s["class"] for s in saved_cbs]
    live_names = [type(cb).__qualname__ for cb in live]
    if saved_names != live_names:
        raise SerializationError(
            f"{path}: the checkpoint holds state for callbacks {saved_names}, but the trainer's callbacks "
            f"with state_dict are {live_names}; pass the same stateful callbacks in the same order"
        )
    for cb, saved in zip(live, saved_cbs, strict=True):
        if not callable(getattr(cb, "load_state_dict", None)):
            raise SerializationError(
                f"{path}: callback {saved['class']} has saved state but no load_state_dict"
            )
        cb.load_state_dict(decode_tree(saved["state"], extra))
    load_model_weights(trainer.model, path)
    opt_sd = decode_tree(state["optimizer"], _load_tensors(path / OPTIMIZER_FILE, cid))
    try:
        trainer.optimizer.load_state_dict(opt_sd)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise SerializationError(f"{path / OPTIMIZER_FILE}: optimizer state does not fit: {exc}") from exc
    if state.get("loader") is not None and callable(getattr(trainer.train_loader, "load_state_dict", None)):
        trainer.train_loader.load_state_dict(decode_tree(state["loader"], extra))
    trainer._load_json_state(state["trainer"])
    return state

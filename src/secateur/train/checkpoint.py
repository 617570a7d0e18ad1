"""Crash-safe, pickle-free checkpoints: every save is a new folder, published by one atomic rename.

On-disk layout of a checkpoint root (the ``directory`` given to :func:`save_checkpoint`)::

    <root>/
      ckpt-000007-step-350/     complete checkpoint number 7 (saves are numbered 1, 2, ... in
                                order), taken after global step 350
        model.safetensors       model.state_dict() with its keys as they are (parametrized modules
                                keep keys such as conv.parametrizations.weight.original)
        optimizer.safetensors   the optimizer's per-parameter tensors (momentum buffers, Adam moments)
        extra.safetensors       tensors found in callback and loader states (only when there are any)
        state.json              counters, history, RNG states (base64), schedule, optimizer
                                hyperparameters, callback and loader states (tensors replaced by
                                references into the safetensors files)
        complete.json           the completion marker, written last: format, checkpoint_id, save
                                number, step, and the byte size and SHA-256 of every file above
      ckpt-000008-step-400/     the newest complete checkpoint: what resuming from <root> loads
      .partial-000009-<hex>/    a save in progress, or one killed mid-write: never read, removed by
                                the next save
      .trash-<hex>-ckpt-.../    an old checkpoint being deleted (renamed first, then removed)

A save (one writer per root; in a distributed run only rank 0 saves, see :class:`Trainer`):

1. encodes everything in memory (a value that cannot be stored raises before the disk is touched);
2. writes each file into a fresh hidden sibling ``.partial-...`` folder and fsyncs it; writes
   ``complete.json`` last and fsyncs it; fsyncs the folder;
3. renames the folder to ``ckpt-<n>-step-<s>`` (atomic on POSIX) and fsyncs the root;
4. only then deletes complete checkpoints beyond ``keep_last`` (each renamed to ``.trash-...``
   before removal, so a half-deleted folder never keeps a ``ckpt-`` name).

A crash at any moment therefore leaves the previous complete checkpoints intact, and no folder
named ``ckpt-...`` lacks its marker. Loading from a root picks the newest ``ckpt-...`` folder
whose marker verifies (sizes and SHA-256 of every file); hidden partial and trash folders are
ignored (loading never changes the folder). A checkpoint folder itself, or a folder in the first
layout (``state.json`` and the safetensors files directly inside, no marker), can be loaded too.

Every file also carries the same random ``checkpoint_id`` (safetensors metadata / JSON field), so
files from two saves are never mixed. Nothing here calls ``torch.save`` or ``pickle``: loading a
checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensor_bytes
from safetensors.torch import save as save_tensor_bytes
from torch import nn

from secateur.errors import ConfigError, SerializationError


class Trainer(Protocol):
    """What a checkpoint saves and restores (:class:`secateur.train.Trainer` is one): the model, the
    optimizer, stateful callbacks and loader, counters, and the trainer's own JSON state."""

    model: nn.Module
    optimizer: Any
    callbacks: list[Any]
    train_loader: Any
    global_step: int
    epoch: int

    def json_state(self) -> dict[str, Any]: ...

    def check_json_state(self, state: dict[str, Any]) -> None: ...

    def load_json_state(self, state: dict[str, Any]) -> None: ...

__all__ = [
    "DEFAULT_KEEP_LAST",
    "FORMAT",
    "VERSION",
    "decode_tree",
    "encode_tree",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "read_state",
    "save_checkpoint",
    "verify_checkpoint",
]

FORMAT = "secateur.train.checkpoint"
VERSION = 1  # of state.json
LAYOUT = 2  # of the folder: 1 = files directly in the directory, 2 = ckpt-* folders with a marker
DEFAULT_KEEP_LAST = 2
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EXTRA_FILE = "extra.safetensors"
STATE_FILE = "state.json"
MARKER_FILE = "complete.json"
DATA_FILES = (MODEL_FILE, OPTIMIZER_FILE, EXTRA_FILE, STATE_FILE)
PARTIAL_PREFIX = ".partial-"
TRASH_PREFIX = ".trash-"
_CKPT_NAME = re.compile(r"^ckpt-(\d+)-step-(\d+)$")
# temporary files of the first layout's one-file-at-a-time replacement, left by a crash
_LEGACY_TMP = re.compile(r"^\.(model|optimizer|extra)\.safetensors\.tmp-\d+$|^\.state\.json\.tmp-\d+$")


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


# ----------------------------------------------------------------------------- writing
def _fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (files created, renamed, removed) durable.

    POSIX only: Windows cannot open a directory, and its renames are not fsync-ordered this way.
    """
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    """Create ``path`` (it must not exist), write ``data`` and fsync; return its size and SHA-256."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _publish(partial: Path, final: Path) -> None:
    """Rename the finished ``partial`` folder to ``final`` (one atomic step) and make it durable."""
    if final.exists():
        raise SerializationError(
            f"{final} already exists: two processes are saving into {final.parent} at once "
            "(one writer per checkpoint folder)"
        )
    os.rename(partial, final)
    _fsync_dir(final.parent)


def _discard(path: Path) -> None:
    """Delete checkpoint folder ``path``: first renamed to a hidden trash name, then removed."""
    trash = path.with_name(f"{TRASH_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")
    os.rename(path, trash)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _clean_stale(root: Path) -> list[str]:
    """Remove unfinished saves, interrupted deletions and first-layout temp files; return their names."""
    removed = []
    for entry in root.iterdir():
        name = entry.name
        if name.startswith((PARTIAL_PREFIX, TRASH_PREFIX)) or _LEGACY_TMP.match(name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(name)
    return removed


def _make_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise SerializationError(f"checkpoint folder {root} exists and is not a folder")
    missing = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    if missing:
        _fsync_dir(root.parent)


def check_keep_last(keep_last: int | None) -> None:
    """Raise ConfigError unless ``keep_last`` (complete checkpoints kept) is an int >= 1 or None (all)."""
    bad = isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
    if keep_last is not None and bad:
        raise ConfigError(f"keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")


def _stateful(callbacks: list[Any]) -> list[Any]:
    """Callbacks that take part in checkpoints: those with a ``state_dict`` method."""
    return [cb for cb in callbacks if callable(getattr(cb, "state_dict", None))]


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory (tied weights); keys stay as state_dict has them
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _encode(trainer: Trainer, checkpoint_id: str) -> dict[str, bytes]:
    """The bytes of every file of one checkpoint, ``{file name: bytes}`` (nothing written yet).

    Raises:
        SerializationError: a callback or loader state holds a value that is neither a tensor nor
            JSON data.
    """
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
        "trainer": trainer.json_state(),
        "optimizer": optimizer_tree,
        "callbacks": callbacks,
        "loader": None if loader_sd is None else encode_tree(loader_sd, "loader", extra),
        "model_zoo": getattr(trainer.model, "secateur_zoo", None),
        "files": [MODEL_FILE, OPTIMIZER_FILE] + ([EXTRA_FILE] if extra else []),
    }
    meta = {"format": FORMAT, "checkpoint_id": checkpoint_id}
    files = {
        MODEL_FILE: save_tensor_bytes(_model_tensors(trainer.model), metadata=meta),
        OPTIMIZER_FILE: save_tensor_bytes(opt_tensors, metadata=meta),
    }
    if extra:
        files[EXTRA_FILE] = save_tensor_bytes(extra, metadata=meta)
    files[STATE_FILE] = json.dumps(state, indent=1).encode("utf-8")
    return files


def save_checkpoint(
    trainer: Trainer, directory: str | os.PathLike[str], keep_last: int | None = DEFAULT_KEEP_LAST
) -> Path:
    """Save the trainer's full state as a new complete checkpoint under ``directory``; return its folder.

    ``directory`` (created if missing) is a checkpoint root: the save goes to a hidden
    ``.partial-...`` folder, every file fsynced, the marker ``complete.json`` (sizes and SHA-256)
    written last, then the folder is renamed to ``ckpt-<n>-step-<global_step>`` in one atomic
    step. Afterwards the oldest complete checkpoints beyond ``keep_last`` (``None``: keep all) are
    deleted, and so are leftovers of earlier interrupted saves. A crash at any moment leaves the
    previous complete checkpoints loadable (see the module docstring for the layout). One writer
    per root at a time.

    Raises:
        ConfigError: ``keep_last`` is not an int >= 1 or None.
        SerializationError: a callback or loader state holds a value that is neither a tensor nor
            JSON data (raised before anything is written), ``directory`` is a file, or another
            process published the same checkpoint name first.
        OSError: the disk refused a write; the unfinished folder is removed, older checkpoints stay.
    """
    check_keep_last(keep_last)
    checkpoint_id = uuid.uuid4().hex
    files = _encode(trainer, checkpoint_id)
    root = Path(directory)
    _make_root(root)
    _clean_stale(root)
    seq = 1 + max((n for n, _ in _published(root)), default=0)
    final = root / f"ckpt-{seq:06d}-step-{int(trainer.global_step)}"
    partial = root / f"{PARTIAL_PREFIX}{seq:06d}-{checkpoint_id[:12]}"
    partial.mkdir()
    try:
        digests = {name: _write_file(partial / name, data) for name, data in files.items()}
        marker = {
            "format": FORMAT,
            "layout": LAYOUT,
            "checkpoint_id": checkpoint_id,
            "save": seq,
            "global_step": int(trainer.global_step),
            "epoch": int(trainer.epoch),
            "files": digests,
        }
        _write_file(partial / MARKER_FILE, json.dumps(marker, indent=1).encode("utf-8"))
        _fsync_dir(partial)
        _publish(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if keep_last is not None:
        for _, old in _published(root)[:-keep_last]:
            _discard(old)
    return final


# ----------------------------------------------------------------------------- finding and checking
def _published(root: Path) -> list[tuple[int, Path]]:
    """``(save number, folder)`` of every ``ckpt-*`` folder in ``root``, oldest first (not verified)."""
    found = []
    for entry in root.iterdir():
        m = _CKPT_NAME.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink():
            found.append((int(m.group(1)), entry))
    return sorted(found, key=lambda t: t[0])


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The ``ckpt-*`` folders of a checkpoint root, oldest first (by save number; not verified).

    Unfinished saves (``.partial-*``) and deletions (``.trash-*``) are never listed.

    Raises:
        SerializationError: ``directory`` is not a folder.
    """
    root = Path(directory)
    if not root.is_dir():
        raise SerializationError(f"checkpoint folder {root} does not exist or is not a folder")
    return [p for _, p in _published(root)]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_marker(path: Path) -> dict[str, Any]:
    file = path / MARKER_FILE
    if file.is_symlink() or not file.is_file():
        raise SerializationError(
            f"{path} is not a complete checkpoint: {MARKER_FILE} is missing (a save that did not finish)"
        )
    try:
        marker = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SerializationError(f"{file} is unreadable or not valid JSON: {exc}") from exc
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or marker.get("layout") != LAYOUT:
        raise SerializationError(f"{file} is not a secateur checkpoint marker (format or layout field wrong)")
    files = marker.get("files")
    if (
        not isinstance(files, dict)
        or not {MODEL_FILE, OPTIMIZER_FILE, STATE_FILE} <= set(files) <= set(DATA_FILES)
        or not all(isinstance(r, dict) and isinstance(r.get("bytes"), int) for r in files.values())
    ):
        raise SerializationError(
            f"{file}: field 'files' must map {list(DATA_FILES)} (extra optional) to their size and sha256"
        )
    return marker


def verify_checkpoint(directory: str | os.PathLike[str], digests: bool = True) -> dict[str, Any]:
    """Check that a checkpoint folder is complete: its marker lists every file with the right size
    and (if ``digests``) SHA-256. Returns the parsed marker (``checkpoint_id``, ``save``,
    ``global_step``, ``epoch``, ``files``).

    Raises:
        SerializationError: no or malformed ``complete.json``, or a listed file that is missing,
            not a regular file, or of another size or digest (the message names the file).
    """
    path = Path(directory)
    marker = _read_marker(path)
    for name, rec in marker["files"].items():
        file = path / name
        if file.is_symlink() or not file.is_file():
            raise SerializationError(f"{file} is missing or not a regular file; the checkpoint is incomplete")
        size = file.stat().st_size
        if size != rec["bytes"]:
            raise SerializationError(f"{file} has {size} bytes, its marker says {rec['bytes']}: corrupted")
        if digests and _sha256_file(file) != rec.get("sha256"):
            raise SerializationError(f"{file}: SHA-256 differs from the one in {MARKER_FILE}: corrupted")
    return marker


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder under a checkpoint root, or None if there is none.

    Folders are tried newest first (by save number); one whose marker does not verify is skipped
    with a warning naming it. Nothing is written or removed.

    Raises:
        SerializationError: ``directory`` is not a folder.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
        except SerializationError as exc:
            warnings.warn(f"skipping checkpoint {path}: {exc}", stacklevel=2)
            continue
        return path
    return None


def _resolve(directory: str | os.PathLike[str]) -> Path:
    """The checkpoint folder to read for ``directory``: a root's newest complete checkpoint, a
    checkpoint folder itself (verified), or a folder in the first layout."""
    path = Path(directory)
    if not path.is_dir():
        raise SerializationError(f"checkpoint {path} does not exist or is not a folder")
    if path.name.startswith((PARTIAL_PREFIX, TRASH_PREFIX)):
        raise SerializationError(f"{path} is an unfinished save or a deletion in progress, not a checkpoint")
    if (path / MARKER_FILE).exists() or _CKPT_NAME.match(path.name):
        verify_checkpoint(path)
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if (path / STATE_FILE).exists() or (path / MODEL_FILE).exists():
        return path  # first layout: files directly in the folder
    unfinished = sorted(p.name for p in path.iterdir() if p.name.startswith(PARTIAL_PREFIX))
    raise SerializationError(
        f"no complete checkpoint in {path}"
        + (f" (unfinished saves ignored: {unfinished})" if unfinished else "")
    )


# ----------------------------------------------------------------------------- reading
def _load_tensors(path: Path, checkpoint_id: str | None) -> dict[str, torch.Tensor]:
    try:
        data = path.read_bytes()
        tensors = load_tensor_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except (OSError, SafetensorError, ValueError) as exc:
        raise SerializationError(f"cannot read {path}: {exc} (is it a safetensors file?)") from exc
    if checkpoint_id is not None and meta.get("checkpoint_id") != checkpoint_id:
        raise SerializationError(
            f"{path} belongs to another save than {path.parent / STATE_FILE} "
            f"(checkpoint_id {meta.get('checkpoint_id')!r} != {checkpoint_id!r}); "
            "the checkpoint is inconsistent"
        )
    return tensors


def _read_state_file(path: Path) -> dict[str, Any]:
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
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


def read_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and check ``state.json`` of a checkpoint (of a root's newest complete checkpoint).

    Raises:
        SerializationError: no complete checkpoint, missing file, invalid JSON, or not a secateur
            trainer checkpoint.
    """
    return _read_state_file(_resolve(directory))


def _load_weights_from(model: nn.Module, path: Path, strict: bool) -> nn.Module:
    checkpoint_id = _read_state_file(path).get("checkpoint_id") if (path / STATE_FILE).exists() else None
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


def load_model_weights(model: nn.Module, directory: str | os.PathLike[str], strict: bool = True) -> nn.Module:
    """Load ``model.safetensors`` of a checkpoint (a root's newest complete one) into ``model``.

    In place; returns ``model``.

    Raises:
        SerializationError: no complete checkpoint, an unreadable file, or keys/shapes that do not
            fit ``model`` (the message lists missing and unexpected keys).
    """
    return _load_weights_from(model, _resolve(directory), strict)


def load_checkpoint(trainer: Trainer, directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Restore model, optimizer, callbacks, loader, counters, history and RNG states into ``trainer``.

    ``directory`` is a checkpoint root (its newest complete checkpoint is loaded; unfinished
    saves are ignored), one checkpoint folder, or a folder in the first layout. Callback states
    are restored first, so a pruner can re-register its parametrizations before the model's state
    dict (with their keys) is loaded. Returns the parsed ``state.json``.

    Raises:
        SerializationError: no complete checkpoint, unreadable or inconsistent files, a different
            number or kind of callbacks, or an optimizer state that does not fit the model's
            parameters.
    """
    path = _resolve(directory)
    state = _read_state_file(path)
    cid = state["checkpoint_id"]
    trainer.check_json_state(state["trainer"])  # before anything is changed
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
    _load_weights_from(trainer.model, path, strict=True)
    opt_sd = decode_tree(state["optimizer"], _load_tensors(path / OPTIMIZER_FILE, cid))
    try:
        trainer.optimizer.load_state_dict(opt_sd)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise SerializationError(f"{path / OPTIMIZER_FILE}: optimizer state does not fit: {exc}") from exc
    if state.get("loader") is not None and callable(getattr(trainer.train_loader, "load_state_dict", None)):
        trainer.train_loader.load_state_dict(decode_tree(state["loader"], extra))
    trainer.load_json_state(state["trainer"])
    return state

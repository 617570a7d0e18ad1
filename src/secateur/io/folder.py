"""Reading a saved folder safely: the plan file, weight files confined to the folder, no pickle.

Shared by :func:`secateur.load` (secateur's layout) and :func:`secateur.from_pretrained` (the Hugging Face
layout); every read goes through :mod:`secateur.io.validate`.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from secateur.errors import (
    CompactionError,
    ConfigError,
    SerializationError,
    UnsafePathError,
)
from secateur.io.validate import (
    folder_file,
    read_plan_file,
    regular_file,
)

# ---------------------------------------------------------------------------------------- architecture

FORMAT = "secateur"
VERSION = 1
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
MASK_PREFIX = "__mask__/"


def plan_text(doc: dict[str, Any]) -> str:
    """``doc`` (the content of plan.json) as JSON text."""
    try:
        return json.dumps(doc, indent=1)
    except TypeError as e:
        raise SerializationError(f"plan or metadata is not JSON-serialisable: {e}") from e


# ------------------------------------------------------------------------------------------------- load
def refuse_pickle(path: Path) -> None:
    """Raise if ``path`` (a regular file the caller has confined) is a pickle or a torch.save archive."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as e:
        raise SerializationError(f"{path}: cannot read: {e}") from e
    if head[8:9] == b"{":  # safetensors: u64 header length, then JSON (length 0x0580 starts \x80\x05)
        return
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise SerializationError(f"{path}: is a pickle file; secateur never unpickles (it can run code)")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith(".pkl") for n in z.namelist()):
                    raise SerializationError(
                        f"{path}: is a torch.save archive (it holds a pickle); secateur never unpickles. "
                        "Re-save the weights with safetensors."
                    )
        except zipfile.BadZipFile:
            pass


def refuse_pickles_in(directory: Path, suffixes: tuple[str, ...]) -> None:
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
            refuse_pickle(p)


def read_plan(directory: Path) -> dict[str, Any]:
    """The validated plan.json document of ``directory`` (see :func:`secateur.io.validate.read_plan_file`)."""
    path = folder_file(directory, PLAN_FILE, "the folder")
    if not path.exists():
        refuse_pickles_in(directory, (".pt", ".pth", ".bin", ".pkl", ".ckpt"))
        raise SerializationError(f"{path}: missing (not a folder written by secateur.save)")
    refuse_pickle(path)
    return read_plan_file(directory, PLAN_FILE, fmt=FORMAT, version=VERSION)


def open_folder(directory: str | os.PathLike[str], writer: str) -> tuple[Path, dict[str, Any]]:
    """The folder as a Path and its validated plan.json; a path that is no folder raises (naming ``writer``,
    function that writes such folders), after refusing it if it is a pickle file."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ConfigError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}")
    directory = Path(directory)
    if not directory.is_dir():
        if regular_file(directory):
            refuse_pickle(directory)
        raise SerializationError(f"{directory}: not a folder written by {writer}")
    return directory, read_plan(directory)


def weights_path(directory: Path, name: str, what: str, missing: str = "missing") -> Path:
    """``directory/name`` confined to the folder, a regular file, present and not a pickle."""
    path = folder_file(directory, name, what)
    if not path.exists():
        raise SerializationError(f"{path}: {missing}")
    refuse_pickle(path)
    return path


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file (already confined by :func:`weights_path`)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SerializationError(f"{path}: cannot read safetensors ({e}); the file may be truncated") from e


def apply_plan(model: nn.Module, plan: dict | None, misfit: str) -> None:
    """Compact ``model`` (the rebuilt original) by ``plan`` when there is one; a plan that does not fit
    raises SerializationError ``"<misfit>: <why>"``."""
    if not plan:
        return
    from secateur.compact import compact

    try:
        compact(model, plan)
    except CompactionError as e:
        raise SerializationError(f"{misfit}: {e}") from e

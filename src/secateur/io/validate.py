"""Validation of a saved folder at the boundary: a folder is data, checked before anything is built.

Everything :func:`secateur.load` and :func:`secateur.from_pretrained` read from disk goes through here:

- **files** (:func:`folder_file`): a file a folder lists must resolve (symlinks followed) to a regular file
  inside the folder; an absolute path, a ``..`` that leaves it, a symlink pointing out of it, a FIFO or a
  device is refused before it is opened (a FIFO would block the reader forever);
- **JSON** (:func:`read_json`): size-capped, nesting depth checked on the text before parsing (a plan nested
  200,000 deep is refused, no ``RecursionError``);
- **plan.json** (:func:`read_plan_file`, :func:`validate_document`, :func:`validate_plan`): the document is
  a JSON object with the expected fields and types; kept indices are ints, unique, sorted and non-negative;
  attribute and config keys are plain names (no ``_private`` or dunder attribute can be set);
- **architecture** (:func:`validate_architecture`): a zoo record, a Hugging Face class among
  ``transformers``' own classes (never a module the folder names; ``auto_map`` and remote code ignored), or a
  user factory, which is *recorded* here and run only when the caller trusts it (see :func:`secateur.load`);
- **sizes** (:func:`check_architecture_sizes`, :func:`check_plan_fits`, :func:`compare_shapes`): integers in
  the architecture record are bounded by the weights actually present (the safetensors headers, read without
  loading data, :func:`safetensors_shapes`), the plan's indices are in range of the architecture built on the
  meta device, and that meta model, compacted by the plan, has the shapes the weights files hold. Only then is
  the real model built.

Every failure raises :class:`~secateur.errors.SerializationError` (or its subclass
:class:`~secateur.errors.UnsafePathError`) naming the file and the field at fault.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from secateur.errors import SerializationError, UnsafePathError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "check_architecture_sizes",
    "check_plan_fits",
    "compare_shapes",
    "folder_file",
    "json_depth",
    "read_json",
    "read_plan_file",
    "safetensors_shapes",
    "validate_architecture",
    "validate_document",
    "validate_plan",
    "validate_tied",
]

#: Deepest nesting of arrays/objects accepted in a JSON file a folder holds (plans and configs nest < 10).
MAX_JSON_DEPTH = 64
#: Largest JSON file read (a plan of a 70B-parameter model is tens of MB).
MAX_JSON_BYTES = 1 << 30
#: Architecture integers up to this are always accepted; above it they must not exceed the number of
#: weights the folder holds (a class count or width larger than every tensor cannot be real).
MIN_SIZE_BOUND = 1 << 24
#: Config keys that count layers: bounded by the number of tensors present (every layer holds a weight).
LAYER_COUNT_KEYS = frozenset(
    {
        "num_hidden_layers",
        "num_layers",
        "n_layer",
        "n_layers",
        "encoder_layers",
        "decoder_layers",
        "num_encoder_layers",
        "num_decoder_layers",
    }
)
#: Hugging Face config keys dropped before a config is built: they can name code to fetch or import.
IGNORED_CONFIG_KEYS = ("auto_map", "trust_remote_code", "custom_pipelines")
#: Config keys naming an attention implementation; a value with a ``/`` is a Hub kernel repository (code).
ATTN_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


# ------------------------------------------------------------------------------------------------- files
def folder_file(directory: Path, name: object, what: str) -> Path:
    """The path of ``name`` inside ``directory``, checked to stay inside it and be a regular file.

    Args:
        directory: the saved folder.
        name: a relative file name as the folder lists it (e.g. a ``weight_map`` value of a sharded index).
        what: what lists the name, for the message (``"plan.json"``, ``"model.safetensors.index.json"``).

    Returns the path (under ``directory``, not resolved), which may not exist; a missing file is the caller's
    error to name.

    Raises:
        UnsafePathError: ``name`` is not a non-empty string, is absolute, resolves (symlinks followed) outside
            the folder, or exists but is not a regular file (a FIFO, socket, device or folder).
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePathError(f"{directory}: {what} lists a file name that is not a plain string: {name!r}")
    if os.path.isabs(name) or Path(name).is_absolute() or name.startswith(("/", "\\")) or ":" in name[:3]:
        raise UnsafePathError(
            f"{directory}: {what} lists the absolute path {name!r}; only names inside the folder"
        )
    path = directory / name
    root = os.path.realpath(directory)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        parts = Path(name).parts
        link = any(os.path.islink(directory.joinpath(*parts[: k + 1])) for k in range(len(parts)))
        raise UnsafePathError(
            f"{path}: listed by {what}, resolves to {real}, outside the folder {root}"
            f"{' through a symlink' if link else ''}; secateur reads only files inside a saved folder"
        )
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise UnsafePathError(f"{path}: cannot inspect ({e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(
            f"{path}: not a regular file ({_file_kind(st.st_mode)}); secateur reads only regular files "
            "(a FIFO would block the reader)"
        )
    return path


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def regular_file(path: Path) -> bool:
    """Whether ``path`` (symlinks followed) is an existing regular file; never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


# -------------------------------------------------------------------------------------------------- JSON
def json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``text`` (brackets inside strings ignored); 0 for a scalar.

    Linear time and memory, no recursion: safe on a hostile file before it is parsed.
    """
    bare = _STRING.sub("", text).encode("utf-8", "surrogatepass")
    b = np.frombuffer(bare, dtype=np.uint8)
    if b.size == 0:
        return 0
    step = np.zeros(b.size, dtype=np.int64)
    step[(b == ord("[")) | (b == ord("{"))] = 1
    step[(b == ord("]")) | (b == ord("}"))] = -1
    return int(max(np.cumsum(step).max(), 0))


def read_json(path: Path, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse the JSON file ``path`` (already confined to its folder by :func:`folder_file`).

    Raises:
        SerializationError: the file is larger than ``max_bytes``, not UTF-8, nested deeper than
            :data:`MAX_JSON_DEPTH`, not valid JSON (possibly truncated), or holds a number Python refuses
            (an integer of thousands of digits); the message names the file.
    """
    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            raise SerializationError(
                f"{path}: {what} of {size} bytes is larger than the {max_bytes}-byte limit"
            )
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SerializationError(f"{path}: {what} is not UTF-8 text ({e})") from e
    except OSError as e:
        raise SerializationError(f"{path}: cannot read {what}: {e}") from e
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise SerializationError(
            f"{path}: {what} nests {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed; not a file "
            "secateur wrote"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SerializationError(f"{path}: not valid JSON ({e}); the file may be truncated") from e
    except (ValueError, RecursionError) as e:  # e.g. an integer longer than sys.get_int_max_str_digits()
        raise SerializationError(f"{path}: {what} holds a value Python cannot read ({e})") from e


# ------------------------------------------------------------------------------------------- plan.json
def _fail(source: str, field: str, why: str) -> SerializationError:
    return SerializationError(f"{source}: {field}: {why}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_mapping(v: object, source: str, field: str) -> Mapping:
    if not isinstance(v, dict):
        raise _fail(source, field, f"expected a JSON object, got {_json_type(v)}")
    return v


def _json_type(v: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for t, n in names.items():
        if isinstance(v, t):
            return n
    return "a number" if isinstance(v, (int, float)) else type(v).__name__


def validate_document(doc: object, source: str, *, fmt: str, version: int) -> dict[str, Any]:
    """Check the top level of a ``plan.json`` document and return it.

    Args:
        doc: the parsed JSON.
        source: the file, named in messages.
        fmt, version: the expected ``"format"`` and ``"version"`` values.

    Raises:
        SerializationError: the document is not a JSON object (e.g. a list), its format or version is not the
            expected one, or a field has the wrong type (``architecture`` not an object, ``masks`` no list of
            names, ``metadata`` not an object, ``plan`` invalid: see :func:`validate_plan`, ``tied``
            invalid: see :func:`validate_tied`).
    """
    if not isinstance(doc, dict):
        raise SerializationError(f"{source}: a plan must be a JSON object, got {_json_type(doc)}")
    if doc.get("format") != fmt:
        raise SerializationError(f"{source}: not a secateur plan (format field is {doc.get('format')!r})")
    if doc.get("version") != version:
        raise SerializationError(
            f"{source}: plan version {doc.get('version')!r}, this secateur reads {version}"
        )
    validate_architecture(doc.get("architecture"), source)
    masks = doc.get("masks", [])
    if not isinstance(masks, list) or not all(isinstance(m, str) for m in masks):
        raise _fail(source, "masks", f"expected a list of parameter names, got {masks!r:.80}")
    if "metadata" in doc and doc["metadata"] is not None:
        _check_mapping(doc["metadata"], source, "metadata")
    if "layout" in doc and doc["layout"] not in (None, "huggingface"):
        raise _fail(source, "layout", f"unknown layout {doc['layout']!r} (expected 'huggingface' or none)")
    if doc.get("plan") is not None:
        validate_plan(doc["plan"], source)
    if doc.get("tied") is not None:
        validate_tied(doc["tied"], source)
    return doc


def validate_tied(tied: object, source: str, field: str = "tied") -> None:
    """Check a record of tied tensors ``{alias: stored name}`` as data (see :mod:`secateur.io.tied`).

    Keys and values are non-empty tensor names (strings); an alias never names itself and never names
    another alias (the writer records the first name of each storage, so chains and cycles cannot be
    genuine). Whether the names are tensors of the file and of the model is checked later, on them.

    Raises:
        SerializationError: naming ``source`` and the field (``tied['lm_head.weight']``).
    """
    for alias, target in _check_mapping(tied, source, field).items():
        if not isinstance(alias, str) or not alias:
            raise _fail(source, field, f"an alias must be a tensor name, got {alias!r:.80}")
        where = f"{field}[{alias!r}]"
        if not isinstance(target, str) or not target:
            raise _fail(source, where, f"expected the name of a stored tensor, got {_json_type(target)}")
        if target == alias:
            raise _fail(source, where, "a tensor cannot be an alias of itself")
        if target in tied:
            raise _fail(
                source, where, f"names {target!r}, itself an alias (chains and cycles are not written)"
            )


def _check_indices(kept: object, source: str, field: str, size: int | None = None) -> None:
    """``kept`` is a non-empty list of ints, strictly increasing (unique and sorted), >= 0 and < ``size``."""
    if not isinstance(kept, list) or not kept:
        raise _fail(source, field, f"kept indices must be a non-empty list of ints, got {_json_type(kept)}")
    if not all(_is_int(i) for i in kept):
        bad = next(i for i in kept if not _is_int(i))
        raise _fail(source, field, f"kept indices must be ints, got {bad!r}")
    a = np.asarray(kept, dtype=object)
    if a.min() < 0:
        raise _fail(source, field, f"kept index {a.min()} is negative")
    if len(kept) > 1:
        arr = np.asarray(kept, dtype=np.int64) if a.max() < 2**62 else None
        if arr is None:
            raise _fail(source, field, f"kept index {a.max()} is out of range")
        d = np.diff(arr)
        if (d == 0).any():
            i = int(np.flatnonzero(d == 0)[0])
            raise _fail(source, field, f"kept index {arr[i]} is listed twice (indices must be unique)")
        if (d < 0).any():
            i = int(np.flatnonzero(d < 0)[0])
            raise _fail(
                source, field, f"kept indices must be sorted ascending; {arr[i]} comes before {arr[i + 1]}"
            )
    if size is not None and a.max() >= size:
        raise _fail(source, field, f"kept index {a.max()} is out of range for a dimension of size {size}")


def _check_changes(changes: object, source: str, field: str, allow_inconsistent: bool) -> None:
    """``{name: [old, new]}`` with plain names (no leading underscore) and JSON scalar/list values."""
    for key, pair in _check_mapping(changes, source, field).items():
        name = key
        if allow_inconsistent and key.startswith("_inconsistent_"):
            name = key[len("_inconsistent_") :]
        if not _NAME.match(name) or key in ATTN_KEYS:
            raise _fail(
                source, f"{field}[{key!r}]", "not a plain attribute name (letters, digits, '_', not leading)"
            )
        if not isinstance(pair, list) or len(pair) != 2:
            raise _fail(source, f"{field}[{key!r}]", f"expected an [old, new] pair, got {pair!r:.80}")


def validate_plan(plan: object, source: str) -> None:
    """Check a structural pruning plan (:func:`secateur.compact.make_plan`'s format) as data.

    ``tensors``: ``{name: {dim: kept}}`` with ``dim`` a non-negative integer string and ``kept`` unique,
    sorted, non-negative ints; ``attributes`` / ``config``: ``{path: {name: [old, new]}}`` with plain names;
    ``norms``: ``{path: {"dim", "size", "kept"}}`` with ``kept`` in range of ``size``; ``groups`` a list.
    Whether indices are in range of the model is checked later, on the model (:func:`check_plan_fits`).

    Raises:
        SerializationError: naming ``source`` and the field path (``plan.tensors['fc.weight']['0']``).
    """
    plan = _check_mapping(plan, source, "plan")
    tensors = _check_mapping(plan.get("tensors", {}), source, "plan.tensors")
    for name, dims in tensors.items():
        field = f"plan.tensors[{name!r}]"
        for dim, kept in _check_mapping(dims, source, field).items():
            if not (isinstance(dim, str) and dim.isdigit() and len(dim) < 4):
                raise _fail(source, f"{field}[{dim!r}]", "a dimension must be a non-negative integer")
            _check_indices(kept, source, f"{field}[{dim!r}]")
    for section in ("attributes", "config"):
        for path, changes in _check_mapping(plan.get(section, {}), source, f"plan.{section}").items():
            _check_changes(
                changes, source, f"plan.{section}[{path!r}]", allow_inconsistent=section == "config"
            )
    for path, spec in _check_mapping(plan.get("norms") or {}, source, "plan.norms").items():
        field = f"plan.norms[{path!r}]"
        spec = _check_mapping(spec, source, field)
        size, dim = spec.get("size"), spec.get("dim")
        if not _is_int(size) or size < 1 or not _is_int(dim):
            raise _fail(source, field, f"needs int 'dim' and 'size' >= 1, got dim={dim!r}, size={size!r}")
        _check_indices(spec.get("kept"), source, f"{field}['kept']", size)
    if not isinstance(plan.get("groups", []), list):
        raise _fail(source, "plan.groups", f"expected an array, got {_json_type(plan.get('groups'))}")


# ---------------------------------------------------------------------------------------- architecture
def validate_architecture(arch: object, source: str) -> None:
    """Check an architecture record (see :func:`secateur.io.serialization.architecture_of`) as data.

    Nothing is imported here. ``zoo``: ``record`` an object with a string ``name``; ``huggingface``: ``class``
    and ``config_class`` of the form ``"transformers.<module>:<Class>"`` (the class is later looked up among
    transformers' own classes; one outside transformers needs the caller's trust, as a factory does) and
    ``config`` an object; ``factory``: ``factory`` of the form
    ``"package.module:function"`` and ``kwargs`` an object with string keys.

    Raises:
        SerializationError: an unknown kind or a field of the wrong form, named.
    """
    arch = _check_mapping(arch, source, "architecture")
    kind = arch.get("kind")
    if kind == "zoo":
        record = _check_mapping(arch.get("record"), source, "architecture.record")
        if not isinstance(record.get("name"), str):
            raise _fail(
                source, "architecture.record.name", f"expected a model name, got {record.get('name')!r}"
            )
    elif kind == "huggingface":
        for key in ("class", "config_class"):
            v = arch.get(key)
            mod, _, name = v.partition(":") if isinstance(v, str) else ("", "", "")
            if not (_DOTTED.match(mod) and _NAME.match(name)):
                raise _fail(
                    source, f"architecture.{key}", f"expected 'transformers.<module>:<Class>', got {v!r:.120}"
                )
        _check_mapping(arch.get("config"), source, "architecture.config")
    elif kind == "factory":
        v = arch.get("factory")
        if not isinstance(v, str) or not is_factory_name(v):
            raise _fail(source, "architecture.factory", f"expected 'package.module:function', got {v!r:.120}")
        kwargs = _check_mapping(arch.get("kwargs", {}), source, "architecture.kwargs")
        bad = [k for k in kwargs if not _NAME.match(k)]
        if bad:
            raise _fail(source, "architecture.kwargs", f"keyword names must be identifiers, got {bad[:3]!r}")
    else:
        raise _fail(
            source, "architecture.kind", f"unknown kind {kind!r} (expected zoo, huggingface or factory)"
        )


def is_factory_name(name: str) -> bool:
    """Whether ``name`` has the form ``"package.module:function"`` (dotted after the colon too)."""
    mod, sep, attr = name.partition(":")
    return bool(sep) and bool(_DOTTED.match(mod)) and bool(_DOTTED.match(attr))


def clean_hf_config(config: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of a Hugging Face config dict without the keys that can name code (``auto_map``,
    ``trust_remote_code``, ``custom_pipelines``; nested sub-configs too), checking that no attention
    implementation names a Hub kernel repository.

    Raises:
        SerializationError: an ``attn_implementation`` value that is not a plain name (e.g. ``"org/kernel"``).
    """

    def clean(d: dict[str, Any], field: str) -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if k in IGNORED_CONFIG_KEYS:
                continue
            if k in ATTN_KEYS and v is not None and not (isinstance(v, str) and _NAME.match(v)):
                raise _fail(
                    source, f"{field}.{k}", f"{v!r:.80} is not a built-in attention implementation (code)"
                )
            out[k] = clean(v, f"{field}.{k}") if isinstance(v, dict) else v
        return out

    return clean(config, "architecture.config")


# ------------------------------------------------------------------------------------------------ sizes
def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` from the header of the safetensors file ``path``, without reading the data.

    The safetensors library checks that the header's offsets fit the file, so the shapes describe weights
    actually present. Raises:
        SerializationError: the file is not a readable safetensors file (truncated, corrupted).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(int(s) for s in f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SerializationError(f"{path}: cannot read safetensors ({e}); the file may be truncated") from e


def _ints(value: object, field: str, out: list[tuple[str, int]], depth: int = 0) -> None:
    if _is_int(value):
        out.append((field, value))
    elif isinstance(value, dict) and depth < MAX_JSON_DEPTH:
        for k, v in value.items():
            _ints(v, f"{field}.{k}", out, depth + 1)
    elif isinstance(value, list) and depth < MAX_JSON_DEPTH:
        for i, v in enumerate(value):
            _ints(v, f"{field}[{i}]", out, depth + 1)


def check_architecture_sizes(
    arch: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Refuse architecture sizes the weights present cannot back, before anything is built.

    Every integer in the record (zoo record, Hugging Face config, factory kwargs) must be at most
    ``max(number of weight elements in the folder, 2**24)``, and a layer count (``num_hidden_layers`` and
    the like) at most the number of tensors: a ``num_classes=10**12`` would otherwise reach the allocator.

    Raises:
        SerializationError: naming ``source``, the field (``architecture.record.num_classes``), its value and
            the bound.
    """
    numel = sum(math.prod(s) for s in shapes.values())
    bound = max(numel, MIN_SIZE_BOUND)
    body = {"zoo": "record", "huggingface": "config", "factory": "kwargs"}.get(arch.get("kind"), "")
    found: list[tuple[str, int]] = []
    _ints(arch.get(body, {}), f"architecture.{body}", found)
    for field, v in found:
        if v > bound:
            raise _fail(
                source,
                field,
                f"{v} exceeds every size the weights can back (the folder holds {numel} weight elements); "
                "refusing to build it",
            )
        if field.rpartition(".")[2] in LAYER_COUNT_KEYS and v > len(shapes):
            raise _fail(source, field, f"{v} layers but the folder holds only {len(shapes)} tensors")


def check_plan_fits(model: nn.Module, plan: Mapping[str, Any] | None, source: str) -> None:
    """Check the plan's kept indices against ``model`` (the rebuilt original, on the meta device).

    Every tensor the plan names exists, every listed dim exists, every kept index is below that dim's size,
    and every norm path names a module. Raises:
        SerializationError: naming ``source`` and the field (``plan.tensors['conv1.weight']['0']``).
    """
    if not plan:
        return

    def misfit(field: str, why: str) -> SerializationError:
        return SerializationError(f"{source}: the plan does not fit the model: {field}: {why}")

    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    for name, dims in plan.get("tensors", {}).items():
        field = f"plan.tensors[{name!r}]"
        t = named.get(name)
        if t is None:
            raise misfit(field, f"the model has no tensor {name!r}")
        for dim, kept in dims.items():
            d = int(dim)
            if d >= t.dim():
                raise misfit(f"{field}[{dim!r}]", f"dimension {d} of a {t.dim()}-dim tensor")
            try:
                _check_indices(kept, source, f"{field}[{dim!r}]", t.shape[d])
            except SerializationError as e:
                raise misfit(f"{field}[{dim!r}]", str(e).rpartition(": ")[2]) from None
    modules = dict(model.named_modules())
    for section in ("norms", "attributes"):
        for path in plan.get(section) or {}:
            if path not in modules:
                raise misfit(f"plan.{section}[{path!r}]", "no such module")


def compare_shapes(
    model: nn.Module, shapes: Mapping[str, tuple[int, ...]], source: str, *, allow_missing: bool = False
) -> None:
    """Check that the weights files' tensors (``shapes``, from their headers) are the model's, shape by shape.

    Args:
        model: the rebuilt architecture, compacted by the plan (on the meta device).
        shapes: ``{name: shape}`` of the tensors present.
        allow_missing: a model tensor may be absent (Hugging Face writes tied weights once); the loader
            checks later that an absent one is a tied alias.

    Raises:
        SerializationError: a tensor of the folder the model lacks, one of another shape, or (without
            ``allow_missing``) a model tensor the folder lacks; the first few are named.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise SerializationError(f"{source}: weights do not fit the rebuilt model: it lacks {extra[:5]}")
    wrong = [
        f"{k}: {shapes[k]} in the file, {expected[k]} in the model"
        for k in sorted(shapes)
        if shapes[k] != expected[k]
    ]
    if wrong:
        raise SerializationError(f"{source}: weights do not fit the rebuilt model: {'; '.join(wrong[:5])}")
    missing = sorted(set(expected) - set(shapes))
    if missing and not allow_missing:
        raise SerializationError(
            f"{source}: weights do not fit the rebuilt model: tensors missing for {missing[:5]}"
        )


def read_plan_file(
    directory: Path, name: str = "plan.json", *, fmt: str = "secateur", version: int = 1
) -> dict:
    """Read and validate ``directory/name`` (confined, regular file, depth-checked JSON, see the module doc).

    Raises:
        UnsafePathError / SerializationError: as :func:`folder_file`, :func:`read_json` and
            :func:`validate_document`; a missing file is a SerializationError naming it.
    """
    path = folder_file(directory, name, "the folder")
    if not path.exists():
        raise SerializationError(f"{path}: missing (not a folder written by secateur.save)")
    return validate_document(read_json(path, "plan"), str(path), fmt=fmt, version=version)

"""One-shot pruning of a Hugging Face checkpoint that is never loaded whole: blocks stream from disk.

:func:`prune_checkpoint` runs the same layer-by-layer procedure as
:func:`secateur.llm.oneshot.prune_oneshot` (SparseGPT, Frantar & Alistarh 2023, section 3; Wanda,
Sun et al. 2023, section 3), but on a checkpoint directory (``config.json`` + ``model.safetensors``,
or shards listed in ``model.safetensors.index.json``) instead of a model in memory:

1. the model is built from ``config.json`` with every parameter on the ``meta`` device (no
   storage; buffers computed at construction, such as rotary frequencies, stay real);
2. the calibration batches run through the model with every block's ``forward`` replaced by a
   recorder (:func:`secateur.llm.oneshot.calibration_stack_inputs`): the first block's inputs are kept,
   and so are the arguments the model hands *each* block (Gemma 2/3 give sliding-window blocks another
   attention mask and other rotary embeddings than full-attention blocks); no block computes. The
   tensors of the modules called on the way (the embeddings, read from the safetensors files when a
   module is first called) then go back to ``meta``; the final norm and an untied head are never read;
3. for each block in turn: its tensors are read (single tensors at their offsets in the file),
   its Linears are pruned by :func:`secateur.llm.oneshot.prune_block` (statistics on the current
   hidden states with the block's own call arguments, then the *pruned* block's outputs become the
   next hidden states, as in the in-memory driver and the papers), the pruned weights are written into
   the output files, and the block goes back to ``meta``.

So at any moment the parameters held are the embeddings (during step 2 only) or one block's
(step 3), plus the calibration activations entering one block; ``peak_materialised_bytes``
in the report records the largest set held.

Output: a directory with the same files as the input (``config.json``, tokenizer files, the same
shards and index), whose safetensors files are byte for byte the input's except the pruned weights,
which hold exact zeros (and SparseGPT's updated survivors). Each input weight file is copied, then
each pruned tensor is overwritten in place at its offset (the safetensors layout: an 8-byte
little-endian header length, a JSON header giving each tensor's dtype, shape and byte range, then
the raw bytes), so writing never needs more memory than one tensor. Everything is written into a
temporary sibling directory that is renamed to ``out_dir`` only when all blocks succeeded: a failure
leaves no ``out_dir`` and the input is only ever read.

Why a separate function rather than an ``offload_dir=`` option of ``prune_oneshot``: the input and
the output are files, not a model object. ``prune_oneshot`` mutates a model in place (reversible
masks, transactional on the model); here there is no model to hand back (it does not fit in memory)
and the natural result is a new checkpoint, written atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from secateur._files import honour_umask
from secateur._optional import require
from secateur.compact import interrupts_deferred
from secateur.errors import ConfigError
from secateur.llm.oneshot import (
    BlockArgs,
    OneShotReport,
    calibration_stack_inputs,
    check_oneshot_args,
    find_blocks,
    prune_block,
    select_linears,
    with_block_args,
)
from secateur.masks.patterns import Pattern, parse_pattern

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Other weight formats would carry the dense weights next to the pruned ones: never copied.
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


@dataclass
class CheckpointReport(OneShotReport):
    """Summary of :func:`prune_checkpoint`: the fields of :class:`OneShotReport` and the streaming.

    ``peak_materialised_bytes``: the most bytes of checkpoint tensors (parameters and persistent
    buffers, each storage once) held in memory at any moment, sampled after every load.
    ``non_block_bytes``: bytes of the tensors outside the blocks that the calibration pass up to the
    first block read (the embeddings; not the final norm nor an untied head, which run after the
    last block), held during that pass only. ``block_bytes[i]``: bytes of block ``i``'s tensors (from the
    checkpoint headers). ``written_tensors``: checkpoint keys overwritten with pruned weights;
    ``copied_files`` / ``skipped_files``: file names copied to ``out_dir`` / left out (weights in
    other formats or safetensors files outside the index, sub-directories).
    """

    out_dir: str = ""
    peak_materialised_bytes: int = 0
    non_block_bytes: int = 0
    block_bytes: list[int] = field(default_factory=list)
    written_tensors: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)


def read_safetensors_header(path: str | os.PathLike) -> tuple[int, dict]:
    """``(header_length, header)`` of a safetensors file: header length in bytes and the parsed JSON.

    The header maps each tensor name to ``{"dtype": "F32"|..., "shape": [...], "data_offsets":
    [begin, end]}`` (byte offsets relative to the end of the header) and may hold
    ``"__metadata__"``. Source: the safetensors format (8-byte little-endian unsigned length, then
    that many bytes of UTF-8 JSON, then the data).

    Raises:
        ConfigError: the file is too short or its header is not valid JSON (naming the file).
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConfigError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if n > size - 8:
            raise ConfigError(f"{path}: not a safetensors file (header length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: safetensors header is not a JSON object")
    return n, header


class _Checkpoint:
    """The safetensors files of a checkpoint directory: which file holds each key, and its header entry."""

    def __init__(self, root: Path) -> None:
        self.root = root
        index = root / INDEX_FILE
        single = root / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from None
            files = sorted(set(weight_map.values()))
            self.index_file: str | None = INDEX_FILE
        elif single.is_file():
            weight_map, files, self.index_file = None, [SINGLE_FILE], None
        else:
            raise ConfigError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints)")
        self.files = files
        self.header_len: dict[str, int] = {}
        self.where: dict[str, tuple[str, dict]] = {}
        for fname in files:
            if os.sep in fname or fname.startswith("."):
                raise ConfigError(f"{index}: weight file {fname!r} is not a plain file name")
            if not (root / fname).is_file():
                raise ConfigError(f"{root}: weight file {fname} listed in {INDEX_FILE} is missing")
            n, header = read_safetensors_header(root / fname)
            self.header_len[fname] = n
            for key, entry in header.items():
                if key != "__metadata__":
                    self.where[key] = (fname, entry)
        if weight_map is not None:
            for key, fname in weight_map.items():
                if self.where.get(key, (None,))[0] != fname:
                    raise ConfigError(f"{index}: {key} is listed in {fname} but that file does not hold it")

    def nbytes(self, key: str) -> int:
        begin, end = self.where[key][1]["data_offsets"]
        return end - begin

    def check(self, key: str, like: torch.Tensor) -> None:
        """Raise ConfigError unless ``key`` is in the checkpoint with the shape of ``like``."""
        if key not in self.where:
            raise ConfigError(f"{self.root}: tensor {key} of the model built from config.json is missing")
        fname, entry = self.where[key]
        if entry.get("dtype") not in _DTYPES:
            raise ConfigError(f"{self.root / fname}: {key} has dtype {entry.get('dtype')}, not supported")
        if list(entry["shape"]) != list(like.shape):
            raise ConfigError(
                f"{self.root / fname}: {key} has shape {tuple(entry['shape'])}, the model built from "
                f"config.json expects {tuple(like.shape)}"
            )

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read ``keys`` into fresh CPU tensors in their stored dtype (each file opened once).

        Plain reads at the offsets of the header into newly allocated memory, not
        ``safetensors.safe_open`` (whose tensors are copy-on-write maps of the input file: resident
        only where touched, and tied to the input file), so that what is counted as held really is.

        Raises:
            ConfigError: a dtype this reader does not know, or a file shorter than its header says.
        """
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k][0], []).append(k)
        out = {}
        for fname, ks in by_file.items():
            with open(self.root / fname, "rb") as f:
                for k in ks:
                    out[k] = self._read_one(f, fname, k)
        return out

    def _read_one(self, f, fname: str, key: str) -> torch.Tensor:
        entry = self.where[key][1]
        where = f"{self.root / fname}: {key}"
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ConfigError(f"{where} has dtype {entry['dtype']}, which this reader does not support")
        begin, end = entry["data_offsets"]
        t = torch.empty(entry["shape"], dtype=dtype)
        raw = t.reshape(-1).view(torch.uint8).numpy()
        if raw.nbytes != end - begin:
            raise ConfigError(f"{where} spans {end - begin} bytes, its dtype and shape need {raw.nbytes}")
        f.seek(8 + self.header_len[fname] + begin)
        if raw.nbytes and f.readinto(memoryview(raw)) != raw.nbytes:
            raise ConfigError(f"{where}: the file ends inside this tensor")
        return t


class _Writer:
    """Overwrites tensors in place inside copied safetensors files (same dtype, shape and offsets)."""

    def __init__(self, out: Path, ckpt: _Checkpoint) -> None:
        self.out, self.ckpt = out, ckpt
        self.handles: dict[str, object] = {}

    def write(self, key: str, tensor: torch.Tensor) -> None:
        fname, entry = self.ckpt.where[key]
        name = _DTYPE_NAMES.get(tensor.dtype)
        if name != entry["dtype"] or list(tensor.shape) != list(entry["shape"]):
            raise ConfigError(
                f"{self.ckpt.root / fname}: {key} is {entry['dtype']} {tuple(entry['shape'])} on disk, "
                f"the pruned tensor is {tensor.dtype} {tuple(tensor.shape)}"
            )
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        begin, end = entry["data_offsets"]
        if raw.nbytes != end - begin:
            raise ConfigError(f"{self.ckpt.root / fname}: {key} spans {end - begin} bytes, got {raw.nbytes}")
        f = self.handles.get(fname)
        if f is None:
            f = self.handles[fname] = open(self.out / fname, "r+b")  # closed in close()
        f.seek(8 + self.ckpt.header_len[fname] + begin)
        f.write(memoryview(raw))

    def close(self, sync: bool) -> None:
        for f in self.handles.values():
            if sync:
                f.flush()
                os.fsync(f.fileno())
            f.close()
        self.handles.clear()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While active, every parameter registered on any ``nn.Module`` is moved to the ``meta`` device.

    Building a model inside it allocates no parameter storage (a Linear's ``torch.empty`` is dropped
    as soon as it is registered, before its initialisation runs on ``meta``), while buffers computed
    at construction (rotary frequencies, position ids) keep their real values. The same idea as
    ``accelerate.init_empty_weights(include_buffers=False)``. Not thread-safe: it patches
    ``nn.Module.register_parameter`` for the duration.
    """
    real = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        real(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = real  # type: ignore[method-assign]


def _tensor_groups(model: nn.Module, skip_prefix: str) -> list[tuple[list[str], torch.Tensor]]:
    """State-dict entries outside ``skip_prefix``, tied aliases grouped: ``[(names, tensor)]``."""
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(skip_prefix):
            continue
        groups.setdefault(id(t), ([], t))[0].append(name)
    return list(groups.values())


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor | nn.Parameter) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, False)
    else:
        mod._buffers[attr] = value.data if isinstance(value, nn.Parameter) else value


def _has_meta(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.device.type == "meta"
    if isinstance(obj, (tuple, list)):
        return any(_has_meta(o) for o in obj)
    if isinstance(obj, Mapping):
        return any(_has_meta(o) for o in obj.values())
    return False


def _capture_streamed(
    model: nn.Module,
    block_list: nn.ModuleList,
    batches: list,
    dev: torch.device | None,
    ckpt: _Checkpoint,
    outside: list[tuple[list[str], str, torch.Tensor]],
) -> tuple[list, list, int, BlockArgs | None, set[int]]:
    """First-block inputs and every block's own call arguments, loading only the tensors of the modules
    called before the first block (:func:`~secateur.llm.oneshot.calibration_stack_inputs`: no block runs).

    Each module outside the blocks that owns tensors gets a forward pre-hook that reads them (and
    their tied aliases) on its first call, so the final norm and an untied head, which run after the
    last block, are never read. If the captured inputs or call arguments still hold a ``meta`` tensor
    or the pass fails (a model reading a weight without calling its module), every tensor outside the
    blocks is loaded and the pass runs again. Returns ``(inputs, masks, n_tokens, block_args, loaded
    group indices)``; ``block_args`` is None when every block is called with the first block's arguments.
    """
    loaded: set[int] = set()

    def load(groups: Iterable[int]) -> None:
        todo = [g for g in groups if g not in loaded]
        tensors = ckpt.read(outside[g][1] for g in todo)
        for g in todo:
            names, key, meta = outside[g]
            value = tensors.pop(key)
            value = nn.Parameter(value, requires_grad=False) if isinstance(meta, nn.Parameter) else value
            for n in names:
                _set_tensor(model, n, value)
            loaded.add(g)

    owners: dict[str, list[int]] = {}
    for g, (names, _, _) in enumerate(outside):
        for n in names:
            owners.setdefault(n.rpartition(".")[0], []).append(g)
    handles = [
        model.get_submodule(mod).register_forward_pre_hook(lambda *_a, _g=tuple(gs): load(_g))
        for mod, gs in owners.items()
    ]
    try:
        inputs, masks, n_tokens, block_args = calibration_stack_inputs(model, block_list, batches, dev)
        lazy_ok = not _has_meta(inputs) and not _has_meta(block_args or [])
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        lazy_ok = False
    finally:
        for h in handles:
            h.remove()
    if not lazy_ok:
        load(range(len(outside)))
        inputs, masks, n_tokens, block_args = calibration_stack_inputs(model, block_list, batches, dev)
    return inputs, masks, n_tokens, block_args, loaded


def _release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Pruning a block allocates and frees tensors of many sizes (weights, scores, sort indices, masks,
    activations). glibc serves those of a few MB from its heap once its dynamic mmap threshold has
    risen, and keeps them there after they are freed, fragmented: without this, pruning a 16-block
    GPT-2 shape (48 MiB per block) grew the process by about 70 MiB per block (1.2 GB at the end)
    while the live tensors stayed at one block; with it the resident memory is flat across blocks.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            import ctypes
            import ctypes.util

            try:
                _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def materialised_bytes(model: nn.Module) -> int:
    """Bytes of the model's state-dict tensors that are not on ``meta``, each storage counted once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        if t.device.type == "meta":
            continue
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _resolve_class(root: Path, config, model_class: type[nn.Module] | None) -> type[nn.Module]:
    if model_class is not None:
        return model_class
    transformers = require("transformers", "streamed pruning of a Hugging Face checkpoint")

    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return cls
    raise ConfigError(
        f"{root / 'config.json'}: 'architectures' ({archs}) names no transformers class; pass model_class="
    )


def _check_dirs(src: Path, out: Path) -> None:
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src}: not a Hugging Face checkpoint directory (no config.json)")
    if out.exists() or out.is_symlink():
        raise ConfigError(f"{out} already exists; choose a new output directory")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent} (parent of the output directory) does not exist")
    s, o = src.resolve(), out.parent.resolve() / out.name
    if o == s or s in o.parents or o in s.parents:
        raise ConfigError(f"output {out} must be outside the checkpoint {src} (and not contain it)")


def _copy_files(src: Path, dst: Path, weight_files: list[str], index_file: str | None) -> tuple[list, list]:
    """Copy the checkpoint's top-level files (contents, symlinks followed); return (copied, skipped)."""
    keep = set(weight_files) | ({index_file} if index_file else set())
    copied, skipped = [], []
    for f in sorted(src.iterdir()):
        if f.is_dir():
            skipped.append(f.name + "/")
        elif f.name in keep or not f.name.endswith(_OTHER_WEIGHT_SUFFIXES):
            shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
        else:
            skipped.append(f.name)
    return copied, skipped


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries to disk (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every regular file directly inside ``root``, then ``root`` itself, to disk."""
    for f in root.iterdir():
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


@torch.no_grad()
def prune_checkpoint(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    data: Iterable[Mapping[str, torch.Tensor]],
    method: str = "wanda",
    sparsity: float | None = 0.5,
    pattern: str | tuple[int, int] | Pattern = "row",
    *,
    blocks: str | None = None,
    include: str | Callable[[str, nn.Module], bool] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    device: torch.device | str | None = None,
    track_error: bool = False,
    model_class: type[nn.Module] | None = None,
    fsync: bool = True,
) -> CheckpointReport:
    """Prune a safetensors checkpoint block by block, streaming blocks from disk, into a new checkpoint.

    The result equals loading the model, calling :func:`~secateur.llm.oneshot.prune_oneshot` with
    the same arguments and ``as_masks=False`` (zeros written into the weights), then saving it — but
    at most the tensors outside the blocks, or one block, are in memory at a time, plus the
    calibration activations entering one block (see the module docstring).

    Args:
        checkpoint_dir: a Hugging Face checkpoint directory: ``config.json`` and ``model.safetensors``
            or ``model.safetensors.index.json`` with its shards. Only read, never written.
        out_dir: the new checkpoint directory; must not exist, its parent must. Gets every
            top-level file of ``checkpoint_dir`` (weights in other formats and sub-directories are
            left out and listed in ``skipped_files``), with the same shards and index.
        data: the calibration batches, each the keyword arguments of ``model(**batch)`` (e.g. from
            :func:`~secateur.llm.calibration.tokenized_batches`); ``attention_mask`` marks real tokens.
        method, sparsity, pattern, blocks, include, block_size, damp, track_error: as
            :func:`~secateur.llm.oneshot.prune_oneshot` (``include`` sees the full module names).
        device: run each block there (e.g. ``"cuda"``); tensors are read on the CPU.
        model_class: the ``nn.Module`` class to build from the config (default: the first
            ``transformers`` class named in ``config.json``'s ``architectures``).
        fsync: flush every output file and the folder to disk before the final rename, and the parent
            folder after it (so a crash or power loss never leaves ``out_dir`` half-written).

    Returns:
        :class:`CheckpointReport`: per-layer sparsity, calibration memory, and the streaming
        accounting (``peak_materialised_bytes`` in bytes, the files written).

    Raises:
        ConfigError: not a safetensors checkpoint, ``out_dir`` exists or lies inside the input, a
            tensor the config's model needs is missing from the checkpoint or has another shape
            (naming the file and tensor), and every error of ``prune_oneshot``'s validation
            (method, sparsity, pattern, N:M divisibility naming the layer, empty batches). These
            checks run before anything is written. Any failure later (e.g. a Hessian that stays
            indefinite) removes the partial output: ``out_dir`` is created only on success.

    Interrupts: a ``KeyboardInterrupt`` or ``SystemExit`` at any point also removes the partial output
    (a hidden sibling ``.<out_dir name>.partial-*``) and is re-raised; only a hard kill can leave that
    hidden folder behind, never a folder named ``out_dir``. The input is opened for reading only.
    """
    transformers = require("transformers", "streamed pruning of a Hugging Face checkpoint")

    t0 = time.perf_counter()
    src, out = Path(checkpoint_dir), Path(out_dir)
    _check_dirs(src, out)
    ckpt = _Checkpoint(src)
    config = transformers.AutoConfig.from_pretrained(src)
    cls = _resolve_class(src, config, model_class)
    p = parse_pattern(pattern)
    with parameters_on_meta():
        model = cls(config)
    model.eval()
    block_path, block_list = find_blocks(model, blocks)
    per_block = [select_linears(b, f"{block_path}.{i}", include) for i, b in enumerate(block_list)]
    if not any(per_block):
        raise ConfigError(f"no Linear selected inside {block_path} (include={include!r})")
    sp = check_oneshot_args([x for lin in per_block for x in lin], method, p, sparsity)
    batches = list(data)
    if not batches:
        raise ConfigError("no calibration batches given")
    dev = torch.device(device) if device is not None else None

    # Every tensor the model needs must be in the checkpoint with its shape, before anything is written.
    prefix = block_path + "."
    block_keys = [
        {f"{prefix}{i}.{k}": t for k, t in b.state_dict().items()} for i, b in enumerate(block_list)
    ]
    for keys in block_keys:
        for k, t in keys.items():
            ckpt.check(k, t)
    outside = []
    for names, t in _tensor_groups(model, prefix):
        stored = [n for n in names if n in ckpt.where]
        if not stored:
            raise ConfigError(f"{src}: tensor {names[0]} of the model built from config.json is missing")
        ckpt.check(stored[0], t)
        outside.append((names, stored[0], t))

    report = CheckpointReport(method=method, pattern=str(p), sparsity=sp, n_tokens=0, out_dir=str(out))
    report.block_bytes = [sum(ckpt.nbytes(k) for k in keys) for keys in block_keys]
    last = max(i for i, lin in enumerate(per_block) if lin)

    if sys.byteorder != "little":
        raise ConfigError("safetensors data is little-endian; big-endian machines are not supported")
    tmp: Path | None = None
    writer: _Writer | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        writer = _Writer(tmp, ckpt)
        report.copied_files, report.skipped_files = _copy_files(src, tmp, ckpt.files, ckpt.index_file)

        # The layers before the first block (embeddings) need their weights for the calibration pass.
        inputs, masks, report.n_tokens, block_args, loaded = _capture_streamed(
            model, block_list, batches, dev, ckpt, outside
        )
        report.non_block_bytes = sum(ckpt.nbytes(outside[g][1]) for g in loaded)
        report.peak_materialised_bytes = materialised_bytes(model)
        for names, _, t in outside:
            for n in names:
                _set_tensor(model, n, t)  # back to the meta tensors of the skeleton

        for bi in range(last + 1):
            block = block_list[bi]
            tensors = ckpt.read(block_keys[bi])
            block.load_state_dict({k[len(f"{prefix}{bi}.") :]: v for k, v in tensors.items()}, assign=True)
            del tensors
            report.peak_materialised_bytes = max(report.peak_materialised_bytes, materialised_bytes(model))
            inputs = prune_block(
                block,
                per_block[bi],
                with_block_args(inputs, block_args, bi),
                masks,
                method,
                sp,
                p,
                report,
                block_size=block_size,
                damp=damp,
                device=dev,
                track_error=track_error,
                as_masks=False,
                feed_next=bi < last,
            )
            for name, mod in per_block[bi]:
                writer.write(f"{name}.weight", mod.weight)
                report.written_tensors.append(f"{name}.weight")
            block.to("meta")
            _release_free_memory()
        writer.close(sync=fsync)
        if fsync:  # every file durable before the rename makes the folder visible under its name
            _fsync_tree(tmp)
        if out.exists():
            raise ConfigError(f"{out} was created while pruning; the result is not moved there")
        honour_umask(tmp)  # mkdtemp made it 0700; published under the user's umask like any mkdir
        os.rename(tmp, out)
    except BaseException:  # an error or an interrupt: no output folder, the partial one removed
        with interrupts_deferred():
            if writer is not None:
                writer.close(sync=False)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        _fsync_dir(out.parent)  # the rename itself durable
    report.seconds = time.perf_counter() - t0
    return report


__all__ = [
    "CheckpointReport",
    "materialised_bytes",
    "parameters_on_meta",
    "prune_checkpoint",
    "read_safetensors_header",
]

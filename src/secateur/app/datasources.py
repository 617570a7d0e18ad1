"""Data for the command line's ``--data``: images with labels or text for any model.

``--data`` forms:

* ``fashion-mnist``: the Debian package's IDX files (:func:`secateur.data.fashion_mnist_loaders`); the
  default for models that take one 28x28 channel (the zoo CNNs).
* a folder of images in class sub-folders (``DIR/<class>/*.png``; optionally ``DIR/train/<class>`` and
  ``DIR/test/<class>`` or ``DIR/val/<class>``): decoded with Pillow, converted to the model's channels
  (``L`` or ``RGB``), resized (bilinear) to the model's input height and width, scaled to [0, 1] and
  normalised per channel by the model's image processor (``preprocessor_config.json``'s ``image_mean`` /
  ``image_std``) or, without one, by the training split's own mean and standard deviation. Classes are
  the sorted sub-folder names (index = position), as torchvision's ``ImageFolder``. Without ``train/`` and
  ``test/`` every fifth image of each class (sorted by name) is held out.
* a text file, or a folder of ``.txt`` files: paragraphs (blank-line separated) in file order; the last
  quarter of them is held out, the rest calibrates; never mixed.
* ``fortunes``: Debian's ``/usr/share/games/fortunes`` (:func:`secateur.data.text.load_fortunes`: a
  seeded split into calibration and held-out fortunes, disjoint).
* ``datasets:BUILDER:PATH`` (``BUILDER`` one of csv, json, parquet, text): a local file read by Hugging Face
  ``datasets`` (optional; its ``text`` column, or its only string column); split as a text file.
* ``none``: no data (counts only).

Text is tokenised with the model's tokenizer (the model folder must hold one) into fixed-length blocks:
the token ids of all paragraphs joined, cut into blocks of ``seq_len`` tokens including the tokenizer's
special tokens (``[CLS] ... [SEP]`` for BERT, ``<bos> ...`` for decoders). Batches are
``{"input_ids", "attention_mask"}`` of ``(B, seq_len)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secateur.errors import ConfigError, DataError

__all__ = [
    "DATASETS_BUILDERS",
    "IMAGE_SUFFIXES",
    "BlockLoader",
    "TaskData",
    "image_folder_tensors",
    "load_task_data",
    "load_tokenizer",
    "text_paragraphs",
    "token_blocks",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DATASETS_BUILDERS = ("csv", "json", "parquet", "text")
#: Blocks per text batch, and the default numbers of held-out blocks (evaluation).
TEXT_BATCH = 8
DEFAULT_HELDOUT_BLOCKS = 32
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")


@dataclass
class TaskData:
    """The data of one run.

    ``kind``: ``"images"`` (``(x, y)`` batches, ``y`` class indices), ``"text"`` (``{"input_ids",
    "attention_mask"}`` batches) or ``"none"``. ``train``: the calibration / fine-tuning loader (shuffled
    for images); ``test``: the held-out loader. ``description``: one line for the output (both splits).
    ``heldout``: the held-out split alone, for outputs that only evaluate (``secateur report``, ``eval``).
    ``normalize``: the per-channel ``(mean, std)`` applied to images (recorded with a saved model).
    ``form``: the ``--data`` value that gives this data again (a file or folder as an absolute path).
    """

    kind: str
    description: str
    form: str = "none"
    train: Any = None
    test: Any = None
    classes: list[str] = field(default_factory=list)
    normalize: dict[str, list[float]] | None = None
    heldout: str = ""

    @property
    def evaluated_on(self) -> str:
        """What a metric measured on ``test`` was measured on: :attr:`heldout`, else :attr:`description`."""
        return self.heldout or self.description


class BlockLoader:
    """Batches of fixed-length token blocks: ``{"input_ids": (B, L) int64, "attention_mask": ones}``.

    ``ids``: ``(n, L)`` int64 blocks; ``batch_size`` blocks per batch (the last batch may be smaller).
    Same order on every iteration; ``len()`` is the number of batches.
    """

    def __init__(self, ids: Any, batch_size: int = TEXT_BATCH) -> None:
        if ids.dim() != 2 or ids.shape[0] == 0:
            raise DataError(f"no text blocks (got ids of shape {tuple(ids.shape)})")
        self.ids = ids
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(self.ids.shape[0] / self.batch_size)

    @property
    def num_examples(self) -> int:
        """Number of blocks."""
        return int(self.ids.shape[0])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch

        for i in range(0, self.ids.shape[0], self.batch_size):
            ids = self.ids[i : i + self.batch_size]
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ---------------------------------------------------------------------------------------------- text
def load_tokenizer(folder: str | Path) -> Any:
    """The Hugging Face tokenizer saved in ``folder`` (``AutoTokenizer``, offline), or None if the folder
    holds no tokenizer file (:data:`_TOKENIZER_FILES`).

    Raises:
        ImportError: transformers is not installed (the ``hf`` extra).
        DataError: the tokenizer files are there but cannot be read (the folder is named).
    """
    folder = Path(folder)
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        import transformers
    except ImportError as e:
        raise ImportError("tokenising text needs transformers: pip install 'secateur[hf]'") from e
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}: tokenizer files cannot be read: {e}") from e


def _paragraphs(text: str) -> list[str]:
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    paras = [p for p in paras if p]
    if len(paras) < 2:  # one paragraph: use lines
        paras = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return paras


def text_paragraphs(path: str | Path) -> list[str]:
    """Paragraphs of a UTF-8 text file, or of every ``*.txt`` file under a folder (sorted paths).

    Raises:
        DataError: a missing path, a folder without ``.txt`` files, a file that is not UTF-8 (named), or
            no text at all.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise DataError(f"{p}: a folder without .txt files (text data) or class sub-folders (images)")
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"{p}: no such file or folder")
    out: list[str] = []
    for f in files:
        try:
            out += _paragraphs(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not UTF-8 text ({e})") from e
    if not out:
        raise DataError(f"{p}: no text")
    return out


def _split_paragraphs(paras: Sequence[str], source: str) -> tuple[list[str], list[str]]:
    """The first three quarters calibrate, the last quarter is held out (at least one each)."""
    if len(paras) < 2:
        raise DataError(f"{source}: one paragraph only; calibration and held-out text need two at least")
    n_held = max(1, len(paras) // 4)
    return list(paras[:-n_held]), list(paras[-n_held:])


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a text (``[CLS]`` / ``[SEP]`` for BERT, ``<bos>`` for a
    decoder), read from how it encodes one word with and without special tokens."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain) :])
    return [], []


def token_blocks(texts: Sequence[str], tokenizer: Any, seq_len: int, max_blocks: int | None) -> Any:
    """``(n, seq_len)`` int64 token blocks of ``texts`` (joined with the tokenizer's separator token), each
    wrapped in the tokenizer's special tokens (:func:`special_tokens`); at most ``max_blocks``. Texts are
    tokenised one by one until enough tokens are collected.

    Raises:
        ConfigError: ``seq_len`` too short for the special tokens. DataError: not one full block of text.
    """
    import torch

    prefix, suffix = special_tokens(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise ConfigError(
            f"--seq-len {seq_len} leaves no room for text beside {len(prefix) + len(suffix)} special tokens"
        )
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    need = None if max_blocks is None else max_blocks * body
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]
        if sep is not None:
            ids.append(sep)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // body if max_blocks is None else min(max_blocks, len(ids) // body)
    if n < 1:
        raise DataError(f"not enough text for one block of {seq_len} tokens ({len(ids)} tokens)")
    blocks = [prefix + ids[i * body : (i + 1) * body] + suffix for i in range(n)]
    return torch.tensor(blocks, dtype=torch.long)


def _datasets_texts(spec: str) -> tuple[list[str], str]:
    _, _, rest = spec.partition(":")
    builder, sep, path = rest.partition(":")
    if not sep or builder not in DATASETS_BUILDERS:
        raise ConfigError(
            f"--data {spec!r}: expected datasets:BUILDER:PATH with BUILDER one of {list(DATASETS_BUILDERS)}"
        )
    if not Path(path).exists():
        raise DataError(f"--data {spec!r}: {path} does not exist")
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "--data datasets:... needs Hugging Face datasets: pip install 'secateur[data]'", name="datasets"
        ) from e
    ds = datasets.load_dataset(builder, data_files=path, split="train")
    columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    column = "text" if "text" in ds.column_names else (columns[0] if len(columns) == 1 else None)
    if column is None:
        raise DataError(f"{path}: no 'text' column and not exactly one string column ({ds.column_names})")
    return [str(t) for t in ds[column] if str(t).strip()], f"{path} ({builder}, column {column!r})"


def _text_data(
    data: str, tokenizer: Any, seq_len: int, calib_blocks: int, subset: int | None, seed: int
) -> TaskData:
    if tokenizer is None:
        raise ConfigError(
            f"--data {data!r} is text: the model folder needs its tokenizer (tokenizer.json or "
            "tokenizer_config.json beside config.json) to tokenise it"
        )
    if data == "fortunes":
        from secateur.data.text import load_fortunes

        split = load_fortunes(seed=seed)
        calib, held, source = split.calibration, split.heldout, "Debian fortunes (seeded split)"
    else:
        if data.startswith("datasets:"):
            paras, source = _datasets_texts(data)
        else:
            paras, source = text_paragraphs(data), data
        calib, held = _split_paragraphs(paras, source)
    n_cal = subset or calib_blocks
    n_held = subset or DEFAULT_HELDOUT_BLOCKS
    train = BlockLoader(token_blocks(calib, tokenizer, seq_len, n_cal))
    test = BlockLoader(token_blocks(held, tokenizer, seq_len, n_held))
    desc = (
        f"{source}: {train.num_examples} calibration and {test.num_examples} held-out blocks of "
        f"{seq_len} tokens (disjoint text)"
    )
    held_desc = f"{source}: {test.num_examples} held-out blocks of {seq_len} tokens"
    form = data if data == "fortunes" or data.startswith("datasets:") else str(Path(data).absolute())
    return TaskData("text", desc, form, train, test, heldout=held_desc)


# -------------------------------------------------------------------------------------------- images
def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


def is_image_folder(path: Path) -> bool:
    """True when ``path`` is a folder whose sub-folders hold image files (class folders, or train/test)."""
    if not path.is_dir():
        return False
    return any(_image_files(d) for d in _class_dirs(path))


def _decode(path: Path, channels: int, size: tuple[int, int]) -> Any:
    import numpy as np

    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise ImportError(
            "--data with an image folder needs Pillow: pip install 'secateur[images]' (matplotlib, "
            "secateur[report], brings it too)",
            name="PIL",
        ) from e
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ConfigError(f"image folders feed models of 1 or 3 input channels; this model takes {channels}")
    try:
        with Image.open(path) as im:
            im = im.convert(mode).resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be decoded as an image ({e})") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _split_dirs(root: Path) -> tuple[Path, Path] | None:
    names = {d.name: d for d in _class_dirs(root)}
    test = names.get("test") or names.get("val")
    if "train" in names and test is not None and _class_dirs(names["train"]):
        return names["train"], test
    return None


def image_folder_tensors(
    root: str | Path, channels: int, size: tuple[int, int], subset: int | None = None
) -> tuple[Any, Any, Any, Any, list[str]]:
    """``(x_train, y_train, x_test, y_test, classes)`` of an image folder (see the module docstring):
    ``x`` float32 ``(N, channels, H, W)`` in [0, 1], ``y`` int64 class indices; ``subset`` keeps the first
    N images of each split.

    Raises:
        DataError: no class folders, no images, a class missing from the training split, or an image
            that cannot be decoded (named). ImportError: Pillow is missing.
    """
    import numpy as np
    import torch

    root = Path(root)
    split = _split_dirs(root)
    class_root = split[0] if split else root
    classes = [d.name for d in _class_dirs(class_root) if _image_files(d)]
    if not classes:
        raise DataError(f"{root}: no class sub-folders with images ({sorted(IMAGE_SUFFIXES)})")
    parts: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for k, name in enumerate(classes):
        if split:
            parts["train"] += [(f, k) for f in _image_files(split[0] / name)]
            parts["test"] += (
                [(f, k) for f in _image_files(split[1] / name)] if (split[1] / name).is_dir() else []
            )
        else:
            files = _image_files(root / name)
            parts["train"] += [(f, k) for i, f in enumerate(files) if i % 5 != 4]
            parts["test"] += [(f, k) for i, f in enumerate(files) if i % 5 == 4]
    out = []
    for key in ("train", "test"):
        items = parts[key][:subset] if subset else parts[key]
        if not items:
            why = "every fifth image of a class is held out, so a class needs 5 images at least"
            raise DataError(f"{root}: no {key} images ({why}; or give train/ and test/ sub-folders)")
        x = torch.from_numpy(np.stack([_decode(f, channels, size) for f, _ in items])).float().div_(255.0)
        out += [x, torch.tensor([k for _, k in items], dtype=torch.long)]
    return out[0], out[1], out[2], out[3], classes


def _image_data(
    root: Path, fields: Sequence[Any], batch_size: int, subset: int | None, seed: int, normalize: Any
) -> TaskData:
    from secateur.data import TensorLoader

    shape = fields[0].shape
    if len(fields) != 1 or len(shape) != 4:
        raise ConfigError(
            f"--data {root} holds images; the model's inputs are {[f.spec() for f in fields]} "
            "(one (N, C, H, W) image input expected)"
        )
    x_tr, y_tr, x_te, y_te, classes = image_folder_tensors(root, shape[1], (shape[2], shape[3]), subset)
    if normalize is None:
        normalize = {
            "mean": x_tr.mean(dim=(0, 2, 3)).tolist(),
            "std": x_tr.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist(),
            "source": "the training split",
        }
    mean = x_tr.new_tensor(normalize["mean"]).view(1, -1, 1, 1)
    std = x_tr.new_tensor(normalize["std"]).view(1, -1, 1, 1)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    train = TensorLoader(x_tr, y_tr, batch_size=batch_size, shuffle=True, seed=seed)
    test = TensorLoader(x_te, y_te, batch_size=max(batch_size, 256))
    desc = (
        f"{root}: {len(classes)} classes, {len(y_tr)} training and {len(y_te)} held-out images resized to "
        f"{shape[2]}x{shape[3]}, normalised by {normalize.get('source', 'the recorded mean/std')}"
    )
    held_desc = f"{root}: {len(y_te)} held-out images of {len(classes)} classes"
    form = str(Path(root).absolute())  # recorded in a saved folder: found again from any working directory
    return TaskData("images", desc, form, train, test, classes, normalize, heldout=held_desc)


def image_normalization(folder: str | Path | None) -> dict[str, Any] | None:
    """``{"mean", "std", "source"}`` from a Hugging Face ``preprocessor_config.json`` in ``folder`` (when it
    normalises), else None."""
    if folder is None:
        return None
    p = Path(folder) / "preprocessor_config.json"
    if not p.is_file():
        return None
    import json

    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: not readable JSON ({e})") from e
    if not cfg.get("do_normalize", True) or "image_mean" not in cfg or "image_std" not in cfg:
        return None
    return {"mean": list(cfg["image_mean"]), "std": list(cfg["image_std"]), "source": str(p)}


# ---------------------------------------------------------------------------------------------- entry
def default_data(fields: Sequence[Any], has_tokenizer: bool) -> str:
    """``--data auto``: ``fashion-mnist`` for a one-channel 28x28 image input, ``fortunes`` for token inputs
    with a tokenizer (when Debian's fortunes are installed), else ``none``."""
    from secateur.data.text import FORTUNES_DIR

    if len(fields) == 1 and tuple(fields[0].shape[1:]) == (1, 28, 28):
        return "fashion-mnist"
    if has_tokenizer and any(f.name == "input_ids" for f in fields) and FORTUNES_DIR.is_dir():
        return "fortunes"
    return "none"


def load_task_data(
    data: str,
    fields: Sequence[Any],
    *,
    tokenizer: Any = None,
    batch_size: int = 128,
    subset: int | None = None,
    seed: int = 0,
    calib_blocks: int = TEXT_BATCH,
    normalize: dict[str, Any] | None = None,
) -> TaskData:
    """The data named by ``--data`` (module docstring) for a model with input ``fields``.

    ``tokenizer``: the model's (text data). ``batch_size``: training images per batch. ``subset``: first N
    images of each split, or N calibration and N held-out text blocks (default ``calib_blocks`` and
    :data:`DEFAULT_HELDOUT_BLOCKS`). ``seed``: the shuffle of the training images and the fortunes split.
    ``normalize``: image mean/std to use (a saved model's record), else as the module docstring says.
    The text block length is the ``input_ids`` field's sequence length.

    Raises:
        ConfigError: an unknown form, data that does not fit the model's inputs (named), text for a model
            without a tokenizer. DataError: missing or unreadable files (named). ImportError: Pillow or
            datasets missing for the forms that need them.
    """
    if subset is not None and subset < 1:
        raise ConfigError(f"--subset must be >= 1, got {subset}")
    if data == "none":
        return TaskData("none", "no data (--data none)", "none")
    if data == "fashion-mnist":
        shapes = [tuple(f.shape[1:]) for f in fields]
        if shapes != [(1, 28, 28)]:
            raise ConfigError(
                "--data fashion-mnist feeds 1x28x28 images; the model's inputs are "
                f"{[f.spec() for f in fields]}"
            )
        from secateur.data import fashion_mnist_loaders

        train, test = fashion_mnist_loaders(batch_size=batch_size, subset=subset, seed=seed)
        first = "" if subset is None else "first "
        held_desc = f"the {first}{test.num_examples:,} Fashion-MNIST test images"
        desc = f"{held_desc} (and the {first}{train.num_examples:,} training images)"
        return TaskData(
            "images",
            desc,
            "fashion-mnist",
            train,
            test,
            [str(i) for i in range(10)],
            heldout=held_desc,
        )
    token = next((f for f in fields if f.name == "input_ids"), None)
    path = Path(data)
    if data != "fortunes" and not data.startswith("datasets:") and is_image_folder(path):
        return _image_data(path, fields, batch_size, subset, seed, normalize)
    if data == "fortunes" or data.startswith("datasets:") or path.exists():
        if token is None:
            raise ConfigError(
                f"--data {data!r} is text, but the model's inputs are {[f.spec() for f in fields]} "
                "(no input_ids)"
            )
        return _text_data(data, tokenizer, token.shape[-1], calib_blocks, subset, seed)
    missing = "" if path.exists() else " (no such file or folder)"
    raise ConfigError(
        f"--data {data!r}{missing}: not 'fashion-mnist', 'fortunes', 'none', 'datasets:BUILDER:PATH' or an "
        "existing image folder / text file / folder of .txt files"
    )

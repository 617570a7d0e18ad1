"""Fashion-MNIST: loading, validation and ready-to-train loaders.

Where the files are looked for, first match wins:

1. the ``root`` argument;
2. the environment variable ``SECATEUR_FASHION_MNIST``;
3. ``/usr/share/datasets/fashion-mnist``, where the Debian package ``dataset-fashion-mnist``
   installs them (``make data``).

Each file may be the official gzip (``train-images-idx3-ubyte.gz``) or its uncompressed form
(``train-images-idx3-ubyte``). Everything a broken file can get wrong (magic number, counts,
image size, length, label range) is checked, because a silently short dataset gives plausible but
wrong accuracies.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from secateur.data.download import download_fashion_mnist
from secateur.data.idx import read_idx
from secateur.data.loader import TensorLoader
from secateur.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "ROOT_ENV_VAR",
    "fashion_mnist_loaders",
    "fashion_mnist_root",
    "load_fashion_mnist",
    "normalize_fashion_mnist",
]

#: Where the Debian package dataset-fashion-mnist installs the files.
DEFAULT_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

#: Environment variable naming a directory with the IDX files (overridden by ``root=``).
ROOT_ENV_VAR = "SECATEUR_FASHION_MNIST"

#: Class names, indexed by label.
FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

#: Mean and standard deviation of the training pixels scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions
_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension
_IMAGE_SHAPE = (28, 28)
_SPLITS: dict[str, tuple[str, str, int]] = {
    # split: (images file, labels file, number of examples)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}

_HOW_TO_GET = (
    "Install the Debian package dataset-fashion-mnist (`make data`), "
    f"set {ROOT_ENV_VAR} to a directory holding the IDX files, "
    "or call with download=True and a root= directory to download the official files into."
)


def fashion_mnist_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Fashion-MNIST directory: ``root``, else ``$SECATEUR_FASHION_MNIST``, else the Debian one.

    The directory is not checked for existence here; :func:`load_fashion_mnist` does that.
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ROOT_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_FASHION_MNIST_ROOT


def _check_split(split: str) -> tuple[str, str, int]:
    if split not in _SPLITS:
        allowed = ", ".join(map(repr, _SPLITS))
        raise ConfigError(f"Fashion-MNIST split {split!r} is unknown; allowed: {allowed}")
    return _SPLITS[split]


def _locate(directory: Path, gz_name: str) -> Path | None:
    """The gzip file if present, else the uncompressed one, else None."""
    for candidate in (directory / gz_name, directory / gz_name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    url: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of Fashion-MNIST, fully validated.

    Args:
        split: ``"train"`` (60000 examples) or ``"test"`` (10000).
        root: directory with the IDX files; default ``$SECATEUR_FASHION_MNIST``, then
            ``/usr/share/datasets/fashion-mnist``.
        download: fetch the split's missing files (SHA-256 verified) into the directory given by
            ``root`` or ``$SECATEUR_FASHION_MNIST`` first. Files already present are not fetched.
        url: base URL for ``download``; default ``$SECATEUR_FASHION_MNIST_URL``, then the official
            Zalando URL.

    Returns:
        ``(images, labels)``: images ``uint8`` of shape ``(N, 28, 28)``, raw pixel values 0..255
        (0 is background); labels ``int64`` of shape ``(N,)`` in ``0..9``, indexing
        :data:`FASHION_MNIST_CLASSES`.

    Raises:
        ConfigError: ``split`` is not ``"train"``/``"test"``, or ``download=True`` without a
            ``root``/``$SECATEUR_FASHION_MNIST`` to download into while files are missing.
        DataError: the directory or a file is missing, or a file is truncated, has the wrong magic
            number, the wrong count or image size, image and label counts disagree, or a label is
            out of range. The message names the file.
        ChecksumError: (a DataError) a downloaded file did not match its SHA-256.
    """
    images_name, labels_name, count = _check_split(split)
    directory = fashion_mnist_root(root)
    user_root = root is not None or bool(os.environ.get(ROOT_ENV_VAR))

    if download:
        missing = [n for n in (images_name, labels_name) if _locate(directory, n) is None]
        if missing and not user_root:
            raise ConfigError(
                f"download=True needs a directory to download into: pass root=... or set {ROOT_ENV_VAR} "
                f"(the default {directory} is managed by the Debian package dataset-fashion-mnist)"
            )
        if missing:
            download_fashion_mnist(directory, url=url, files=missing)

    if not directory.is_dir():
        raise DataError(f"Fashion-MNIST directory {directory} does not exist. {_HOW_TO_GET}")
    paths = []
    for name in (images_name, labels_name):
        path = _locate(directory, name)
        if path is None:
            raise DataError(
                f"{directory / name}: missing (nor is there an uncompressed "
                f"{name.removesuffix('.gz')}). {_HOW_TO_GET}"
            )
        paths.append(path)
    images_path, labels_path = paths

    images = read_idx(images_path, magic=_IMAGES_MAGIC)
    labels = read_idx(labels_path, magic=_LABELS_MAGIC)
    if tuple(images.shape[1:]) != _IMAGE_SHAPE:
        raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    if images.shape[0] != count:
        raise DataError(f"{images_path}: expected {count} {split} images, got {images.shape[0]}")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_path}: label {int(labels.max())} out of range 0..9")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def normalize_fashion_mnist(images: torch.Tensor) -> torch.Tensor:
    """Scale uint8 images to the network input: ``(x / 255 - 0.2860) / 0.3530``, with a channel axis.

    Args:
        images: ``uint8`` pixels of shape ``(N, 28, 28)`` (or ``(N, 1, 28, 28)``).

    Returns:
        ``float32`` tensor of shape ``(N, 1, 28, 28)``, roughly zero mean and unit variance.
    """
    x = images.to(torch.float32).div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return x.unsqueeze(1) if x.dim() == 3 else x


def fashion_mnist_loaders(
    batch_size: int = 128,
    root: str | os.PathLike[str] | None = None,
    subset: int | None = None,
    seed: int = 0,
    eval_batch_size: int = 1000,
    *,
    download: bool = False,
    url: str | None = None,
) -> tuple[TensorLoader, TensorLoader]:
    """Train and test loaders over normalised Fashion-MNIST held in memory.

    Args:
        batch_size: training batch size.
        root: data directory, as in :func:`load_fashion_mnist`.
        subset: if given, keep only the first ``subset`` examples of each split (all of a split
            when it has fewer), e.g. for quick tests.
        seed: base seed of the training shuffle (epoch ``e`` uses ``seed + e``).
        eval_batch_size: test batch size.
        download, url: as in :func:`load_fashion_mnist`.

    Returns:
        ``(train_loader, test_loader)`` yielding ``(x, y)`` with ``x`` float32 ``(B, 1, 28, 28)``
        normalised with mean 0.2860 / std 0.3530 and ``y`` int64 ``(B,)``. The training loader
        shuffles; the test loader keeps file order. Neither drops the last partial batch.

    Raises:
        ConfigError: ``subset`` < 1 or a batch size < 1.
        DataError: as in :func:`load_fashion_mnist`.
    """
    if subset is not None and subset < 1:
        raise ConfigError(f"subset must be a positive number of examples or None, got {subset}")
    for name, bs in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ConfigError(f"{name} must be a positive int, got {bs!r}")
    loaders = []
    for split, bs, shuffle in (("train", batch_size, True), ("test", eval_batch_size, False)):
        images, labels = load_fashion_mnist(split, root=root, download=download, url=url)
        if subset is not None:
            images, labels = images[:subset], labels[:subset]
        loaders.append(TensorLoader(normalize_fashion_mnist(images), labels, bs, shuffle=shuffle, seed=seed))
    return loaders[0], loaders[1]

"""Datasets for secateur's examples and benchmarks.

Fashion-MNIST is read from the IDX files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``), from ``$SECATEUR_FASHION_MNIST``, or from a directory
given explicitly, optionally after a SHA-256-verified download. :class:`TensorLoader` batches
tensors held in memory.
"""

from secateur.data.download import DEFAULT_FASHION_MNIST_URL, FASHION_MNIST_SHA256, download_fashion_mnist
from secateur.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist_loaders,
    fashion_mnist_root,
    load_fashion_mnist,
    normalize_fashion_mnist,
)
from secateur.data.idx import read_idx
from secateur.data.loader import TensorLoader

__all__ = [
    "DEFAULT_FASHION_MNIST_URL",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_SHA256",
    "FASHION_MNIST_STD",
    "TensorLoader",
    "download_fashion_mnist",
    "fashion_mnist_loaders",
    "fashion_mnist_root",
    "load_fashion_mnist",
    "normalize_fashion_mnist",
    "read_idx",
]

"""Verified, atomic download of the official Fashion-MNIST files.

A download is streamed into a temporary file in the destination directory, hashed on the way,
and renamed onto the final name only once its SHA-256 matches the known digest. So a file under
the final name is always complete and correct: an interrupted or corrupted transfer leaves
nothing behind (the temporary file is removed), and a crash mid-rename cannot happen because
``os.replace`` within one directory is atomic.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from secateur._files import honour_umask
from secateur.errors import ChecksumError, ConfigError, DataError

__all__ = [
    "DEFAULT_FASHION_MNIST_URL",
    "FASHION_MNIST_SHA256",
    "URL_ENV_VAR",
    "download_fashion_mnist",
    "download_file",
    "fashion_mnist_url",
    "sha256_file",
]

#: Official Zalando mirror of the four Fashion-MNIST files.
DEFAULT_FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

#: Environment variable overriding the base URL (the ``url`` argument overrides both).
URL_ENV_VAR = "SECATEUR_FASHION_MNIST_URL"

#: SHA-256 of the official gzip files (computed from the Debian package dataset-fashion-mnist,
#: which ships the upstream files unchanged).
FASHION_MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}

_CHUNK = 1 << 16
_ALLOWED_SCHEMES = ("http", "https", "file")


def fashion_mnist_url(url: str | None = None) -> str:
    """Base download URL: ``url`` if given, else ``$SECATEUR_FASHION_MNIST_URL``, else the official one.

    Returns:
        The base URL, always ending in ``/``.

    Raises:
        ConfigError: the URL's scheme is not http, https or file.
    """
    base = url or os.environ.get(URL_ENV_VAR) or DEFAULT_FASHION_MNIST_URL
    scheme = urllib.parse.urlsplit(base).scheme
    if scheme not in _ALLOWED_SCHEMES:
        raise ConfigError(f"download URL {base!r}: scheme must be one of {', '.join(_ALLOWED_SCHEMES)}")
    return base if base.endswith("/") else base + "/"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a file's bytes (read in 64 KiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str,
    *,
    timeout: float = 60.0,
    progress: bool | None = None,
) -> Path:
    """Download ``url`` to ``dest``, keeping it only if its SHA-256 equals ``sha256``.

    The bytes go to a hidden temporary file next to ``dest`` and are renamed onto ``dest`` only
    after the digest (and, when the server sent one, the Content-Length) match; on any failure the
    temporary file is deleted and ``dest`` is left as it was.

    Args:
        url: full URL of the file.
        dest: final path; its directory is created if needed.
        sha256: expected hex digest (case-insensitive).
        timeout: seconds a connect or a single read may block before giving up (no retries).
        progress: show a tqdm bar on stderr; ``None`` means only when stderr is a terminal.

    Returns:
        ``dest`` as a Path.

    Raises:
        ChecksumError: the downloaded bytes have another digest; names ``dest`` and ``url``.
        DataError: the transfer failed (HTTP error, timeout, connection closed early) or the
            destination directory is not writable.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DataError(f"{dest}: cannot write into {dest.parent} ({e.strerror or e})") from e
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        got = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    length_header = resp.headers.get("Content-Length")
                    total = int(length_header) if length_header and length_header.isdigit() else None
                    with tqdm(
                        total=total,
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        desc=dest.name,
                        disable=not _show_progress(progress),
                        leave=False,
                    ) as bar:
                        while chunk := resp.read(_CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            got += len(chunk)
                            bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                # URLError, HTTPError, socket timeouts and IncompleteRead all land here.
                raise DataError(f"{dest}: download from {url} failed: {e}") from e
            if total is not None and got != total:
                raise DataError(
                    f"{dest}: download from {url} interrupted: got {got} of {total} bytes"
                )
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if digest != sha256.lower():
            raise ChecksumError(
                f"{dest}: SHA-256 mismatch for download from {url}: expected {sha256.lower()}, "
                f"got {digest} ({got} bytes); the file was not kept"
            )
        honour_umask(tmp)  # mkstemp made it 0600; published under the user's umask like any open()
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def download_fashion_mnist(
    root: str | os.PathLike[str],
    *,
    url: str | None = None,
    files: Iterable[str] | None = None,
    force: bool = False,
    timeout: float = 60.0,
    progress: bool | None = None,
) -> list[Path]:
    """Download the official Fashion-MNIST gzip files into ``root``, verified by SHA-256.

    Args:
        root: destination directory (created if missing).
        url: base URL; defaults to ``$SECATEUR_FASHION_MNIST_URL``, then the official Zalando URL.
        files: which of the four file names (keys of :data:`FASHION_MNIST_SHA256`); default all.
        force: download even when a file of that name (gzip, or its uncompressed form) exists.
        timeout: per-connection/read timeout in seconds.
        progress: show tqdm bars; ``None`` means only when stderr is a terminal.

    Returns:
        Paths of the files downloaded in this call (already-present files are skipped).

    Raises:
        ConfigError: an unknown file name or a URL with an unsupported scheme.
        ChecksumError: a downloaded file has the wrong digest (nothing is kept under its name).
        DataError: a transfer failed.
    """
    base = fashion_mnist_url(url)
    names = list(FASHION_MNIST_SHA256) if files is None else list(files)
    unknown = [n for n in names if n not in FASHION_MNIST_SHA256]
    if unknown:
        raise ConfigError(f"unknown Fashion-MNIST file(s) {unknown}; known: {sorted(FASHION_MNIST_SHA256)}")
    root = Path(root)
    done: list[Path] = []
    for name in names:
        dest = root / name
        if not force and (dest.exists() or dest.with_suffix("").exists()):
            continue
        done.append(
            download_file(
                base + name, dest, FASHION_MNIST_SHA256[name], timeout=timeout, progress=progress
            )
        )
    return done

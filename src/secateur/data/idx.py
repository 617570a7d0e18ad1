"""Reader for the IDX format used by MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number ``0x0000TTDD`` (``TT`` the element type code, ``DD`` the
number of dimensions), then ``DD`` big-endian uint32 sizes, then the elements in C order,
big-endian. Files may be gzip-compressed; compression is detected from the content (bytes
``1f 8b``), not from the file name, so a mislabelled file still reads.

Every problem is reported as :class:`~secateur.errors.DataError` whose message starts with the
file path, because a user confronted with "bad magic number" needs to know which file to replace.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from secateur.errors import DataError

__all__ = ["IDX_DTYPES", "read_idx"]

#: IDX element type code -> numpy dtype (big-endian as stored in the file).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytearray:
    """Whole (decompressed) content of ``path``; a bytearray so numpy views of it are writable."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head != _GZIP_MAGIC:
                return bytearray(f.read())
        with gzip.open(path, "rb") as gz:
            return bytearray(gz.read())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an IDX file") from None
    except EOFError as e:
        raise DataError(f"{path}: truncated gzip stream ({e})") from e
    except (zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt gzip data ({e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


def read_idx(path: str | os.PathLike[str], *, magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) into a numpy array.

    Args:
        path: the file. Gzip is recognised by its first two bytes (``1f 8b``), whatever the suffix.
        magic: if given, the exact magic number the file must carry, e.g. ``2051`` (uint8, 3-D:
            images) or ``2049`` (uint8, 1-D: labels); this pins both element type and rank.

    Returns:
        A writable, C-contiguous array of the shape recorded in the header (e.g. ``(N, 28, 28)``
        for images, ``(N,)`` for labels) in the file's element type converted to native byte
        order (``uint8`` for (Fashion-)MNIST; values as stored, no scaling).

    Raises:
        DataError: the file is missing or unreadable, is a damaged gzip stream, has a magic number
            that is not IDX or differs from ``magic``, has an unknown type code, or its length
            disagrees with its header (``truncated: expected X bytes, got Y`` or trailing data).
            The message starts with the path.
    """
    p = Path(path)
    data = _read_bytes(p)
    if len(data) < 4:
        raise DataError(f"{p}: truncated: expected at least 4 bytes (IDX magic number), got {len(data)}")
    found = int.from_bytes(data[:4], "big")
    if found >> 16 != 0:
        raise DataError(f"{p}: not an IDX file: magic number 0x{found:08x} (its first two bytes must be 0)")
    if magic is not None and found != magic:
        raise DataError(
            f"{p}: wrong magic number {found} (0x{found:08x}), expected {magic} (0x{magic:08x})"
        )
    type_code, ndim = (found >> 8) & 0xFF, found & 0xFF
    if type_code not in IDX_DTYPES:
        raise DataError(f"{p}: unknown IDX element type code 0x{type_code:02x} in magic number 0x{found:08x}")
    if ndim == 0:
        raise DataError(f"{p}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{p}: truncated: expected at least {header_len} bytes of header, got {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[type_code]
    expected = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) < expected:
        raise DataError(f"{p}: truncated: expected {expected} bytes, got {len(data)}")
    if len(data) > expected:
        raise DataError(
            f"{p}: malformed: expected {expected} bytes for shape {shape}, got {len(data)} (trailing data)"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr

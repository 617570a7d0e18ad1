"""Tests of secateur.data: IDX reading, Fashion-MNIST validation, verified download, TensorLoader.

No network: downloads are served by an http.server on 127.0.0.1 started here. The real data is
the Debian package dataset-fashion-mnist (`make data`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import secateur.data.fashion_mnist as fm
from secateur.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_SHA256,
    TensorLoader,
    download_fashion_mnist,
    fashion_mnist_loaders,
    load_fashion_mnist,
    read_idx,
)
from secateur.errors import ChecksumError, ConfigError, DataError

REAL = Path("/usr/share/datasets/fashion-mnist")
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"

needs_real = pytest.mark.skipif(
    not (REAL / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (make data: Debian package dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No user settings leak in, and local test servers are never reached through a proxy."""
    monkeypatch.delenv("SECATEUR_FASHION_MNIST", raising=False)
    monkeypatch.delenv("SECATEUR_FASHION_MNIST_URL", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def real_test() -> tuple[torch.Tensor, torch.Tensor]:
    if not (REAL / TEST_IMAGES).is_file():
        pytest.skip("Fashion-MNIST not installed")
    return load_fashion_mnist("test", root=REAL)


def _raw(name: str) -> bytes:
    """Decompressed bytes of a real file."""
    return gzip.decompress((REAL / name).read_bytes())


def _idx(arr: np.ndarray, magic: int) -> bytes:
    """Serialise a uint8 array as IDX with the given magic number (dims taken from arr)."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_test_split(root: Path, images: bytes, labels: bytes) -> tuple[Path, Path]:
    """Write uncompressed test-split files into root."""
    root.mkdir(parents=True, exist_ok=True)
    ip, lp = root / "t10k-images-idx3-ubyte", root / "t10k-labels-idx1-ubyte"
    ip.write_bytes(images)
    lp.write_bytes(labels)
    return ip, lp


# --------------------------------------------------------------------------- real data


@needs_real
def test_real_train_and_test_shapes_dtypes_labels() -> None:
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = load_fashion_mnist(split)
        assert x.shape == (n, 28, 28) and x.dtype == torch.uint8
        assert y.shape == (n,) and y.dtype == torch.int64
        assert int(y.min()) == 0 and int(y.max()) == 9
        counts = torch.bincount(y, minlength=10)
        assert len(counts) == 10 == len(FASHION_MNIST_CLASSES)
        assert torch.all(counts == n // 10)  # Fashion-MNIST is exactly balanced
        assert int(x.max()) > 200 and int(x.min()) == 0


@needs_real
def test_raw_equals_gz(tmp_path: Path, real_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    _write_test_split(tmp_path, _raw(TEST_IMAGES), _raw(TEST_LABELS))
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert torch.equal(x, real_test[0]) and torch.equal(y, real_test[1])
    # gzip is detected from the content, not the suffix
    mislabelled = tmp_path / "labels-without-suffix"
    shutil.copy(REAL / TEST_LABELS, mislabelled)
    np.testing.assert_array_equal(read_idx(mislabelled), real_test[1].numpy())
    # the returned arrays are writable, so torch.from_numpy does not warn
    assert read_idx(mislabelled).flags.writeable


@needs_real
def test_truncated_raw_file_names_file_and_sizes(tmp_path: Path) -> None:
    ip, _ = _write_test_split(tmp_path, _raw(TEST_IMAGES)[:1000], _raw(TEST_LABELS))
    with pytest.raises(DataError, match="truncated: expected 7840016 bytes, got 1000") as e:
        load_fashion_mnist("test", root=tmp_path)
    assert str(ip) in str(e.value)


@needs_real
def test_truncated_gz_content_and_truncated_gz_stream(tmp_path: Path) -> None:
    # a complete gzip whose content is short
    short = tmp_path / "short" / TEST_IMAGES
    short.parent.mkdir()
    short.write_bytes(gzip.compress(_raw(TEST_IMAGES)[:1000]))
    shutil.copy(REAL / TEST_LABELS, short.parent / TEST_LABELS)
    with pytest.raises(DataError, match="truncated: expected 7840016 bytes, got 1000") as e:
        load_fashion_mnist("test", root=short.parent)
    assert str(short) in str(e.value)
    # a gzip stream cut in the middle
    cut = tmp_path / "cut.gz"
    cut.write_bytes((REAL / TEST_IMAGES).read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated gzip") as e:
        read_idx(cut)
    assert str(cut) in str(e.value)


@needs_real
def test_wrong_magic_names_file(tmp_path: Path) -> None:
    # a labels file (magic 2049) where the images file (magic 2051) should be
    ip, _ = _write_test_split(tmp_path, _raw(TEST_LABELS), _raw(TEST_LABELS))
    with pytest.raises(DataError, match="wrong magic number 2049.*expected 2051") as e:
        load_fashion_mnist("test", root=tmp_path)
    assert str(ip) in str(e.value)


def test_not_idx_and_tiny_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="not an IDX file") as e:
        read_idx(junk)
    assert str(junk) in str(e.value)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tiny)
    bad_type = tmp_path / "bad_type"
    bad_type.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x00")
    with pytest.raises(DataError, match="unknown IDX element type"):
        read_idx(bad_type)
    trailing = tmp_path / "trailing"
    trailing.write_bytes(_idx(np.zeros(3, np.uint8), 2049) + b"\x00")
    with pytest.raises(DataError, match="trailing data"):
        read_idx(trailing)
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path / "absent")


def test_read_idx_multibyte_big_endian(tmp_path: Path) -> None:
    arr = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    p = tmp_path / "ints"
    p.write_bytes(bytes([0, 0, 0x0C, 2]) + (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + arr.tobytes())
    out = read_idx(p)
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


@needs_real
def test_mismatched_counts_raise(tmp_path: Path) -> None:
    labels = read_idx(REAL / TEST_LABELS)
    ip, lp = _write_test_split(tmp_path, _raw(TEST_IMAGES), _idx(labels[:9999], 2049))
    with pytest.raises(DataError, match="10000 images but .* 9999 labels") as e:
        load_fashion_mnist("test", root=tmp_path)
    assert str(ip) in str(e.value) and str(lp) in str(e.value)


def test_wrong_count_size_and_label_range(tmp_path: Path) -> None:
    # Synthetic files: only the header and sizes matter here.
    imgs, labels = np.zeros((10, 28, 28), np.uint8), np.zeros(10, np.uint8)
    ip, _ = _write_test_split(tmp_path, _idx(imgs, 2051), _idx(labels, 2049))
    with pytest.raises(DataError, match="expected 10000 test images, got 10") as e:
        load_fashion_mnist("test", root=tmp_path)
    assert str(ip) in str(e.value)

    narrow = _idx(np.zeros((10000, 28, 27), np.uint8), 2051)
    _write_test_split(tmp_path, narrow, _idx(np.zeros(10000), 2049))
    with pytest.raises(DataError, match="28x27, expected 28x28"):
        load_fashion_mnist("test", root=tmp_path)

    bad = np.zeros(10000, np.uint8)
    bad[5] = 10
    _, lp = _write_test_split(tmp_path, _idx(np.zeros((10000, 28, 28), np.uint8), 2051), _idx(bad, 2049))
    with pytest.raises(DataError, match="label 10 out of range") as e:
        load_fashion_mnist("test", root=tmp_path)
    assert str(lp) in str(e.value)


def test_missing_directory_and_file_messages(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_fashion_mnist("train", root=tmp_path / "nowhere")
    msg = str(e.value)
    for needle in (str(tmp_path / "nowhere"), "dataset-fashion-mnist", "make data", "SECATEUR_FASHION_MNIST",
                   "download=True"):
        assert needle in msg
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: missing"):
        load_fashion_mnist("train", root=tmp_path)


def test_unknown_split_is_config_error() -> None:
    with pytest.raises(ConfigError, match="'train', 'test'"):
        load_fashion_mnist("validation")


@needs_real
def test_root_precedence_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 real_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    for name in (TEST_IMAGES, TEST_LABELS):
        shutil.copy(REAL / name, tmp_path / name)
    monkeypatch.setenv("SECATEUR_FASHION_MNIST", str(tmp_path))
    x, y = load_fashion_mnist("test")  # env var beats the Debian default...
    assert torch.equal(x, real_test[0]) and torch.equal(y, real_test[1])
    monkeypatch.setenv("SECATEUR_FASHION_MNIST", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="empty"):  # ...which would have worked
        load_fashion_mnist("test")
    x, _ = load_fashion_mnist("test", root=REAL)  # explicit root beats the env var
    assert x.shape == (10000, 28, 28)


# --------------------------------------------------------------------------- download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass


class _HalfHandler(_QuietHandler):
    """Announces the full Content-Length, sends half the bytes, then hangs up."""

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@contextmanager
def _serve(directory: Path, handler: type[_QuietHandler] = _QuietHandler) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 at a free port for the duration of the block."""
    factory = functools.partial(handler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


class _StallHandler(_QuietHandler):
    """Sends headers and a few bytes, then goes silent until released."""

    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"\x1f\x8b")
        self.wfile.flush()
        self.release.wait(10)


def _mirror(tmp_path: Path, names: list[str]) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    for name in names:
        shutil.copy(REAL / name, site / name)
    return site


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@needs_real
def test_download_all_files_verifies_and_loads(tmp_path: Path,
                                               real_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    site = _mirror(tmp_path, list(FASHION_MNIST_SHA256))
    dest = tmp_path / "dest"
    with _serve(site) as url:
        got = download_fashion_mnist(dest, url=url, progress=False)
        assert sorted(p.name for p in got) == sorted(FASHION_MNIST_SHA256)
        assert download_fashion_mnist(dest, url=url) == []  # already there: nothing fetched
    assert _leftovers(dest) == sorted(FASHION_MNIST_SHA256)  # no temporary files left
    for name, digest in FASHION_MNIST_SHA256.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest
    x, y = load_fashion_mnist("test", root=dest)
    assert torch.equal(x, real_test[0]) and torch.equal(y, real_test[1])


@needs_real
def test_load_with_download_uses_url_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _mirror(tmp_path, [TEST_IMAGES, TEST_LABELS])
    dest = tmp_path / "dest"
    with _serve(site) as url:
        monkeypatch.setenv("SECATEUR_FASHION_MNIST_URL", url)
        monkeypatch.setenv("SECATEUR_FASHION_MNIST", str(dest))
        x, _ = load_fashion_mnist("test", download=True)  # fetches only the test split
    assert x.shape == (10000, 28, 28)
    assert _leftovers(dest) == sorted([TEST_IMAGES, TEST_LABELS])


@needs_real
def test_corrupted_download_rejected_and_not_kept(tmp_path: Path) -> None:
    site = _mirror(tmp_path, [TEST_IMAGES, TEST_LABELS])
    data = bytearray((site / TEST_LABELS).read_bytes())
    data[100] ^= 0xFF
    (site / TEST_LABELS).write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with _serve(site) as url, pytest.raises(ChecksumError, match="SHA-256 mismatch") as e:
        load_fashion_mnist("test", root=dest, download=True, url=url)
    assert str(dest / TEST_LABELS) in str(e.value)
    assert not (dest / TEST_LABELS).exists()
    assert _leftovers(dest) == [TEST_IMAGES]  # the good file stays, no partial file anywhere


@needs_real
def test_interrupted_download_leaves_no_file(tmp_path: Path) -> None:
    site = _mirror(tmp_path, [TEST_LABELS])
    dest = tmp_path / "dest"
    with _serve(site, _HalfHandler) as url, pytest.raises(DataError, match="interrupted") as e:
        download_fashion_mnist(dest, url=url, files=[TEST_LABELS])
    assert not isinstance(e.value, ChecksumError)
    assert str(dest / TEST_LABELS) in str(e.value)
    assert _leftovers(dest) == []


def test_stalled_download_times_out(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (tmp_path / "site").mkdir()
    _StallHandler.release.clear()
    try:
        with _serve(tmp_path / "site", _StallHandler) as url, pytest.raises(DataError, match="timed out"):
            download_fashion_mnist(dest, url=url, files=[TEST_LABELS], timeout=0.3)
    finally:
        _StallHandler.release.set()
    assert _leftovers(dest) == []


@needs_real
def test_short_file_served_in_full_is_rejected(tmp_path: Path) -> None:
    site = _mirror(tmp_path, [TEST_LABELS])
    (site / TEST_LABELS).write_bytes((site / TEST_LABELS).read_bytes()[:1000])
    dest = tmp_path / "dest"
    with _serve(site) as url, pytest.raises(ChecksumError):
        download_fashion_mnist(dest, url=url, files=[TEST_LABELS])
    assert _leftovers(dest) == []


def test_http_error_and_bad_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "site").mkdir()
    with _serve(tmp_path / "site") as url, pytest.raises(DataError, match="404"):
        download_fashion_mnist(tmp_path / "dest", url=url, files=[TEST_LABELS])
    assert _leftovers(tmp_path / "dest") == []
    with pytest.raises(ConfigError, match="scheme"):
        download_fashion_mnist(tmp_path / "dest", url="ftp://example.invalid/")
    with pytest.raises(ConfigError, match="unknown Fashion-MNIST file"):
        download_fashion_mnist(tmp_path / "dest", files=["mnist.npz"])
    # download=True with neither root= nor the env var has nowhere to write to
    monkeypatch.setattr(fm, "DEFAULT_FASHION_MNIST_ROOT", tmp_path / "system")
    with pytest.raises(ConfigError, match="root="):
        load_fashion_mnist("test", download=True)


# --------------------------------------------------------------------------- TensorLoader


def _data(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n)


def test_tensor_loader_batches_and_len() -> None:
    x, y = _data(10)
    loader = TensorLoader(x, y, batch_size=4)
    batches = list(loader)
    assert len(loader) == 3 == len(batches)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)  # file order without shuffle
    assert torch.equal(batches[0][0], x[:4])
    dropping = TensorLoader(x, y, batch_size=4, drop_last=True)
    assert len(dropping) == 2 == len(list(dropping))
    assert len(TensorLoader(x, y, batch_size=5, drop_last=True)) == 2


def test_tensor_loader_shuffle_is_deterministic_per_epoch() -> None:
    x, y = _data(50)
    a = TensorLoader(x, y, batch_size=8, shuffle=True, seed=3)
    b = TensorLoader(x, y, batch_size=8, shuffle=True, seed=3)
    ep0 = torch.cat([yb for _, yb in a])
    ep1 = torch.cat([yb for _, yb in a])
    assert torch.equal(torch.sort(ep0).values, y)  # a permutation: every example once
    assert not torch.equal(ep0, ep1) and not torch.equal(ep0, y)
    assert torch.equal(ep0, torch.cat([yb for _, yb in b]))  # same seed, same epoch, same order
    for xb, yb in a:
        assert torch.equal(xb[:, 0].long(), yb)  # inputs and targets stay paired
    c = TensorLoader(x, y, batch_size=8, shuffle=True, seed=3)
    c.set_epoch(1)
    assert torch.equal(torch.cat([yb for _, yb in c]), ep1)
    torch.manual_seed(123)  # the global RNG has no influence
    d = TensorLoader(x, y, batch_size=8, shuffle=True, seed=3)
    assert torch.equal(torch.cat([yb for _, yb in d]), ep0)
    assert not torch.equal(ep0, torch.cat([yb for _, yb in TensorLoader(x, y, 8, shuffle=True, seed=4)]))


def test_tensor_loader_state_dict_resume() -> None:
    x, y = _data(40)
    run = TensorLoader(x, y, batch_size=16, shuffle=True, seed=0)
    orders = []
    for epoch in range(4):
        if epoch == 2:
            saved = run.state_dict()
        orders.append(torch.cat([yb for _, yb in run]))
    assert saved["epoch"] == 2
    resumed = TensorLoader(x, y, batch_size=16, shuffle=True, seed=0)
    resumed.load_state_dict(saved)
    assert torch.equal(torch.cat([yb for _, yb in resumed]), orders[2])
    assert torch.equal(torch.cat([yb for _, yb in resumed]), orders[3])
    with pytest.raises(ConfigError):
        resumed.load_state_dict({})


def test_tensor_loader_rejects_bad_arguments() -> None:
    x, y = _data(10)
    with pytest.raises(ConfigError, match="10 examples but y has 9"):
        TensorLoader(x, y[:9], batch_size=2)
    for bs in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="batch_size"):
            TensorLoader(x, y, batch_size=bs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TensorLoader(x, y, batch_size=2).set_epoch(-1)


@needs_real
def test_fashion_mnist_loaders_subset() -> None:
    train, test = fashion_mnist_loaders(batch_size=64, subset=300, seed=1, eval_batch_size=100)
    assert len(train) == 5 and len(test) == 3
    xb, yb = next(iter(train))
    assert xb.shape == (64, 1, 28, 28) and xb.dtype == torch.float32
    assert yb.shape == (64,) and yb.dtype == torch.int64
    assert train.shuffle and not test.shuffle
    xs = torch.cat([b[0] for b in test])
    assert xs.shape == (300, 1, 28, 28)
    assert abs(float(xs.mean())) < 0.1 and abs(float(xs.std()) - 1.0) < 0.1
    raw, labels = load_fashion_mnist("test")
    expected = (raw[:300].float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(xs[:, 0], expected)
    assert torch.equal(torch.cat([b[1] for b in test]), labels[:300])
    with pytest.raises(ConfigError, match="subset"):
        fashion_mnist_loaders(subset=0)

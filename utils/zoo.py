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
from .train import (CatastrophicOverfitting, CatastrophicOverfittingCheck, CrossEntropy, Distillation,
                    EnergyPairing, FastFGSM, History, LogitPairing, Objective, PGDAdversarial,
                    TemperatureCrossEntropy, fit)

FORMAT_VERSION = 1


class CacheWarning(UserWarning):
    """A cached checkpoint was damaged or did not match, and the model is being retrained."""


@dataclass(frozen=True)
class EarlyStop:
    """Watch for catastrophic overfitting while a model trains, and stop early (Wong et al. 2020).

    After every epoch, the PGD accuracy (L∞ ``eps``, ``steps`` steps, one seeded random start) is
    measured on the first ``n`` *training* examples (a training minibatch, as Wong et al. do:
    no held-out digit takes part in choosing the weights). With ``action="stop"``, a fall of more
    than ``drop`` below the best epoch so far stops training and the weights of the best epoch
    are restored. With ``action="record"`` training runs to the end and the measurements are
    only recorded, which is how chapter 6 shows the collapse. See
    :class:`utils.train.CatastrophicOverfittingCheck`.
    """

    eps: float = 0.3
    steps: int = 10
    drop: float = 0.2
    n: int = 256
    action: str = "stop"

    def __post_init__(self):
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")
        self.check(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long))  # validates the rest

    def check(self, x_train: torch.Tensor, y_train: torch.Tensor) -> CatastrophicOverfittingCheck:
        """The callback, on the first ``n`` training examples."""
        return CatastrophicOverfittingCheck(x_train[: self.n], y_train[: self.n], eps=self.eps, steps=self.steps,
                                            drop=self.drop, action=self.action)

    def spec(self) -> dict:
        return {"eps": self.eps, "steps": self.steps, "drop": self.drop, "n": self.n, "action": self.action}


@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines a trained model except the data it is trained on.

    ``arch_kwargs`` is a tuple of ``(name, value)`` pairs so the spec stays hashable, e.g.
    ``ModelSpec("wide", arch_kwargs=(("width", 64),))``. ``early_stop`` (an :class:`EarlyStop`)
    watches the PGD accuracy during training; it is part of the key, and what it saw is kept
    with the checkpoint (:attr:`TrainedModel.guard`).
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
    early_stop: EarlyStop | None = None

    def __post_init__(self):
        if self.early_stop is not None and not isinstance(self.early_stop, EarlyStop):
            raise TypeError(f"early_stop must be an EarlyStop or None, got {type(self.early_stop).__name__}")
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"name must be non-empty letters, digits, '-' or '_', got {self.name!r}")
        if self.epochs < 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("epochs must be >= 0, batch_size and lr > 0")

    def build(self) -> nn.Module:
        """A fresh model, initialised from ``seed``."""
        torch.manual_seed(self.seed)
        return build_model(self.arch, **dict(self.arch_kwargs))

    def key_dict(self, data: MNISTData) -> dict:
        extra = {} if self.early_stop is None else {"early_stop": self.early_stop.spec()}
        return {
            **extra,
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
    guard: dict | None = None  # what spec.early_stop measured: epochs, accs, events, stopped_at, best_epoch

    @property
    def stopped_early(self) -> bool:
        """Whether training was stopped by :class:`EarlyStop` (and the best epoch restored)."""
        return bool(self.guard and self.guard.get("stopped_at") is not None)

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
            guard = json.loads(payload["guard"]) if payload.get("guard") else None
            return TrainedModel(model, spec, key, path, History.from_list(payload["history"]),
                                float(payload["train_seconds"]), "loaded from cache", data.source, guard)
        if why != "missing":
            warnings.warn(f"retraining {spec.name!r}: {why}", CacheWarning, stacklevel=2)
            status = f"retrained: {why}"
            model = spec.build()  # never continue from weights that were partly loaded
    model.to(device)
    check = None if spec.early_stop is None else spec.early_stop.check(data.x_train, data.y_train)
    stopped_at = None
    start = time.perf_counter()
    try:
        history = fit(
            model, data.x_train, data.y_train, spec.objective,
            epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, schedule=spec.schedule,
            weight_decay=spec.weight_decay, seed=spec.seed, x_test=data.x_test, y_test=data.y_test,
            progress=progress, callback=check,
        )
    except CatastrophicOverfitting as stop:
        history = stop.history
        stopped_at = stop.event.epoch
        check.restore(model)
        if progress:
            print(f"{spec.name}: {stop}; stopped and restored the weights of epoch {check.best_epoch}")
    seconds = time.perf_counter() - start
    guard = None
    if check is not None:
        guard = {"epochs": check.epochs, "accs": check.accs, "best_epoch": check.best_epoch,
                 "best_acc": check.best_acc, "stopped_at": stopped_at,
                 "events": [{"epoch": e.epoch, "acc": e.acc, "best_acc": e.best_acc, "best_epoch": e.best_epoch}
                            for e in check.events]}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT_VERSION,
        "key": key,
        "key_dict": json.dumps(spec.key_dict(data), sort_keys=True, default=str),
        "state_dict": state,
        "history": history.to_list(),
        "train_seconds": seconds,
        "guard": json.dumps(guard) if guard is not None else "",
    }
    _atomic_save(payload, path)
    model.eval()
    return TrainedModel(model, spec, key, path, history, seconds, status, data.source, guard)


def standard_spec(profile: config.Profile | str | None = None) -> ModelSpec:
    """The chapter-2 model every later chapter attacks: the CNN trained with cross-entropy."""
    if not isinstance(profile, config.Profile):
        profile = config.get_profile(profile)
    return ModelSpec(name="standard", arch="cnn", objective=CrossEntropy(),
                     epochs=profile.epochs, batch_size=profile.batch_size, lr=1e-3, seed=0)


# --------------------------------------------------------------------------------------------
# The models of the book, one recipe each, so every chapter that needs a model gets the same one
# --------------------------------------------------------------------------------------------

#: The ε (L∞, pixels in [0, 1]) every defence of the book is trained for: Madry et al.'s MNIST budget.
DEFENCE_EPS = 0.3

#: name -> (chapter that introduces it, one line saying what it is)
BOOK_MODELS: dict[str, tuple[int, str]] = {
    "standard": (2, "cross-entropy on clean digits"),
    "pgd_at": (6, "PGD adversarial training (Madry et al. 2018)"),
    "fast_at": (6, "FGSM with a random start and a step of 2ε/3, guarded by early stopping (after Wong et al. 2020)"),
    "fast_at_overfit": (6, "FGSM with a random start and Wong et al.'s step 1.25ε, trained to the end"),
    "alp": (7, "adversarial logit pairing (Kannan et al. 2018)"),
    "clp": (7, "clean logit pairing (Kannan et al. 2018)"),
    "enaet": (8, "adversarial training with energy pairing (the book's EnAET)"),
    "enaet_weighted": (8, "EnAET with energy-weighted adversarial loss (after WEAT)"),
    "distillation_teacher": (9, "trained at softmax temperature 100, the teacher of defensive distillation"),
    "distilled": (9, "defensive distillation at temperature 100 (Papernot et al. 2016)"),
}

#: The softmax temperature of defensive distillation (Papernot et al. 2016 used 100 on MNIST).
DISTILLATION_TEMPERATURE = 100.0


def book_spec(name: str, profile: config.Profile | str | None = None, *,
              teacher: TrainedModel | None = None) -> ModelSpec:
    """The recipe of the book's model ``name`` (see :data:`BOOK_MODELS`) in ``profile``.

    Every adversarially trained model uses the same budget, so that chapter 8 can compare them
    fairly: ``profile.defence_epochs`` epochs of Adam (cosine schedule, lr 1e-3, batch
    ``profile.batch_size``), with the attack inside training at ε = :data:`DEFENCE_EPS`, ramped up
    linearly over the first quarter of training, and ``profile.train_pgd_steps`` PGD steps of
    size 2.5·ε/steps from a random start. The two single-step (FGSM with a random start) models
    train at the full ε from the start, as Wong et al. do: ``fast_at_overfit`` with their step
    1.25·ε, ``fast_at`` with a step of 2ε/3 and early stopping.

    ``"distilled"`` needs its ``teacher`` (the trained ``"distillation_teacher"``);
    :func:`load_book_model` fetches it. Both are trained for twice the standard model's epochs
    at a learning rate of 3e-3.
    """
    if not isinstance(profile, config.Profile):
        profile = config.get_profile(profile)
    if name not in BOOK_MODELS:
        raise ValueError(f"unknown model {name!r}; the book's models are {sorted(BOOK_MODELS)}")
    if name == "standard":
        return standard_spec(profile)
    if name in ("distillation_teacher", "distilled"):
        if name == "distillation_teacher":
            objective: Objective = TemperatureCrossEntropy(DISTILLATION_TEMPERATURE)
        else:
            if teacher is None or teacher.spec.name != "distillation_teacher":
                raise ValueError("the distilled model needs teacher=<the trained 'distillation_teacher'>")
            objective = Distillation(teacher.model, teacher.key, DISTILLATION_TEMPERATURE)
        # At T = 100 the logits must grow about 100 times larger than usual before the softmax
        # at temperature T is confident: a larger learning rate and twice the standard epochs.
        return ModelSpec(name=name, arch="cnn", objective=objective, epochs=2 * profile.epochs,
                         batch_size=profile.batch_size, lr=3e-3, seed=0)
    if teacher is not None:
        raise ValueError(f"only the distilled model takes a teacher, not {name!r}")
    eps, steps, warmup = DEFENCE_EPS, profile.train_pgd_steps, 0.25
    objectives: dict[str, Objective] = {
        "pgd_at": PGDAdversarial(eps=eps, alpha=None, steps=steps, warmup=warmup),
        # Wong et al.'s step, 1.25·ε, collapses on the 5,000 offline digits from the first epochs on
        # (chapter 6 shows it); a step of 2ε/3 does not, so the guarded model uses that.
        "fast_at": FastFGSM(eps=eps, alpha=round(2 * eps / 3, 6)),
        "fast_at_overfit": FastFGSM(eps=eps, alpha=None),
        "alp": LogitPairing(eps=eps, alpha=None, steps=steps, weight=0.5, mix=0.5, warmup=warmup),
        "clp": LogitPairing(pairing="clean", weight=0.5),
        "enaet": EnergyPairing(eps=eps, alpha=None, steps=steps, lam=1.0, gamma=0.1, warmup=warmup),
        "enaet_weighted": EnergyPairing(eps=eps, alpha=None, steps=steps, lam=1.0, gamma=0.1, weighted=True,
                                        warmup=warmup),
    }
    early_stop = {
        "fast_at": EarlyStop(eps=eps, steps=10, drop=0.2, action="stop"),
        "fast_at_overfit": EarlyStop(eps=eps, steps=10, drop=0.2, action="record"),
    }.get(name)
    return ModelSpec(name=name, arch="cnn", objective=objectives[name], epochs=profile.defence_epochs,
                     batch_size=profile.batch_size, lr=1e-3, seed=0, early_stop=early_stop)


def load_book_model(name: str, data: MNISTData, profile: config.Profile | str | None = None,
                    **kwargs) -> TrainedModel:
    """:func:`load_or_train` on :func:`book_spec`: the model a chapter needs, cached or trained.

    For ``"distilled"`` the teacher is loaded (or trained) first.
    """
    teacher = load_book_model("distillation_teacher", data, profile, **kwargs) if name == "distilled" else None
    return load_or_train(book_spec(name, profile, teacher=teacher), data, **kwargs)

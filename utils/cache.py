"""Trained models, cached on disk under a key made from everything that defines them.

``load_or_train(spec, data)`` returns the model that ``spec`` describes, trained on ``data``: from
the cache when a matching, intact checkpoint exists, otherwise by training it (and caching the
result). The key covers the architecture and its arguments, the objective and its parameters, the
optimiser settings, the seed, the profile, the data (source, sizes and a content fingerprint), and
a fingerprint of the code that trains a model (:data:`TRAINING_CODE`), so a later chapter reuses a
model exactly when it would have trained the same one, and a change to the training code retrains.

A checkpoint is one file that carries its own SHA-256 digest in a header line, written atomically
(one ``os.replace``): a reader sees a whole checkpoint or none, never one beside another run's
checksum. It is read with ``torch.load(weights_only=True)`` after the digest is checked; a
truncated, altered or unreadable checkpoint is reported with a :class:`CacheWarning` and retrained,
never trusted. While a model trains, a lock file beside it makes a second process that needs the
same model wait, then load what the first one saved, instead of training it again.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import config
from .checks import atomic_write, integer, real
from .data import MNISTData
from .models import build_model
from .objectives import CrossEntropy, set_field
from .overfitting import BestCheckpoint, CatastrophicOverfitting, EarlyStop
from .train import History, Objective, fit

try:  # POSIX; elsewhere (Windows) two processes may both train a missing model, and both save it whole
    import fcntl
except ImportError:  # pragma: no cover - not on the book's platforms
    fcntl = None

FORMAT_VERSION = 2
_MAGIC = b"advbook-checkpoint"

#: The modules whose code decides what a trained model's weights are. Their fingerprint is part of
#: every model's cache key. The data module is not here: the data's content is in the key itself.
#: Of the attack package only what training runs (PGD and its core) is here, so a new attack
#: retrains nothing. An objective defined in a module outside this list (a later chapter's
#: training objective) adds that module's fingerprint to its own models' keys only.
TRAINING_CODE = ("utils.attacks.core", "utils.attacks.gradient", "utils.augment", "utils.cache", "utils.checks",
                 "utils.defences", "utils.energy", "utils.evaluate", "utils.models", "utils.objectives",
                 "utils.overfitting", "utils.train")

#: The modules that do not change a trained model, or change only the models of an objective they
#: define (TRADES, :mod:`utils.trades`: its fingerprint joins those models' keys alone, see
#: :meth:`ModelSpec.training_code`). A test checks that every module is in one list.
OUTSIDE_TRAINING_CODE = ("utils", "utils.attacks", "utils.attacks.apgd", "utils.attacks.cw",
                         "utils.attacks.noise", "utils.attacks.patch", "utils.attacks.spatial",
                         "utils.attacks.square", "utils.attacks.transfer", "utils.certify", "utils.config",
                         "utils.data", "utils.plot", "utils.robustness", "utils.smoothing", "utils.trades",
                         "utils.verify", "utils.widgets", "utils.zoo")


class CacheWarning(UserWarning):
    """A cached checkpoint was damaged or did not match, and the model is being retrained."""


# --------------------------------------------------------------------------------------------
# Fingerprints of code
# --------------------------------------------------------------------------------------------

def _module_files(name: str) -> list[Path]:
    module = importlib.import_module(name)
    path = Path(module.__file__)
    if path.name == "__init__.py" and name != "utils":
        return sorted(path.parent.glob("*.py"))
    return [path]


def _without_docstrings(tree: ast.AST) -> ast.AST:
    # The list of modules outside the training code changes no model: leave it out of the hash,
    # so a new chapter's module can join it without retraining every model.
    if isinstance(tree, ast.Module):
        tree.body = [node for node in tree.body if not (
            isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "OUTSIDE_TRAINING_CODE"
                                                 for t in node.targets))]
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=None)
def code_fingerprint(modules: tuple[str, ...]) -> str:
    """A short hash of the code of ``modules`` (a package counts with all its files).

    It hashes the syntax tree without docstrings, so a change of comments, docstrings or layout
    keeps it and any change of what the code does changes it. (The tree's printed form can differ
    between Python versions, so another Python may retrain a model rather than reuse it.)
    """
    h = hashlib.sha256()
    for name in sorted(modules):
        for path in _module_files(name):
            tree = _without_docstrings(ast.parse(path.read_text(encoding="utf-8")))
            h.update(f"{name}:{path.name}\n".encode())
            h.update(ast.dump(tree).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# What defines a model
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines a trained model except the data it is trained on.

    ``arch_kwargs`` is a tuple of ``(name, value)`` pairs so the spec stays hashable, e.g.
    ``ModelSpec("wide", arch_kwargs=(("width", 64),))``. ``early_stop`` (an
    :class:`utils.overfitting.EarlyStop`) watches the PGD accuracy during training; it is part of
    the key, and what it saw is kept with the checkpoint (:attr:`TrainedModel.guard`).

    ``shift`` (random shifts of up to that many pixels) and ``ema`` (the decay of a moving average
    of the weights) are :func:`utils.train.fit`'s options of the same names; at their defaults (0,
    off) they are left out of the key, so a recipe that does not use them keeps its key.

    ``checkpoint`` (a :class:`utils.overfitting.BestCheckpoint`, default None) sets validation digits
    aside from the training digits, measures the PGD accuracy on them after every epoch and ends with
    the best (or the last) weights; it is in the key with the fingerprint of the digits actually
    trained on, and what it measured is kept with the checkpoint (:attr:`TrainedModel.validation`).
    With ``early_stop`` as well, the early stop watches the digits trained on, and the checkpoint's
    choice of weights comes last.
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
    shift: int = 0
    ema: float = 0.0
    checkpoint: BestCheckpoint | None = None

    def __post_init__(self):
        if self.early_stop is not None and not isinstance(self.early_stop, EarlyStop):
            raise TypeError(f"early_stop must be an EarlyStop or None, got {type(self.early_stop).__name__}")
        if self.checkpoint is not None and not isinstance(self.checkpoint, BestCheckpoint):
            raise TypeError(f"checkpoint must be a BestCheckpoint or None, got {type(self.checkpoint).__name__}")
        if not isinstance(self.name, str) or not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"name must be non-empty letters, digits, '-' or '_', got {self.name!r}")
        integer("epochs", self.epochs, low=0)
        integer("batch_size", self.batch_size)
        real("lr", self.lr, open_low=True)
        integer("seed", self.seed, low=0)
        set_field(self, "shift", integer("shift", self.shift, low=0))
        set_field(self, "ema", real("ema", self.ema, high=1.0, open_high=True))

    def build(self) -> nn.Module:
        """A fresh model, initialised from ``seed``; the caller's global random state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return build_model(self.arch, **dict(self.arch_kwargs))

    def training_code(self) -> tuple[str, ...]:
        """The modules whose fingerprint is in this model's key: :data:`TRAINING_CODE`, plus the
        module that defines the objective when it lives elsewhere (a later chapter's objective)."""
        home = type(self.objective).__module__
        return TRAINING_CODE if home in TRAINING_CODE or not home.startswith("utils.") \
            else TRAINING_CODE + (home,)

    def key_dict(self, data: MNISTData) -> dict:
        extra = {} if self.early_stop is None else {"early_stop": self.early_stop.spec()}
        if self.shift:
            extra["shift"] = self.shift
        if self.ema:
            extra["ema"] = self.ema
        if self.checkpoint is not None:
            extra["checkpoint"] = {**self.checkpoint.spec(), "train_data": self.checkpoint.split(data)[0].key()}
        return {
            **extra,
            "format": FORMAT_VERSION,
            "code": code_fingerprint(self.training_code()),
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
    validation: dict | None = None  # what spec.checkpoint measured: epochs, accs, best_epoch, kept_epoch, n

    @property
    def stopped_early(self) -> bool:
        """Whether training was stopped by :class:`utils.overfitting.EarlyStop` (and the best epoch restored)."""
        return bool(self.guard and self.guard.get("stopped_at") is not None)

    @property
    def from_cache(self) -> bool:
        return self.status == "loaded from cache"

    def __repr__(self) -> str:
        return (f"TrainedModel({self.spec.name!r}, {self.status}, trained in {self.train_seconds:.1f}s "
                f"on {self.data_source}, key={self.key})")


# --------------------------------------------------------------------------------------------
# Checkpoint files: one file, its own digest in its first line
# --------------------------------------------------------------------------------------------

def checkpoint_path(spec: ModelSpec, data: MNISTData, cache: str | Path | None = None) -> Path:
    root = Path(cache) if cache is not None else config.cache_dir("models")
    return root / f"{spec.name}-{spec.key(data)}.pt"


def save_checkpoint(payload: dict, path: Path) -> None:
    """Write ``payload`` (``torch.save``-able) to ``path`` as one file: a header line with the
    SHA-256 digest of the body, then the body; atomically (:func:`utils.checks.atomic_write`)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = _MAGIC + b" " + str(FORMAT_VERSION).encode() + b" " + hashlib.sha256(body).hexdigest().encode() + b"\n"
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(header + body))


def read_checkpoint(path: Path) -> tuple[dict | None, str]:
    """``(payload, "")``, or ``(None, why it was rejected)``: missing, damaged, or unreadable."""
    if not path.exists():
        return None, "missing"
    raw = path.read_bytes()
    header, sep, body = raw.partition(b"\n")
    parts = header.split(b" ")
    if not sep or len(parts) != 3 or parts[0] != _MAGIC:
        return None, f"{path.name} is not a checkpoint of this book (no digest header)"
    if parts[1] != str(FORMAT_VERSION).encode():
        return None, f"{path.name} has format {parts[1].decode(errors='replace')}, not {FORMAT_VERSION}"
    if hashlib.sha256(body).hexdigest().encode() != parts[2]:
        return None, f"{path.name} is damaged (checksum mismatch)"
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:
        return None, f"{path.name} could not be read ({type(exc).__name__})"
    if not isinstance(payload, dict):
        return None, f"{path.name} does not hold a checkpoint"
    return payload, ""


@contextlib.contextmanager
def training_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` plus ``.lock`` for the block: a second process asking for
    the same lock waits until the first releases it (POSIX ``flock``; a no-op where it is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_into(path: Path, key: str, model: nn.Module) -> tuple[dict | None, str]:
    payload, why = read_checkpoint(path)
    if payload is None:
        return None, why
    if payload.get("key") != key or payload.get("format") != FORMAT_VERSION:
        return None, f"{path.name} belongs to another model or format"
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except Exception as exc:
        return None, f"{path.name} does not fit the architecture ({type(exc).__name__})"
    return payload, ""


def _from_payload(model, spec, key, path, payload, data) -> TrainedModel:
    guard = json.loads(payload["guard"]) if payload.get("guard") else None
    validation = json.loads(payload["validation"]) if payload.get("validation") else None
    return TrainedModel(model, spec, key, path, History.from_list(payload["history"]),
                        float(payload["train_seconds"]), "loaded from cache", data.source, guard, validation)


# --------------------------------------------------------------------------------------------
# Load or train
# --------------------------------------------------------------------------------------------

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
    :class:`CacheWarning` and is replaced by a freshly trained model. Building and training draw
    from forked random generators seeded by ``spec.seed``, so the caller's global random state is
    the same afterwards whether the model was trained or loaded.
    """
    device = torch.device(device) if device is not None else config.get_device()
    key = spec.key(data)
    path = checkpoint_path(spec, data, cache)
    status = "trained"
    with training_lock(path):
        model = spec.build()
        if not retrain:
            payload, why = _load_into(path, key, model)
            if payload is not None:
                model.to(device).eval()
                return _from_payload(model, spec, key, path, payload, data)
            if why != "missing":
                warnings.warn(f"retraining {spec.name!r}: {why}", CacheWarning, stacklevel=2)
                status = f"retrained: {why}"
                model = spec.build()  # never continue from weights that were partly loaded
        model.to(device)
        history, seconds, guard, validation = _train(spec, data, model, progress)
        payload = {
            "format": FORMAT_VERSION,
            "key": key,
            "key_dict": json.dumps(spec.key_dict(data), sort_keys=True, default=str),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "history": history.to_list(),
            "train_seconds": seconds,
            "guard": json.dumps(guard) if guard is not None else "",
            "validation": json.dumps(validation) if validation is not None else "",
        }
        save_checkpoint(payload, path)
    model.eval()
    return TrainedModel(model, spec, key, path, history, seconds, status, data.source, guard, validation)


def _train(spec: ModelSpec, data: MNISTData, model: nn.Module,
           progress: bool) -> tuple[History, float, dict | None, dict | None]:
    """Train ``model`` as ``spec`` says; return its history, the seconds it took, what the
    early-stopping check measured and what the best-checkpoint watch measured (None without them)."""
    watch = None
    if spec.checkpoint is not None:
        data, x_val, y_val = spec.checkpoint.split(data)
        watch = spec.checkpoint.watch(x_val, y_val)
    check = None if spec.early_stop is None else spec.early_stop.check(data.x_train, data.y_train)
    callbacks = [c for c in (watch, check) if c is not None]

    def callback(model: nn.Module, record) -> None:
        for c in callbacks:
            c(model, record)

    stopped_at = None
    start = time.perf_counter()
    try:
        history = fit(model, data.x_train, data.y_train, spec.objective, epochs=spec.epochs,
                      batch_size=spec.batch_size, lr=spec.lr, schedule=spec.schedule,
                      weight_decay=spec.weight_decay, seed=spec.seed, x_test=data.x_test, y_test=data.y_test,
                      progress=progress, callback=callback if callbacks else None, shift=spec.shift, ema=spec.ema)
    except CatastrophicOverfitting as stop:
        history = stop.history
        stopped_at = stop.event.epoch
        check.restore(model)
        if progress:
            print(f"{spec.name}: {stop}; stopped and restored the weights of epoch {check.best_epoch}")
    if watch is not None and watch.epochs:
        watch.finish(model)
    seconds = time.perf_counter() - start
    return (history, seconds, None if check is None else check.record(stopped_at),
            None if watch is None else watch.record())

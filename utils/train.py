"""The one training loop of the book; what differs between models is the *objective*.

An objective is a small frozen dataclass called as ``objective(model, x, y, progress=t)`` that
returns a :class:`StepOutput` (the loss to minimise, the logits whose accuracy is reported, and
named loss terms for the history). ``progress`` runs from 0 to 1 over training, so an objective
can schedule its own parameters (the ε warm-up of adversarial training, chapter 6). Its
:meth:`spec` is part of the cache key of every model trained with it (:mod:`utils.cache`).

The objectives live in :mod:`utils.objectives` (clean data: cross-entropy, temperature, distillation),
:mod:`utils.defences` (adversarial training and its variants) and :mod:`utils.trades` (TRADES); the
watches for catastrophic and robust overfitting are :func:`fit` callbacks in :mod:`utils.overfitting`.

:func:`fit` draws its random numbers (the shuffling, and the random starts of the attacks inside
adversarial objectives) from generators seeded by its ``seed``, inside
``torch.random.fork_rng``: training is repeatable, and the caller's global random state is the
same after :func:`fit` as before, whether a model was trained or loaded from the cache.

Two options of :func:`fit` change what is trained beyond the objective (Rebuffi et al. 2021, who
show that together they reduce robust overfitting): ``shift``, random shifts of every training
digit by up to that many pixels (:func:`utils.augment.random_shift`), and ``ema``, an exponential
moving average of the weights (:class:`WeightAverage`) that becomes the returned model's weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .augment import random_shift
from .checks import check_images, check_labels, choice, integer, real
from .evaluate import Metrics, evaluate
from .models import kept_modes, model_device


@dataclass
class StepOutput:
    """What an objective returns for one batch."""

    loss: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput: ...

    def spec(self) -> dict: ...


@dataclass(frozen=True)
class EpochRecord:
    """One row of a training history."""

    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float | None
    test_acc: float | None
    seconds: float
    lr: float
    terms: dict[str, float]

    def __repr__(self) -> str:
        test = "" if self.test_acc is None else f", test_acc={100 * self.test_acc:.2f}%"
        return (f"EpochRecord(epoch={self.epoch}, train_loss={self.train_loss:.4f}, "
                f"train_acc={100 * self.train_acc:.2f}%{test}, {self.seconds:.1f}s)")


@dataclass
class History:
    """The per-epoch records of one training run."""

    records: list[EpochRecord] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def column(self, name: str) -> list:
        return [getattr(r, name) for r in self.records]

    def to_list(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    @classmethod
    def from_list(cls, rows: list[dict]) -> "History":
        return cls([EpochRecord(**r) for r in rows])

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        if not self.records:
            return "History(empty)"
        last = self.records[-1]
        return f"History({len(self.records)} epochs, {self.seconds:.1f}s, last: {last!r})"


class StopTraining(Exception):
    """Raised by a :func:`fit` callback to end training after the current epoch.

    :func:`fit` sets ``.history`` to the :class:`History` of the epochs completed so far (the
    epoch whose callback raised included) and re-raises, so the caller can keep it.
    """

    def __init__(self, message: str = "training stopped by a callback"):
        super().__init__(message)
        self.history: History | None = None


SCHEDULES = ("constant", "cosine")


def _lr_at(schedule: str, lr: float, t: float) -> float:
    if schedule == "constant":
        return lr
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


class WeightAverage:
    """An exponential moving average of a model's trainable parameters, with Adam's bias correction.

    After step ``t`` (:meth:`update`, called after each optimiser step) the average of every
    parameter is ``Σ_{k≤t} (1 − τ)·τ^(t−k)·w_k / (1 − τ^t)``: the weights ``w_1 … w_t`` after each
    step, the recent ones counting most, normalised so that the weights sum to 1 (without the
    correction the initial random weights would count ``τ^t``, most of the average in a short run).
    ``τ = 0`` is the last weights exactly. Only parameters that require a gradient are averaged;
    buffers (a normalisation's constants, a BatchNorm's running statistics, which are running
    averages already) are left as the live model has them. Rebuffi, Gowal, Calian, Stimberg, Wiles
    & Mann, "Data augmentation can improve robustness", NeurIPS 2021 (τ = 0.999 on CIFAR-10).
    Introduced in chapter 6.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = real("ema", decay, high=1.0, open_high=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sums = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average (one optimiser step)."""
        self.steps += 1
        for s, p in zip(self.sums, self.params):
            s.mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    def averages(self) -> list[torch.Tensor]:
        """The averaged weights, one tensor per averaged parameter (the live ones before any step)."""
        if self.steps == 0:
            return [p.detach().clone() for p in self.params]
        correction = 1.0 - self.decay ** self.steps
        return [s / correction for s in self.sums]

    @contextlib.contextmanager
    def swapped_in(self, keep: bool = False):
        """For the block, the model holds the averaged weights; afterwards its live weights come
        back, unless ``keep`` or the block raised :class:`StopTraining` (training ends there)."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.averages()):
                p.copy_(a)
        try:
            yield
        except StopTraining:
            keep = True
            raise
        finally:
            if not keep:
                with torch.no_grad():
                    for p, w in zip(self.params, live):
                        p.copy_(w)


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, *, shuffle: bool = False,
                seed: int = 0) -> DataLoader:
    """A ``DataLoader`` over tensors; shuffling is seeded, so two loaders built alike agree."""
    check_images(x)
    check_labels(y, num_classes=None, n=len(x))
    batch_size = integer("batch_size", batch_size)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def fit(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    objective: Objective,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    seed: int = 0,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    progress: bool = True,
    callback: Callable[[nn.Module, EpochRecord], None] | None = None,
    shift: int = 0,
    ema: float = 0.0,
) -> History:
    """Train ``model`` in place with Adam on ``objective`` and return its :class:`History`.

    Batches are shuffled with a generator seeded by ``seed``, and the global generator is forked
    and seeded with ``seed`` for the objective's own draws (restored afterwards). The learning rate
    follows ``schedule`` per step. After every epoch the model is evaluated on ``(x_test, y_test)``
    when given, and ``callback(model, record)`` is called. To stop training early a callback raises
    :class:`StopTraining` (or a subclass such as :class:`utils.overfitting.CatastrophicOverfitting`):
    ``fit`` attaches the history so far to the exception as ``.history`` and lets it propagate, so
    the caller decides what to do (``except StopTraining as stop: history = stop.history``). Any
    other exception propagates unchanged.

    Modes: a model handed over in evaluation mode is trained in training mode; one handed over in
    training mode is trained as it is, so a submodule the caller froze in evaluation mode (a
    BatchNorm) stays frozen. Afterwards every module's mode is what it was before.

    ``shift`` (pixels, default 0: off): every training batch is shifted at random, each image by up
    to ``shift`` pixels in each direction with zeros filling in (:func:`utils.augment.random_shift`);
    the shifts come from a generator of their own seeded with ``seed``, so training stays repeatable
    and the objective's own random draws are the same with and without shifts.

    ``ema`` (the decay τ in [0, 1), default 0: off): an exponential moving average of the weights
    is kept over every optimiser step (:class:`WeightAverage`, bias-corrected), and the model
    ``fit`` leaves behind holds the *averaged* weights (also when a callback stops training). The
    per-epoch test evaluation and the callback see the averaged weights too, the model as it would
    be returned at that epoch; training itself goes on from the live weights, so the optimiser's
    path is the same as without ``ema``. ``train_loss`` and ``train_acc`` are those of the live
    weights during the epoch. ``ema=0`` is the last weights, i.e. no averaging.
    """
    check_images(x_train, name="x_train")
    check_labels(y_train, n=len(x_train), name="y_train")
    epochs = integer("epochs", epochs, low=0)
    lr = real("lr", lr, open_low=True)
    weight_decay = real("weight_decay", weight_decay)
    schedule = choice("schedule", schedule, SCHEDULES)
    seed = integer("seed", seed, low=0)
    shift = integer("shift", shift, low=0)
    ema = real("ema", ema, high=1.0, open_high=True)
    device = model_device(model)
    loader = make_loader(x_train, y_train, batch_size, shuffle=True, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = max(1, epochs * len(loader))
    history = History()
    train_all = not model.training
    bar = tqdm(total=total_steps, desc="training", disable=not progress, leave=True)
    step = 0
    shifts = torch.Generator().manual_seed(seed) if shift else None
    average = WeightAverage(model, ema) if ema > 0.0 else None
    with kept_modes(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            for epoch in range(1, epochs + 1):
                if train_all:
                    model.train()
                start = time.perf_counter()
                loss_sum, correct, n = 0.0, 0, 0
                term_sums: dict[str, float] = {}
                current_lr = lr
                for xb, yb in loader:
                    xb, yb = xb.to(device), yb.to(device)
                    if shift:
                        xb = random_shift(xb, shift, shifts)
                    t = step / total_steps
                    current_lr = _lr_at(schedule, lr, t)
                    for group in opt.param_groups:
                        group["lr"] = current_lr
                    out = objective(model, xb, yb, progress=t)
                    if not torch.isfinite(out.loss):
                        raise FloatingPointError(f"the training loss became {out.loss.item()} at epoch {epoch}, "
                                                 f"step {step}")
                    opt.zero_grad(set_to_none=True)
                    out.loss.backward()
                    opt.step()
                    if average is not None:
                        average.update()
                    step += 1
                    bs = len(yb)
                    loss_sum += out.loss.item() * bs
                    correct += (out.logits.detach().argmax(1) == yb).sum().item()
                    n += bs
                    for k, v in out.terms.items():
                        term_sums[k] = term_sums.get(k, 0.0) + float(v) * bs
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss_sum / n:.3f}", acc=f"{100 * correct / n:.1f}%")
                seconds = time.perf_counter() - start
                averaged = contextlib.nullcontext() if average is None else average.swapped_in(keep=epoch == epochs)
                with averaged:
                    test: Metrics | None = None
                    if x_test is not None and y_test is not None:
                        test = evaluate(model, x_test, y_test)
                    record = EpochRecord(
                        epoch=epoch,
                        train_loss=loss_sum / max(n, 1),
                        train_acc=correct / max(n, 1),
                        test_loss=None if test is None else test.loss,
                        test_acc=None if test is None else test.acc,
                        seconds=seconds,
                        lr=current_lr,
                        terms={k: v / max(n, 1) for k, v in term_sums.items()},
                    )
                    history.records.append(record)
                    if callback is not None:
                        callback(model, record)
        except StopTraining as stop:
            stop.history = history
            raise
        finally:
            bar.close()
            # Leave no gradients behind: a freshly trained model and one loaded from the cache must be
            # indistinguishable (attacks check that they write no parameter gradient).
            model.zero_grad(set_to_none=True)
    return history

"""One training loop for every model in the book; what differs between defences is the *objective*.

An objective is a small frozen dataclass called as ``objective(model, x, y, progress=t)`` that
returns a :class:`StepOutput` (the loss to minimise, the logits whose accuracy is reported, and
named loss terms for the history). ``progress`` runs from 0 to 1 over training, so an objective
can schedule its own parameters (the ε warm-up of adversarial training, chapter 6). Its
:meth:`spec` is part of the cache key of every model trained with it (:mod:`utils.zoo`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import check_images, check_labels, make_loader
from .evaluate import Metrics, evaluate, model_device


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
class CrossEntropy:
    """Standard training: minimise the cross-entropy on clean inputs."""

    label_smoothing: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return StepOutput(loss, logits, {"ce": loss.item()})

    def spec(self) -> dict:
        return {"objective": "cross_entropy", **asdict(self)}


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


SCHEDULES = ("constant", "cosine")


def _lr_at(schedule: str, lr: float, t: float) -> float:
    if schedule == "constant":
        return lr
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


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
) -> History:
    """Train ``model`` in place with Adam on ``objective`` and return its :class:`History`.

    Batches are shuffled with a generator seeded by ``seed``; the learning rate follows
    ``schedule`` per step. After every epoch the model is evaluated on ``(x_test, y_test)`` when
    given, and ``callback(model, record)`` is called (it may raise to stop training). The model
    is left in the mode it was in before.
    """
    check_images(x_train, name="x_train")
    check_labels(y_train, n=len(x_train), name="y_train")
    if epochs < 0:
        raise ValueError(f"epochs must be non-negative, got {epochs}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    device = model_device(model)
    loader = make_loader(x_train, y_train, batch_size, shuffle=True, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = max(1, epochs * len(loader))
    history = History()
    was_training = model.training
    bar = tqdm(total=total_steps, desc="training", disable=not progress, leave=True)
    step = 0
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            start = time.perf_counter()
            loss_sum, correct, n = 0.0, 0, 0
            term_sums: dict[str, float] = {}
            for xb, yb in loader:
                xb, yb = xb.to(device), yb.to(device)
                t = step / total_steps
                current_lr = _lr_at(schedule, lr, t)
                for group in opt.param_groups:
                    group["lr"] = current_lr
                out = objective(model, xb, yb, progress=t)
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"the training loss became {out.loss.item()} at epoch {epoch}, step {step}")
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
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
                lr=current_lr if epochs else lr,
                terms={k: v / max(n, 1) for k, v in term_sums.items()},
            )
            history.records.append(record)
            if callback is not None:
                callback(model, record)
    finally:
        bar.close()
        model.train(was_training)
    return history

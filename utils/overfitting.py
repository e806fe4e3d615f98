"""Watching adversarial training for catastrophic overfitting, and stopping early (chapter 6).

:class:`EarlyStop` is the rule (what to measure, how large a fall counts, what to do), a frozen
value that goes into a model's cache key; :class:`CatastrophicOverfittingCheck` applies it to a
fixed batch as a :func:`utils.train.fit` callback and keeps what it measured and the best weights.
Wong, Rice & Kolter (2020) stop FGSM training when the PGD accuracy on a training minibatch
collapses and keep the weights of the best epoch; that is ``EarlyStop(action="stop")``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .attacks import pgd
from .checks import check_images, check_labels, choice, integer, real
from .evaluate import evaluate
from .objectives import set_field
from .train import EpochRecord, StopTraining

ACTIONS = ("stop", "record")


@dataclass(frozen=True)
class EarlyStop:
    """The rule: after every epoch, measure the PGD accuracy on the first ``n`` *training* examples
    (L∞ ``eps``, ``steps`` steps of ``alpha``, default ``2.5·eps/steps``, one random start drawn from a
    generator seeded with ``seed``, so every epoch faces the same attack). A fall of more than ``drop``
    (an absolute fraction: 0.2 is 20 points) below the best earlier epoch is catastrophic
    overfitting. With ``action="stop"`` training stops there and the weights of the best epoch are
    restored; with ``action="record"`` training runs to the end and the measurements are only kept,
    which is how chapter 6 shows the collapse.

    The check batch is a training minibatch, as in Wong et al.: no held-out digit takes part in
    choosing the weights.
    """

    eps: float = 0.3
    steps: int = 10
    drop: float = 0.2
    n: int = 256
    action: str = "stop"
    alpha: float | None = None
    seed: int = 0

    def __post_init__(self):
        set_field(self, "eps", real("eps", self.eps, open_low=True))
        set_field(self, "steps", integer("steps", self.steps))
        set_field(self, "drop", real("drop", self.drop, high=1.0, open_low=True))
        set_field(self, "n", integer("n", self.n))
        set_field(self, "action", choice("action", self.action, ACTIONS))
        if self.alpha is not None:
            set_field(self, "alpha", real("alpha", self.alpha, open_low=True))
        set_field(self, "seed", integer("seed", self.seed, low=0))

    def check(self, x_train: torch.Tensor, y_train: torch.Tensor) -> "CatastrophicOverfittingCheck":
        """The :func:`utils.train.fit` callback applying this rule to the first ``n`` training examples."""
        return CatastrophicOverfittingCheck(x_train[: self.n], y_train[: self.n], self)

    def spec(self) -> dict:
        spec = {"eps": self.eps, "steps": self.steps, "drop": self.drop, "n": self.n, "action": self.action}
        if self.alpha is not None or self.seed != 0:
            spec.update(alpha=self.alpha, seed=self.seed)
        return spec


@dataclass(frozen=True)
class OverfittingEvent:
    """One epoch at which the PGD accuracy fell more than ``drop`` below the best seen before it."""

    epoch: int
    acc: float
    best_acc: float
    best_epoch: int

    def __repr__(self) -> str:
        return (f"OverfittingEvent(epoch={self.epoch}, PGD acc {100 * self.acc:.1f}% vs best "
                f"{100 * self.best_acc:.1f}% at epoch {self.best_epoch})")


class CatastrophicOverfitting(StopTraining):
    """Raised by :class:`CatastrophicOverfittingCheck` (``action="stop"``); ``.event`` says where."""

    def __init__(self, event: OverfittingEvent):
        super().__init__(
            f"catastrophic overfitting at epoch {event.epoch}: PGD accuracy {100 * event.acc:.1f}% "
            f"fell from the best {100 * event.best_acc:.1f}% (epoch {event.best_epoch})")
        self.event = event


class CatastrophicOverfittingCheck:
    """A :func:`utils.train.fit` callback that applies an :class:`EarlyStop` rule to a fixed batch.

    After each epoch it measures the PGD accuracy on ``(x_check, y_check)`` (:meth:`measure`). A
    fall of more than ``rule.drop`` below the best earlier epoch is recorded in ``events`` and, with
    ``rule.action == "stop"``, raises :class:`CatastrophicOverfitting`, which :func:`utils.train.fit`
    passes on with the history so far. It keeps a copy of the weights of the best epoch so far (ties
    go to the later epoch) in ``best_state``; :meth:`restore` loads it::

        check = EarlyStop(eps=0.3).check(x_train, y_train)
        try:
            history = fit(model, x_train, y_train, FastFGSM(eps=0.3), epochs=10, callback=check)
        except CatastrophicOverfitting as stop:
            history = stop.history
            check.restore(model)

    ``epochs`` and ``accs`` hold the measurements. Introduced in chapter 6.
    """

    def __init__(self, x_check: torch.Tensor, y_check: torch.Tensor, rule: EarlyStop | None = None):
        check_images(x_check, name="x_check")
        check_labels(y_check, n=len(x_check), name="y_check")
        if len(x_check) == 0:
            raise ValueError("x_check must hold at least one example")
        if rule is None:
            rule = EarlyStop()
        if not isinstance(rule, EarlyStop):
            raise TypeError(f"rule must be an EarlyStop, got {type(rule).__name__}")
        self.x_check, self.y_check, self.rule = x_check, y_check, rule
        self.epochs: list[int] = []
        self.accs: list[float] = []
        self.events: list[OverfittingEvent] = []
        self.best_acc: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    @property
    def fired(self) -> bool:
        """Whether catastrophic overfitting has been seen."""
        return bool(self.events)

    def measure(self, model: nn.Module) -> float:
        """PGD accuracy of ``model`` on the check batch (the same attack, seed included, every time)."""
        r = self.rule
        attack = functools.partial(pgd, eps=r.eps, alpha=r.alpha, steps=r.steps, random_start=True,
                                   generator=torch.Generator().manual_seed(r.seed))
        return evaluate(model, self.x_check, self.y_check, attack).acc

    def update(self, model: nn.Module, acc: float, epoch: int) -> OverfittingEvent | None:
        """Record the accuracy ``acc`` of epoch ``epoch``; return the event if it is one (never raises)."""
        acc = float(acc)
        self.epochs.append(int(epoch))
        self.accs.append(acc)
        event = None
        if self.best_acc is not None and acc < self.best_acc - self.rule.drop:
            event = OverfittingEvent(int(epoch), acc, self.best_acc, self.best_epoch)
            self.events.append(event)
        if self.best_acc is None or acc >= self.best_acc:
            self.best_acc, self.best_epoch = acc, int(epoch)
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return event

    def __call__(self, model: nn.Module, record: EpochRecord) -> None:
        event = self.update(model, self.measure(model), record.epoch)
        if event is not None and self.rule.action == "stop":
            raise CatastrophicOverfitting(event)

    def restore(self, model: nn.Module) -> nn.Module:
        """Load the weights of the best epoch into ``model`` (in place) and return it."""
        if self.best_state is None:
            raise RuntimeError("no epoch has been measured yet, so there are no best weights to restore")
        model.load_state_dict(self.best_state)
        return model

    def record(self, stopped_at: int | None = None) -> dict:
        """What was measured, as plain data (kept with a checkpoint as its ``guard``)."""
        return {"epochs": self.epochs, "accs": self.accs, "best_epoch": self.best_epoch,
                "best_acc": self.best_acc, "stopped_at": stopped_at,
                "events": [{"epoch": e.epoch, "acc": e.acc, "best_acc": e.best_acc, "best_epoch": e.best_epoch}
                           for e in self.events]}

    def __repr__(self) -> str:
        r = self.rule
        best = "none yet" if self.best_acc is None else f"{100 * self.best_acc:.1f}% at epoch {self.best_epoch}"
        return (f"CatastrophicOverfittingCheck(eps={r.eps:g}, steps={r.steps}, drop={r.drop:g}, "
                f"action={r.action!r}, {len(self.accs)} epochs measured, best {best}, "
                f"{len(self.events)} events)")

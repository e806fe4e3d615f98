"""Watching adversarial training for catastrophic and robust overfitting (chapter 6).

:class:`EarlyStop` is the rule (what to measure, how large a fall counts, what to do), a frozen
value that goes into a model's cache key; :class:`CatastrophicOverfittingCheck` applies it to a
fixed batch as a :func:`utils.train.fit` callback and keeps what it measured and the best weights.
Wong, Rice & Kolter (2020) stop FGSM training when the PGD accuracy on a training minibatch
collapses and keep the weights of the best epoch; that is ``EarlyStop(action="stop")``.

:class:`BestCheckpoint` is the rule against *robust* overfitting (Rice, Wong & Kolter 2020): the
PGD accuracy on validation digits carved from the training digits is measured after every epoch
(:class:`BestCheckpointWatch`, a :func:`utils.train.fit` callback), and the model ends with the
weights of the best epoch (``keep="best"``) or of the last one (``keep="last"``), to compare them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .attacks import pgd
from .checks import check_images, check_labels, choice, integer, real
from .data import MNISTData, validation_split
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


class _RobustAccuracyWatch:
    """What both watches share: a fixed batch, the PGD accuracy on it (the same attack, seed included,
    every epoch), the accuracies measured, and a copy of the weights of the best epoch so far (ties
    go to the later epoch)."""

    #: The class of the watch's rule; ``rule=None`` means its defaults.
    RULE: type

    def __init__(self, x_check: torch.Tensor, y_check: torch.Tensor, rule=None):
        if rule is None:
            rule = self.RULE()
        if not isinstance(rule, self.RULE):
            raise TypeError(f"rule must be a{'n' if self.RULE.__name__[0] in 'AEIOU' else ''} "
                            f"{self.RULE.__name__}, got {type(rule).__name__}")
        check_images(x_check, name="x_check")
        check_labels(y_check, n=len(x_check), name="y_check")
        if len(x_check) == 0:
            raise ValueError("x_check must hold at least one example")
        self.x_check, self.y_check, self.rule = x_check, y_check, rule
        self.epochs: list[int] = []
        self.accs: list[float] = []
        self.best_acc: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def measure(self, model: nn.Module) -> float:
        """PGD accuracy of ``model`` on the check batch (the same attack, seed included, every time)."""
        r = self.rule
        attack = functools.partial(pgd, eps=r.eps, alpha=r.alpha, steps=r.steps, random_start=True,
                                   generator=torch.Generator().manual_seed(r.seed))
        return evaluate(model, self.x_check, self.y_check, attack).acc

    def _keep(self, model: nn.Module, acc: float, epoch: int) -> None:
        self.epochs.append(int(epoch))
        self.accs.append(acc)
        if self.best_acc is None or acc >= self.best_acc:
            self.best_acc, self.best_epoch = acc, int(epoch)
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self, model: nn.Module) -> nn.Module:
        """Load the weights of the best epoch into ``model`` (in place) and return it."""
        if self.best_state is None:
            raise RuntimeError("no epoch has been measured yet, so there are no best weights to restore")
        model.load_state_dict(self.best_state)
        return model


class CatastrophicOverfittingCheck(_RobustAccuracyWatch):
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

    RULE = EarlyStop

    def __init__(self, x_check: torch.Tensor, y_check: torch.Tensor, rule: EarlyStop | None = None):
        super().__init__(x_check, y_check, rule)
        self.events: list[OverfittingEvent] = []

    @property
    def fired(self) -> bool:
        """Whether catastrophic overfitting has been seen."""
        return bool(self.events)

    def update(self, model: nn.Module, acc: float, epoch: int) -> OverfittingEvent | None:
        """Record the accuracy ``acc`` of epoch ``epoch``; return the event if it is one (never raises)."""
        acc = float(acc)
        event = None
        if self.best_acc is not None and acc < self.best_acc - self.rule.drop:
            event = OverfittingEvent(int(epoch), acc, self.best_acc, self.best_epoch)
            self.events.append(event)
        self._keep(model, acc, epoch)
        return event

    def __call__(self, model: nn.Module, record: EpochRecord) -> None:
        event = self.update(model, self.measure(model), record.epoch)
        if event is not None and self.rule.action == "stop":
            raise CatastrophicOverfitting(event)

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


# --------------------------------------------------------------------------------------------
# Robust overfitting: the best checkpoint on validation digits (Rice et al. 2020)
# --------------------------------------------------------------------------------------------

KEEPS = ("best", "last")


@dataclass(frozen=True)
class BestCheckpoint:
    """The rule against robust overfitting: keep the checkpoint with the best robust accuracy on
    validation digits carved from the training digits.

    ``n`` training digits (stratified, chosen with ``seed``: :func:`utils.data.validation_split`)
    are set aside and not trained on. After every epoch the PGD accuracy on them is measured (L∞
    ``eps``, ``steps`` steps of ``alpha``, default ``2.5·eps/steps``, one random start from a
    generator seeded with ``seed``: the same attack every epoch). ``keep="best"``: the model ends
    with the weights of the epoch with the highest validation accuracy (ties: the later epoch);
    ``keep="last"``: with the last weights, trained on the same digits, which is the comparison Rice
    et al. make. The test digits take no part.

    Rice, Wong & Kolter, "Overfitting in adversarially robust deep learning", ICML 2020.
    Introduced in chapter 6.
    """

    n: int = 500
    eps: float = 0.3
    steps: int = 10
    alpha: float | None = None
    keep: str = "best"
    seed: int = 0

    def __post_init__(self):
        set_field(self, "n", integer("n", self.n))
        set_field(self, "eps", real("eps", self.eps, open_low=True))
        set_field(self, "steps", integer("steps", self.steps))
        if self.alpha is not None:
            set_field(self, "alpha", real("alpha", self.alpha, open_low=True))
        set_field(self, "keep", choice("keep", self.keep, KEEPS))
        set_field(self, "seed", integer("seed", self.seed, low=0))

    def split(self, data: MNISTData) -> tuple[MNISTData, torch.Tensor, torch.Tensor]:
        """``(train, x_val, y_val)``: the data to train on, without the validation digits, and those digits."""
        return validation_split(data, self.n, seed=self.seed)

    def watch(self, x_val: torch.Tensor, y_val: torch.Tensor) -> "BestCheckpointWatch":
        """The :func:`utils.train.fit` callback applying this rule to the validation digits."""
        return BestCheckpointWatch(x_val, y_val, self)

    def spec(self) -> dict:
        return {"n": self.n, "eps": self.eps, "steps": self.steps, "alpha": self.alpha, "keep": self.keep,
                "seed": self.seed}


class BestCheckpointWatch(_RobustAccuracyWatch):
    """A :func:`utils.train.fit` callback that applies a :class:`BestCheckpoint` rule: after every
    epoch it measures the PGD accuracy on the validation digits and keeps a copy of the best
    weights so far; :meth:`finish` then leaves the model with the weights the rule keeps::

        rule = BestCheckpoint(n=500, eps=0.3)
        train, x_val, y_val = rule.split(data)
        watch = rule.watch(x_val, y_val)
        history = fit(model, train.x_train, train.y_train, objective, epochs=20, callback=watch)
        watch.finish(model)

    It never stops training. With :func:`utils.train.fit`'s ``ema``, it sees (and keeps) the
    averaged weights. Introduced in chapter 6.
    """

    RULE = BestCheckpoint

    def __init__(self, x_val: torch.Tensor, y_val: torch.Tensor, rule: BestCheckpoint | None = None):
        super().__init__(x_val, y_val, rule)

    def __call__(self, model: nn.Module, record: EpochRecord) -> None:
        self._keep(model, float(self.measure(model)), record.epoch)

    def finish(self, model: nn.Module) -> nn.Module:
        """The best weights loaded into ``model`` with ``keep="best"``; ``model`` untouched with ``"last"``."""
        return self.restore(model) if self.rule.keep == "best" else model

    def record(self) -> dict:
        """What was measured, as plain data (kept with a checkpoint)."""
        last = self.epochs[-1] if self.epochs else None
        return {"epochs": self.epochs, "accs": self.accs, "best_epoch": self.best_epoch, "best_acc": self.best_acc,
                "kept_epoch": self.best_epoch if self.rule.keep == "best" else last, "n": len(self.y_check)}

    def __repr__(self) -> str:
        r = self.rule
        best = "none yet" if self.best_acc is None else f"{100 * self.best_acc:.1f}% at epoch {self.best_epoch}"
        return (f"BestCheckpointWatch(eps={r.eps:g}, steps={r.steps}, keep={r.keep!r}, {len(self.y_check)} "
                f"validation digits, {len(self.accs)} epochs measured, best {best})")

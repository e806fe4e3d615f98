"""One training loop for every model in the book; what differs between defences is the *objective*.

An objective is a small frozen dataclass called as ``objective(model, x, y, progress=t)`` that
returns a :class:`StepOutput` (the loss to minimise, the logits whose accuracy is reported, and
named loss terms for the history). ``progress`` runs from 0 to 1 over training, so an objective
can schedule its own parameters (the ε warm-up of adversarial training, chapter 6). Its
:meth:`spec` is part of the cache key of every model trained with it (:mod:`utils.zoo`).

The objectives of the book:

* :class:`CrossEntropy`: standard training (chapter 2).
* :class:`PGDAdversarial`: Madry et al.'s PGD adversarial training, and :class:`FastFGSM`, Wong,
  Rice & Kolter's FGSM with a random start, with :class:`CatastrophicOverfittingCheck` to watch
  for catastrophic overfitting (chapter 6).
* :class:`LogitPairing`: adversarial and clean logit pairing, Kannan, Kurakin & Goodfellow
  (chapter 7).
* :class:`EnergyPairing`: the book's "EnAET", adversarial training plus an energy pairing term,
  optionally weighted after WEAT (chapter 8).

Every adversarial objective builds its adversarial batch with :func:`utils.attacks.pgd` (or, for
fast FGSM, one step of the same kind) on the current model: the attack runs in evaluation mode,
takes gradients with respect to the input only and writes no parameter's ``.grad``, so the only
gradients that reach the weights are those of the returned loss. The adversarial batch is a
constant of the outer minimisation (Danskin's theorem, as in Madry et al.). Random starts draw
from torch's global generator, which :meth:`utils.zoo.ModelSpec.build` seeds.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .attacks import NORMS, _attacking, pgd
from .data import check_images, check_labels, make_loader
from .energy import energy
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
    given, and ``callback(model, record)`` is called. To stop training early a callback raises
    :class:`StopTraining` (or a subclass such as :class:`CatastrophicOverfitting`): ``fit``
    attaches the history so far to the exception as ``.history`` and lets it propagate, so the
    caller decides what to do (``except StopTraining as stop: history = stop.history``). Any
    other exception propagates unchanged. The model is left in the mode it was in before.
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
    except StopTraining as stop:
        stop.history = history
        raise
    finally:
        bar.close()
        # Leave no gradients behind: a freshly trained model and one loaded from the cache must be
        # indistinguishable (attacks check that they write no parameter gradient).
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return history


# --------------------------------------------------------------------------------------------
# Checks at the boundary of the defences (one sentence: what was wrong and what is expected)
# --------------------------------------------------------------------------------------------

def _number(name: str, value, *, low: float = 0.0, high: float = math.inf, open_low: bool = False,
            open_high: bool = False) -> float:
    """``value`` as a float, or a clear error unless it is a finite real number in the interval."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    too_low = v < low or (open_low and v == low)
    too_high = v > high or (open_high and v == high)
    if not math.isfinite(v) or too_low or too_high:
        if high == math.inf:
            where = f"{'>' if open_low else '>='} {low:g}"
        else:
            where = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be a finite number {where}, got {value!r}")
    return v


def _count(name: str, value, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    return int(value)


def _switch(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _one_of(name: str, value, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value.lower()


def _set(obj, name: str, value) -> None:
    """Store a normalised field value on a frozen dataclass (so ``eps=0`` and ``eps=0.0`` give one spec)."""
    object.__setattr__(obj, name, value)


# --------------------------------------------------------------------------------------------
# The inner maximisation, one source of truth for every PGD-based objective
# --------------------------------------------------------------------------------------------

def _warmup_scale(progress: float, warmup: float) -> float:
    """The fraction of ε in force at ``progress``: a linear ramp from 0 to 1 over ``[0, warmup]``."""
    if warmup <= 0.0:
        return 1.0
    return min(max(float(progress) / warmup, 0.0), 1.0)


def _pgd_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
               steps: int, random_start: bool, norm: str, warmup: float,
               progress: float) -> tuple[torch.Tensor, float]:
    """The adversarial batch for the current model and ε schedule, and the ε in force.

    ε and the step size α are both multiplied by the warm-up fraction at ``progress``. With an ε
    of 0 (no attack, or the very start of a warm-up) the batch is ``x`` itself and no attack runs.
    Otherwise it is :func:`utils.attacks.pgd` on the current weights (evaluation mode, no
    parameter gradients written), detached: the outer minimisation treats it as a constant.
    """
    scale = _warmup_scale(progress, warmup)
    eps_now = eps * scale
    if eps_now == 0.0:
        return x.detach(), 0.0
    x_adv = pgd(model, x, y, eps_now, alpha=alpha * scale, steps=steps, norm=norm, random_start=random_start)
    return x_adv.detach(), eps_now


class _InnerPGD:
    """What the PGD-based objectives share: the fields ``eps, alpha, steps, random_start, norm,
    warmup``, their checks, the schedule, the adversarial batch and their part of the spec."""

    eps: float
    alpha: float | None
    steps: int
    random_start: bool
    norm: str
    warmup: float

    def _check_attack(self) -> None:
        _set(self, "eps", _number("eps", self.eps))
        if self.alpha is not None:
            _set(self, "alpha", _number("alpha", self.alpha, open_low=True))
        _set(self, "steps", _count("steps", self.steps))
        _set(self, "random_start", _switch("random_start", self.random_start))
        _set(self, "norm", _one_of("norm", self.norm, NORMS))
        _set(self, "warmup", _number("warmup", self.warmup, high=1.0, open_high=True))

    @property
    def step_size(self) -> float:
        """The PGD step size α at full ε: ``alpha``, or ``2.5·eps/steps`` when ``alpha`` is None."""
        return 2.5 * self.eps / self.steps if self.alpha is None else self.alpha

    def current_eps(self, progress: float) -> float:
        """The ε in force at ``progress`` (0 at the start of a warm-up, ``eps`` from ``warmup`` on)."""
        return self.eps * _warmup_scale(progress, self.warmup)

    def _adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     progress: float) -> tuple[torch.Tensor, float]:
        return _pgd_batch(model, x, y, eps=self.eps, alpha=self.step_size, steps=self.steps,
                          random_start=self.random_start, norm=self.norm, warmup=self.warmup,
                          progress=progress)

    def _attack_spec(self) -> dict:
        return {"attack": "pgd", "eps": self.eps, "alpha": self.step_size, "steps": self.steps,
                "random_start": self.random_start, "norm": self.norm, "warmup": self.warmup}


# --------------------------------------------------------------------------------------------
# Chapter 6: adversarial training
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PGDAdversarial(_InnerPGD):
    """PGD adversarial training: ``min_θ E[max_{‖δ‖∞ ≤ ε} CE(f_θ(x + δ), y)]``.

    The inner maximum is approximated by :func:`utils.attacks.pgd` on the current model (``steps``
    steps of size ``alpha``, from a random start in the ball when ``random_start``; ``norm="l2"``
    switches to the L2 ball); the outer minimum is the mean cross-entropy on that adversarial
    batch alone. ``alpha=None`` means ``2.5·eps/steps``.

    ``warmup`` in [0, 1): the fraction of training over which ε, and α with it, ramps linearly
    from 0 to ``eps`` (``progress`` is the fraction of training done); 0 means the full ε from the
    first step.

    The logits returned are the *adversarial* ones, so :func:`fit`'s ``train_acc`` is the training
    accuracy under attack (the clean test accuracy is in ``test_acc``). Terms: ``ce_adv`` and
    ``eps`` (the ε in force, averaged over the epoch).

    Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards deep learning models resistant to
    adversarial attacks", ICLR 2018 (MNIST: ε = 0.3, 40 steps of 0.01, random start). Introduced
    in chapter 6.
    """

    eps: float = 0.3
    alpha: float | None = 0.01
    steps: int = 40
    random_start: bool = True
    warmup: float = 0.0
    norm: str = "linf"

    def __post_init__(self):
        self._check_attack()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        x_adv, eps = self._adversarial(model, x, y, progress)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss, logits, {"ce_adv": loss.item(), "eps": eps})

    def spec(self) -> dict:
        return {"objective": "pgd_adversarial", **self._attack_spec()}


@dataclass(frozen=True)
class FastFGSM:
    """Fast adversarial training: one FGSM step from a random start ("FGSM-RS").

    For every batch: ``δ`` uniform in ``[−ε, ε]^d`` (clipped so that ``x + δ`` stays in [0, 1]),
    one step ``δ ← δ + α·sign(∇_δ CE(f(x + δ), y))`` (the gradient taken with
    ``torch.autograd.grad`` with respect to ``δ`` only, in evaluation mode), then ``δ`` is projected
    onto the ε-ball and ``x + δ`` onto the pixel box; the loss is the mean cross-entropy on
    ``x + δ``. ``alpha=None`` means ``1.25·eps``, the paper's choice. This is :func:`utils.attacks.pgd`
    with ``steps=1`` and ``random_start=True``, written out the way the paper writes it.

    With larger steps, or without the random start, training can fall into *catastrophic
    overfitting*: within a few steps the model becomes robust to FGSM and not at all to PGD.
    Watch for it with :class:`CatastrophicOverfittingCheck`.

    ``warmup``: as in :class:`PGDAdversarial`, ε and α ramp linearly from 0 over that fraction of
    training. The logits returned are those of ``x + δ`` (train accuracy under this attack).
    Terms: ``ce_adv``, ``eps``.

    Wong, Rice & Kolter, "Fast is better than free: revisiting adversarial training", ICLR 2020.
    Introduced in chapter 6.
    """

    eps: float = 0.3
    alpha: float | None = None
    warmup: float = 0.0

    def __post_init__(self):
        _set(self, "eps", _number("eps", self.eps))
        if self.alpha is not None:
            _set(self, "alpha", _number("alpha", self.alpha, open_low=True))
        _set(self, "warmup", _number("warmup", self.warmup, high=1.0, open_high=True))

    @property
    def step_size(self) -> float:
        """The FGSM step α at full ε: ``alpha``, or ``1.25·eps`` when ``alpha`` is None."""
        return 1.25 * self.eps if self.alpha is None else self.alpha

    def current_eps(self, progress: float) -> float:
        """The ε in force at ``progress``."""
        return self.eps * _warmup_scale(progress, self.warmup)

    def perturbation(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                     progress: float = 1.0) -> torch.Tensor:
        """The FGSM-RS perturbation ``δ`` for this batch (detached; ``x + δ`` lies in [0, 1])."""
        scale = _warmup_scale(progress, self.warmup)
        eps, alpha = self.eps * scale, self.step_size * scale
        x = x.detach()
        if eps == 0.0:
            return torch.zeros_like(x)
        with _attacking(model):
            delta = torch.rand_like(x).mul_(2 * eps).sub_(eps)       # uniform in [−ε, ε]
            delta = torch.maximum(torch.minimum(delta, 1 - x), -x)   # x + δ in [0, 1]
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = delta.detach().add_(grad.sign(), alpha=alpha).clamp_(-eps, eps)
                delta = torch.maximum(torch.minimum(delta, 1 - x), -x)
        return delta

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        delta = self.perturbation(model, x, y, progress=progress)
        logits = model((x.detach() + delta).clamp_(0.0, 1.0))
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss, logits, {"ce_adv": loss.item(), "eps": self.current_eps(progress)})

    def spec(self) -> dict:
        return {"objective": "fast_fgsm", "attack": "fgsm_random_start", "eps": self.eps,
                "alpha": self.step_size, "warmup": self.warmup}


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
    """A :func:`fit` callback that watches the PGD accuracy on a small fixed batch after every epoch.

    After each epoch it measures the accuracy under :func:`utils.attacks.pgd` (L∞, ``eps``,
    ``steps`` steps of ``alpha``, default ``2.5·eps/steps``, one random start drawn from a
    generator seeded with ``seed``, so every epoch faces the same attack) on ``(x_check,
    y_check)``. When it falls more than ``drop`` (an absolute fraction: 0.2 is 20 points) below
    the best accuracy of the epochs before, that is catastrophic overfitting (Wong et al. 2020):
    the event is recorded in ``events`` and, with ``action="stop"``, a
    :class:`CatastrophicOverfitting` exception is raised, which :func:`fit` passes on with the
    history so far. With ``action="record"`` training goes on (to show the collapse).

    It keeps a copy of the weights of the best epoch so far (ties go to the later epoch):
    ``best_state``, and :meth:`restore` loads it, which is Wong et al.'s early stopping::

        check = CatastrophicOverfittingCheck(x_val[:200], y_val[:200], eps=0.3)
        try:
            history = fit(model, x, y, FastFGSM(eps=0.3), epochs=10, callback=check)
        except CatastrophicOverfitting as stop:
            history = stop.history
            check.restore(model)

    ``epochs`` and ``accs`` hold the measurements. Introduced in chapter 6.
    """

    def __init__(self, x_check: torch.Tensor, y_check: torch.Tensor, eps: float, steps: int = 10,
                 drop: float = 0.2, action: str = "stop", *, alpha: float | None = None, seed: int = 0):
        check_images(x_check, name="x_check")
        check_labels(y_check, n=len(x_check), name="y_check")
        if len(x_check) == 0:
            raise ValueError("x_check must hold at least one example")
        self.x_check, self.y_check = x_check, y_check
        self.eps = _number("eps", eps, open_low=True)
        self.steps = _count("steps", steps)
        self.alpha = None if alpha is None else _number("alpha", alpha, open_low=True)
        self.drop = _number("drop", drop, high=1.0, open_low=True)
        self.action = _one_of("action", action, ("stop", "record"))
        self.seed = _count("seed", seed, low=0)
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
        attack = functools.partial(pgd, eps=self.eps, alpha=self.alpha, steps=self.steps, random_start=True,
                                   generator=torch.Generator().manual_seed(self.seed))
        return evaluate(model, self.x_check, self.y_check, attack).acc

    def update(self, model: nn.Module, acc: float, epoch: int) -> OverfittingEvent | None:
        """Record the accuracy ``acc`` of epoch ``epoch``; return the event if it is one (never raises)."""
        acc = float(acc)
        self.epochs.append(int(epoch))
        self.accs.append(acc)
        event = None
        if self.best_acc is not None and acc < self.best_acc - self.drop:
            event = OverfittingEvent(int(epoch), acc, self.best_acc, self.best_epoch)
            self.events.append(event)
        if self.best_acc is None or acc >= self.best_acc:
            self.best_acc, self.best_epoch = acc, int(epoch)
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return event

    def __call__(self, model: nn.Module, record: EpochRecord) -> None:
        event = self.update(model, self.measure(model), record.epoch)
        if event is not None and self.action == "stop":
            raise CatastrophicOverfitting(event)

    def restore(self, model: nn.Module) -> nn.Module:
        """Load the weights of the best epoch into ``model`` (in place) and return it."""
        if self.best_state is None:
            raise RuntimeError("no epoch has been measured yet, so there are no best weights to restore")
        model.load_state_dict(self.best_state)
        return model

    def __repr__(self) -> str:
        best = "none yet" if self.best_acc is None else f"{100 * self.best_acc:.1f}% at epoch {self.best_epoch}"
        return (f"CatastrophicOverfittingCheck(eps={self.eps:g}, steps={self.steps}, drop={self.drop:g}, "
                f"action={self.action!r}, {len(self.accs)} epochs measured, best {best}, "
                f"{len(self.events)} events)")


# --------------------------------------------------------------------------------------------
# Chapter 7: logit pairing
# --------------------------------------------------------------------------------------------

PAIRINGS = ("adversarial", "clean")


def logit_pairing_loss(logits: torch.Tensor, logits_other: torch.Tensor) -> torch.Tensor:
    """The logit pairing term ``mean_i ‖f_i − g_i‖²₂``: squared L2 distance between paired logit
    vectors, *summed* over the K classes and *averaged* over the batch. ``[N, K], [N, K] -> []``.

    (A mean over classes as well, as in ``F.mse_loss``, would be K times smaller: with K = 10 a
    ``weight`` of λ here is a weight of 10·λ there.) Kannan et al. 2018, chapter 7.
    """
    if logits.shape != logits_other.shape or logits.dim() != 2:
        raise ValueError(f"logit pairing needs two logit tensors of the same shape [N, K], got "
                         f"{tuple(logits.shape)} and {tuple(logits_other.shape)}")
    return (logits - logits_other).pow(2).sum(dim=1).mean()


def _random_partner(n: int, device: torch.device) -> torch.Tensor:
    """A random cyclic permutation ``π`` of ``0..n-1``: every example gets a partner other than itself."""
    order = torch.randperm(n)
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)
    return partner.to(device)


@dataclass(frozen=True)
class LogitPairing(_InnerPGD):
    """Adversarial logit pairing (ALP) and clean logit pairing (CLP).

    ALP (``pairing="adversarial"``), with ``x_adv`` from PGD on the current model::

        L = (1 − mix)·CE(f(x), y) + mix·CE(f(x_adv), y) + weight · mean_i ‖f(x_i) − f(x_adv,i)‖²₂

    ``mix=0.5`` is Kannan et al.'s half-clean, half-adversarial batch; ``mix=1`` is ALP on top of
    Madry's PGD training, the version Engstrom et al. and Mosbach et al. evaluated. The logits
    returned are the adversarial ones (train accuracy under attack).

    CLP (``pairing="clean"``) needs no attack: ``L = CE(f(x), y) + weight · mean_i ‖f(x_i) −
    f(x_π(i))‖²₂`` with ``π`` a random cyclic permutation of the batch, so each clean example is
    paired with another random clean example (never itself). The logits returned are the clean
    ones. The attack fields do not affect CLP and are left out of its spec.

    The pairing term is :func:`logit_pairing_loss` (summed over classes, averaged over the batch).
    Terms: ``ce_clean``, ``ce_adv`` and ``eps`` (ALP only), ``pairing``, ``acc_clean`` (ALP only).

    Kannan, Kurakin & Goodfellow, "Adversarial logit pairing", 2018. Their robustness claims did
    not survive stronger attacks (Engstrom, Ilyas & Athalye 2018 on ImageNet; on MNIST, Mosbach et
    al. 2018 find ALP holds up better while CLP collapses). Introduced in chapter 7.
    """

    eps: float = 0.3
    alpha: float | None = 0.01
    steps: int = 40
    weight: float = 0.5
    pairing: str = "adversarial"
    mix: float = 0.5
    random_start: bool = True
    norm: str = "linf"
    warmup: float = 0.0

    def __post_init__(self):
        self._check_attack()
        _set(self, "weight", _number("weight", self.weight))
        _set(self, "pairing", _one_of("pairing", self.pairing, PAIRINGS))
        _set(self, "mix", _number("mix", self.mix, high=1.0))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        if self.pairing == "clean":
            logits = model(x)
            ce_clean = F.cross_entropy(logits, y)
            pair = logit_pairing_loss(logits, logits[_random_partner(len(x), logits.device)])
            loss = ce_clean + self.weight * pair
            return StepOutput(loss, logits, {"ce_clean": ce_clean.item(), "pairing": pair.item()})
        x_adv, eps = self._adversarial(model, x, y, progress)
        logits_clean, logits_adv = model(x), model(x_adv)
        ce_clean = F.cross_entropy(logits_clean, y)
        ce_adv = F.cross_entropy(logits_adv, y)
        pair = logit_pairing_loss(logits_clean, logits_adv)
        loss = (1.0 - self.mix) * ce_clean + self.mix * ce_adv + self.weight * pair
        acc_clean = (logits_clean.detach().argmax(1) == y).float().mean().item()
        return StepOutput(loss, logits_adv, {"ce_clean": ce_clean.item(), "ce_adv": ce_adv.item(),
                                             "pairing": pair.item(), "eps": eps, "acc_clean": acc_clean})

    def spec(self) -> dict:
        if self.pairing == "clean":
            return {"objective": "logit_pairing", "pairing": "clean", "weight": self.weight}
        return {"objective": "logit_pairing", "pairing": "adversarial", "weight": self.weight, "mix": self.mix,
                **self._attack_spec()}


# --------------------------------------------------------------------------------------------
# Chapter 8: "EnAET", adversarial training with energy pairing
# --------------------------------------------------------------------------------------------

def energy_pairing_loss(logits: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """The energy pairing term ``mean_i (E(x_adv,i) − E(x_i))²`` with the free energy
    ``E = −logsumexp(logits)`` at T = 1 (:func:`utils.energy.energy`). ``[N, K], [N, K] -> []``.

    The scalar counterpart of :func:`logit_pairing_loss`: it asks the attack not to move the
    energy, where logit pairing asks it not to move any logit. Chapter 8.
    """
    if logits.shape != logits_adv.shape or logits.dim() != 2:
        raise ValueError(f"energy pairing needs two logit tensors of the same shape [N, K], got "
                         f"{tuple(logits.shape)} and {tuple(logits_adv.shape)}")
    return (energy(logits_adv) - energy(logits)).pow(2).mean()


def energy_weights(energies: torch.Tensor) -> torch.Tensor:
    """Per-example weights after WEAT: ``w_i ∝ 1 / log(1 + exp(|E_i|))``, normalised to mean 1.

    ``energies``: ``[N]`` free energies (detached here: the weights are constants of the loss).
    An example whose energy is far below 0 (a large top logit, fit with confidence) gets a small
    weight; one whose energy is near 0 (small logits, poorly fit) a large one. The normalisation
    keeps the weighted mean of a loss on the scale of the plain mean. Mirza, Briglia, Beadini &
    Masi, "Shedding more light on robust classifiers under the lens of energy-based models", ECCV
    2024 (WEAT). Chapter 8.
    """
    e = energies.detach()
    if e.dim() != 1 or e.numel() == 0:
        raise ValueError(f"energy_weights needs a non-empty vector of energies [N], got shape {tuple(e.shape)}")
    w = 1.0 / F.softplus(e.abs())
    return w / w.mean()


@dataclass(frozen=True)
class EnergyPairing(_InnerPGD):
    """The book's "EnAET": adversarial training plus an energy pairing term.

    With ``x_adv`` from PGD on the current model and the free energy ``E`` at T = 1::

        L = CE(f(x), y) + lam · CE(f(x_adv), y) + gamma · mean_i (E(x_adv,i) − E(x_i))²

    ``weighted=True`` is the energy-weighted variant, after WEAT (Mirza et al. 2024): the
    adversarial cross-entropy becomes ``mean_i w_i · CE(f(x_adv,i), y_i)`` with the weights of
    :func:`energy_weights` computed from ``E(x_adv)`` (detached, mean 1 over the batch), so
    adversarial examples the model fits with low confidence count more. It borrows WEAT's
    weighting, it does not reproduce WEAT, whose released code computes unnormalised weights from
    the *clean* energies and applies them inside a TRADES-style loss.

    The name comes from a blog post; in the literature "EnAET" is Wang et al.'s unrelated
    semi-supervised method (2019). The energy view rests on JEM (Grathwohl et al. 2020), energy-based
    OOD detection (Liu et al. 2020) and WEAT. The logits returned are the adversarial ones (train
    accuracy under attack). Terms: ``ce_clean``, ``ce_adv`` (unweighted mean), ``energy_pairing``,
    ``energy_clean`` and ``energy_adv`` (batch means of E), ``eps``, ``acc_clean``, and
    ``ce_adv_weighted`` when ``weighted``. Introduced in chapter 8.
    """

    eps: float = 0.3
    alpha: float | None = 0.01
    steps: int = 40
    lam: float = 1.0
    gamma: float = 0.1
    weighted: bool = False
    random_start: bool = True
    norm: str = "linf"
    warmup: float = 0.0

    def __post_init__(self):
        self._check_attack()
        _set(self, "lam", _number("lam", self.lam))
        _set(self, "gamma", _number("gamma", self.gamma))
        _set(self, "weighted", _switch("weighted", self.weighted))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        x_adv, eps = self._adversarial(model, x, y, progress)
        logits_clean, logits_adv = model(x), model(x_adv)
        ce_clean = F.cross_entropy(logits_clean, y)
        ce_adv_each = F.cross_entropy(logits_adv, y, reduction="none")
        pair = energy_pairing_loss(logits_clean, logits_adv)
        e_clean, e_adv = energy(logits_clean.detach()), energy(logits_adv.detach())
        terms = {"ce_clean": ce_clean.item(), "ce_adv": ce_adv_each.mean().item()}
        if self.weighted:
            ce_adv = (energy_weights(e_adv) * ce_adv_each).mean()
            terms["ce_adv_weighted"] = ce_adv.item()
        else:
            ce_adv = ce_adv_each.mean()
        loss = ce_clean + self.lam * ce_adv + self.gamma * pair
        terms.update(energy_pairing=pair.item(), energy_clean=e_clean.mean().item(),
                     energy_adv=e_adv.mean().item(), eps=eps,
                     acc_clean=(logits_clean.detach().argmax(1) == y).float().mean().item())
        return StepOutput(loss, logits_adv, terms)

    def spec(self) -> dict:
        return {"objective": "energy_pairing", "lam": self.lam, "gamma": self.gamma, "weighted": self.weighted,
                "energy_temperature": 1.0, **self._attack_spec()}


# --------------------------------------------------------------------------------------------
# Chapter 9: defensive distillation, the book's example of gradient masking
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TemperatureCrossEntropy:
    """Cross-entropy of the softmax at temperature ``T``: ``CE(f(x) / T, y)``.

    Trained this way and then used at temperature 1 (the logits as they are), a model's logits
    come out about ``T`` times larger than a normally trained model's, so its softmax saturates:
    the first step of defensive distillation (the teacher). Terms: ``ce_T``.
    Papernot, McDaniel, Wu, Jha & Swami, "Distillation as a defense to adversarial perturbations
    against deep neural networks", IEEE S&P 2016. Introduced in chapter 9.
    """

    temperature: float = 100.0

    def __post_init__(self):
        _set(self, "temperature", _number("temperature", self.temperature, open_low=True))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        logits = model(x)
        loss = F.cross_entropy(logits / self.temperature, y)
        return StepOutput(loss, logits, {"ce_T": loss.item()})

    def spec(self) -> dict:
        return {"objective": "temperature_cross_entropy", "temperature": self.temperature}


@dataclass(frozen=True, eq=False)
class Distillation:
    """Defensive distillation: fit the teacher's soft labels at temperature ``T``.

    ``L = −mean_i Σ_k softmax(t(x_i)/T)_k · log softmax(f(x_i)/T)_k`` with ``t`` the ``teacher``
    (evaluation mode, no gradient). The student is then used at temperature 1, where its
    logits are about ``T`` times too large: the softmax saturates and the gradient of the
    cross-entropy vanishes in float32, which is gradient masking, not robustness (chapter 9).
    ``teacher_key`` names the teacher in the spec (its cache key), so that a different teacher
    makes a different student. Terms: ``soft_ce``.
    """

    teacher: nn.Module
    teacher_key: str
    temperature: float = 100.0

    def __post_init__(self):
        if not isinstance(self.teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(self.teacher).__name__}")
        if not isinstance(self.teacher_key, str) or not self.teacher_key:
            raise ValueError("teacher_key must be a non-empty string (the teacher's cache key)")
        _set(self, "temperature", _number("temperature", self.temperature, open_low=True))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        was_training = self.teacher.training
        self.teacher.eval()
        with torch.no_grad():
            soft = F.softmax(self.teacher(x) / self.temperature, dim=1)
        self.teacher.train(was_training)
        logits = model(x)
        loss = -(soft * F.log_softmax(logits / self.temperature, dim=1)).sum(1).mean()
        return StepOutput(loss, logits, {"soft_ce": loss.item()})

    def spec(self) -> dict:
        return {"objective": "distillation", "temperature": self.temperature, "teacher": self.teacher_key}

    def __repr__(self) -> str:
        return f"Distillation(teacher_key={self.teacher_key!r}, temperature={self.temperature:g})"

"""Adversarial attacks: FGSM, PGD (L∞ and L2), Carlini & Wagner L2, and random noise.

Every attack has the same contract::

    x_adv = attack(model, x, y, **params)

* ``x``: images ``[N, C, H, W]`` with pixels in ``[0, 1]``; ``y``: integer labels ``[N]`` (the
  true labels, or the *target* labels when ``targeted=True``).
* ``x_adv``: a new tensor shaped like ``x``, pixels in ``[0, 1]``, on the device of ``x``. The
  inputs are never modified.
* The attack runs on the model's device, with the model in evaluation mode (BatchNorm uses its
  running statistics, Dropout is off) and with gradients taken with respect to the input only
  (``torch.autograd.grad``): no parameter's ``.grad`` is written. Afterwards every module's
  ``training`` flag and every parameter's ``requires_grad`` flag are as before, also when the
  attack raises.
* Normalisation lives inside the model, so ``eps`` is in pixel units.
* Configure an attack with keywords or ``functools.partial(pgd, eps=0.3, steps=40)``: every loop
  of the book (:func:`utils.evaluate.evaluate`, adversarial training) takes it as a plain callable.

Chapters: FGSM in chapter 3, PGD in chapter 4, Carlini & Wagner in chapter 5; random noise is the
baseline of chapter 2.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import nn

from .data import check_images, check_labels
from .evaluate import model_device

#: A loss for PGD/FGSM: ``loss(logits [N, K], y [N]) -> [N]``, one value per example.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Loss = Union[str, LossFn]

NORMS = ("linf", "l2")
NOISE_KINDS = ("sign", "uniform")

#: Smallest gradient / perturbation norm we divide by in the L2 threat model.
_NORM_FLOOR = 1e-12

__all__ = [
    "fgsm", "pgd", "pgd_trace", "PGDTrace", "cw_l2", "random_noise",
    "margin_loss", "cross_entropy_loss", "LOSSES", "NORMS",
]


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

def cross_entropy_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy ``-log softmax(logits)_y``: ``[N, K], [N] -> [N]``."""
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example logit margin ``max_{j≠y} f_j − f_y``: ``[N, K], [N] -> [N]``.

    Positive exactly when some other class beats class ``y``. The best other logit is found by
    *masking* class ``y`` (setting it to ``-inf``), not by multiplying it by zero: logits can be
    negative, and a zeroed entry would then win the max (the bug of torchattacks issue #184).
    Unlike the cross-entropy, the margin does not saturate, which matters against models that mask
    gradients (chapter 9; Carlini & Wagner 2017).
    """
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    is_true = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, y.unsqueeze(1), True)
    other = logits.masked_fill(is_true, float("-inf")).amax(dim=1)
    return other - true


#: The losses that can be named in ``loss=...``.
LOSSES: dict[str, LossFn] = {"ce": cross_entropy_loss, "margin": margin_loss}


# --------------------------------------------------------------------------------------------
# Checks at the boundary (one sentence: what was wrong and what is expected)
# --------------------------------------------------------------------------------------------

def _real(name: str, value, *, low: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < low or (strict and v == low):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {relation} {low:g}, got {value!r}")
    return v


def _integer(name: str, value, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    return int(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _choice(name: str, value, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value.lower()


def _loss_fn(loss: Loss) -> LossFn:
    if isinstance(loss, str):
        if loss.lower() not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))} or a callable "
                             f"loss(logits, y) -> [N], got {loss!r}")
        return LOSSES[loss.lower()]
    if not callable(loss):
        raise TypeError(f"loss must be a name ({', '.join(map(repr, LOSSES))}) or a callable "
                        f"loss(logits, y) -> [N], got {type(loss).__name__}")
    return loss


def _generator(generator) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_images(x)
    check_labels(y, num_classes=None, n=len(x))


def _check_output(logits: torch.Tensor, y: torch.Tensor) -> None:
    """Once per call, on the first forward pass: logits ``[N, K]`` and labels in ``0..K-1``."""
    if logits.dim() != 2 or logits.shape[0] != len(y) or logits.shape[1] < 2:
        raise ValueError(f"the model must return logits of shape [N, K] with K >= 2 for N = {len(y)} "
                         f"inputs, got shape {tuple(logits.shape)}")
    k = logits.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise ValueError(f"y has labels outside 0..{k - 1} (min {int(y.min())}, max {int(y.max())}); "
                         f"the model has {k} classes")


def _check_loss_value(loss: torch.Tensor, n: int) -> None:
    if not isinstance(loss, torch.Tensor) or loss.shape != (n,):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"the loss must return one value per example (shape [{n}]), got {shape}")
    if not loss.requires_grad:
        raise TypeError("the loss does not depend differentiably on the input (does the model "
                        "or the loss run under torch.no_grad() or detach its output?)")


# --------------------------------------------------------------------------------------------
# Leaving the model as we found it
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _attacking(model: nn.Module) -> Iterator[None]:
    """Evaluation mode, frozen parameters and gradients switched on, for the block; then restore.

    Unlike :func:`utils.evaluate.eval_mode`, which restores only the top-level flag through
    ``model.train(was_training)`` (and so puts every submodule into that one mode), this records
    and restores the ``training`` flag of *every* module: a model in training mode with a frozen
    BatchNorm in evaluation mode comes back exactly like that. Parameters are switched to
    ``requires_grad=False`` during the attack so that autograd neither builds nor runs any part of
    the graph for the weights (cheaper, and no ``.grad`` can be written); their flags come back too.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def _per_example(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``[N]`` tensor so that it broadcasts over ``[N, C, H, W]``."""
    return t.view((-1,) + (1,) * (like.dim() - 1))


def _rand(like: torch.Tensor, generator: torch.Generator | None, *, normal: bool = False,
          shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Uniform [0, 1) (or standard normal) numbers on ``like``'s device, drawn from ``generator``.

    A generator draws on its own device and the numbers are moved, so a CPU generator gives the
    same perturbation on every device.
    """
    shape = tuple(like.shape) if shape is None else shape
    draw = torch.randn if normal else torch.rand
    if generator is None:
        return draw(shape, device=like.device, dtype=like.dtype)
    return draw(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _ball_delta(like: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None, *,
                boundary: bool = False) -> torch.Tensor:
    """A random perturbation in the ε-ball, one per example, shaped like ``like``.

    Uniform in the ball (``boundary=False``), the random start of PGD: L∞, every pixel uniform in
    ``[−eps, eps)``; L2, a Gaussian direction normalised to length 1 times a radius
    ``eps · u^(1/d)`` (``u`` uniform, ``d`` pixels per example), which is uniform in volume (a
    radius uniform in ``[0, eps]`` would crowd the centre). On the boundary (``boundary=True``):
    L∞, every pixel ``±eps``; L2, a random direction of length exactly ``eps``.
    """
    if norm == "linf":
        u = _rand(like, generator)
        if boundary:
            return torch.where(u < 0.5, -eps, eps).to(like.dtype)
        return u.mul_(2 * eps).sub_(eps)
    delta = _rand(like, generator, normal=True)
    delta.div_(_per_example(delta.flatten(1).norm(dim=1).clamp_(min=_NORM_FLOOR), like))
    if boundary:
        return delta.mul_(eps)
    radius = eps * _rand(like, generator, shape=(len(like),)).pow_(1.0 / like[0].numel())
    return delta.mul_(_per_example(radius, like))


def _input_gradient(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                    targeted: bool, check: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and one backward pass: the gradient of the attack objective w.r.t. ``x_adv``.

    The objective is ``sum_i loss_i`` (untargeted: push the loss of the true class up) or
    ``-sum_i loss_i`` (targeted: pull the loss of the target class down). Summing, not averaging,
    keeps every example's gradient independent of the batch size. Returns the gradient (a fresh
    tensor the caller may overwrite) and the per-example loss (detached).
    """
    x_adv.requires_grad_(True)
    logits = model(x_adv)
    if check:
        _check_output(logits, y)
    loss = loss_fn(logits, y)
    if check:
        _check_loss_value(loss, len(y))
    total = loss.sum()
    (grad,) = torch.autograd.grad(-total if targeted else total, x_adv)
    return grad, loss.detach()


# --------------------------------------------------------------------------------------------
# FGSM (chapter 3)
# --------------------------------------------------------------------------------------------

def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
         targeted: bool = False, loss: Loss = "ce") -> torch.Tensor:
    """Fast gradient sign method: ``x_adv = clip_[0,1](x + eps · sign(∇_x L))``, one step.

    Threat model: L∞ ball of radius ``eps`` (pixel units) around ``x``, intersected with the
    pixel box [0, 1]. Untargeted (default): ``y`` are the true labels and the step *increases*
    their loss. Targeted (``targeted=True``): ``y`` are the target labels and the step *decreases*
    their loss, ``x − eps · sign(∇_x L(x, y_target))``.

    ``loss`` is ``"ce"`` (cross-entropy, the paper's choice), ``"margin"`` (:func:`margin_loss`)
    or a callable ``loss(logits, y) -> [N]``.

    Shapes: ``x`` ``[N, C, H, W]`` in [0, 1], ``y`` ``[N]``; returns ``[N, C, H, W]`` in [0, 1].
    Goodfellow, Shlens & Szegedy, "Explaining and harnessing adversarial examples", ICLR 2015.
    Introduced in chapter 3.
    """
    eps = _real("eps", eps)
    targeted = _flag("targeted", targeted)
    loss_fn = _loss_fn(loss)
    _inputs(model, x, y)
    if len(x) == 0:
        return x.clone()
    device = model_device(model)
    with _attacking(model):
        x0, y0 = x.detach().to(device), y.to(device=device, dtype=torch.long)
        grad, _ = _input_gradient(model, x0.clone(), y0, loss_fn, targeted, check=True)
        x_adv = x0.add(grad.sign_(), alpha=eps).clamp_(0.0, 1.0)
    return x_adv.to(x.device)


# --------------------------------------------------------------------------------------------
# PGD (chapter 4)
# --------------------------------------------------------------------------------------------

@dataclass
class PGDTrace:
    """What :func:`pgd_trace` returns.

    * ``x_adv``: the adversarial examples ``[N, C, H, W]`` (exactly what :func:`pgd` returns).
    * ``losses``: ``[steps + 1, N]``, the loss of every example at the start point (row 0, after
      the random start) and after each step (the last row is the loss at ``x_adv``). This is the
      *loss* (e.g. the cross-entropy of ``y``), not the objective: it goes up in an untargeted
      attack and down in a targeted one. With restarts, each example's row comes from the restart
      that was kept for it.
    * ``restart``: ``[N]``, the index of that restart.
    """

    x_adv: torch.Tensor
    losses: torch.Tensor
    restart: torch.Tensor

    def __repr__(self) -> str:
        steps, n = self.losses.shape[0] - 1, self.losses.shape[1]
        if n == 0:
            return f"PGDTrace(n=0, steps={steps})"
        first, last = self.losses[0].mean().item(), self.losses[-1].mean().item()
        return f"PGDTrace(n={n}, steps={steps}, mean loss {first:.4f} -> {last:.4f})"


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, *, alpha, steps, norm, random_start,
         restarts, targeted, loss, generator, trace: bool) -> PGDTrace | torch.Tensor:
    """The one PGD loop behind :func:`pgd` and :func:`pgd_trace` (``trace`` says which)."""
    eps = _real("eps", eps)
    steps = _integer("steps", steps)
    alpha = 2.5 * eps / steps if alpha is None else _real("alpha", alpha, strict=True)
    norm = _choice("norm", norm, NORMS)
    random_start = _flag("random_start", random_start)
    restarts = _integer("restarts", restarts)
    if restarts > 1 and not random_start:
        raise ValueError(f"restarts={restarts} needs random_start=True: without a random start every "
                         "restart is the same deterministic run")
    targeted = _flag("targeted", targeted)
    loss_fn = _loss_fn(loss)
    generator = _generator(generator)
    _inputs(model, x, y)

    device = model_device(model)
    n = len(x)
    if n == 0:
        empty = x.clone()
        return PGDTrace(empty, x.new_zeros(steps + 1, 0), torch.zeros(0, dtype=torch.long)) if trace else empty

    with _attacking(model):
        x0, y0 = x.detach().to(device), y.to(device=device, dtype=torch.long)
        if norm == "linf":
            # The L∞ ball and the pixel box are both boxes: projecting onto the ball and then
            # clamping to [0, 1] is one clamp to their intersection.
            lo, hi = (x0 - eps).clamp_(min=0.0), (x0 + eps).clamp_(max=1.0)
        keep_final = trace or restarts > 1
        best = best_losses = best_success = best_objective = None
        chosen = torch.zeros(n, dtype=torch.long, device=device)

        for r in range(restarts):
            # ---- start point: x, or uniform in the ball, clamped to [0, 1] ----
            if random_start:
                x_adv = _ball_delta(x0, eps, norm, generator).add_(x0).clamp_(0.0, 1.0)
            else:
                x_adv = x0.clone()
            losses = torch.empty(steps + 1, n, device=device) if trace else None

            # ---- the loop: one forward and one backward pass per step, nothing else heavy ----
            for t in range(steps):
                grad, loss_t = _input_gradient(model, x_adv, y0, loss_fn, targeted, check=(r == 0 and t == 0))
                if losses is not None:
                    losses[t] = loss_t
                x_adv = x_adv.detach()
                if norm == "linf":
                    x_adv.add_(grad.sign_(), alpha=alpha)
                    x_adv.clamp_(lo, hi)
                else:
                    scale = alpha / grad.flatten(1).norm(dim=1).clamp_(min=_NORM_FLOOR)
                    delta = x_adv.add_(grad.mul_(_per_example(scale, x0))).sub_(x0)
                    shrink = (eps / delta.flatten(1).norm(dim=1).clamp_(min=_NORM_FLOOR)).clamp_(max=1.0)
                    x_adv = delta.mul_(_per_example(shrink, x0)).add_(x0).clamp_(0.0, 1.0)

            if not keep_final:
                best = x_adv
                break
            with torch.no_grad():
                logits = model(x_adv)
                final_loss = loss_fn(logits, y0).detach()
                success = (logits.argmax(1) == y0) if targeted else (logits.argmax(1) != y0)
            objective = -final_loss if targeted else final_loss
            if losses is not None:
                losses[steps] = final_loss
            if best is None:
                best, best_losses, best_success, best_objective = x_adv, losses, success, objective
                continue
            # ---- keep the worst case per example: success first, then the higher objective ----
            better = (success & ~best_success) | ((success == best_success) & (objective > best_objective))
            best = torch.where(_per_example(better, x0), x_adv, best)
            best_success = best_success | success
            best_objective = torch.where(better, objective, best_objective)
            chosen = torch.where(better, torch.full_like(chosen, r), chosen)
            if losses is not None:
                best_losses = torch.where(better.unsqueeze(0), losses, best_losses)

    x_adv = best.to(x.device)
    if not trace:
        return x_adv
    return PGDTrace(x_adv=x_adv, losses=best_losses.to(x.device), restart=chosen.to(x.device))


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
        alpha: float | None = None, steps: int = 10, norm: str = "linf", random_start: bool = True,
        restarts: int = 1, targeted: bool = False, loss: Loss = "ce",
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent: ``steps`` steps of steepest ascent on the loss, each followed
    by a projection onto the ε-ball around ``x`` and a clamp to the pixel box [0, 1].

    Threat models (``norm``):

    * ``"linf"``: ``‖x_adv − x‖∞ ≤ eps``; step ``x ← x + alpha · sign(∇_x L)``.
    * ``"l2"``: ``‖x_adv − x‖₂ ≤ eps`` per example; step ``x ← x + alpha · ∇_x L / ‖∇_x L‖₂``
      (the norm floored at 1e-12); projection rescales ``delta`` to length ``eps`` when longer.

    ``alpha`` defaults to ``2.5 · eps / steps`` (Madry et al.), so the iterate can cross the ball.
    ``random_start`` starts from a point drawn uniformly from the ball (L∞: each pixel uniform in
    ``[−eps, eps]``; L2: a Gaussian direction scaled to radius ``eps · u^(1/d)``, ``d`` the number
    of pixels), clamped to [0, 1]. Untargeted (default): ``y`` are the true labels, their loss goes
    up. Targeted: ``y`` are the target labels, their loss goes down.

    ``loss`` is ``"ce"`` (cross-entropy), ``"margin"`` (:func:`margin_loss`, the logit margin of
    Carlini & Wagner, which does not saturate) or a callable ``loss(logits, y) -> [N]``.

    ``restarts``: run the attack that many times from independent random starts and keep, *per
    example*, the worst case. The rule: a restart that succeeds (the prediction is wrong; targeted:
    it is the target) beats one that does not; among restarts that agree on success, the higher
    objective at the final iterate wins (the loss; targeted: minus the loss); ties keep the earlier
    restart. So adding restarts never loses a success, and never lowers the objective of an
    example whose success does not change (with ``loss="margin"`` success *is* a positive margin,
    so the kept margin never goes down). Restart ``r`` draws its start from ``generator`` after
    restarts ``0..r-1``: the same seed gives the same first restart whatever ``restarts`` is.
    Cost: ``restarts · steps`` forward and backward passes, plus one forward pass per restart
    (to compare them) when ``restarts > 1``.

    Shapes: ``x`` ``[N, C, H, W]`` in [0, 1], ``y`` ``[N]``; returns ``[N, C, H, W]`` in [0, 1],
    inside the ball (to float rounding). :func:`pgd_trace` runs the same loop and also returns
    the per-step losses. With ``steps=1, alpha=eps, random_start=False`` this is :func:`fgsm`.

    Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards deep learning models resistant to
    adversarial attacks", ICLR 2018. Introduced in chapter 4.
    """
    return _pgd(model, x, y, eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start,
                restarts=restarts, targeted=targeted, loss=loss, generator=generator, trace=False)


def pgd_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
              alpha: float | None = None, steps: int = 10, norm: str = "linf", random_start: bool = True,
              restarts: int = 1, targeted: bool = False, loss: Loss = "ce",
              generator: torch.Generator | None = None) -> PGDTrace:
    """:func:`pgd` that also records each example's loss at every step (for loss curves, chapter 4).

    Same arguments, same loop and, for the same generator state, the same ``x_adv``. Returns a
    :class:`PGDTrace` with ``x_adv`` ``[N, C, H, W]``, ``losses`` ``[steps + 1, N]`` (row 0 at the
    start point, row ``t`` after step ``t``) and ``restart`` ``[N]`` (which restart was kept).
    Costs one extra forward pass per restart (for the loss at the final iterate).
    """
    return _pgd(model, x, y, eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start,
                restarts=restarts, targeted=targeted, loss=loss, generator=generator, trace=True)


# --------------------------------------------------------------------------------------------
# Carlini & Wagner L2 (chapter 5)
# --------------------------------------------------------------------------------------------

#: Adam's constants, as in the paper's code (TensorFlow's defaults) and torch.optim.Adam.
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


def cw_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, c: float = 1.0, kappa: float = 0.0,
          steps: int = 100, lr: float = 0.1, binary_search_steps: int = 9, abort_early: bool = True,
          targeted: bool = False) -> torch.Tensor:
    """Carlini & Wagner's L2 attack: the smallest L2 perturbation that changes the prediction.

    For each example it minimises ``‖x_adv − x‖₂² + c · f(x_adv)`` over ``w`` with Adam (learning
    rate ``lr``, ``steps`` iterations), where ``x_adv = (tanh(w) + 1) / 2`` keeps pixels in [0, 1]
    without clipping (``w`` starts at ``atanh((2x − 1)(1 − 1e-6))``, i.e. at ``x``), and ``f`` is
    the margin objective on the logits ``Z``:

    * untargeted (``y`` true labels): ``f = max(Z_y − max_{j≠y} Z_j, −kappa)``;
    * targeted (``y`` target labels): ``f = max(max_{j≠y} Z_j − Z_y, −kappa)``.

    The best other logit is taken with a mask (class ``y`` set to ``−inf``), never by zeroing it.

    A candidate is *successful* when the prediction is wrong (targeted: equals the target) and,
    for ``kappa > 0``, it is so by a margin of at least ``kappa`` (``f`` has reached ``−kappa``).
    ``c`` starts at ``c`` for every example and is tuned per example by a binary search over
    ``binary_search_steps`` rounds: after a round with a success, ``c`` becomes the midpoint of
    the bracket with that ``c`` as upper bound; after a failure, the lower bound goes up and ``c``
    is multiplied by 10 while no upper bound is known. Each round restarts from ``x`` with a fresh
    Adam. With ``abort_early`` a round stops when the batch's total loss has not decreased by
    0.01% over the last ``steps // 10`` iterations (the rule of the paper's code; it makes the
    result depend slightly on which examples share the batch).

    Why ``lr=0.1`` and not the paper's 0.01: about 80% of MNIST's pixels are exactly 0 (or 1), where
    ``w`` starts at ``±7.25`` and Adam moves it by at most about ``lr`` per step. The paper ran up to
    10,000 steps; with 100 steps and ``lr=0.01`` those pixels cannot move, and on the book's models
    the attack then fails on most digits even with the binary search. With ``lr=0.1`` it succeeds on
    every digit, with perturbations within a few percent of 1,000 steps at ``lr=0.01``.

    Returns, per example, the successful candidate with the smallest L2 distance found over all
    rounds, and ``x`` itself (unchanged) where none was found. Shapes: ``x`` ``[N, C, H, W]`` in
    [0, 1], ``y`` ``[N]``; returns ``[N, C, H, W]`` in [0, 1]. There is no ε: the threat model is
    "as small as possible in L2"; measure ``(x_adv − x).flatten(1).norm(dim=1)``.

    Carlini & Wagner, "Towards evaluating the robustness of neural networks", IEEE S&P 2017.
    Introduced in chapter 5.
    """
    c = _real("c", c, strict=True)
    kappa = _real("kappa", kappa)
    steps = _integer("steps", steps)
    lr = _real("lr", lr, strict=True)
    binary_search_steps = _integer("binary_search_steps", binary_search_steps)
    abort_early = _flag("abort_early", abort_early)
    targeted = _flag("targeted", targeted)
    _inputs(model, x, y)
    if len(x) == 0:
        return x.clone()

    device = model_device(model)
    beta1, beta2 = _ADAM_BETAS
    check_every = max(steps // 10, 1)
    with _attacking(model):
        x0, y0 = x.detach().to(device), y.to(device=device, dtype=torch.long)
        n = len(x0)
        w0 = torch.atanh((2 * x0 - 1) * (1 - 1e-6))
        const = torch.full((n,), c, device=device)
        lower = torch.zeros(n, device=device)
        upper = torch.full((n,), math.inf, device=device)
        best_l2 = torch.full((n,), math.inf, device=device)
        best = x0.clone()

        for round_ in range(binary_search_steps):
            w = w0.clone()
            m, v = torch.zeros_like(w), torch.zeros_like(w)
            found = torch.zeros(n, dtype=torch.bool, device=device)
            loss_at_check = math.inf
            for it in range(steps):
                w.requires_grad_(True)
                x_adv = (torch.tanh(w) + 1) / 2
                logits = model(x_adv)
                if round_ == 0 and it == 0:
                    _check_output(logits, y0)
                margin = margin_loss(logits, y0)          # max_{j≠y} Z_j − Z_y
                past = -margin if targeted else margin    # how far past the decision boundary
                f = torch.clamp(-past, min=-kappa)
                l2 = (x_adv - x0).pow(2).flatten(1).sum(dim=1)
                loss = l2 + const * f
                (grad,) = torch.autograd.grad(loss.sum(), w)

                with torch.no_grad():
                    # Is this iterate (the one the logits belong to) a better adversarial example?
                    pred = logits.argmax(dim=1)
                    hit = (pred == y0) if targeted else (pred != y0)
                    success = hit & (past >= kappa)
                    found |= success
                    better = success & (l2 < best_l2)
                    best_l2 = torch.where(better, l2, best_l2)
                    best = torch.where(_per_example(better, x0), x_adv, best)

                    if abort_early and it % check_every == 0:
                        # As in the paper's code: stop the round when the batch's total loss has
                        # not gone down by 0.01% since the last check (one sync per check).
                        total = loss.sum().item()
                        if total > loss_at_check - 1e-4 * abs(loss_at_check):
                            break
                        loss_at_check = total

                    # Adam on w, element-wise, exactly as torch.optim.Adam.
                    w = w.detach()
                    m.mul_(beta1).add_(grad, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    step_size = lr / (1 - beta1 ** (it + 1))
                    denom = (v.sqrt() / math.sqrt(1 - beta2 ** (it + 1))).add_(_ADAM_EPS)
                    w.addcdiv_(m, denom, value=-step_size)

            # Binary search on c, per example.
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            const = torch.where(torch.isfinite(upper), (lower + upper) / 2, const * 10)

    return best.to(x.device)


# --------------------------------------------------------------------------------------------
# Random noise (chapter 2)
# --------------------------------------------------------------------------------------------

def random_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                 norm: str = "linf", kind: str = "sign",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Random perturbations of size ``eps``: the baseline a worst-case perturbation is compared to.

    Attack-shaped (same contract) so it drops into every loop, but it ignores the model's
    gradients; ``model`` and ``y`` are only checked. ``kind``:

    * ``"sign"``: on the boundary of the ball. L∞: every pixel moves by ``±eps`` (random signs,
      the same size as an FGSM step); L2: a uniformly random direction with length ``eps``.
    * ``"uniform"``: uniform in the ball. L∞: every pixel uniform in ``[−eps, eps]``; L2: a
      Gaussian direction scaled to radius ``eps · u^(1/d)``.

    The result is clamped to [0, 1] (which can only shrink the perturbation). Shapes: ``x``
    ``[N, C, H, W]`` in [0, 1], ``y`` ``[N]``; returns ``[N, C, H, W]`` on the device of ``x``.
    Introduced in chapter 2 ("noise does little, the worst case breaks it").
    """
    eps = _real("eps", eps)
    norm = _choice("norm", norm, NORMS)
    kind = _choice("kind", kind, NOISE_KINDS)
    generator = _generator(generator)
    _inputs(model, x, y)
    x0 = x.detach()
    if len(x0) == 0:
        return x0.clone()
    delta = _ball_delta(x0, eps, norm, generator, boundary=(kind == "sign"))
    return (x0 + delta).clamp_(0.0, 1.0)

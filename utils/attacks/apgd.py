"""APGD (chapter 9): PGD whose step size needs no tuning, the scale-invariant DLR loss it climbs,
and its targeted variant over the most likely other classes (Croce & Hein, ICML 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..checks import NORMS, choice, integer, real
from .core import (NORM_FLOOR, Loss, LossFn, attacking_batch, ball_delta, check_inputs, check_output,
                   cross_entropy_loss, generator_or_none, input_gradient, loss_fn_of, margin_loss,
                   per_example)

#: Weight of the new gradient step against the last move (the paper's momentum, α = 0.75).
MOMENTUM = 0.75

#: The first step size is ``INITIAL_STEP · eps``: large enough to cross the ball in one step.
INITIAL_STEP = 2.0

#: Added to DLR's denominator, as in the paper, so that equal logits do not divide by zero.
DLR_FLOOR = 1e-12

# Where the checkpoints sit, in hundredths of the run: p_1 = 0.22, then every interval 0.03
# shorter than the one before, but never shorter than 0.06.
_FIRST_CHECKPOINT, _SHRINK, _SHORTEST = 22, 3, 6


# --------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------

def _need_classes(logits: torch.Tensor, k: int, what: str) -> None:
    if logits.dim() == 2 and logits.shape[1] < k:
        raise ValueError(f"{what} needs logits for at least {k} classes, got {logits.shape[1]}")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12)``:
    ``[N, K], [N] -> [N]``.

    ``z_π1 ≥ z_π2 ≥ z_π3`` are the three largest logits. The numerator is the logit margin
    (:func:`margin_loss`), positive exactly when another class beats ``y``; the denominator is
    the spread of the top three logits. Adding a constant to every logit, or multiplying them all
    by a positive constant, leaves DLR unchanged, so a model cannot hide behind large logits:
    the cross-entropy of a model whose logits were multiplied by 1000 (the masking of defensive
    distillation, chapter 9) has a gradient of exactly zero wherever its softmax saturates, while
    DLR's gradient is the unscaled model's. Needs at least 3 classes.

    Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks", ICML 2020. Introduced in chapter 9.
    """
    _need_classes(logits, 3, "the DLR loss")
    top = logits.topk(3, dim=1).values
    return margin_loss(logits, y) / (top[:, 0] - top[:, 2] + DLR_FLOOR)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4) / 2 + 1e-12)``: ``[N, K], [N], [N] -> [N]``.

    ``y`` are the true labels and ``target`` the classes ``t`` to push above them; the loss is
    positive exactly when ``z_t > z_y``. Invariant to a shift and to a positive scaling of the
    logits, like :func:`dlr_loss`. Needs at least 4 classes. Croce & Hein 2020; chapter 9.
    """
    _need_classes(logits, 4, "the targeted DLR loss")
    top = logits.topk(4, dim=1).values
    gap = logits.gather(1, target.unsqueeze(1)).squeeze(1) - logits.gather(1, y.unsqueeze(1)).squeeze(1)
    return gap / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + DLR_FLOOR)


#: The losses that can be named in ``apgd(loss=...)``.
APGD_LOSSES: dict[str, LossFn] = {"ce": cross_entropy_loss, "dlr": dlr_loss}


# --------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------

def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD decides whether to halve its step size.

    ``w_j = ⌈p_j · steps⌉`` for the fractions ``p_0 = 0``, ``p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)`` that do not exceed 1 (``w_0 = 0`` left
    out, repeats dropped): the intervals start at 22% of the run and shrink, so the step size can
    adapt faster towards the end. For ``steps=100``: ``[22, 41, 57, 70, 80, 87, 93, 99]``. The
    fractions are added in exact integer hundredths (in floats, p_3 comes out just above 0.57 and
    its checkpoint one iteration late, 58).
    """
    steps = integer("steps", steps)
    fractions, before, p = [], 0, _FIRST_CHECKPOINT
    while p <= 100:
        fractions.append(p)
        before, p = p, p + max(p - before - _SHRINK, _SHORTEST)
    return sorted({-(-p * steps // 100) for p in fractions})


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------

@dataclass
class _Run:
    """What one run returns, per example: the point kept, whether it is misclassified, its loss,
    and (when recorded) the loss at every iterate and the step size of every step."""

    x_adv: torch.Tensor
    success: torch.Tensor
    loss: torch.Tensor
    losses: torch.Tensor | None = None
    step_sizes: torch.Tensor | None = None


def _run(model: nn.Module, x0: torch.Tensor, y0: torch.Tensor, loss_fn: LossFn, *, eps: float, norm: str,
         steps: int, rho: float, generator: torch.Generator | None, check: bool, record: bool = False) -> _Run:
    """``steps`` APGD steps from a random start in the ball, on every example of ``x0``.

    Two points are kept per example: ``x_max``, the highest loss so far, where the iterate jumps
    back when the step size is halved (the algorithm's own best point), and the point returned,
    the best by (misclassified, loss): a misclassified iterate beats any other, then the higher
    loss wins, ties keep the earlier iterate. Gradients are taken at ``x^(0) … x^(steps−1)``; the
    last iterate needs the loss and the prediction only.
    """
    n = len(x0)
    if norm == "linf":
        lo, hi = (x0 - eps).clamp_(min=0.0), (x0 + eps).clamp_(max=1.0)

    def project(v: torch.Tensor) -> torch.Tensor:
        """Onto the ε-ball around ``x0``, then into the pixel box (in place)."""
        if norm == "linf":
            return v.clamp_(lo, hi)
        delta = v.sub_(x0)
        shrink = (eps / delta.flatten(1).norm(dim=1).clamp_(min=NORM_FLOOR)).clamp_(max=1.0)
        return delta.mul_(per_example(shrink, x0)).add_(x0).clamp_(0.0, 1.0)

    def ascent(g: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of unit size in the threat model's norm (in place)."""
        if norm == "linf":
            return g.sign_()
        return g.div_(per_example(g.flatten(1).norm(dim=1).clamp_(min=NORM_FLOOR), g))

    def evaluate(x: torch.Tensor, first: bool, last: bool):
        if last:
            with torch.no_grad():
                logits = model(x)
                return None, loss_fn(logits, y0).detach(), logits
        grad, loss, logits = input_gradient(model, x, y0, loss_fn, False, check=check and first)
        x.requires_grad_(False)
        return grad, loss, logits

    def where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(per_example(mask, a) if a.dim() > 1 else mask, a, b)

    x = ball_delta(x0, eps, norm, generator).add_(x0).clamp_(0.0, 1.0)
    grad, loss, logits = evaluate(x, first=True, last=False)
    success = logits.argmax(1) != y0
    x_out, loss_out, success_out = x, loss, success           # the point returned
    x_max, loss_max, grad_max = x, loss, grad.clone()         # the point the iterate returns to
    x_prev, loss_prev = x, loss
    eta = torch.full((n,), INITIAL_STEP * eps, dtype=x0.dtype, device=x0.device)
    # what the halving conditions compare with: the state at the last checkpoint
    ups = torch.zeros(n, dtype=torch.long, device=x0.device)  # steps that raised the loss since then
    since, max_then = 0, loss_max
    halved_then = torch.zeros(n, dtype=torch.bool, device=x0.device)
    checkpoints = set(apgd_checkpoints(steps))
    losses = torch.empty(steps + 1, n, device=x0.device) if record else None
    step_sizes = torch.empty(steps, n, device=x0.device) if record else None
    if record:
        losses[0] = loss

    for k in range(1, steps + 1):
        if record:
            step_sizes[k - 1] = eta
        # ---- the step: z = P(x + η · direction), then momentum between z and the last move ----
        z = project(ascent(grad).mul_(per_example(eta, x0)).add_(x))
        if k > 1:
            z = project(z.sub_(x).mul_(MOMENTUM).add_(x - x_prev, alpha=1.0 - MOMENTUM).add_(x))
        x_prev, x = x, z
        grad, loss, logits = evaluate(x, first=False, last=(k == steps))
        if record:
            losses[k] = loss

        # ---- the points kept ----
        success = logits.argmax(1) != y0
        better = (success & ~success_out) | ((success == success_out) & (loss > loss_out))
        x_out, loss_out = where(better, x, x_out), where(better, loss, loss_out)
        success_out = success_out | success
        higher = loss > loss_max
        x_max, loss_max = where(higher, x, x_max), where(higher, loss, loss_max)
        if grad is not None:
            grad_max = where(higher, grad, grad_max)
        ups += loss > loss_prev
        loss_prev = loss

        # ---- at a checkpoint: halve η where the last interval went badly, and restart from x_max ----
        if k in checkpoints and k < steps:
            too_few_ups = ups < rho * (k - since)
            stuck = ~halved_then & (loss_max <= max_then)
            halve = too_few_ups | stuck
            eta = torch.where(halve, eta / 2, eta)
            x, grad = where(halve, x_max, x), where(halve, grad_max, grad)
            loss_prev = torch.where(halve, loss_max, loss_prev)
            halved_then, max_then, since = halve, loss_max, k
            ups.zero_()

    return _Run(x_out, success_out, loss_out, losses, step_sizes)


def _until_broken(model: nn.Module, x0: torch.Tensor, y0: torch.Tensor, clean_logits: torch.Tensor,
                  losses: Iterable[Callable[[torch.Tensor], LossFn]], **run_kw) -> torch.Tensor:
    """One run per entry of ``losses`` (each a function of the indices attacked that gives the
    loss), each only on the examples that no earlier point has misclassified, starting with the
    clean input itself: an example the model already gets wrong is returned as it is. Per example
    the best point over the runs: a misclassified point beats any other, then the higher loss,
    ties keep the earlier run."""
    x_adv = x0.clone()
    success = clean_logits.argmax(1) != y0
    best_loss = torch.full_like(y0, float("-inf"), dtype=clean_logits.dtype)
    for r, loss_for in enumerate(losses):
        idx = (~success).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        run = _run(model, x0[idx], y0[idx], loss_for(idx), check=(r == 0), **run_kw)
        better = run.success | (run.loss > best_loss[idx])
        x_adv[idx] = torch.where(per_example(better, run.x_adv), run.x_adv, x_adv[idx])
        best_loss[idx] = torch.where(better, run.loss.to(best_loss.dtype), best_loss[idx])
        success[idx] = run.success
    return x_adv


def _clean_logits(model: nn.Module, x0: torch.Tensor, y0: torch.Tensor, classes: int, what: str) -> torch.Tensor:
    """The logits of the clean input, checked: ``[N, K]``, labels in range, ``K >= classes``."""
    with torch.no_grad():
        logits = model(x0)
    check_output(logits, y0)
    _need_classes(logits, classes, what)
    return logits


def _checked(eps, norm, steps, rho, generator) -> dict:
    return dict(eps=real("eps", eps), norm=choice("norm", norm, NORMS), steps=integer("steps", steps),
                rho=real("rho", rho, high=1.0), generator=generator_or_none(generator))


# --------------------------------------------------------------------------------------------
# The attacks
# --------------------------------------------------------------------------------------------

def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
         steps: int = 100, restarts: int = 1, loss: Loss = "ce", rho: float = 0.75,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Auto-PGD: PGD with momentum and a step size that halves itself when progress stalls.

    Threat models (``norm``): ``"linf"``, ``‖x_adv − x‖∞ ≤ eps``, steps along ``sign(∇_x L)``;
    ``"l2"``, ``‖x_adv − x‖₂ ≤ eps`` per example, steps along ``∇_x L / ‖∇_x L‖₂`` and projection
    by rescaling ``delta`` to length ``eps`` when it is longer. Every point is then clamped to the
    pixel box [0, 1].

    The run starts at a point drawn uniformly from the ball (as in :func:`pgd`, from
    ``generator``: a CPU generator gives the same start on every device). Step ``k`` goes to
    ``z = P(x_k + η · direction)`` and then to ``x_{k+1} = P(x_k + 0.75 · (z − x_k) +
    0.25 · (x_k − x_{k−1}))`` (the first step has no momentum). The step size ``η`` starts at
    ``2 · eps`` and is looked at, per example, only at the checkpoints :func:`apgd_checkpoints`
    (22, 41, 57, 70, 80, 87, 93 and 99 for 100 steps); it is halved when

    1. fewer than a fraction ``rho`` of the steps since the last checkpoint raised the loss, or
    2. it was not halved at the last checkpoint and the best loss has not grown since then
       (at the first checkpoint: since the start),

    and the iterate then jumps back to the highest-loss point found so far.

    ``loss`` is ``"ce"`` (cross-entropy), ``"dlr"`` (:func:`dlr_loss`, invariant to the scale
    of the logits; needs 3 classes) or a callable ``loss(logits, y) -> [N]``.

    What is attacked and what is returned, per example: an example the model already
    misclassifies is returned as it is (it is an error already, inside the ball) and is not
    attacked. Every run attacks *only the examples that nothing has misclassified yet*, and
    returns the best point it visited: a misclassified point beats any other, then the higher
    loss. ``restarts`` runs in all, each from a new random start; a run's point replaces the kept
    one if it is misclassified or has a higher loss. So restarts never lose a success, and the
    first run is the same whatever ``restarts`` is. Cost: one forward pass on ``x``, then per
    run ``steps`` forward and backward passes and one forward pass, on the examples attacked.

    Shapes: ``x`` ``[N, C, H, W]`` in [0, 1], ``y`` ``[N]`` true labels; returns
    ``[N, C, H, W]`` in [0, 1], inside the ball (to float rounding). :func:`apgd_trace` records
    the losses and step sizes of one run.

    Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks", ICML 2020. Introduced in chapter 9.
    """
    kw = _checked(eps, norm, steps, rho, generator)
    restarts = integer("restarts", restarts)
    loss_fn = loss_fn_of(loss, APGD_LOSSES)
    check_inputs(model, x, y)
    if len(x) == 0:
        return x.clone()
    with attacking_batch(model, x, y) as (x0, y0):
        logits = _clean_logits(model, x0, y0, 3 if loss_fn is dlr_loss else 2, "the DLR loss")
        x_adv = _until_broken(model, x0, y0, logits, [lambda idx: loss_fn] * restarts, **kw)
    return x_adv.to(x.device)


def apgd_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
                  steps: int = 100, n_targets: int = 9, restarts: int = 1, rho: float = 0.75,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD-T: :func:`apgd` on the targeted DLR loss, once for each of the ``n_targets`` most
    likely other classes.

    ``y`` are the *true* labels; the attack is untargeted in what it counts (any wrong class is a
    success) and targeted in how it searches. The other classes are ranked per example by the
    logits of the clean input; run ``t`` climbs :func:`dlr_targeted_loss` towards the ``t``-th of
    them, with ``restarts`` runs per target. As in :func:`apgd`, an example the model already
    misclassifies is returned as it is, and every run attacks only the examples that nothing has
    misclassified yet; per example the point kept is that of the first run that misclassifies it,
    or, where none does, the one with the highest targeted DLR loss. Step sizes, threat models
    and random starts are as in :func:`apgd`. Needs at least 4 classes and ``n_targets`` at most
    the number of classes minus one. Cost: up to ``n_targets · restarts`` runs of ``steps``
    forward and backward passes, each on the examples still standing.

    Shapes: ``x`` ``[N, C, H, W]`` in [0, 1], ``y`` ``[N]``; returns ``[N, C, H, W]`` in [0, 1],
    inside the ball (to float rounding).

    Croce & Hein 2020 (APGD-T is the second attack of their AutoAttack). Introduced in chapter 9.
    """
    kw = _checked(eps, norm, steps, rho, generator)
    n_targets = integer("n_targets", n_targets)
    restarts = integer("restarts", restarts)
    check_inputs(model, x, y)
    if len(x) == 0:
        return x.clone()
    with attacking_batch(model, x, y) as (x0, y0):
        logits = _clean_logits(model, x0, y0, 4, "apgd_targeted (the targeted DLR loss)")
        k = logits.shape[1]
        if n_targets > k - 1:
            raise ValueError(f"n_targets must be at most {k - 1} (the model has {k} classes), got {n_targets}")
        others = logits.scatter(1, y0.unsqueeze(1), float("-inf"))
        ranked = others.argsort(dim=1, descending=True)[:, :n_targets]        # [N, n_targets]

        def towards(t: int) -> Callable[[torch.Tensor], LossFn]:
            def loss_for(idx: torch.Tensor) -> LossFn:
                target = ranked[idx, t]
                return lambda z, labels: dlr_targeted_loss(z, labels, target)
            return loss_for

        plan = [towards(t) for t in range(n_targets) for _ in range(restarts)]
        x_adv = _until_broken(model, x0, y0, logits, plan, **kw)
    return x_adv.to(x.device)


@dataclass
class APGDTrace:
    """What :func:`apgd_trace` returns.

    * ``x_adv``: ``[N, C, H, W]``, the best point of the run per example, chosen as in :func:`apgd`.
    * ``losses``: ``[steps + 1, N]``, the loss at every iterate: row 0 at the random start, row
      ``k`` after step ``k`` (before any jump back to the best point at a checkpoint).
    * ``step_sizes``: ``[steps, N]``, the step size ``η`` that step ``k`` used (row ``k − 1``).
    * ``checkpoints``: :func:`apgd_checkpoints` of ``steps``.
    """

    x_adv: torch.Tensor
    losses: torch.Tensor
    step_sizes: torch.Tensor
    checkpoints: list[int]

    def __repr__(self) -> str:
        steps, n = self.step_sizes.shape
        if n == 0:
            return f"APGDTrace(n=0, steps={steps})"
        halvings = (self.step_sizes[1:] < self.step_sizes[:-1]).sum(0).float().mean().item()
        return (f"APGDTrace(n={n}, steps={steps}, mean loss {self.losses[0].mean().item():.4f} -> "
                f"{self.losses.amax(0).mean().item():.4f} (best), step size halved {halvings:.1f} "
                "times on average)")


def apgd_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
               steps: int = 100, loss: Loss = "ce", rho: float = 0.75,
               generator: torch.Generator | None = None) -> APGDTrace:
    """One run of :func:`apgd` on *every* example, also those the model already misclassifies
    (which :func:`apgd` returns unattacked), recording each example's loss at every iterate and
    the step size of every step: for the loss curves and the schedule of chapter 9. Same
    arguments; where the model classifies every example correctly, the same generator state gives
    the same ``x_adv`` as ``apgd(restarts=1)``. Returns an :class:`APGDTrace`.
    """
    kw = _checked(eps, norm, steps, rho, generator)
    loss_fn = loss_fn_of(loss, APGD_LOSSES)
    check_inputs(model, x, y)
    checkpoints = apgd_checkpoints(kw["steps"])
    if len(x) == 0:
        return APGDTrace(x.clone(), x.new_zeros(kw["steps"] + 1, 0), x.new_zeros(kw["steps"], 0), checkpoints)
    with attacking_batch(model, x, y) as (x0, y0):
        run = _run(model, x0, y0, loss_fn, check=True, record=True, **kw)
    return APGDTrace(run.x_adv.to(x.device), run.losses.to(x.device), run.step_sizes.to(x.device), checkpoints)

"""FGSM (chapter 3) and PGD (chapter 4): attacks that follow the gradient of a loss within an ε-ball."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import NORMS, choice, flag, integer, real
from .core import (NORM_FLOOR, Loss, attacking_batch, ball_delta, generator_or_none, input_gradient,
                   check_inputs, loss_fn_of, per_example)


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
    eps = real("eps", eps)
    targeted = flag("targeted", targeted)
    loss_fn = loss_fn_of(loss)
    check_inputs(model, x, y)
    if len(x) == 0:
        return x.clone()
    with attacking_batch(model, x, y) as (x0, y0):
        grad, _, _ = input_gradient(model, x0.clone(), y0, loss_fn, targeted, check=True)
        x_adv = x0.add(grad.sign_(), alpha=eps).clamp_(0.0, 1.0)
    return x_adv.to(x.device)


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
    eps = real("eps", eps)
    steps = integer("steps", steps)
    alpha = 2.5 * eps / steps if alpha is None else real("alpha", alpha, open_low=True)
    norm = choice("norm", norm, NORMS)
    random_start = flag("random_start", random_start)
    restarts = integer("restarts", restarts)
    if restarts > 1 and not random_start:
        raise ValueError(f"restarts={restarts} needs random_start=True: without a random start every "
                         "restart is the same deterministic run")
    targeted = flag("targeted", targeted)
    loss_fn = loss_fn_of(loss)
    generator = generator_or_none(generator)
    check_inputs(model, x, y)

    n = len(x)
    if n == 0:
        empty = x.clone()
        return PGDTrace(empty, x.new_zeros(steps + 1, 0), torch.zeros(0, dtype=torch.long)) if trace else empty

    with attacking_batch(model, x, y) as (x0, y0):
        device = x0.device
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
                x_adv = ball_delta(x0, eps, norm, generator).add_(x0).clamp_(0.0, 1.0)
            else:
                x_adv = x0.clone()
            losses = torch.empty(steps + 1, n, device=device) if trace else None

            # ---- the loop: one forward and one backward pass per step, nothing else heavy ----
            for t in range(steps):
                grad, loss_t, _ = input_gradient(model, x_adv, y0, loss_fn, targeted, check=(r == 0 and t == 0))
                if losses is not None:
                    losses[t] = loss_t
                x_adv = x_adv.detach()
                if norm == "linf":
                    x_adv.add_(grad.sign_(), alpha=alpha)
                    x_adv.clamp_(lo, hi)
                else:
                    scale = alpha / grad.flatten(1).norm(dim=1).clamp_(min=NORM_FLOOR)
                    delta = x_adv.add_(grad.mul_(per_example(scale, x0))).sub_(x0)
                    shrink = (eps / delta.flatten(1).norm(dim=1).clamp_(min=NORM_FLOOR)).clamp_(max=1.0)
                    x_adv = delta.mul_(per_example(shrink, x0)).add_(x0).clamp_(0.0, 1.0)

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
            best = torch.where(per_example(better, x0), x_adv, best)
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

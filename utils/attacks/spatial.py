"""Spatial attacks (chapter 10): the worst rotation and translation of a digit, found by grid search or
by gradient ascent on the transformation's parameters through a differentiable warp, and the
worst-of-k spatial augmentation that trains a model against them.

The threat model is not an ε-ball around the pixels: an adversary may rotate the image by at most
``max_angle`` degrees and shift it by at most ``max_shift`` pixels in each direction, and nothing
else. A rotated digit is far from the original in every L-p norm and still obviously the same digit.
Engstrom, Tran, Tsipras, Schmidt & Madry, "Exploring the landscape of spatial robustness", ICML 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import flag, integer, real
from ..models import eval_mode
from ..train import StepOutput
from .core import (LOSSES, Loss, LossFn, attacking_batch, check_inputs, check_output, generator_or_none,
                   loss_fn_of, random_like)

__all__ = ["rotate_translate", "SpatialResult", "spatial_grid", "spatial_grid_search", "spatial_pgd",
           "spatial_pgd_search", "WorstOfK"]

#: The largest rotation a threat model may allow: beyond 180° every angle is reached already.
MAX_ANGLE = 180.0


# --------------------------------------------------------------------------------------------
# The differentiable warp
# --------------------------------------------------------------------------------------------

def _per_example(value, n: int, width: int, name: str, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a number, a sequence of ``width`` numbers, or a tensor ``[N]`` / ``[N, width]``) as a
    float tensor ``[N, width]`` on the device of ``like``; a clear error unless every entry is finite."""
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=like.dtype)
    if not t.is_floating_point():
        t = t.to(like.dtype)
    t = t.to(like.device, like.dtype)
    if t.dim() == 0:
        t = t.reshape(1, 1).expand(n, width)
    elif t.dim() == 1 and width > 1 and len(t) == width:   # one (dx, dy) for every image
        t = t.unsqueeze(0).expand(n, width)
    elif t.dim() == 1 and width == 1 and len(t) == n:
        t = t.unsqueeze(1)
    if t.shape != (n, width):
        want = "a number or a tensor [N]" if width == 1 else f"{width} numbers or a tensor [N, {width}]"
        raise ValueError(f"{name} must be {want} for N = {n} images, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t.flatten()[~torch.isfinite(t.flatten())][0].item()}")
    return t


def rotate_translate(x: torch.Tensor, angle, shift=0.0) -> torch.Tensor:
    """Rotate each image about its centre by ``angle`` degrees, then shift it by ``shift`` pixels.

    ``x``: ``[N, C, H, W]``. ``angle``: a number or a tensor ``[N]``; positive turns the image
    counter-clockwise as it is displayed (row 0 at the top). ``shift``: a number, a pair ``(dx, dy)``
    or a tensor ``[N, 2]``; positive ``dx`` moves the content right, positive ``dy`` down. Pixels that
    come from outside the image are black (0); the rest are interpolated bilinearly.

    The warp is :func:`torch.nn.functional.affine_grid` and :func:`~torch.nn.functional.grid_sample`,
    differentiable with respect to the image and to ``angle`` and ``shift``. It is exact where the
    geometry allows: angle 0 and shift 0 give the image back, integer shifts are
    ``torch.roll`` with zeros filled in, and a quarter turn of a square image is ``torch.rot90``.
    Chapter 10.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor [N, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    n, _, h, w = x.shape
    a = _per_example(angle, n, 1, "angle", x)[:, 0] * (math.pi / 180.0)
    t = _per_example(shift, n, 2, "shift", x)
    cos, sin = torch.cos(a), torch.sin(a)
    # affine_grid maps each output location, in coordinates normalised to [-1, 1], to the input location
    # it reads from. In pixel units (x right, y down) the content moves by p_out = R p_in + t with
    # R = [[cos, sin], [-sin, cos]] (counter-clockwise on screen), so p_in = R^T (p_out - t). The
    # normalised coordinates are pixel coordinates divided by (W/2, H/2).
    sx, sy = w / 2.0, h / 2.0
    theta = torch.stack([
        torch.stack([cos, -sin * sy / sx, -(cos * t[:, 0] - sin * t[:, 1]) / sx], dim=1),
        torch.stack([sin * sx / sy, cos, -(sin * t[:, 0] + cos * t[:, 1]) / sy], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# --------------------------------------------------------------------------------------------
# The threat model and what an attack returns
# --------------------------------------------------------------------------------------------

@dataclass
class SpatialResult:
    """The transformation a spatial attack chose for each example, and where it led.

    ``x_adv`` ``[N, C, H, W]``: the transformed images; ``angle`` ``[N]`` (degrees) and ``shift``
    ``[N, 2]`` (pixels, ``dx, dy``): the transformation (``x_adv`` is
    ``rotate_translate(x, angle, shift)``); ``loss`` ``[N]``: the attack's loss there; ``fooled``
    ``[N]``: whether the model misclassifies ``x_adv``; ``evaluations``: forward passes per example.
    """

    x_adv: torch.Tensor
    angle: torch.Tensor
    shift: torch.Tensor
    loss: torch.Tensor
    fooled: torch.Tensor
    evaluations: int

    def __repr__(self) -> str:
        return (f"SpatialResult(n={len(self.fooled)}, fooled={self.fooled.float().mean().item():.1%}, "
                f"evaluations per example={self.evaluations})")


def _check_box(max_angle, max_shift) -> tuple[float, float]:
    return (real("max_angle", max_angle, high=MAX_ANGLE), real("max_shift", max_shift))


def _better(fooled_new, loss_new, fooled_old, loss_old) -> torch.Tensor:
    """Success first, then the higher loss; ties keep the old point."""
    return (fooled_new & ~fooled_old) | ((fooled_new == fooled_old) & (loss_new > loss_old))


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, angle, shift,
              check: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        xt = rotate_translate(x, angle, shift)
        logits = model(xt)
        if check:
            check_output(logits, y)
        return xt, loss_fn(logits, y), logits.argmax(1) != y


# --------------------------------------------------------------------------------------------
# Grid search
# --------------------------------------------------------------------------------------------

def _grid(max_angle: float, max_shift: float, angles: int, shifts: int) -> torch.Tensor:
    """Every ``(angle, dx, dy)`` of the grid, ``[T, 3]``, the smallest transformations first."""
    a = torch.linspace(-max_angle, max_angle, angles, dtype=torch.float64) if angles > 1 else torch.zeros(1, dtype=torch.float64)
    s = torch.linspace(-max_shift, max_shift, shifts, dtype=torch.float64) if shifts > 1 else torch.zeros(1, dtype=torch.float64)
    g = torch.cartesian_prod(a, s, s)
    size = g[:, 0].abs() / max(max_angle, 1e-12) + g[:, 1:].abs().amax(dim=1) / max(max_shift, 1e-12)
    return g[torch.argsort(size, stable=True)].float()


def spatial_grid_search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, max_angle: float = 30.0,
                        max_shift: float = 3.0, angles: int = 31, shifts: int = 7,
                        loss: Loss = "ce") -> SpatialResult:
    """The worst rotation and translation of each example on a grid: a :class:`SpatialResult`.

    The grid has ``angles`` rotations evenly spaced in ``[-max_angle, max_angle]`` degrees and
    ``shifts`` shifts evenly spaced in ``[-max_shift, max_shift]`` pixels for each of ``dx`` and
    ``dy`` (odd counts include 0): ``angles · shifts²`` transformations, tried from the smallest
    to the largest. An example is fooled as soon as one of them is misclassified, and then left
    alone (the transformation kept is the smallest that fools it); for the others, the one with
    the highest ``loss`` (``"ce"``, ``"margin"`` or a callable) is kept. Engstrom et al. 2019 use
    31 rotations and 7 × 7 integer shifts on MNIST (±30°, ±3 px), the defaults. The model runs in
    evaluation mode and is left as it was found; no gradient is taken. Chapter 10.
    """
    check_inputs(model, x, y)
    max_angle, max_shift = _check_box(max_angle, max_shift)
    angles, shifts = integer("angles", angles), integer("shifts", shifts)
    loss_fn = loss_fn_of(loss, LOSSES)
    grid = _grid(max_angle, max_shift, angles, shifts)
    with attacking_batch(model, x, y) as (x0, y0):
        n = len(x0)
        best_angle = torch.zeros(n, device=x0.device)
        best_shift = torch.zeros(n, 2, device=x0.device)
        best_x = x0.clone()
        best_loss = torch.full((n,), -math.inf, device=x0.device)
        fooled = torch.zeros(n, dtype=torch.bool, device=x0.device)
        if n == 0:
            return SpatialResult(best_x, best_angle, best_shift, best_loss, fooled, 0)
        for i, (a, dx, dy) in enumerate(grid.tolist()):
            todo = (~fooled).nonzero().flatten()
            if len(todo) == 0:
                break
            shift = torch.tensor([dx, dy], device=x0.device)
            xt, l, f = _evaluate(model, x0[todo], y0[todo], loss_fn, a, shift, check=i == 0)
            take = _better(f, l, fooled[todo], best_loss[todo])
            sel = todo[take]
            best_x[sel], best_loss[sel], fooled[sel] = xt[take], l[take], f[take]
            best_angle[sel] = a
            best_shift[sel] = shift
        return SpatialResult(best_x, best_angle, best_shift, best_loss, fooled, len(grid))


def spatial_grid(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **params) -> torch.Tensor:
    """:func:`spatial_grid_search` with the book's attack contract: only the images ``x_adv``."""
    return spatial_grid_search(model, x, y, **params).x_adv


# --------------------------------------------------------------------------------------------
# Gradient ascent on the transformation's parameters
# --------------------------------------------------------------------------------------------

def spatial_pgd_search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, max_angle: float = 30.0,
                       max_shift: float = 3.0, steps: int = 20, alpha_angle: float | None = None,
                       alpha_shift: float | None = None, random_start: bool = True, loss: Loss = "ce",
                       generator: torch.Generator | None = None) -> SpatialResult:
    """Projected gradient ascent on each example's ``(angle, dx, dy)``: a :class:`SpatialResult`.

    PGD in the three parameters of the transformation instead of the 784 pixels: each step moves
    the angle by ``alpha_angle`` degrees and each shift by ``alpha_shift`` pixels in the direction
    of the sign of the loss's gradient (through :func:`rotate_translate`), then clips them to the
    box ``|angle| ≤ max_angle``, ``|dx|, |dy| ≤ max_shift``. The start is uniform in the box
    (``random_start=True``, drawn from ``generator``) or the identity. Default step sizes
    ``2.5 · max / steps``, as for PGD. The point kept is the best of every iterate (misclassified
    first, then the higher loss), so more steps never do worse. Engstrom et al. 2019 found this
    first-order attack weaker than the grid: the loss is far from concave in the angle (the
    book's chapter 10 measures it). The model is left as it was found.
    """
    check_inputs(model, x, y)
    max_angle, max_shift = _check_box(max_angle, max_shift)
    steps = integer("steps", steps, low=0)
    alpha_angle = 2.5 * max_angle / max(steps, 1) if alpha_angle is None else real("alpha_angle", alpha_angle)
    alpha_shift = 2.5 * max_shift / max(steps, 1) if alpha_shift is None else real("alpha_shift", alpha_shift)
    random_start = flag("random_start", random_start)
    loss_fn = loss_fn_of(loss, LOSSES)
    generator = generator_or_none(generator)
    with attacking_batch(model, x, y) as (x0, y0):
        n = len(x0)
        box = torch.tensor([max_angle, max_shift, max_shift], device=x0.device, dtype=x0.dtype)
        if random_start:
            params = (random_like(x0, generator, shape=(n, 3)) * 2 - 1) * box
        else:
            params = torch.zeros(n, 3, device=x0.device, dtype=x0.dtype)
        step = torch.tensor([alpha_angle, alpha_shift, alpha_shift], device=x0.device, dtype=x0.dtype)
        best_x = x0.clone()
        best_params = params.clone()
        best_loss = torch.full((n,), -math.inf, device=x0.device, dtype=x0.dtype)
        fooled = torch.zeros(n, dtype=torch.bool, device=x0.device)
        if n == 0:
            return SpatialResult(best_x, best_params[:, 0], best_params[:, 1:], best_loss, fooled, 0)
        for i in range(steps + 1):
            p = params.clone().requires_grad_(i < steps)
            xt = rotate_translate(x0, p[:, 0], p[:, 1:])
            logits = model(xt)
            if i == 0:
                check_output(logits, y0)
            l = loss_fn(logits, y0)
            f = logits.argmax(1) != y0
            take = _better(f, l.detach(), fooled, best_loss)
            best_x[take], best_params[take] = xt.detach()[take], params[take]
            best_loss[take], fooled[take] = l.detach()[take], f[take]
            if i < steps:
                (g,) = torch.autograd.grad(l.sum(), p)
                params = torch.maximum(torch.minimum(params + step * g.sign(), box), -box)
        return SpatialResult(best_x, best_params[:, 0], best_params[:, 1:], best_loss, fooled, steps + 1)


def spatial_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **params) -> torch.Tensor:
    """:func:`spatial_pgd_search` with the book's attack contract: only the images ``x_adv``."""
    return spatial_pgd_search(model, x, y, **params).x_adv


# --------------------------------------------------------------------------------------------
# Training against it: worst-of-k spatial augmentation
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorstOfK:
    """A training objective: the cross-entropy on the worst of ``k`` random rotations and shifts.

    For every training digit, ``k`` transformations are drawn uniformly from the box
    ``|angle| ≤ max_angle``, ``|dx|, |dy| ≤ max_shift`` (from torch's global generator, which
    :func:`utils.train.fit` seeds), the current model scores them in evaluation mode without
    gradients, and the one with the highest cross-entropy is trained on: a cheap inner maximisation
    (``k`` forward passes, no backward pass) that Engstrom et al. 2019 found about as good as the
    grid's worst case for training (their worst-of-10). Terms: ``ce`` (on the chosen digits).
    Chapter 10.
    """

    k: int = 10
    max_angle: float = 30.0
    max_shift: float = 3.0

    def __post_init__(self):
        object.__setattr__(self, "k", integer("k", self.k))
        max_angle, max_shift = _check_box(self.max_angle, self.max_shift)
        object.__setattr__(self, "max_angle", max_angle)
        object.__setattr__(self, "max_shift", max_shift)

    def worst(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The worst of ``k`` random transformations of each digit of ``x`` under ``model``."""
        n = len(x)
        box = torch.tensor([self.max_angle, self.max_shift, self.max_shift], device=x.device, dtype=x.dtype)
        best, best_loss = x, torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
        with eval_mode(model), torch.no_grad():
            for _ in range(self.k):
                p = (torch.rand(n, 3, device=x.device, dtype=x.dtype) * 2 - 1) * box
                xt = rotate_translate(x, p[:, 0], p[:, 1:])
                l = F.cross_entropy(model(xt), y, reduction="none")
                take = l > best_loss
                best = torch.where(take.view(-1, 1, 1, 1), xt, best)
                best_loss = torch.where(take, l, best_loss)
        return best

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        x_worst = self.worst(model, x, y)
        logits = model(x_worst)
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss, logits, {"ce": loss.item()})

    def spec(self) -> dict:
        return {"objective": "worst_of_k_spatial", "k": self.k, "max_angle": self.max_angle,
                "max_shift": self.max_shift}

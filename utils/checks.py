"""Checks at the boundary of the package, shared by every module.

Each check raises one clear error (one sentence: what was wrong and what is expected) or returns
the value normalised (``eps=0`` and ``eps=0.0`` become the same float, names are lower-cased).
Attacks, training objectives, the training loop and the robustness evaluation all use these, so
the same mistake gets the same message everywhere.

Also here: the check that an adversarial example lies inside its threat model
(:func:`check_in_ball`) and the one way the package writes a file atomically
(:func:`atomic_write`).
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from pathlib import Path

import torch

#: How far outside the ε-ball an attack's output may lie before it is refused: float rounding of
#: ``x + δ`` in float32 (pixels in [0, 1], so an absolute tolerance).
BALL_TOLERANCE = 1e-5

NORMS = ("linf", "l2")


def real(name: str, value, *, low: float = 0.0, high: float = math.inf, open_low: bool = False,
         open_high: bool = False) -> float:
    """``value`` as a float, or a clear error unless it is a finite real number in the interval.

    The interval is ``[low, high]``; ``open_low``/``open_high`` exclude an end. A one-element
    floating tensor is accepted as its value.
    """
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


def integer(name: str, value, *, low: int = 1) -> int:
    """``value`` as an int, or a clear error unless it is an integer ``>= low`` (booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    return int(value)


def flag(name: str, value) -> bool:
    """``value`` unchanged, or a clear error unless it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def choice(name: str, value, options: tuple[str, ...]) -> str:
    """``value`` lower-cased, or a clear error unless it names one of ``options``."""
    if not isinstance(value, str) or value.lower() not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value.lower()


def check_images(x: torch.Tensor, *, name: str = "x", tol: float = 1e-6) -> None:
    """Raise a clear error unless ``x`` is a float image batch ``[N, C, H, W]`` with pixels in ``[0, 1]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor with pixels in [0, 1], got dtype {x.dtype}")
    if x.numel() and (float(x.min()) < -tol or float(x.max()) > 1 + tol):
        raise ValueError(
            f"{name} has pixels outside [0, 1] (min {float(x.min()):.3g}, max {float(x.max()):.3g}); "
            "pixels must lie in [0, 1] (normalisation belongs inside the model)"
        )


def check_labels(y: torch.Tensor, *, num_classes: int | None = 10, n: int | None = None, name: str = "y") -> None:
    """Raise a clear error unless ``y`` is an integer label vector of length ``n`` with values in range."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} must be a 1-D integer tensor of class labels, got shape {tuple(y.shape)} "
                         f"and dtype {y.dtype}")
    if n is not None and len(y) != n:
        raise ValueError(f"{name} has {len(y)} labels but there are {n} inputs")
    if num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name} has labels outside 0..{num_classes - 1} (min {int(y.min())}, max {int(y.max())})")


def perturbation_size(x_adv: torch.Tensor, x: torch.Tensor, norm: str = "linf") -> torch.Tensor:
    """``‖x_adv − x‖`` per example in ``norm`` (``"linf"`` or ``"l2"``): ``[N]`` on the device of ``x``."""
    norm = choice("norm", norm, NORMS)
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv must have the shape of x {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    delta = (x_adv.detach().to(x.device) - x.detach()).flatten(1)
    if norm == "linf":
        return delta.abs().amax(dim=1) if delta.shape[1] else delta.new_zeros(len(delta))
    return delta.norm(dim=1)


def check_in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str = "linf", *,
                  name: str = "the attack's output") -> None:
    """Raise a clear error unless every ``x_adv[i]`` lies in the pixel box and in the ε-ball around ``x[i]``.

    The threat model is ``‖x_adv − x‖ ≤ eps`` in ``norm`` (``"linf"`` or ``"l2"``), up to
    :data:`BALL_TOLERANCE` for float rounding. RobustBench and AutoAttack run the same check before
    they count an example as broken: an attack that leaves the ball has changed the question.
    """
    eps = real("eps", eps)
    check_images(x_adv, name=name)
    size = perturbation_size(x_adv, x, norm)
    if size.numel() and float(size.max()) > eps + BALL_TOLERANCE:
        worst = int(size.argmax())
        raise ValueError(f"{name} leaves the {norm} ball of radius {eps:g}: example {worst} moved by "
                         f"{float(size[worst]):.4g} ({int((size > eps + BALL_TOLERANCE).sum())} of {len(size)} "
                         "examples outside)")


def atomic_write(path: str | Path, write) -> None:
    """Create ``path`` in one step: ``write(tmp_path)`` fills a temporary file beside it, which then
    replaces ``path`` with ``os.replace``. A reader sees the old file or the whole new one, never a
    part; if ``write`` fails, nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

"""Random noise of a given size (chapter 2): the baseline a worst-case perturbation is compared to."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import NORMS, choice, real
from .core import NOISE_KINDS, ball_delta, generator_or_none, check_inputs


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
    eps = real("eps", eps)
    norm = choice("norm", norm, NORMS)
    kind = choice("kind", kind, NOISE_KINDS)
    generator = generator_or_none(generator)
    check_inputs(model, x, y)
    x0 = x.detach()
    if len(x0) == 0:
        return x0.clone()
    delta = ball_delta(x0, eps, norm, generator, boundary=(kind == "sign"))
    return (x0 + delta).clamp_(0.0, 1.0)

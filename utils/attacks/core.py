"""What every attack of the book shares: the losses it can climb, the checks at its boundary, leaving
the model as it was found, random points in the ε-ball, and one forward-and-backward pass for the
gradient with respect to the input. The attacks themselves live in :mod:`.gradient` (FGSM, PGD),
:mod:`.apgd` (APGD and its DLR loss), :mod:`.cw` (Carlini & Wagner) and :mod:`.noise` (random noise).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import NORMS, check_images, check_labels
from ..models import kept_modes, model_device

#: A loss for PGD/FGSM: ``loss(logits [N, K], y [N]) -> [N]``, one value per example.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Loss = Union[str, LossFn]

NOISE_KINDS = ("sign", "uniform")

#: Smallest gradient / perturbation norm we divide by in the L2 threat model.
NORM_FLOOR = 1e-12

__all__ = ["cross_entropy_loss", "margin_loss", "LOSSES", "NORMS", "LossFn", "Loss"]


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
# Checks at the boundary (the argument checks themselves are in utils.checks)
# --------------------------------------------------------------------------------------------

def loss_fn_of(loss: Loss, losses: dict[str, LossFn] = LOSSES) -> LossFn:
    """The loss function named by ``loss`` in ``losses`` (an attack's own table), or ``loss`` itself
    when it is a callable."""
    if isinstance(loss, str):
        if loss.lower() not in losses:
            raise ValueError(f"loss must be one of {', '.join(map(repr, losses))} or a callable "
                             f"loss(logits, y) -> [N], got {loss!r}")
        return losses[loss.lower()]
    if not callable(loss):
        raise TypeError(f"loss must be a name ({', '.join(map(repr, losses))}) or a callable "
                        f"loss(logits, y) -> [N], got {type(loss).__name__}")
    return loss


def generator_or_none(generator) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def check_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_images(x)
    check_labels(y, num_classes=None, n=len(x))


def check_output(logits: torch.Tensor, y: torch.Tensor) -> None:
    """Once per call, on the first forward pass: logits ``[N, K]`` and labels in ``0..K-1``."""
    if logits.dim() != 2 or logits.shape[0] != len(y) or logits.shape[1] < 2:
        raise ValueError(f"the model must return logits of shape [N, K] with K >= 2 for N = {len(y)} "
                         f"inputs, got shape {tuple(logits.shape)}")
    k = logits.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise ValueError(f"y has labels outside 0..{k - 1} (min {int(y.min())}, max {int(y.max())}); "
                         f"the model has {k} classes")


def check_loss_value(loss: torch.Tensor, n: int) -> None:
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
def attacking(model: nn.Module) -> Iterator[None]:
    """Evaluation mode, frozen parameters and gradients switched on, for the block; then restore.

    Every module's ``training`` flag comes back as it was (:func:`utils.models.kept_modes`: a
    model in training mode with a frozen BatchNorm in evaluation mode comes back exactly like
    that). Parameters are switched to ``requires_grad=False`` during the attack so that autograd
    neither builds nor runs any part of the graph for the weights (cheaper, and no ``.grad`` can be
    written); their flags come back too, also when the attack raises.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with kept_modes(model):
        try:
            model.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            with torch.enable_grad():
                yield
        finally:
            for p, f in flags:
                p.requires_grad_(f)


@contextlib.contextmanager
def attacking_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`attacking` for the block, which receives the batch on the model's device: ``x``
    detached (the caller's tensor is never modified) and ``y`` as int64 labels."""
    device = model_device(model)
    with attacking(model):
        yield x.detach().to(device), y.to(device=device, dtype=torch.long)


def per_example(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``[N]`` tensor so that it broadcasts over ``[N, C, H, W]``."""
    return t.view((-1,) + (1,) * (like.dim() - 1))


def random_like(like: torch.Tensor, generator: torch.Generator | None, *, normal: bool = False,
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


def ball_delta(like: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None, *,
                boundary: bool = False) -> torch.Tensor:
    """A random perturbation in the ε-ball, one per example, shaped like ``like``.

    Uniform in the ball (``boundary=False``), the random start of PGD: L∞, every pixel uniform in
    ``[−eps, eps)``; L2, a Gaussian direction normalised to length 1 times a radius
    ``eps · u^(1/d)`` (``u`` uniform, ``d`` pixels per example), which is uniform in volume (a
    radius uniform in ``[0, eps]`` would crowd the centre). On the boundary (``boundary=True``):
    L∞, every pixel ``±eps``; L2, a random direction of length exactly ``eps``.
    """
    if norm == "linf":
        u = random_like(like, generator)
        if boundary:
            return torch.where(u < 0.5, -eps, eps).to(like.dtype)
        return u.mul_(2 * eps).sub_(eps)
    delta = random_like(like, generator, normal=True)
    delta.div_(per_example(delta.flatten(1).norm(dim=1).clamp_(min=NORM_FLOOR), like))
    if boundary:
        return delta.mul_(eps)
    radius = eps * random_like(like, generator, shape=(len(like),)).pow_(1.0 / like[0].numel())
    return delta.mul_(per_example(radius, like))


def input_gradient(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                    targeted: bool, check: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward and one backward pass: the gradient of the attack objective w.r.t. ``x_adv``.

    The objective is ``sum_i loss_i`` (untargeted: push the loss of the true class up) or
    ``-sum_i loss_i`` (targeted: pull the loss of the target class down). Summing, not averaging,
    keeps every example's gradient independent of the batch size. Returns the gradient (a fresh
    tensor the caller may overwrite), the per-example loss and the logits (both detached).
    """
    x_adv.requires_grad_(True)
    logits = model(x_adv)
    if check:
        check_output(logits, y)
    loss = loss_fn(logits, y)
    if check:
        check_loss_value(loss, len(y))
    total = loss.sum()
    (grad,) = torch.autograd.grad(-total if targeted else total, x_adv)
    return grad, loss.detach(), logits.detach()

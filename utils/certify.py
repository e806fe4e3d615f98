"""Certified robustness under L∞ from interval bounds: interval bound propagation (IBP) and IBP training.

* :func:`interval_bounds` and :func:`margin_bounds`: sound bounds on a model's logits (and on its
  margins ``z_y − z_j``) over the whole ball ``{x' : ‖x' − x‖∞ ≤ ε, x' ∈ [0, 1]}`` in one forward
  pass; :func:`certified` and :func:`certified_accuracy` turn them into certificates.
* :class:`IntervalBoundTraining`: a training objective for :func:`utils.train.fit` that minimises
  ``κ·CE(f(x), y) + (1 − κ)·CE(ẑ(ε), y)`` with ``ẑ`` the worst-case logits of IBP, under Gowal et
  al.'s schedule of ε and κ.

Exact verification (a MILP) is in :mod:`utils.verify`, randomized smoothing (L2) in
:mod:`utils.smoothing`. Pixels are in [0, 1] and ε is in pixel units; the model's input
normalisation is part of the bounds. Gowal et al., "On the effectiveness of interval bound
propagation for training verifiably robust models", 2018. Introduced in chapter 11.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_images, check_labels, real
from .models import Normalize, eval_mode, model_device
from .objectives import set_field
from .train import StepOutput

#: The layer types the bounds understand (the book's models are built from these alone).
SUPPORTED = (Normalize, nn.Flatten, nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d)


# --------------------------------------------------------------------------------------------
# Interval bound propagation
# --------------------------------------------------------------------------------------------

def bound_layers(model: nn.Module) -> list[nn.Module]:
    """The model's leaf modules in the order they were registered, which is the order the book's
    models apply them (``Normalize``, then ``features``, then ``classifier``). A clear error for a
    layer the bounds do not understand; :func:`interval_bounds` also checks that applying the
    layers in this order reproduces the model's output."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if not list(m.children())]
    for m in layers:
        if not isinstance(m, SUPPORTED):
            raise ValueError(f"interval bounds do not support the layer {type(m).__name__}; supported: "
                             f"{', '.join(t.__name__ for t in SUPPORTED)}")
    if not layers:
        raise ValueError("the model has no layers to bound")
    return layers


def _input_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)


def _affine(layer: nn.Module, center: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear or convolutional layer on a box given by centre and radius: ``Wc + b`` and ``|W| r``."""
    if isinstance(layer, nn.Linear):
        return layer(center), F.linear(radius, layer.weight.abs())
    return layer(center), F.conv2d(radius, layer.weight.abs(), None, layer.stride, layer.padding,
                                    layer.dilation, layer.groups)


def _propagate(layers: list[nn.Module], lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for layer in layers:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            center, radius = _affine(layer, (upper + lower) / 2, (upper - lower) / 2)
            lower, upper = center - radius, center + radius
        else:  # Normalize (std > 0), Flatten, ReLU and max-pooling are monotone: apply them to both ends
            lower, upper = layer(lower), layer(upper)
    return lower, upper


def _check_bound_args(model: nn.Module, x: torch.Tensor, eps) -> tuple[float, list[nn.Module]]:
    eps = real("eps", eps)
    check_images(x)
    layers = bound_layers(model)
    with torch.no_grad():
        probe = x[:1].to(model_device(model))
        direct = probe
        for layer in layers:
            direct = layer(direct)
        if len(probe) and not torch.allclose(direct, model(probe), atol=1e-5, rtol=1e-4):
            raise ValueError("the model's leaf layers, applied in the order they are registered, do not "
                             "reproduce its output: interval bounds need a model that is a chain of layers")
    return eps, layers


def interval_bounds(model: nn.Module, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds ``[N, K]`` on the logits over the L∞ ball of radius ``eps`` around each
    ``x`` intersected with the pixel box: for every ``x'`` with ``‖x' − x‖∞ ≤ eps`` and pixels in
    [0, 1], ``lower ≤ model(x') ≤ upper`` (up to float rounding).

    Interval bound propagation: a box ``[l, u]`` passes an affine layer as centre ``W(l+u)/2 + b``
    and radius ``|W|(u−l)/2``, and a monotone layer (ReLU, max-pooling, the normalisation) as
    ``[h(l), h(u)]``. Differentiable in the weights (IBP training). The model must be a chain of
    the :data:`SUPPORTED` layers (the book's ``cnn`` and ``mlp``); it is evaluated as it is (call
    it in evaluation mode). Gowal et al., "On the effectiveness of interval bound propagation for
    training verifiably robust models", 2018. Introduced in chapter 11.
    """
    eps, layers = _check_bound_args(model, x, eps)
    lower, upper = _input_box(x.to(model_device(model)), eps)
    return _propagate(layers, lower, upper)


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Lower bounds ``[N, K]`` on the margins ``z_y(x') − z_j(x')`` over the ball (0 in column ``y``).

    The box is propagated to the input of the last linear layer; the margin ``(w_y − w_j)·h + b_y − b_j``
    is then bounded directly, which is tighter than subtracting the logits' bounds (the last layer is
    "elided" into the specification, as Gowal et al. do). A digit is certified when every entry but
    column ``y`` is positive. Differentiable in the weights.
    """
    eps, layers = _check_bound_args(model, x, eps)
    check_labels(y, num_classes=None, n=len(x))
    last = layers[-1]
    if not isinstance(last, nn.Linear):
        raise ValueError(f"margin bounds need a model whose last layer is nn.Linear, got {type(last).__name__}")
    device = model_device(model)
    y = y.to(device=device, dtype=torch.long)
    lower, upper = _propagate(layers[:-1], *_input_box(x.to(device), eps))
    w = last.weight[y].unsqueeze(1) - last.weight.unsqueeze(0)          # [N, K, H]: w_y − w_j
    b = last.bias[y].unsqueeze(1) - last.bias.unsqueeze(0)              # [N, K]
    center, radius = (upper + lower) / 2, (upper - lower) / 2
    return torch.einsum("nkh,nh->nk", w, center) + b - torch.einsum("nkh,nh->nk", w.abs(), radius)


def certified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
              batch_size: int = 500) -> torch.Tensor:
    """Per digit ``[N]`` (bool, CPU): IBP proves that no ``x'`` in the ball is classified other than
    ``y`` (every margin lower bound of :func:`margin_bounds` is positive). A ``True`` is a proof; a
    ``False`` is no proof of anything (the bounds may be loose). The model is put in evaluation mode
    for the call and left as it was."""
    out = []
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(x), batch_size):
            m = margin_bounds(model, x[i:i + batch_size], y[i:i + batch_size], eps)
            m.scatter_(1, y[i:i + batch_size].to(m.device, torch.long).unsqueeze(1), float("inf"))
            out.append((m > 0).all(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def certified_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """The fraction of digits :func:`certified` at ``eps``: a lower bound on the true robust accuracy."""
    ok = certified(model, x, y, eps)
    if len(ok) == 0:
        raise ValueError("certified_accuracy needs at least one digit")
    return float(ok.double().mean())


# --------------------------------------------------------------------------------------------
# IBP training
# --------------------------------------------------------------------------------------------

def ibp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """``CE(ẑ, y)`` with the worst-case logits ``ẑ_j = −m_j`` (``m`` from :func:`margin_bounds`,
    so ``ẑ_y = 0``): ``mean log(1 + Σ_{j≠y} exp(−m_j))``, an upper bound on the cross-entropy of
    every point of the ball (Gowal et al.'s specification loss)."""
    return F.cross_entropy(-margin_bounds(model, x, y, eps), y.to(model_device(model), torch.long))


@dataclass(frozen=True)
class IntervalBoundTraining:
    """IBP training: minimise ``κ·CE(f(x), y) + (1 − κ)·CE(ẑ(ε), y)`` (:func:`ibp_loss`).

    The schedule follows Gowal et al.: for the first ``start`` of training (``progress`` is the
    fraction done) the model trains on clean digits alone (ε = 0, κ = 1); over the next ``ramp``
    ε grows linearly from 0 to ``eps`` and κ falls linearly from 1 to ``kappa``; then both stay.
    Without the ramp the bounds of an untrained network are so loose that the robust term swamps
    the clean one. ``eps`` is in pixel units (the bounds include the model's normalisation).

    The logits returned are the clean ones (``train_acc`` is clean accuracy). Terms: ``ce``,
    ``ce_ibp`` (0 while ε = 0), ``eps`` and ``kappa`` in force. Gowal et al., "On the effectiveness
    of interval bound propagation for training verifiably robust models", 2018. Introduced in
    chapter 11.
    """

    eps: float = 0.1
    kappa: float = 0.5
    start: float = 0.1
    ramp: float = 0.5

    def __post_init__(self):
        set_field(self, "eps", real("eps", self.eps))
        set_field(self, "kappa", real("kappa", self.kappa, high=1.0))
        set_field(self, "start", real("start", self.start, high=1.0, open_high=True))
        set_field(self, "ramp", real("ramp", self.ramp, high=1.0))
        if self.start + self.ramp > 1.0:
            raise ValueError(f"start + ramp must be at most 1 (the whole of training), got {self.start + self.ramp:g}")

    def schedule(self, progress: float) -> tuple[float, float]:
        """``(ε, κ)`` in force at ``progress`` in [0, 1]."""
        if self.ramp == 0.0:
            frac = 1.0 if progress >= self.start else 0.0
        else:
            frac = min(max((float(progress) - self.start) / self.ramp, 0.0), 1.0)
        return self.eps * frac, 1.0 - (1.0 - self.kappa) * frac

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        eps_now, kappa_now = self.schedule(progress)
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        # At ε = 0 the bound is the clean cross-entropy itself; while κ = 1 it has no weight and is not computed.
        robust = ibp_loss(model, x, y, eps_now) if kappa_now < 1.0 else torch.zeros((), device=ce.device)
        loss = kappa_now * ce + (1.0 - kappa_now) * robust
        return StepOutput(loss, logits, {"ce": ce.item(), "ce_ibp": float(robust.item()), "eps": eps_now,
                                         "kappa": kappa_now})

    def spec(self) -> dict:
        return {"objective": "interval_bound_training", "eps": self.eps, "kappa": self.kappa,
                "start": self.start, "ramp": self.ramp}

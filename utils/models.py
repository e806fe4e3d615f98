"""Models: small MNIST classifiers whose normalisation lives inside the model.

Every model takes pixels in ``[0, 1]`` (shape ``[N, 1, 28, 28]``) and returns logits ``[N, 10]``.
Because the normalisation is a buffer inside the model, an attack's ``eps`` is always in pixel
units. Introduced in chapter 2.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

#: Mean and standard deviation of MNIST training pixels (the usual constants).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class Normalize(nn.Module):
    """``(x - mean) / std`` with mean and std stored as buffers (saved with the weights)."""

    def __init__(self, mean: float = MNIST_MEAN, std: float = MNIST_STD):
        super().__init__()
        if std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.item():.4f}, std={self.std.item():.4f}"


class MnistCNN(nn.Module):
    """Four 3x3 convolutions (``width``, ``width``, ``2·width``, ``2·width`` channels) with two max-pools,
    then a hidden layer of ``hidden`` units and 10 logits.

    With the default ``width=32`` this is the classic MNIST network of Carlini & Wagner (2017),
    also close to the one Madry et al. (2018) trained adversarially.
    """

    def __init__(self, width: int = 32, hidden: int = 200, num_classes: int = 10):
        super().__init__()
        w = int(width)
        self.normalize = Normalize()
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * 7 * 7, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class MnistMLP(nn.Module):
    """A two-hidden-layer perceptron: a cheap model for tests and exercises."""

    def __init__(self, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "cnn": MnistCNN,
    "mlp": MnistMLP,
}


def build_model(arch: str = "cnn", **kwargs) -> nn.Module:
    """Build a fresh, untrained model by name (``"cnn"`` or ``"mlp"``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[nn.Module]:
    """For the block, let the code change ``model``'s modes; afterwards every module's ``training``
    flag is what it was before, also when the block raises.

    ``model.train(was_training)`` would not do: it puts every submodule into the one top-level mode,
    so a BatchNorm frozen in evaluation mode inside a model in training mode would come back in
    training mode. This records and restores the flag of each module.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluation mode for the block (BatchNorm uses its running statistics, Dropout is off); then
    every module's mode comes back as it was (:func:`kept_modes`)."""
    with kept_modes(model):
        model.eval()
        yield model

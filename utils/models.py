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


def classifier_head(features: int, hidden: int, num_classes: int = 10) -> nn.Sequential:
    """Flatten, a hidden layer of ``hidden`` ReLU units, then ``num_classes`` logits: the head both CNNs share."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class MnistCNN(nn.Module):
    """Four 3x3 convolutions (``width``, ``width``, ``2·width``, ``2·width`` channels) with two max-pools,
    then a hidden layer of ``hidden`` units and 10 logits.

    With the default ``width=32`` this is the classic MNIST network of Carlini & Wagner (2017),
    also close to the one Madry et al. (2018) trained adversarially. 694,402 parameters.
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
        self.classifier = classifier_head(2 * w * 7 * 7, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class SmallCNN(nn.Module):
    """Two 4x4 convolutions of stride 2 (``width`` and ``2·width`` channels, no pooling), then a hidden
    layer of ``hidden`` units and 10 logits.

    With the defaults (16, 100) this is the MNIST network of Wong et al. (2020, "Fast is better than
    free") and of Kolter & Madry's tutorial, 166,406 parameters. Its convolutions work at 14x14 and
    7x7 where :class:`MnistCNN`'s work at 28x28 and 14x14, so an input gradient costs about an
    eighteenth as much on a CPU (``benchmarks/architecture.py``). The book's models (:mod:`utils.zoo`) are this one.
    """

    def __init__(self, width: int = 16, hidden: int = 100, num_classes: int = 10):
        super().__init__()
        w = int(width)
        self.normalize = Normalize()
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.ReLU(),
        )
        self.classifier = classifier_head(2 * w * 7 * 7, hidden, num_classes)

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
    "small_cnn": SmallCNN,
    "mlp": MnistMLP,
}


def build_model(arch: str = "cnn", **kwargs) -> nn.Module:
    """Build a fresh, untrained model by name (a key of :data:`ARCHITECTURES`)."""
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

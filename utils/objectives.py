"""Training objectives on clean data: the standard cross-entropy (chapter 2) and the two steps of
defensive distillation, the book's example of gradient masking (chapter 9).

Each objective is a frozen dataclass called by :func:`utils.train.fit` as ``objective(model, x, y,
progress=t)``; its :meth:`spec` goes into the cache key of the model trained with it. The
adversarial objectives are in :mod:`utils.defences`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checks import real
from .models import eval_mode
from .train import StepOutput


def set_field(obj, name: str, value) -> None:
    """Store a checked, normalised field value on a frozen dataclass (so ``eps=0`` and ``eps=0.0``
    give one spec, and one cache key)."""
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class CrossEntropy:
    """Standard training: minimise the cross-entropy on clean inputs."""

    label_smoothing: float = 0.0

    def __post_init__(self):
        set_field(self, "label_smoothing", real("label_smoothing", self.label_smoothing, high=1.0, open_high=True))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return StepOutput(loss, logits, {"ce": loss.item()})

    def spec(self) -> dict:
        return {"objective": "cross_entropy", **asdict(self)}


@dataclass(frozen=True)
class TemperatureCrossEntropy:
    """Cross-entropy of the softmax at temperature ``T``: ``CE(f(x) / T, y)``.

    Trained this way and then used at temperature 1 (the logits as they are), a model's logits
    come out about ``T`` times larger than a normally trained model's, so its softmax saturates:
    the first step of defensive distillation (the teacher). Terms: ``ce_T``.
    Papernot, McDaniel, Wu, Jha & Swami, "Distillation as a defense to adversarial perturbations
    against deep neural networks", IEEE S&P 2016. Introduced in chapter 9.
    """

    temperature: float = 100.0

    def __post_init__(self):
        set_field(self, "temperature", real("temperature", self.temperature, open_low=True))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        logits = model(x)
        loss = F.cross_entropy(logits / self.temperature, y)
        return StepOutput(loss, logits, {"ce_T": loss.item()})

    def spec(self) -> dict:
        return {"objective": "temperature_cross_entropy", "temperature": self.temperature}


@dataclass(frozen=True, eq=False)
class Distillation:
    """Defensive distillation: fit the teacher's soft labels at temperature ``T``.

    ``L = −mean_i Σ_k softmax(t(x_i)/T)_k · log softmax(f(x_i)/T)_k`` with ``t`` the ``teacher``
    (evaluation mode, no gradient). The student is then used at temperature 1, where its
    logits are about ``T`` times too large: the softmax saturates and the gradient of the
    cross-entropy vanishes in float32, which is gradient masking, not robustness (chapter 9).
    ``teacher_key`` names the teacher in the spec (its cache key), so that a different teacher
    makes a different student. Terms: ``soft_ce``.
    """

    teacher: nn.Module
    teacher_key: str
    temperature: float = 100.0

    def __post_init__(self):
        if not isinstance(self.teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(self.teacher).__name__}")
        if not isinstance(self.teacher_key, str) or not self.teacher_key:
            raise ValueError("teacher_key must be a non-empty string (the teacher's cache key)")
        set_field(self, "temperature", real("temperature", self.temperature, open_low=True))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        with eval_mode(self.teacher), torch.no_grad():
            soft = F.softmax(self.teacher(x) / self.temperature, dim=1)
        logits = model(x)
        loss = -(soft * F.log_softmax(logits / self.temperature, dim=1)).sum(1).mean()
        return StepOutput(loss, logits, {"soft_ce": loss.item()})

    def spec(self) -> dict:
        return {"objective": "distillation", "temperature": self.temperature, "teacher": self.teacher_key}

    def __repr__(self) -> str:
        return f"Distillation(teacher_key={self.teacher_key!r}, temperature={self.temperature:g})"

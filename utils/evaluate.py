"""Evaluation: accuracy and loss on clean or attacked inputs, predictions, confusion matrices.

One loop serves every attack: :func:`evaluate` takes an optional ``attack`` callable with the
book's contract ``attack(model, x, y) -> x_adv`` (configure it with ``functools.partial``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_images, check_labels, integer
from .models import eval_mode, model_device

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Metrics:
    """Mean loss, accuracy (a fraction in [0, 1]) and the number of examples they were measured on."""

    loss: float
    acc: float
    n: int

    @property
    def err(self) -> float:
        return 1.0 - self.acc

    def __repr__(self) -> str:
        return f"Metrics(loss={self.loss:.4f}, acc={100 * self.acc:.2f}%, n={self.n})"


def _batches(x: torch.Tensor, y: torch.Tensor | None, batch_size: int):
    batch_size = integer("batch_size", batch_size)
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], (None if y is None else y[i:i + batch_size])


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits ``[N, K]`` of ``model`` in evaluation mode, returned on the CPU. ``x``: ``[N, C, H, W]`` in [0, 1]."""
    check_images(x)
    device = model_device(model)
    with eval_mode(model):
        out = [model(xb.to(device)).float().cpu() for xb, _ in _batches(x, None, batch_size)]
    return torch.cat(out) if out else torch.empty(0, 0)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Predicted classes ``[N]`` (CPU)."""
    return predict_logits(model, x, batch_size).argmax(dim=1)


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack | None = None,
    *,
    batch_size: int = 512,
) -> Metrics:
    """Cross-entropy and accuracy of ``model`` on ``(x, y)``, or on ``attack(model, x, y)`` when given.

    The model is evaluated in evaluation mode and every module is left in the mode it was in. The
    attack runs batch by batch on the model's device.
    """
    check_images(x)
    check_labels(y, n=len(x))
    device = model_device(model)
    total_loss, correct, n = 0.0, 0, 0
    with eval_mode(model):
        for xb, yb in _batches(x, y, batch_size):
            xb, yb = xb.to(device), yb.to(device)
            if attack is not None:
                xb = attack(model, xb, yb)
            with torch.no_grad():
                logits = model(xb)
                total_loss += F.cross_entropy(logits, yb, reduction="sum").item()
                correct += (logits.argmax(1) == yb).sum().item()
            n += len(yb)
    if n == 0:
        raise ValueError("evaluate needs at least one example")
    return Metrics(loss=total_loss / n, acc=correct / n, n=n)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack | None = None,
             batch_size: int = 512) -> float:
    """Accuracy only (a fraction)."""
    return evaluate(model, x, y, attack, batch_size=batch_size).acc


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """``C[i, j]`` = number of examples of class ``i`` predicted as ``j``."""
    check_labels(y_true, num_classes=num_classes, name="y_true")
    check_labels(y_pred, num_classes=num_classes, n=len(y_true), name="y_pred")
    idx = y_true.long().cpu() * num_classes + y_pred.long().cpu()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def targeted_success_matrix(model: nn.Module, attack: Callable[..., torch.Tensor], x: torch.Tensor,
                            y: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """``S[s, t]``: the fraction of the examples of class ``s`` that ``attack(model, x, target,
    targeted=True)`` turns into class ``t`` (NaN on the diagonal and for classes absent from ``y``).

    Every target ``t`` is tried on all examples whose class is not ``t``. ``attack`` follows the
    book's contract with a ``targeted`` keyword (:func:`utils.attacks.fgsm`, :func:`utils.attacks.pgd`,
    :func:`utils.attacks.cw_l2`). ``[num_classes, num_classes]`` on the CPU. Chapter 4.
    """
    check_images(x)
    check_labels(y, num_classes=num_classes, n=len(x))
    success = torch.full((num_classes, num_classes), float("nan"))
    y_cpu = y.cpu()
    for t in range(num_classes):
        keep = y_cpu != t
        if not keep.any():
            continue
        keep_dev = keep.to(y.device)
        target = torch.full_like(y[keep_dev], t)
        pred = predict(model, attack(model, x[keep_dev], target, targeted=True))
        for s in range(num_classes):
            from_s = y_cpu[keep] == s
            if from_s.any():
                success[s, t] = (pred[from_s] == t).float().mean()
    return success


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve for telling ``positive`` scores from ``negative`` ones (higher = more positive).

    Equals the probability that a random positive scores above a random negative, ties counting one half
    (the Mann-Whitney U statistic over ``len(positive)·len(negative)``). Used for energy as a detector
    (chapters 1 and 8).
    """
    pos = torch.as_tensor(positive, dtype=torch.float64).flatten().cpu()
    neg = torch.as_tensor(negative, dtype=torch.float64).flatten().cpu()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise ValueError("auroc needs finite scores")
    scores = torch.cat([pos, neg])
    order = torch.argsort(scores, stable=True)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))

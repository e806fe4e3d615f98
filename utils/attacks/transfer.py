"""Transfer attacks (chapter 10): adversarial examples made on one model (the *source*, or an ensemble
of several) and shown to another that the attacker never queries.

Szegedy et al. (2014) found that adversarial examples often fool other models too; Papernot,
McDaniel & Goodfellow (2016) built black-box attacks on it, and Liu, Chen, Liu & Song (2017)
showed that examples made on an ensemble transfer better than those of any single model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .core import check_inputs

__all__ = ["Ensemble", "transfer_attack"]

COMBINE = ("log_softmax", "logits")


class Ensemble(nn.Module):
    """Several classifiers as one: the mean of their log-probabilities (``combine="log_softmax"``,
    the default) or of their logits (``"logits"``).

    Averaging log-probabilities weighs every member alike whatever the scale of its logits (a
    distilled model's logits are about a hundred times larger than a standard model's, and would
    drown the others in a mean of logits). The members are kept as submodules, so an attack on the
    ensemble leaves each of them as it was found. Chapter 10.
    """

    def __init__(self, models: Sequence[nn.Module], combine: str = "log_softmax"):
        super().__init__()
        models = list(models)
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise ValueError("an Ensemble needs a non-empty sequence of torch.nn.Module")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {', '.join(map(repr, COMBINE))}, got {combine!r}")
        self.members = nn.ModuleList(models)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.members]
        if self.combine == "log_softmax":
            outs = [F.log_softmax(o, dim=1) for o in outs]
        return torch.stack(outs).mean(dim=0)


def transfer_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, source: nn.Module,
                    attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The book's attack contract for a transfer attack: ``attack(source, x, y)``, run on ``source``.

    ``model`` (the target) is never called: its name is in the signature only so that every loop of
    the book (:func:`utils.robustness.robust_correct`, :func:`utils.evaluate.evaluate`) can run a
    transfer attack like any other; the result lies in whatever threat model ``attack`` keeps to.
    The examples come back on the device of ``x``. Chapter 10.
    """
    check_inputs(model, x, y)
    if not isinstance(source, nn.Module):
        raise TypeError(f"source must be a torch.nn.Module, got {type(source).__name__}")
    if not callable(attack):
        raise TypeError(f"attack must be callable as attack(model, x, y), got {type(attack).__name__}")
    return attack(source, x, y).to(x.device)

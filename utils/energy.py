"""The energy view of a classifier (chapter 1).

For logits ``f(x)`` the (free) energy at temperature ``T`` is

    E(x) = -T · logsumexp(f(x) / T)

and the joint energy of an input with a label is ``E(x, y) = -f_y(x)``. With ``T = 1`` the
cross-entropy is their difference, ``CE(f(x), y) = E(x, y) - E(x)`` (Grathwohl et al. 2020;
LeCun et al. 2006). Low energy goes with a large top logit; energy is not a probability and,
unlike the softmax, it is not invariant to adding a constant to every logit (Liu et al. 2020 use
this to detect out-of-distribution inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import real


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        logits = torch.as_tensor(logits, dtype=torch.float32)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a class dimension last, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        logits = logits.float()
    return logits


def _check_temperature(T: float) -> float:
    return real("temperature T", T, open_low=True)


def energy(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Free energy ``-T·logsumexp(logits / T)`` over the last dimension.

    ``logits``: ``[..., K]``; returns ``[...]``. ``T > 0``.
    """
    logits = _check_logits(logits)
    T = _check_temperature(T)
    return -T * torch.logsumexp(logits / T, dim=-1)


def joint_energy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy of an input with a label, ``E(x, y) = -f_y(x)``. ``logits``: ``[N, K]``, ``y``: ``[N]``."""
    logits = _check_logits(logits)
    y = torch.as_tensor(y, device=logits.device)
    if logits.dim() != 2 or y.shape != logits.shape[:1]:
        raise ValueError(
            f"joint_energy needs logits [N, K] and labels [N], got {tuple(logits.shape)} and {tuple(y.shape)}"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}")
    return -logits.gather(1, y.long().unsqueeze(1)).squeeze(1)


def cross_entropy_from_energy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy written as ``E(x, y) - E(x)``; equals ``F.cross_entropy(..., reduction='none')``."""
    return joint_energy(logits, y) - energy(logits)


@dataclass(frozen=True)
class EnergySummary:
    """Everything chapter 1's logit explorer shows for one logit vector."""

    logits: tuple[float, ...]
    T: float
    energy: float
    probs: tuple[float, ...]
    confidence: float
    prediction: int
    max_logit: float

    def __repr__(self) -> str:
        probs = ", ".join(f"{p:.3f}" for p in self.probs)
        return (f"EnergySummary(E={self.energy:.4f} at T={self.T:g}, prediction={self.prediction}, "
                f"confidence={self.confidence:.3f}, probs=[{probs}])")


def summarize_logits(logits, T: float = 1.0) -> EnergySummary:
    """Energy, softmax and prediction of a single logit vector (a pure function behind the explorer)."""
    t = _check_logits(torch.as_tensor(logits, dtype=torch.float64))
    if t.dim() != 1:
        raise ValueError(f"summarize_logits takes one logit vector [K], got shape {tuple(t.shape)}")
    T = _check_temperature(T)
    p = F.softmax(t / T, dim=-1)
    return EnergySummary(
        logits=tuple(float(v) for v in t),
        T=T,
        energy=float(energy(t, T)),
        probs=tuple(float(v) for v in p),
        confidence=float(p.max()),
        prediction=int(p.argmax()),
        max_logit=float(t.max()),
    )


@torch.no_grad()
def model_energy(model: torch.nn.Module, x: torch.Tensor, T: float = 1.0, batch_size: int = 1024) -> torch.Tensor:
    """Energy of every input under ``model`` (evaluation mode, no gradients), on the CPU. ``x``: ``[N, C, H, W]``."""
    from .evaluate import predict_logits

    return energy(predict_logits(model, x, batch_size=batch_size), T)

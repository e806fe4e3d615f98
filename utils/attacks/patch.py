"""Adversarial patches (chapter 10): one small square of pixels, the same for every image, pasted
anywhere, that makes a model predict a chosen class, the "sticker" threat model of the physical world.

Inside its square the patch may take any value in [0, 1]; outside it nothing changes. That is far
outside any small L∞ ball (the patch pixels move by up to 1), and very local. Brown, Mané, Roy,
Abadi & Gilmer, "Adversarial patch", 2017.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_images, check_labels, integer, real
from ..models import model_device
from .core import attacking, generator_or_none, random_like

__all__ = ["apply_patch", "random_positions", "PatchResult", "train_patch", "patch_attack"]


def _check_patch(patch: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(patch, torch.Tensor) or patch.dim() != 3 or not patch.is_floating_point():
        raise ValueError(f"patch must be a float tensor [C, s, s], got "
                         f"{tuple(patch.shape) if isinstance(patch, torch.Tensor) else type(patch).__name__}")
    c, s, s2 = patch.shape
    if s != s2 or s < 1:
        raise ValueError(f"patch must be square [C, s, s], got shape {tuple(patch.shape)}")
    if c != x.shape[1]:
        raise ValueError(f"the patch has {c} channels but the images have {x.shape[1]}")
    if s > x.shape[2] or s > x.shape[3]:
        raise ValueError(f"the patch ({s}×{s}) is larger than the images ({x.shape[2]}×{x.shape[3]})")
    if patch.numel() and (float(patch.detach().min()) < 0 or float(patch.detach().max()) > 1):
        raise ValueError(f"the patch has pixels outside [0, 1] (min {float(patch.detach().min()):.3g}, "
                         f"max {float(patch.detach().max()):.3g})")


def random_positions(n: int, side: int, height: int = 28, width: int = 28,
                     generator: torch.Generator | None = None, *, margin: int = 0) -> torch.Tensor:
    """``[n, 2]`` (int64, CPU): a uniformly random top-left corner ``(row, col)`` per image for a
    ``side × side`` patch that lies entirely inside a ``height × width`` image, at least ``margin``
    pixels from every border (MNIST digits fill the central 20 × 20 pixels: ``margin=4`` puts the
    patch on the digit)."""
    n, side = integer("n", n, low=0), integer("side", side)
    height, width = integer("height", height), integer("width", width)
    margin = integer("margin", margin, low=0)
    if side + 2 * margin > height or side + 2 * margin > width:
        raise ValueError(f"the patch ({side}×{side}) with a margin of {margin} is larger than the images "
                         f"({height}×{width})")
    generator = generator_or_none(generator)
    like = torch.empty(0)
    u = random_like(like, generator, shape=(n, 2))
    room = torch.tensor([height - side - 2 * margin + 1, width - side - 2 * margin + 1])
    return torch.minimum((u * room).long(), room - 1) + margin


def apply_patch(x: torch.Tensor, patch: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Paste ``patch`` ``[C, s, s]`` into each image of ``x`` ``[N, C, H, W]`` with its top-left corner
    at ``positions[i] = (row, col)``. Differentiable with respect to ``patch`` (and ``x``); every
    pixel outside the square is ``x``'s. Chapter 10."""
    check_images(x)
    _check_patch(patch, x)
    n, _, h, w = x.shape
    s = patch.shape[1]
    if not isinstance(positions, torch.Tensor) or positions.shape != (n, 2) or positions.is_floating_point():
        raise ValueError(f"positions must be a tensor [N, 2] of integer (row, col) pairs for N = {n} images, got "
                         f"{tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__}")
    pos = positions.to(x.device, torch.long)
    if n and (int(pos.min()) < 0 or int(pos[:, 0].max()) > h - s or int(pos[:, 1].max()) > w - s):
        raise ValueError(f"every position must keep the {s}×{s} patch inside the {h}×{w} image "
                         f"(rows and cols in 0..{h - s} and 0..{w - s})")
    rows = torch.arange(h, device=x.device)[None, :] - pos[:, :1]      # [n, h]: row inside the patch
    cols = torch.arange(w, device=x.device)[None, :] - pos[:, 1:]      # [n, w]
    inside = ((rows >= 0) & (rows < s))[:, :, None] & ((cols >= 0) & (cols < s))[:, None, :]
    p = patch.to(x.device, x.dtype)
    r, c = rows.clamp(0, s - 1), cols.clamp(0, s - 1)
    pasted = p[:, r[:, :, None], c[:, None, :]].permute(1, 0, 2, 3)       # [n, C, h, w]
    return torch.where(inside.unsqueeze(1), pasted, x)


@dataclass
class PatchResult:
    """A trained universal patch ``[C, s, s]`` (pixels in [0, 1]), the target class it pushes
    towards, and the training loss (cross-entropy towards the target) and the share of the batch
    predicted as the target, at every step."""

    patch: torch.Tensor
    target: int
    losses: list[float]
    hits: list[float]

    def __repr__(self) -> str:
        s = self.patch.shape[1]
        last = f", last batch {self.hits[-1]:.0%} on target" if self.hits else ""
        return f"PatchResult({s}×{s} patch, target {self.target}, {len(self.losses)} steps{last})"


def train_patch(model: nn.Module, x: torch.Tensor, target: int, *, size: int = 6, steps: int = 200,
                batch_size: int = 64, alpha: float = 0.05, margin: int = 0,
                generator: torch.Generator | None = None) -> PatchResult:
    """Train a universal ``size × size`` patch that makes ``model`` predict ``target`` wherever it is put.

    Gradient descent on the cross-entropy towards ``target``, averaged over a batch of
    ``batch_size`` images of ``x`` (drawn at random, each step) with the patch pasted at a random
    position in each (at least ``margin`` pixels from the border, :func:`random_positions`): the expectation over placements of Brown et al. 2017 (they also vary the
    scale and rotation). Each step moves every patch pixel by ``alpha`` against the sign of the
    gradient and clips it to [0, 1]; the patch starts uniform in [0, 1]. All draws come from
    ``generator``. Gradients are taken with respect to the patch only; the model is left as it was
    found. Chapter 10.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_images(x)
    if len(x) == 0:
        raise ValueError("train_patch needs at least one image")
    target = integer("target", target, low=0)
    size, steps, batch_size = integer("size", size), integer("steps", steps, low=0), integer("batch_size", batch_size)
    alpha = real("alpha", alpha, open_low=True)
    generator = generator_or_none(generator)
    _, c, h, w = x.shape
    margin = integer("margin", margin, low=0)
    if size + 2 * margin > h or size + 2 * margin > w:
        raise ValueError(f"the patch ({size}×{size}) with a margin of {margin} is larger than the images ({h}×{w})")
    device = model_device(model)
    patch = random_like(torch.empty(0), generator, shape=(c, size, size)).to(device)
    losses, hits = [], []
    with attacking(model):
        for _ in range(steps):
            pick = (random_like(torch.empty(0), generator, shape=(min(batch_size, len(x)),)) * len(x)).long()
            pick = pick.clamp_(max=len(x) - 1)
            xb = x[pick].to(device)
            where = random_positions(len(xb), size, h, w, generator, margin=margin)
            p = patch.clone().requires_grad_(True)
            logits = model(apply_patch(xb, p, where))
            t = torch.full((len(xb),), target, dtype=torch.long, device=device)
            if target >= logits.shape[1]:
                raise ValueError(f"target must be a class of the model (0..{logits.shape[1] - 1}), got {target}")
            loss = F.cross_entropy(logits, t)
            (g,) = torch.autograd.grad(loss, p)
            patch = (patch - alpha * g.sign()).clamp_(0.0, 1.0)
            losses.append(loss.item())
            hits.append((logits.argmax(1) == t).float().mean().item())
    return PatchResult(patch.detach(), target, losses, hits)


def patch_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, patch: torch.Tensor,
                 positions: torch.Tensor | None = None, margin: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The book's attack contract for a universal patch: ``x`` with ``patch`` pasted at ``positions``
    (``[N, 2]`` top-left corners) or, by default, at a random position per image drawn from
    ``generator``, at least ``margin`` pixels from the border. The patch does not depend on the image, the label or the model (it was trained
    beforehand, :func:`train_patch`); the result is on the device of ``x``. Chapter 10."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_images(x)
    check_labels(y, num_classes=None, n=len(x))
    _check_patch(patch, x)
    if positions is None:
        positions = random_positions(len(x), patch.shape[1], x.shape[2], x.shape[3], generator_or_none(generator),
                                     margin=margin)
    with torch.no_grad():
        return apply_patch(x.detach(), patch.detach(), positions)

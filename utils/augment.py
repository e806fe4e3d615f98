"""Data augmentation suited to digits: small random shifts (chapter 6).

A digit moved by a pixel or two is the same digit, so shifting every training image by a random
few pixels (padding with black, the background of MNIST) shows the model more digits than the data
holds. Rebuffi, Gowal, Calian, Stimberg, Wiles & Mann, "Data augmentation can improve robustness",
NeurIPS 2021, find that augmentation helps adversarial training mainly together with weight
averaging (:func:`utils.train.fit`'s ``ema``); :func:`utils.train.fit` applies
:func:`random_shift` to every batch when its ``shift`` is above 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_images, integer


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift every image by its own random ``(dy, dx)``, each uniform in ``{−max_shift, …, max_shift}``,
    filling the uncovered border with zeros: ``out[i, :, r, c] = x[i, :, r − dy_i, c − dx_i]`` where
    that pixel exists, else 0.

    The shifts are drawn on the CPU from ``generator`` (the global generator when None) and the
    result is on ``x``'s device, so a seeded generator gives the same shifts on every device.
    ``max_shift=0`` returns ``x`` itself. Shapes: ``[N, C, H, W] -> [N, C, H, W]``, pixels stay in
    [0, 1]; labels are untouched (the caller keeps them). Chapter 6.
    """
    check_images(x)
    s = integer("max_shift", max_shift, low=0)
    if s == 0 or len(x) == 0:
        return x
    n, _, h, w = x.shape
    offsets = torch.randint(-s, s + 1, (n, 2), generator=generator).to(x.device)
    padded = F.pad(x, (s, s, s, s))
    rows = torch.arange(h, device=x.device).unsqueeze(0) + s - offsets[:, :1]   # [N, H]
    cols = torch.arange(w, device=x.device).unsqueeze(0) + s - offsets[:, 1:]   # [N, W]
    index = torch.arange(n, device=x.device)[:, None, None]
    out = padded[index, :, rows[:, :, None], cols[:, None, :]]                  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()

"""Randomized smoothing: a certified L2 radius for any classifier, from Gaussian noise and counting.

The smoothed classifier of a base classifier ``f`` is ``g(x) = argmax_c P(f(x + δ) = c)`` with
``δ ~ N(0, σ² I)``. If the top class has probability ``p_A ≥ 1/2``, then ``g`` returns it on the
whole L2 ball of radius ``σ Φ⁻¹(p_A)`` (Cohen, Rosenfeld & Kolter 2019, Theorem 1 with
``p_B = 1 − p_A``). ``p_A`` is estimated by Monte Carlo, so the certificate holds with probability
at least ``1 − alpha`` over the noise:

* :func:`noise_counts`: how often ``f(x + δ)`` lands on each class;
* :func:`clopper_pearson_lower`: the exact one-sided lower confidence bound on a binomial
  proportion;
* :func:`certify` (Cohen et al.'s CERTIFY): pick the class on ``n0`` draws, bound its
  probability on ``n`` fresh ones, return the radius or abstain;
* :func:`predict_smoothed` (their PREDICT): the smoothed prediction with a binomial test, or abstain;
* :class:`GaussianAugmentation`: the training objective that makes a base classifier good under
  that noise.

The noise is added to the pixels without clamping (as in the paper); the model's normalisation
stays inside it. Introduced in chapter 11.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from .checks import check_images, check_labels, integer, real
from .models import eval_mode, model_device
from .objectives import set_field
from .train import StepOutput

#: The label :func:`certify` and :func:`predict_smoothed` return when they abstain.
ABSTAIN = -1


def noise_counts(model: nn.Module, x: torch.Tensor, sigma: float, n: int, *, batch_size: int = 1000,
                 generator: torch.Generator | None = None, num_classes: int = 10) -> torch.Tensor:
    """Per digit, how many of ``n`` noisy copies ``x + δ`` (``δ ~ N(0, σ² I)``) the model puts in
    each class: ``[N, num_classes]`` int64 counts on the CPU. ``batch_size`` noisy copies go
    through the model at a time; the noise is drawn on the CPU from ``generator`` (so the counts
    do not depend on the device). The model is evaluated in evaluation mode and left as it was."""
    sigma = real("sigma", sigma, open_low=True)
    n = integer("n", n)
    batch_size = integer("batch_size", batch_size)
    check_images(x)
    device = model_device(model)
    counts = torch.zeros(len(x), num_classes, dtype=torch.long)
    with eval_mode(model), torch.no_grad():
        for i in range(len(x)):
            left = n
            while left:
                m = min(left, batch_size)
                noise = torch.randn((m,) + tuple(x.shape[1:]), generator=generator) * sigma
                pred = model((x[i].cpu() + noise).to(device)).argmax(1).cpu()
                counts[i] += torch.bincount(pred, minlength=num_classes)[:num_classes]
                left -= m
    return counts


def clopper_pearson_lower(k, n, alpha: float = 0.001) -> torch.Tensor:
    """The one-sided ``1 − alpha`` lower confidence bound on a binomial proportion from ``k``
    successes in ``n`` trials: the ``alpha`` quantile of ``Beta(k, n − k + 1)`` (0 when ``k = 0``).
    Exact, i.e. conservative: it covers the true proportion with probability at least ``1 − alpha``.
    Works elementwise on tensors or numbers; returns a float64 tensor."""
    alpha = real("alpha", alpha, open_low=True, high=1.0, open_high=True)
    k = torch.as_tensor(k, dtype=torch.float64)
    n = torch.as_tensor(n, dtype=torch.float64)
    if (k < 0).any() or (k > n).any() or (n < 1).any() or (k != k.round()).any() or (n != n.round()).any():
        raise ValueError("k and n must be whole numbers with 0 <= k <= n and n >= 1")
    k_np, n_np = torch.broadcast_tensors(k, n)
    low = stats.beta.ppf(alpha, k_np.numpy(), (n_np - k_np + 1).numpy())
    return torch.where(k_np == 0, 0.0, torch.from_numpy(np.asarray(low, dtype=np.float64)))


@dataclass
class SmoothedCertificate:
    """What :func:`certify` returns, per digit (CPU tensors of length ``N``): ``prediction`` (the
    smoothed class, or :data:`ABSTAIN`), ``radius`` (the certified L2 radius, 0 where it abstains),
    ``p_lower`` (the lower confidence bound on the top class's probability) and ``counts`` (the
    ``n`` draws' class counts). ``sigma``, ``n``, ``alpha`` are the settings used."""

    prediction: torch.Tensor
    radius: torch.Tensor
    p_lower: torch.Tensor
    counts: torch.Tensor
    sigma: float
    n: int
    alpha: float

    def certified_accuracy(self, y: torch.Tensor, radius: float) -> float:
        """The fraction of digits whose smoothed prediction is ``y`` with a certified radius of at
        least ``radius`` (the quantity plotted against the radius in Cohen et al.)."""
        radius = real("radius", radius)
        check_labels(y, n=len(self.prediction))
        return float(((self.prediction == y.cpu()) & (self.radius >= radius)).double().mean())

    def __repr__(self) -> str:
        kept = self.prediction != ABSTAIN
        return (f"SmoothedCertificate(N={len(kept)}, sigma={self.sigma:g}, n={self.n}, alpha={self.alpha:g}, "
                f"abstained={int((~kept).sum())}, median radius={float(self.radius.median()):.3f})")


def certify(model: nn.Module, x: torch.Tensor, sigma: float, *, n0: int = 100, n: int = 1000,
            alpha: float = 0.001, batch_size: int = 1000, generator: torch.Generator | None = None,
            num_classes: int = 10) -> SmoothedCertificate:
    """Cohen et al.'s CERTIFY for each digit of ``x``: the top class ``ĉ`` of ``n0`` noisy draws,
    then ``p_A``, the lower ``1 − alpha`` Clopper-Pearson bound on its probability from ``n`` fresh
    draws; abstain if ``p_A < 1/2``, otherwise certify the L2 radius ``σ Φ⁻¹(p_A)``. With probability
    at least ``1 − alpha`` (over the noise), the smoothed classifier returns ``ĉ`` everywhere in that
    ball. Even with every draw right, the radius is capped at ``σ Φ⁻¹(alpha^(1/n))``. Cohen,
    Rosenfeld & Kolter, "Certified adversarial robustness via randomized smoothing", ICML 2019.
    """
    sigma = real("sigma", sigma, open_low=True)
    n0, n = integer("n0", n0), integer("n", n)
    alpha = real("alpha", alpha, open_low=True, high=1.0, open_high=True)
    guess = noise_counts(model, x, sigma, n0, batch_size=batch_size, generator=generator,
                         num_classes=num_classes).argmax(1)
    counts = noise_counts(model, x, sigma, n, batch_size=batch_size, generator=generator, num_classes=num_classes)
    k = counts.gather(1, guess.unsqueeze(1)).squeeze(1)
    p_lower = clopper_pearson_lower(k, n, alpha)
    keep = p_lower >= 0.5
    radius = torch.where(keep, sigma * torch.from_numpy(np.asarray(stats.norm.ppf(p_lower.numpy()), dtype=np.float64)), 0.0).clamp(min=0.0)
    prediction = torch.where(keep, guess, torch.tensor(ABSTAIN))
    return SmoothedCertificate(prediction, radius, p_lower, counts, sigma, n, alpha)


def predict_smoothed(model: nn.Module, x: torch.Tensor, sigma: float, *, n: int = 100, alpha: float = 0.001,
                     batch_size: int = 1000, generator: torch.Generator | None = None,
                     num_classes: int = 10) -> torch.Tensor:
    """Cohen et al.'s PREDICT: the smoothed classifier's class for each digit, ``[N]`` on the CPU,
    or :data:`ABSTAIN` where a two-sided binomial test cannot tell the top two classes apart at
    level ``alpha`` (counts ``n_A`` against ``n_B``, ``p = 1/2``). A returned class differs from
    the true smoothed class with probability at most ``alpha``."""
    alpha = real("alpha", alpha, open_low=True, high=1.0, open_high=True)
    counts = noise_counts(model, x, sigma, n, batch_size=batch_size, generator=generator, num_classes=num_classes)
    top2 = counts.topk(2, dim=1)
    out = top2.indices[:, 0].clone()
    for i, (na, nb) in enumerate(top2.values.tolist()):
        if stats.binomtest(na, na + nb, 0.5).pvalue > alpha:
            out[i] = ABSTAIN
    return out


class NoisyAverage(nn.Module):
    """``log E_δ softmax(f(x + δ))`` estimated from ``samples`` Gaussian draws per input (fresh ones
    at every call): the soft smoothed classifier that an attack on the smoothed classifier climbs
    (Salman et al. 2019). Its argmax is not exactly the smoothed prediction, but its gradient points
    where the smoothed classifier's probabilities move. A model of the book's contract (pixels in,
    log-probabilities as logits out), so every attack of :mod:`utils.attacks` runs on it."""

    def __init__(self, model: nn.Module, sigma: float, samples: int = 16):
        super().__init__()
        self.model = model
        self.sigma = real("sigma", sigma, open_low=True)
        self.samples = integer("samples", samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noisy = x.unsqueeze(1) + self.sigma * torch.randn((len(x), self.samples) + tuple(x.shape[1:]),
                                                          device=x.device, dtype=x.dtype)
        probs = F.softmax(self.model(noisy.flatten(0, 1)), dim=1).view(len(x), self.samples, -1).mean(1)
        return probs.clamp_min(1e-12).log()


@dataclass(frozen=True)
class GaussianAugmentation:
    """Train the base classifier of randomized smoothing: ``CE(f(x + δ), y)`` with ``δ ~ N(0, σ² I)``
    drawn afresh for every batch (not clamped, as at certification). The logits returned are those
    of the noisy batch. Terms: ``ce_noisy``. Cohen et al. 2019, section 3.3; chapter 11."""

    sigma: float = 0.5

    def __post_init__(self):
        set_field(self, "sigma", real("sigma", self.sigma, open_low=True))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        logits = model(x + self.sigma * torch.randn_like(x))
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss, logits, {"ce_noisy": loss.item()})

    def spec(self) -> dict:
        return {"objective": "gaussian_augmentation", "sigma": self.sigma}

"""Adversarial training objectives: what the book's defences minimise (chapters 6-8).

Every objective here is adversarial training with, optionally, a pairing term, in one vocabulary::

    L = (1 − mix)·CE(f(x), y) + mix·CE(f(x_adv), y) + weight · pairing(f(x), f(x_adv))

* :class:`PGDAdversarial`: Madry et al.'s PGD adversarial training (``mix = 1``, no pairing), and
  :class:`FastFGSM`, Wong, Rice & Kolter's single step from a random start (chapter 6);
* :class:`LogitPairing`: adversarial logit pairing, and clean logit pairing, Kannan et al. (chapter 7);
* :class:`EnergyPairing`: the book's "EnAET", the same with an energy pairing term (chapter 8).

TRADES, which fits the clean labels and pairs the clean and adversarial predictions with a KL term
found by its own inner attack, is in :mod:`utils.trades` (chapter 6).

``x_adv`` comes from :func:`utils.attacks.pgd` on the current model, the one source of the inner
maximisation: the attack runs in evaluation mode, takes gradients with respect to the input only and
writes no parameter's ``.grad``, so the only gradients that reach the weights are those of the
returned loss. The adversarial batch is a constant of the outer minimisation (Danskin's theorem, as
in Madry et al.). Random starts draw from torch's global generator, which :func:`utils.train.fit`
forks and seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import pgd
from .checks import NORMS, choice, flag, integer, real
from .energy import energy
from .objectives import set_field
from .train import StepOutput


# --------------------------------------------------------------------------------------------
# The inner maximisation, one source of truth for every adversarial objective
# --------------------------------------------------------------------------------------------

def _warmup_scale(progress: float, warmup: float) -> float:
    """The fraction of ε in force at ``progress``: a linear ramp from 0 to 1 over ``[0, warmup]``."""
    if warmup <= 0.0:
        return 1.0
    return min(max(float(progress) / warmup, 0.0), 1.0)


def _pgd_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
               steps: int, random_start: bool, norm: str, warmup: float,
               progress: float) -> tuple[torch.Tensor, float]:
    """The adversarial batch for the current model and ε schedule, and the ε in force.

    ε and the step size α are both multiplied by the warm-up fraction at ``progress``. With an ε
    of 0 (no attack, or the very start of a warm-up) the batch is ``x`` itself and no attack runs.
    Otherwise it is :func:`utils.attacks.pgd` on the current weights (evaluation mode, no
    parameter gradients written), detached: the outer minimisation treats it as a constant.
    """
    scale = _warmup_scale(progress, warmup)
    eps_now = eps * scale
    if eps_now == 0.0:
        return x.detach(), 0.0
    x_adv = pgd(model, x, y, eps_now, alpha=alpha * scale, steps=steps, norm=norm, random_start=random_start)
    return x_adv.detach(), eps_now


class _InnerPGD:
    """What the PGD-based objectives share: the fields ``eps, alpha, steps, random_start, norm,
    warmup``, their checks, the schedule, the adversarial batch and their part of the spec."""

    eps: float
    alpha: float | None
    steps: int
    random_start: bool
    norm: str
    warmup: float

    def _check_attack(self) -> None:
        set_field(self, "eps", real("eps", self.eps))
        if self.alpha is not None:
            set_field(self, "alpha", real("alpha", self.alpha, open_low=True))
        set_field(self, "steps", integer("steps", self.steps))
        set_field(self, "random_start", flag("random_start", self.random_start))
        set_field(self, "norm", choice("norm", self.norm, NORMS))
        set_field(self, "warmup", real("warmup", self.warmup, high=1.0, open_high=True))

    def _default_alpha(self) -> float:
        return 2.5 * self.eps / self.steps

    @property
    def step_size(self) -> float:
        """The step size α at full ε: ``alpha``, or the default (PGD: ``2.5·eps/steps``) when ``alpha`` is None."""
        return self._default_alpha() if self.alpha is None else self.alpha

    def current_eps(self, progress: float) -> float:
        """The ε in force at ``progress`` (0 at the start of a warm-up, ``eps`` from ``warmup`` on)."""
        return self.eps * _warmup_scale(progress, self.warmup)

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    progress: float = 1.0) -> tuple[torch.Tensor, float]:
        """The adversarial batch for ``model`` at ``progress`` (detached), and the ε in force."""
        return _pgd_batch(model, x, y, eps=self.eps, alpha=self.step_size, steps=self.steps,
                          random_start=self.random_start, norm=self.norm, warmup=self.warmup,
                          progress=progress)

    def _attack_spec(self) -> dict:
        return {"attack": "pgd", "eps": self.eps, "alpha": self.step_size, "steps": self.steps,
                "random_start": self.random_start, "norm": self.norm, "warmup": self.warmup}


# --------------------------------------------------------------------------------------------
# Chapter 6: adversarial training
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PGDAdversarial(_InnerPGD):
    """PGD adversarial training: ``min_θ E[max_{‖δ‖∞ ≤ ε} CE(f_θ(x + δ), y)]``.

    The inner maximum is approximated by :func:`utils.attacks.pgd` on the current model (``steps``
    steps of size ``alpha``, from a random start in the ball when ``random_start``; ``norm="l2"``
    switches to the L2 ball); the outer minimum is the mean cross-entropy on that adversarial
    batch alone. ``alpha=None`` means ``2.5·eps/steps``.

    ``warmup`` in [0, 1): the fraction of training over which ε, and α with it, ramps linearly
    from 0 to ``eps`` (``progress`` is the fraction of training done); 0 means the full ε from the
    first step.

    The logits returned are the *adversarial* ones, so :func:`fit`'s ``train_acc`` is the training
    accuracy under attack (the clean test accuracy is in ``test_acc``). Terms: ``ce_adv`` and
    ``eps`` (the ε in force, averaged over the epoch).

    Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards deep learning models resistant to
    adversarial attacks", ICLR 2018 (MNIST: ε = 0.3, 40 steps of 0.01, random start). Introduced
    in chapter 6.
    """

    eps: float = 0.3
    alpha: float | None = 0.01
    steps: int = 40
    random_start: bool = True
    warmup: float = 0.0
    norm: str = "linf"

    def __post_init__(self):
        self._check_attack()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        x_adv, eps = self.adversarial(model, x, y, progress)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss, logits, {"ce_adv": loss.item(), "eps": eps})

    def spec(self) -> dict:
        return {"objective": "pgd_adversarial", **self._attack_spec()}


@dataclass(frozen=True)
class FastFGSM(PGDAdversarial):
    """Fast adversarial training: one FGSM step from a random start ("FGSM-RS").

    For every batch: ``δ`` uniform in ``[−ε, ε]^d`` (``x + δ`` clipped to [0, 1]), one step
    ``δ ← δ + α·sign(∇_δ CE(f(x + δ), y))``, then ``δ`` is projected onto the ε-ball and ``x + δ``
    onto the pixel box; the loss is the mean cross-entropy on ``x + δ``. That is
    :class:`PGDAdversarial` with ``steps=1`` and ``random_start=True`` (fixed here), and this
    objective is exactly that. ``alpha=None`` means ``1.25·eps``, the paper's choice.

    With larger steps, or without the random start, training can fall into *catastrophic
    overfitting*: within a few steps the model becomes robust to FGSM and not at all to PGD.
    Watch for it with :class:`utils.overfitting.EarlyStop`.

    ``warmup``: as in :class:`PGDAdversarial`, ε and α ramp linearly from 0 over that fraction of
    training. The logits returned are those of ``x + δ`` (train accuracy under this attack).
    Terms: ``ce_adv``, ``eps``.

    Wong, Rice & Kolter, "Fast is better than free: revisiting adversarial training", ICLR 2020.
    Introduced in chapter 6.
    """

    eps: float = 0.3
    alpha: float | None = None
    warmup: float = 0.0
    steps: int = field(default=1, init=False, repr=False)
    random_start: bool = field(default=True, init=False, repr=False)
    norm: str = field(default="linf", init=False, repr=False)

    def _default_alpha(self) -> float:
        return 1.25 * self.eps

    def spec(self) -> dict:
        return {"objective": "fast_fgsm", "attack": "fgsm_random_start", "eps": self.eps,
                "alpha": self.step_size, "warmup": self.warmup}


# --------------------------------------------------------------------------------------------
# Chapter 7: logit pairing
# --------------------------------------------------------------------------------------------

PAIRINGS = ("adversarial", "clean")


def logit_pairing_loss(logits: torch.Tensor, logits_other: torch.Tensor) -> torch.Tensor:
    """The logit pairing term ``mean_i ‖f_i − g_i‖²₂``: squared L2 distance between paired logit
    vectors, *summed* over the K classes and *averaged* over the batch. ``[N, K], [N, K] -> []``.

    (A mean over classes as well, as in ``F.mse_loss``, would be K times smaller: with K = 10 a
    ``weight`` of λ here is a weight of 10·λ there.) Kannan et al. 2018, chapter 7.
    """
    if logits.shape != logits_other.shape or logits.dim() != 2:
        raise ValueError(f"logit pairing needs two logit tensors of the same shape [N, K], got "
                         f"{tuple(logits.shape)} and {tuple(logits_other.shape)}")
    return (logits - logits_other).pow(2).sum(dim=1).mean()


def _random_partner(n: int, device: torch.device) -> torch.Tensor:
    """A random cyclic permutation ``π`` of ``0..n-1``: every example gets a partner other than itself."""
    order = torch.randperm(n)
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)
    return partner.to(device)


@dataclass(frozen=True)
class LogitPairing(_InnerPGD):
    """Adversarial logit pairing (ALP) and clean logit pairing (CLP).

    ALP (``pairing="adversarial"``), with ``x_adv`` from PGD on the current model::

        L = (1 − mix)·CE(f(x), y) + mix·CE(f(x_adv), y) + weight · mean_i ‖f(x_i) − f(x_adv,i)‖²₂

    ``mix=0.5`` is Kannan et al.'s half-clean, half-adversarial batch; ``mix=1`` is ALP on top of
    Madry's PGD training, the version Engstrom et al. and Mosbach et al. evaluated. The logits
    returned are the adversarial ones (train accuracy under attack).

    CLP (``pairing="clean"``) needs no attack: ``L = CE(f(x), y) + weight · mean_i ‖f(x_i) −
    f(x_π(i))‖²₂`` with ``π`` a random cyclic permutation of the batch, so each clean example is
    paired with another random clean example (never itself). The logits returned are the clean
    ones. The attack fields do not affect CLP and are left out of its spec.

    The pairing term is :func:`logit_pairing_loss` (summed over classes, averaged over the batch).
    Terms: ``ce_clean``, ``ce_adv`` and ``eps`` (ALP only), ``pairing``, ``acc_clean`` (ALP only).

    Kannan, Kurakin & Goodfellow, "Adversarial logit pairing", 2018. Their robustness claims did
    not survive stronger attacks (Engstrom, Ilyas & Athalye 2018 on ImageNet; on MNIST, Mosbach et
    al. 2018 find ALP holds up better while CLP collapses). Introduced in chapter 7.
    """

    eps: float = 0.3
    alpha: float | None = 0.01
    steps: int = 40
    weight: float = 0.5
    pairing: str = "adversarial"
    mix: float = 0.5
    random_start: bool = True
    norm: str = "linf"
    warmup: float = 0.0

    def __post_init__(self):
        self._check_attack()
        set_field(self, "weight", real("weight", self.weight))
        set_field(self, "pairing", choice("pairing", self.pairing, PAIRINGS))
        set_field(self, "mix", real("mix", self.mix, high=1.0))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        if self.pairing == "clean":
            logits = model(x)
            ce_clean = F.cross_entropy(logits, y)
            pair = logit_pairing_loss(logits, logits[_random_partner(len(x), logits.device)])
            loss = ce_clean + self.weight * pair
            return StepOutput(loss, logits, {"ce_clean": ce_clean.item(), "pairing": pair.item()})
        x_adv, eps = self.adversarial(model, x, y, progress)
        logits_clean, logits_adv = model(x), model(x_adv)
        ce_clean = F.cross_entropy(logits_clean, y)
        ce_adv = F.cross_entropy(logits_adv, y)
        pair = logit_pairing_loss(logits_clean, logits_adv)
        loss = (1.0 - self.mix) * ce_clean + self.mix * ce_adv + self.weight * pair
        acc_clean = (logits_clean.detach().argmax(1) == y).float().mean().item()
        return StepOutput(loss, logits_adv, {"ce_clean": ce_clean.item(), "ce_adv": ce_adv.item(),
                                             "pairing": pair.item(), "eps": eps, "acc_clean": acc_clean})

    def spec(self) -> dict:
        if self.pairing == "clean":
            return {"objective": "logit_pairing", "pairing": "clean", "weight": self.weight}
        return {"objective": "logit_pairing", "pairing": "adversarial", "weight": self.weight, "mix": self.mix,
                **self._attack_spec()}


# --------------------------------------------------------------------------------------------
# Chapter 8: "EnAET", adversarial training with energy pairing
# --------------------------------------------------------------------------------------------

def energy_pairing_loss(logits: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """The energy pairing term ``mean_i (E(x_adv,i) − E(x_i))²`` with the free energy
    ``E = −logsumexp(logits)`` at T = 1 (:func:`utils.energy.energy`). ``[N, K], [N, K] -> []``.

    The scalar counterpart of :func:`logit_pairing_loss`: it asks the attack not to move the
    energy, where logit pairing asks it not to move any logit. Chapter 8.
    """
    if logits.shape != logits_adv.shape or logits.dim() != 2:
        raise ValueError(f"energy pairing needs two logit tensors of the same shape [N, K], got "
                         f"{tuple(logits.shape)} and {tuple(logits_adv.shape)}")
    return (energy(logits_adv) - energy(logits)).pow(2).mean()


def energy_weights(energies: torch.Tensor) -> torch.Tensor:
    """Per-example weights after WEAT: ``w_i ∝ 1 / log(1 + exp(|E_i|))``, normalised to mean 1.

    ``energies``: ``[N]`` free energies (detached here: the weights are constants of the loss).
    An example whose energy is far below 0 (a large top logit, fit with confidence) gets a small
    weight; one whose energy is near 0 (small logits, poorly fit) a large one. The normalisation
    keeps the weighted mean of a loss on the scale of the plain mean. Mirza, Briglia, Beadini &
    Masi, "Shedding more light on robust classifiers under the lens of energy-based models", ECCV
    2024 (WEAT). Chapter 8.
    """
    e = energies.detach()
    if e.dim() != 1 or e.numel() == 0:
        raise ValueError(f"energy_weights needs a non-empty vector of energies [N], got shape {tuple(e.shape)}")
    w = 1.0 / F.softplus(e.abs())
    return w / w.mean()


@dataclass(frozen=True)
class EnergyPairing(_InnerPGD):
    """The book's "EnAET": adversarial training plus an energy pairing term.

    With ``x_adv`` from PGD on the current model and the free energy ``E`` at T = 1::

        L = (1 − mix)·CE(f(x), y) + mix·CE(f(x_adv), y) + weight · mean_i (E(x_adv,i) − E(x_i))²

    in the vocabulary every defence of the book shares (:class:`LogitPairing` has the same ``mix``
    and ``weight``). The post that named the method writes ``CE + λ·CE_adv + γ·pairing``; divided by
    ``1 + λ`` that is this loss with ``mix = λ/(1 + λ)`` and ``weight = γ/(1 + λ)``, so its λ = 1,
    γ = 0.1 are ``mix=0.5, weight=0.05`` here (a loss scaled by a constant trains alike under Adam).

    ``weighted=True`` is the energy-weighted variant, after WEAT (Mirza et al. 2024): the
    adversarial cross-entropy becomes ``mean_i w_i · CE(f(x_adv,i), y_i)`` with the weights of
    :func:`energy_weights` computed from ``E(x_adv)`` (detached, mean 1 over the batch), so
    adversarial examples the model fits with low confidence count more. It borrows WEAT's
    weighting, it does not reproduce WEAT, whose released code computes unnormalised weights from
    the *clean* energies and applies them inside a TRADES-style loss.

    The name comes from a blog post; in the literature "EnAET" is Wang et al.'s unrelated
    semi-supervised method (2019). The energy view rests on JEM (Grathwohl et al. 2020), energy-based
    OOD detection (Liu et al. 2020) and WEAT. The logits returned are the adversarial ones (train
    accuracy under attack). Terms: ``ce_clean``, ``ce_adv`` (unweighted mean), ``energy_pairing``,
    ``energy_clean`` and ``energy_adv`` (batch means of E), ``eps``, ``acc_clean``, and
    ``ce_adv_weighted`` when ``weighted``. Introduced in chapter 8.
    """

    eps: float = 0.3
    alpha: float | None = 0.01
    steps: int = 40
    mix: float = 0.5
    weight: float = 0.05
    weighted: bool = False
    random_start: bool = True
    norm: str = "linf"
    warmup: float = 0.0

    def __post_init__(self):
        self._check_attack()
        set_field(self, "mix", real("mix", self.mix, high=1.0))
        set_field(self, "weight", real("weight", self.weight))
        set_field(self, "weighted", flag("weighted", self.weighted))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        x_adv, eps = self.adversarial(model, x, y, progress)
        logits_clean, logits_adv = model(x), model(x_adv)
        ce_clean = F.cross_entropy(logits_clean, y)
        ce_adv_each = F.cross_entropy(logits_adv, y, reduction="none")
        pair = energy_pairing_loss(logits_clean, logits_adv)
        e_clean, e_adv = energy(logits_clean.detach()), energy(logits_adv.detach())
        terms = {"ce_clean": ce_clean.item(), "ce_adv": ce_adv_each.mean().item()}
        if self.weighted:
            ce_adv = (energy_weights(e_adv) * ce_adv_each).mean()
            terms["ce_adv_weighted"] = ce_adv.item()
        else:
            ce_adv = ce_adv_each.mean()
        loss = (1.0 - self.mix) * ce_clean + self.mix * ce_adv + self.weight * pair
        terms.update(energy_pairing=pair.item(), energy_clean=e_clean.mean().item(),
                     energy_adv=e_adv.mean().item(), eps=eps,
                     acc_clean=(logits_clean.detach().argmax(1) == y).float().mean().item())
        return StepOutput(loss, logits_adv, terms)

    def spec(self) -> dict:
        return {"objective": "energy_pairing", "mix": self.mix, "weight": self.weight, "weighted": self.weighted,
                "energy_temperature": 1.0, **self._attack_spec()}

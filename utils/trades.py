"""TRADES: trade clean accuracy for robustness with a KL term (chapter 6).

Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically principled trade-off between robustness
and accuracy", ICML 2019. Where PGD adversarial training fits the labels of adversarial examples,
TRADES fits the labels of the *clean* digits and asks the prediction not to move inside the ball::

    L = mean_i CE(f(x_i), y_i) + β · mean_i KL(softmax f(x_i) ‖ softmax f(x_adv,i))

with ``x_adv`` the point of the ball that maximises that KL for the current model, found by PGD
from a small Gaussian start (the KL and its gradient are exactly 0 at ``x`` itself). The inner
attack is :func:`trades_attack`; the objective, with the ε warm-up and step-size conventions of
every defence of :mod:`utils.defences`, is :class:`TRADES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attacks.core import NORM_FLOOR, attacking_batch, check_inputs, input_gradient, per_example, random_like
from .checks import NORMS, choice, integer, real
from .defences import _InnerPGD, _warmup_scale
from .objectives import set_field
from .train import StepOutput


def trades_kl(logits: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-example ``KL(softmax(logits) ‖ softmax(logits_adv))``, summed over the K classes.
    ``[N, K], [N, K] -> [N]``, every entry ``>= 0`` and exactly 0 where the two rows agree.

    The clean prediction comes first: it is the target the adversarial one is pulled towards.
    TRADES' ``β``-term is the batch mean of this (Zhang et al. 2019, chapter 6).
    """
    if logits.shape != logits_adv.shape or logits.dim() != 2:
        raise ValueError(f"the TRADES KL needs two logit tensors of the same shape [N, K], got "
                         f"{tuple(logits.shape)} and {tuple(logits_adv.shape)}")
    log_p, log_q = F.log_softmax(logits, dim=1), F.log_softmax(logits_adv, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def trades_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, alpha: float = 0.01,
                  steps: int = 40, norm: str = "linf", start_std: float = 0.001,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """TRADES' inner maximisation: PGD on ``KL(softmax f(x) ‖ softmax f(x_adv))``.

    The clean prediction ``softmax f(x)`` is computed once, in evaluation mode and without a
    gradient; the start is ``x + start_std · N(0, 1)`` (Zhang et al.: 0.001), projected onto the
    ε-ball and clamped to [0, 1]; then ``steps`` steps of size ``alpha``, each projected onto the
    ball (L∞: sign of the gradient; L2: the gradient normalised to length ``alpha``) and clamped
    to [0, 1]. The labels ``y`` are checked but not used: the attack needs no label, only the
    model's own clean prediction (it has the book's attack contract so that
    :func:`utils.evaluate.evaluate` can run it). The model is left as it was found (mode,
    ``requires_grad``, no ``.grad`` written), as by every attack of the book.

    Shapes: ``x`` ``[N, C, H, W]`` in [0, 1], ``y`` ``[N]``; returns ``[N, C, H, W]`` in [0, 1]
    inside the ball. Zhang et al. 2019; introduced in chapter 6.
    """
    eps = real("eps", eps)
    alpha = real("alpha", alpha, open_low=True)
    steps = integer("steps", steps, low=0)
    norm = choice("norm", norm, NORMS)
    start_std = real("start_std", start_std)
    check_inputs(model, x, y)
    if len(x) == 0:
        return x.clone()
    with attacking_batch(model, x, y) as (x0, y0):
        with torch.no_grad():
            log_p = F.log_softmax(model(x0), dim=1)

        def kl_to_clean(logits: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            return (log_p.exp() * (log_p - F.log_softmax(logits, dim=1))).sum(dim=1)

        def project(x_adv: torch.Tensor) -> torch.Tensor:
            if norm == "linf":
                return torch.max(torch.min(x_adv, x0 + eps), x0 - eps).clamp_(0.0, 1.0)
            delta = x_adv - x0
            shrink = (eps / delta.flatten(1).norm(dim=1).clamp_(min=NORM_FLOOR)).clamp_(max=1.0)
            return delta.mul_(per_example(shrink, x0)).add_(x0).clamp_(0.0, 1.0)

        x_adv = project(x0 + start_std * random_like(x0, generator, normal=True))
        for t in range(steps):
            grad, _, _ = input_gradient(model, x_adv, y0, kl_to_clean, targeted=False, check=(t == 0))
            x_adv = x_adv.detach()
            if norm == "linf":
                x_adv = x_adv + alpha * grad.sign()
            else:
                x_adv = x_adv + grad * per_example(alpha / grad.flatten(1).norm(dim=1).clamp_(min=NORM_FLOOR), x0)
            x_adv = project(x_adv)
    return x_adv.detach().to(x.device)


@dataclass(frozen=True)
class TRADES(_InnerPGD):
    """TRADES: ``L = CE(f(x), y) + β · mean_i KL(softmax f(x_i) ‖ softmax f(x_adv,i))``.

    ``x_adv`` comes from :func:`trades_attack` on the current model in evaluation mode (``steps``
    steps of size ``alpha`` on the KL from a start ``start_std · N(0, 1)`` away from ``x``) and is a
    constant of the outer minimisation; the gradient of the loss flows through *both* the clean and
    the adversarial logits, as in Zhang et al.'s code. ``beta`` weighs robustness against clean
    accuracy: ``beta=0`` is standard training on the clean digits; Zhang et al. report their MNIST
    result (99.48% clean, 96.07% under PGD-40 at ε = 0.3) with ``β = 6``, ε = 0.3, 40 steps of 0.01.

    ``warmup``, ``alpha`` (``None`` means ``2.5·eps/steps``) and ``norm`` are those of every
    defence of :mod:`utils.defences`: ε and α ramp linearly from 0 over the first ``warmup`` of
    training, and at ε = 0 no attack runs. The logits returned are the adversarial ones (train
    accuracy under this attack, as for the other defences). Terms: ``ce_clean``, ``kl``, ``eps``,
    ``acc_clean``. Zhang et al. 2019; introduced in chapter 6.
    """

    eps: float = 0.3
    alpha: float | None = 0.01
    steps: int = 40
    beta: float = 6.0
    start_std: float = 0.001
    norm: str = "linf"
    warmup: float = 0.0
    random_start: bool = field(default=True, init=False, repr=False)

    def __post_init__(self):
        self._check_attack()
        set_field(self, "beta", real("beta", self.beta))
        set_field(self, "start_std", real("start_std", self.start_std))

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    progress: float = 1.0) -> tuple[torch.Tensor, float]:
        """The adversarial batch for ``model`` at ``progress`` (detached), and the ε in force."""
        scale = _warmup_scale(progress, self.warmup)
        eps_now = self.eps * scale
        if eps_now == 0.0:
            return x.detach(), 0.0
        x_adv = trades_attack(model, x, y, eps_now, alpha=self.step_size * scale, steps=self.steps,
                              norm=self.norm, start_std=self.start_std)
        return x_adv, eps_now

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, progress: float = 1.0) -> StepOutput:
        x_adv, eps = self.adversarial(model, x, y, progress)
        logits_clean, logits_adv = model(x), model(x_adv)
        ce_clean = F.cross_entropy(logits_clean, y)
        kl = trades_kl(logits_clean, logits_adv).mean()
        loss = ce_clean + self.beta * kl
        acc_clean = (logits_clean.detach().argmax(1) == y).float().mean().item()
        return StepOutput(loss, logits_adv, {"ce_clean": ce_clean.item(), "kl": kl.item(), "eps": eps,
                                             "acc_clean": acc_clean})

    def spec(self) -> dict:
        return {"objective": "trades", "beta": self.beta, "attack": "pgd_kl", "eps": self.eps,
                "alpha": self.step_size, "steps": self.steps, "start_std": self.start_std, "norm": self.norm,
                "warmup": self.warmup}

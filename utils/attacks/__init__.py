"""Adversarial attacks: FGSM, PGD and APGD (L∞ and L2), Carlini & Wagner L2, and random noise.

Every attack has the same contract::

    x_adv = attack(model, x, y, **params)

* ``x``: images ``[N, C, H, W]`` with pixels in ``[0, 1]``; ``y``: integer labels ``[N]`` (the
  true labels, or the *target* labels when ``targeted=True``).
* ``x_adv``: a new tensor shaped like ``x``, pixels in ``[0, 1]``, on the device of ``x``. The
  inputs are never modified.
* The attack runs on the model's device, with the model in evaluation mode (BatchNorm uses its
  running statistics, Dropout is off) and with gradients taken with respect to the input only
  (``torch.autograd.grad``): no parameter's ``.grad`` is written. Afterwards every module's
  ``training`` flag and every parameter's ``requires_grad`` flag are as before, also when the
  attack raises.
* Normalisation lives inside the model, so ``eps`` is in pixel units.
* Configure an attack with keywords or ``functools.partial(pgd, eps=0.3, steps=40)``: every loop
  of the book (:func:`utils.evaluate.evaluate`, adversarial training) takes it as a plain callable.

Chapters: FGSM in chapter 3, PGD in chapter 4, Carlini & Wagner in chapter 5, APGD (and its DLR
loss) in chapter 9; random noise is the baseline of chapter 2.
"""

from .apgd import APGDTrace, apgd, apgd_checkpoints, apgd_targeted, apgd_trace, dlr_loss, dlr_targeted_loss
from .core import LOSSES, NORMS, cross_entropy_loss, margin_loss
from .cw import cw_l2
from .gradient import PGDTrace, fgsm, pgd, pgd_trace
from .noise import random_noise

__all__ = [
    "fgsm", "pgd", "pgd_trace", "PGDTrace", "cw_l2", "random_noise",
    "apgd", "apgd_targeted", "apgd_trace", "APGDTrace", "apgd_checkpoints",
    "margin_loss", "cross_entropy_loss", "dlr_loss", "dlr_targeted_loss", "LOSSES", "NORMS",
]

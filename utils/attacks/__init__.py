"""Adversarial attacks: FGSM, PGD and APGD (L∞ and L2), Carlini & Wagner L2, random noise, and the
attacks beyond gradients and the ε-ball: spatial, transfer, Square (score-based) and patches.

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
loss) in chapter 9; random noise is the baseline of chapter 2. Chapter 10 leaves the ε-ball or the
gradient: rotations and translations (:mod:`.spatial`), transfer from other models (:mod:`.transfer`),
the score-based Square attack (:mod:`.square`) and universal patches (:mod:`.patch`). The spatial and
patch attacks keep the contract but not an L-p threat model: their outputs are not in any small ball
around ``x``.
"""

from .apgd import APGDTrace, apgd, apgd_checkpoints, apgd_targeted, apgd_trace, dlr_loss, dlr_targeted_loss
from .core import LOSSES, NORMS, cross_entropy_loss, margin_loss
from .cw import cw_l2
from .gradient import PGDTrace, fgsm, pgd, pgd_trace
from .noise import random_noise
from .patch import PatchResult, apply_patch, patch_attack, random_positions, train_patch
from .spatial import (SpatialResult, WorstOfK, rotate_translate, spatial_grid, spatial_grid_search, spatial_pgd,
                      spatial_pgd_search)
from .square import SquareResult, square, square_fraction, square_trace
from .transfer import Ensemble, transfer_attack

__all__ = [
    "fgsm", "pgd", "pgd_trace", "PGDTrace", "cw_l2", "random_noise",
    "apgd", "apgd_targeted", "apgd_trace", "APGDTrace", "apgd_checkpoints",
    "margin_loss", "cross_entropy_loss", "dlr_loss", "dlr_targeted_loss", "LOSSES", "NORMS",
    "rotate_translate", "spatial_grid", "spatial_grid_search", "spatial_pgd", "spatial_pgd_search",
    "SpatialResult", "WorstOfK", "square", "square_trace", "square_fraction", "SquareResult",
    "apply_patch", "random_positions", "train_patch", "patch_attack", "PatchResult",
    "Ensemble", "transfer_attack",
]

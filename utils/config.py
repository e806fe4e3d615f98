"""Run-time configuration: the profile, seeding, the device and the cache folder.

Two profiles exist (see the preface):

* ``full`` (the default): real training budgets, what readers run and what the committed
  notebook outputs show.
* ``fast``: small subsets and few epochs, so every notebook executes in a few minutes on a
  2-core CPU. The test suite runs this one.

The profile is chosen by the environment variable ``ADVBOOK_PROFILE``; the cache folder by
``ADVBOOK_CACHE`` (default ``~/.cache/advbook``).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch

PROFILE_ENV = "ADVBOOK_PROFILE"
CACHE_ENV = "ADVBOOK_CACHE"
OFFLINE_ENV = "ADVBOOK_OFFLINE"


@dataclass(frozen=True)
class Profile:
    """The budgets one profile gives to every chapter.

    ``train_size``/``test_size`` cap the number of examples used (``None`` means all the
    data source has); ``epochs`` is the standard model's training budget; ``attack_size`` is
    how many test examples an attack experiment uses; ``pgd_steps`` and ``restarts`` are the
    budget of the strongest PGD a chapter runs; ``cw_steps`` and ``cw_search_steps`` are Carlini &
    Wagner's iterations per round and rounds of binary search over ``c``. ``defence_epochs`` is
    the training budget of every adversarially trained model (chapters 6-9) and
    ``train_pgd_steps`` the number of PGD steps of the attack inside their training loop.
    ``apgd_steps`` is the budget of each APGD run of the book's own evaluation (100 in the full
    profile, Croce & Hein's reference); ``square_queries`` the query budget of its Square attack
    (5,000 in the full profile, as in AutoAttack).
    """

    name: str
    train_size: int | None
    test_size: int | None
    epochs: int
    batch_size: int
    attack_size: int
    explorer_examples: int
    pgd_steps: int
    restarts: int
    cw_steps: int
    cw_search_steps: int
    defence_epochs: int = 2
    train_pgd_steps: int = 3
    apgd_steps: int = 100
    square_queries: int = 5000

    def as_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "fast": Profile(name="fast", train_size=1000, test_size=500, epochs=6, batch_size=64,
                    attack_size=100, explorer_examples=8, pgd_steps=10, restarts=2,
                    cw_steps=30, cw_search_steps=4, defence_epochs=6, train_pgd_steps=3, apgd_steps=20,
                    square_queries=300),
    "full": Profile(name="full", train_size=None, test_size=None, epochs=40, batch_size=128,
                    attack_size=1000, explorer_examples=32, pgd_steps=40, restarts=5,
                    cw_steps=100, cw_search_steps=9, defence_epochs=150, train_pgd_steps=10,
                    apgd_steps=100, square_queries=5000),
}


def get_profile(name: str | None = None) -> Profile:
    """Return the profile called ``name``, or the one ``ADVBOOK_PROFILE`` names (default ``full``)."""
    if name is None:
        name = os.environ.get(PROFILE_ENV, "full").strip().lower() or "full"
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}: {PROFILE_ENV} must be one of {sorted(PROFILES)}"
        )
    return PROFILES[name]


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) and return a ``torch.Generator`` seeded alike."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def get_device(prefer: str | None = None) -> torch.device:
    """CUDA when present, else CPU; ``prefer="cpu"`` forces the CPU."""
    if prefer is not None:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_dir(sub: str | None = None) -> Path:
    """The folder that holds downloaded data and trained models (created on demand)."""
    root = Path(os.environ.get(CACHE_ENV, "") or Path.home() / ".cache" / "advbook").expanduser()
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path


def offline() -> bool:
    """True when ``ADVBOOK_OFFLINE`` is set to a true value: skip every download attempt."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}

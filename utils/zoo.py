"""The models of the book: one recipe each, so every chapter that needs a model gets the same one.

:func:`book_spec` gives the recipe (a :class:`utils.cache.ModelSpec`) of each model in
:data:`BOOK_MODELS`, and :func:`load_book_model` loads it from the cache or trains it
(:func:`utils.cache.load_or_train`). Chapters 6-9 share their models this way.
"""

from __future__ import annotations

from . import config
from .cache import ModelSpec, TrainedModel, load_or_train
from .data import MNISTData
from .defences import EnergyPairing, FastFGSM, LogitPairing, PGDAdversarial
from .objectives import CrossEntropy, Distillation, TemperatureCrossEntropy
from .overfitting import BestCheckpoint, EarlyStop
from .trades import TRADES
from .train import Objective


#: The network of every model of the book: Wong et al.'s two stride-2 convolutions
#: (:class:`utils.models.SmallCNN`). ``benchmarks/choose_network.py`` measured it against the four-convolution
#: CNN (:class:`utils.models.MnistCNN`) on validation digits: at least as robust, and far cheaper to attack.
ARCH = "small_cnn"

#: Every model trains on digits shifted at random by up to this many pixels (:func:`utils.augment.random_shift`).
SHIFT = 2


def standard_spec(profile: config.Profile | str | None = None) -> ModelSpec:
    """The chapter-2 model every later chapter attacks: :data:`ARCH` trained with cross-entropy on
    digits shifted at random by up to :data:`SHIFT` pixels (Adam, lr 3e-3, cosine schedule)."""
    if not isinstance(profile, config.Profile):
        profile = config.get_profile(profile)
    return ModelSpec(name="standard", arch=ARCH, objective=CrossEntropy(), epochs=profile.epochs,
                     batch_size=profile.batch_size, lr=3e-3, seed=0, shift=SHIFT)


# --------------------------------------------------------------------------------------------
# The models of the book, one recipe each, so every chapter that needs a model gets the same one
# --------------------------------------------------------------------------------------------

#: The ε (L∞, pixels in [0, 1]) every defence of the book is trained for: Madry et al.'s MNIST budget.
DEFENCE_EPS = 0.3

#: name -> (chapter that introduces it, one line saying what it is)
BOOK_MODELS: dict[str, tuple[int, str]] = {
    "standard": (2, "cross-entropy on clean digits"),
    "pgd_at": (6, "PGD adversarial training (Madry et al. 2018)"),
    "trades": (6, "TRADES with β = 6: clean cross-entropy plus β times the KL to the worst point (Zhang et al. 2019)"),
    "fast_at": (6, "FGSM with a random start and a step of 2ε/3, guarded by early stopping (after Wong et al. 2020)"),
    "fast_at_overfit": (6, "FGSM with a random start and Wong et al.'s step 1.25ε, trained to the end"),
    "alp": (7, "adversarial logit pairing (Kannan et al. 2018)"),
    "clp": (7, "clean logit pairing (Kannan et al. 2018)"),
    "enaet": (8, "adversarial training with energy pairing (the book's EnAET)"),
    "enaet_weighted": (8, "EnAET with energy-weighted adversarial loss (after WEAT)"),
    "distillation_teacher": (9, "trained at softmax temperature 100, the teacher of defensive distillation"),
    "distilled": (9, "defensive distillation at temperature 100 (Papernot et al. 2016)"),
}

#: TRADES' weight of its robustness term in the book's model: Zhang et al.'s β = 6, not tuned here.
TRADES_BETA = 6.0

#: The softmax temperature of defensive distillation (Papernot et al. 2016 used 100 on MNIST).
DISTILLATION_TEMPERATURE = 100.0


def book_spec(name: str, profile: config.Profile | str | None = None, *,
              teacher: TrainedModel | None = None) -> ModelSpec:
    """The recipe of the book's model ``name`` (see :data:`BOOK_MODELS`) in ``profile``.

    Every model is :data:`ARCH` trained on digits shifted by up to :data:`SHIFT` pixels. Every
    adversarially trained model uses the same budget, so that chapter 8 can compare them
    fairly: ``profile.defence_epochs`` epochs of Adam (cosine schedule, lr 1e-3, batch
    ``profile.batch_size``), with the attack inside training at ε = :data:`DEFENCE_EPS`, ramped up
    linearly over the first quarter of training, and ``profile.train_pgd_steps`` PGD steps of
    size 2.5·ε/steps from a random start. The two single-step (FGSM with a random start) models
    train at the full ε from the start, as Wong et al. do: ``fast_at_overfit`` with their step
    1.25·ε, ``fast_at`` with a step of 2ε/3 and early stopping.

    ``"distilled"`` needs its ``teacher`` (the trained ``"distillation_teacher"``);
    :func:`load_book_model` fetches it. Both are trained for twice the standard model's epochs
    at a learning rate of 3e-3.
    """
    if not isinstance(profile, config.Profile):
        profile = config.get_profile(profile)
    if name not in BOOK_MODELS:
        raise ValueError(f"unknown model {name!r}; the book's models are {sorted(BOOK_MODELS)}")
    if name == "standard":
        return standard_spec(profile)
    if name in ("distillation_teacher", "distilled"):
        if name == "distillation_teacher":
            objective: Objective = TemperatureCrossEntropy(DISTILLATION_TEMPERATURE)
        else:
            if teacher is None or teacher.spec.name != "distillation_teacher":
                raise ValueError("the distilled model needs teacher=<the trained 'distillation_teacher'>")
            objective = Distillation(teacher.model, teacher.key, DISTILLATION_TEMPERATURE)
        # At T = 100 the logits must grow about 100 times larger than usual before the softmax
        # at temperature T is confident: a larger learning rate and twice the standard epochs.
        return ModelSpec(name=name, arch=ARCH, objective=objective, epochs=2 * profile.epochs,
                         batch_size=profile.batch_size, lr=3e-3, seed=0, shift=SHIFT)
    if teacher is not None:
        raise ValueError(f"only the distilled model takes a teacher, not {name!r}")
    eps, steps, warmup = DEFENCE_EPS, profile.train_pgd_steps, 0.25
    # Every pairing defence uses one vocabulary (utils.defences): (1 - mix)·CE + mix·CE_adv + weight·pairing.
    objectives: dict[str, Objective] = {
        "pgd_at": PGDAdversarial(eps=eps, alpha=None, steps=steps, warmup=warmup),
        # The paper's β = 6 for MNIST and CIFAR-10, on the same inner attack and budget as pgd_at.
        "trades": TRADES(eps=eps, alpha=None, steps=steps, beta=TRADES_BETA, warmup=warmup),
        # Wong et al.'s step, 1.25·ε, collapses on the 5,000 offline digits from the first epochs on
        # (chapter 6 shows it); a step of 2ε/3 does not, so the guarded model uses that.
        "fast_at": FastFGSM(eps=eps, alpha=round(2 * eps / 3, 6)),
        "fast_at_overfit": FastFGSM(eps=eps, alpha=None),
        "alp": LogitPairing(eps=eps, alpha=None, steps=steps, weight=0.5, mix=0.5, warmup=warmup),
        "clp": LogitPairing(pairing="clean", weight=0.5),
        # The post's λ = 1, γ = 0.1 (CE + λ·CE_adv + γ·pairing), divided by 1 + λ.
        "enaet": EnergyPairing(eps=eps, alpha=None, steps=steps, mix=0.5, weight=0.05, warmup=warmup),
        "enaet_weighted": EnergyPairing(eps=eps, alpha=None, steps=steps, mix=0.5, weight=0.05, weighted=True,
                                        warmup=warmup),
    }
    early_stop = {
        "fast_at": EarlyStop(eps=eps, steps=10, drop=0.2, action="stop"),
        "fast_at_overfit": EarlyStop(eps=eps, steps=10, drop=0.2, action="record"),
    }.get(name)
    return ModelSpec(name=name, arch=ARCH, objective=objectives[name], epochs=profile.defence_epochs,
                     batch_size=profile.batch_size, lr=1e-3, seed=0, shift=SHIFT, early_stop=early_stop)


#: The objectives :func:`candidate_spec` builds by name.
CANDIDATE_OBJECTIVES = ("pgd_at", "trades")


def candidate_spec(name: str, objective: Objective | str = "pgd_at", profile: config.Profile | str | None = None, *,
                   epochs: int | None = None, steps: int | None = None, warmup: float = 0.25, beta: float = 6.0,
                   shift: int = SHIFT, ema: float = 0.0, checkpoint: BestCheckpoint | None = None,
                   seed: int = 0, arch: str = ARCH, arch_kwargs: tuple = (), lr: float = 1e-3) -> ModelSpec:
    """A recipe to measure against the book's models: :data:`ARCH` on the book's defence budget unless
    told otherwise, with the training options of :func:`utils.train.fit` as knobs.

    ``objective``: ``"pgd_at"`` (:class:`utils.defences.PGDAdversarial`) or ``"trades"``
    (:class:`utils.trades.TRADES` with ``beta``), both at ε = :data:`DEFENCE_EPS` with ``steps`` PGD
    steps of 2.5·ε/steps (default ``profile.train_pgd_steps``) and ε ramped up over ``warmup`` of
    training, as the book's defences are; or any objective, used as it is. ``epochs`` defaults to
    ``profile.defence_epochs``; ``shift`` (default :data:`SHIFT`, as the book's models), ``ema`` and
    ``checkpoint`` (off by default) are :class:`ModelSpec`'s. ``arch`` and ``arch_kwargs`` choose the network (:func:`utils.models.build_model`),
    ``lr`` Adam's learning rate. The name must not be one of the book's models (:data:`BOOK_MODELS`), whose recipes
    are :func:`book_spec`'s alone.
    """
    if not isinstance(profile, config.Profile):
        profile = config.get_profile(profile)
    if name in BOOK_MODELS:
        raise ValueError(f"{name!r} is one of the book's models; give a candidate a name of its own")
    steps = profile.train_pgd_steps if steps is None else steps
    if isinstance(objective, str):
        if objective not in CANDIDATE_OBJECTIVES:
            raise ValueError(f"objective must be one of {CANDIDATE_OBJECTIVES} or an objective, got {objective!r}")
        if objective == "pgd_at":
            objective = PGDAdversarial(eps=DEFENCE_EPS, alpha=None, steps=steps, warmup=warmup)
        else:
            objective = TRADES(eps=DEFENCE_EPS, alpha=None, steps=steps, beta=beta, warmup=warmup)
    return ModelSpec(name=name, arch=arch, arch_kwargs=tuple(arch_kwargs), objective=objective,
                     epochs=profile.defence_epochs if epochs is None else epochs, batch_size=profile.batch_size,
                     lr=lr, seed=seed, shift=shift, ema=ema, checkpoint=checkpoint)


def load_book_model(name: str, data: MNISTData, profile: config.Profile | str | None = None,
                    **kwargs) -> TrainedModel:
    """:func:`load_or_train` on :func:`book_spec`: the model a chapter needs, cached or trained.

    For ``"distilled"`` the teacher is loaded (or trained) first.
    """
    teacher = load_book_model("distillation_teacher", data, profile, **kwargs) if name == "distilled" else None
    return load_or_train(book_spec(name, profile, teacher=teacher), data, **kwargs)

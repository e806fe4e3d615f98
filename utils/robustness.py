"""Robust accuracy measured the careful way: per example, worst case over attacks and restarts.

An example counts as *robust* only if the model classifies it correctly before any attack and
after every attack tried on it. :func:`robust_correct` runs a list of attacks one after another,
each only on the examples that are still standing (a broken example stays broken, so attacking it
again would change nothing and cost time); restarts of an attack are further attacks of the
same kind. :func:`robustness_table` does this for several models and several attacks, and adds
the per-example worst case over all of them, which is what a robust accuracy should report.

Every adversarial example is checked against the threat model (``eps`` and ``norm``) before it
counts: an attack that leaves the ε-ball, or the pixel box, raises an error instead of lowering the
accuracy (RobustBench and AutoAttack check the same).

:func:`book_attacks` names the attacks behind the book's headline number: its worst case per
example is the robust accuracy every chapter from 6 on reports (an upper bound: a stronger attack
may find more).

Introduced in chapter 6 and used in every chapter after it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from . import config
from .cache import code_fingerprint
from .checks import (NORMS, atomic_write, check_images, check_in_ball, check_labels, choice, integer,
                     perturbation_size, real)
from .attacks import apgd, apgd_targeted, fgsm, pgd, square
from .evaluate import predict
from .models import eval_mode, model_device

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def robust_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   attacks: Attack | Sequence[Attack] = (), *, eps: float | None = None, norm: str = "linf",
                   restarts: int = 1, batch_size: int = 500, key: str | None = None) -> torch.Tensor:
    """``[N]`` booleans: is example ``i`` classified correctly clean *and* after every attack?

    ``attacks`` is one attack or a sequence of them, each a callable ``attack(model, x, y) ->
    x_adv``; every attack is run ``restarts`` times (an attack with a random start draws a new
    start each time). Each run sees only the examples that are still correctly classified, and
    an example's result is its worst case so far. With no attack this is the clean correctness.

    ``eps`` and ``norm`` (``"linf"`` or ``"l2"``) are the threat model, required with any attack:
    every adversarial example must lie in the pixel box and within ``eps`` of its clean example
    (:func:`utils.checks.check_in_ball`), or a ``ValueError`` says which attack left the ball.

    The model runs in evaluation mode on its own device and is left in the mode it was in. The
    result is on the CPU.

    ``key`` (optional): the model's cache key (:attr:`utils.zoo.TrainedModel.key`). When it is
    given and every attack can be described exactly (:func:`describe_attack`), the result is kept
    under ``ADVBOOK_CACHE/robustness`` and read back the next time the same model meets the same
    attacks on the same digits, in this chapter or a later one. The memo's key includes a
    fingerprint of the attack code, so a change to it measures again. Delete that folder to
    measure again by hand.
    """
    return _robust_correct(model, x, y, attacks, eps=eps, norm=norm, restarts=restarts,
                           batch_size=batch_size, key=key)[0]


def _robust_correct(model, x, y, attacks, *, eps, norm, restarts, batch_size, key) -> tuple[torch.Tensor, bool]:
    """:func:`robust_correct`, and whether the result was read from the memo."""
    check_images(x)
    check_labels(y, n=len(x))
    restarts = integer("restarts", restarts)
    batch_size = integer("batch_size", batch_size)
    norm = choice("norm", norm, NORMS)
    if callable(attacks):
        attacks = [attacks]
    attacks = list(attacks)
    for a in attacks:
        if not callable(a):
            raise TypeError(f"every attack must be callable as attack(model, x, y), got {type(a).__name__}")
    if attacks and eps is None:
        raise ValueError("robust_correct needs the threat model of its attacks: eps=... (and norm='linf' or "
                         "'l2'), so that every adversarial example can be checked against its ball")
    if eps is not None:
        eps = real("eps", eps)
    memo = None
    if key is not None and attacks:
        texts = [describe_attack(a) for a in attacks]
        if all(t is not None for t in texts):
            memo = _memo_path(str(key), " + ".join(texts), f"{norm} {eps!r}", restarts, x, y)
            ok = _memo_load(memo, len(x))
            if ok is not None:
                return ok, True
    device = model_device(model)
    standing = torch.zeros(len(x), dtype=torch.bool)
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            standing[start:start + len(xb)] = _correct(model, xb, yb).cpu()
        for attack in attacks:
            for _ in range(restarts):
                idx = standing.nonzero().flatten()
                for start in range(0, len(idx), batch_size):
                    sel = idx[start:start + batch_size]
                    xb, yb = x[sel].to(device), y[sel].to(device)
                    x_adv = attack(model, xb, yb)
                    check_in_ball(x_adv, xb, eps, norm, name=f"the output of {_name(attack)}")
                    standing[sel] = _correct(model, x_adv, yb).cpu()
    if memo is not None:
        _memo_save(memo, standing)
    return standing, False


def _name(attack) -> str:
    func = attack.func if isinstance(attack, functools.partial) else attack
    return getattr(func, "__qualname__", type(func).__name__)


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    attacks: Attack | Sequence[Attack] = (), *, eps: float | None = None, norm: str = "linf",
                    restarts: int = 1, batch_size: int = 500) -> float:
    """The fraction of :func:`robust_correct` (the worst case per example over every attack)."""
    return robust_correct(model, x, y, attacks, eps=eps, norm=norm, restarts=restarts,
                          batch_size=batch_size).float().mean().item()


def accuracy_vs_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, make_attack: Callable[[float], Attack],
                    eps_values: Sequence[float], *, norm: str = "linf", restarts: int = 1,
                    batch_size: int = 500) -> list[float]:
    """Robust accuracy at every ε of ``eps_values``; ``make_attack(eps)`` returns the attack at ε,
    whose outputs are checked against the ``norm`` ball of radius ε.

    ε = 0 means no attack (the clean accuracy). Negative ε values are refused.
    """
    out = []
    for eps in eps_values:
        eps = real("every eps", eps)
        attacks = [] if eps == 0.0 else [make_attack(eps)]
        out.append(robust_accuracy(model, x, y, attacks, eps=eps, norm=norm, restarts=restarts,
                                   batch_size=batch_size))
    return out


def minimal_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *,
                  norm: str = "l2") -> torch.Tensor:
    """Per example, the size of the perturbation an attack that searches for the *smallest* one
    (:func:`utils.attacks.cw_l2`) needed: ``[N]`` on the CPU.

    ``‖x_adv − x‖`` in ``norm`` where ``x_adv`` is misclassified, ``inf`` where the attack found
    nothing (it returned a correctly classified point), and 0 where ``x`` is misclassified already.
    :func:`accuracy_from_norms` turns these into robust accuracy at any ε.
    """
    check_images(x)
    check_labels(y, n=len(x))
    size = perturbation_size(x_adv, x, norm).cpu()
    y_cpu = y.cpu()
    out = torch.where(predict(model, x_adv) != y_cpu, size, torch.tensor(math.inf))
    out[predict(model, x) != y_cpu] = 0.0
    return out


def accuracy_from_norms(norms: torch.Tensor, eps: float | Sequence[float]) -> float | list[float]:
    """The accuracy an attacker limited to ``‖δ‖ ≤ eps`` gets from the minimal norms of
    :func:`minimal_norms`: the fraction of examples whose norm is larger than ``eps`` (an upper
    bound on the true robust accuracy, since a smaller perturbation may exist). A list for a list of ε."""
    norms = torch.as_tensor(norms, dtype=torch.float64).flatten()
    if norms.numel() == 0:
        raise ValueError("accuracy_from_norms needs at least one norm")
    if isinstance(eps, (list, tuple)):
        return [accuracy_from_norms(norms, e) for e in eps]
    eps = real("eps", eps)
    return float((norms > eps).double().mean())


# --------------------------------------------------------------------------------------------
# A memo of per-example results, so that the same model under the same attack is measured once
# --------------------------------------------------------------------------------------------

#: The code whose fingerprint is part of every memo key: the attacks, and how they are run here.
ATTACK_CODE = ("utils.attacks", "utils.checks", "utils.models", "utils.robustness")


def describe_attack(attack: Attack) -> str | None:
    """A text that identifies ``attack`` exactly, or None when it cannot be described.

    Only a ``functools.partial`` of one of the book's own attack functions (a module-level
    function of :mod:`utils`, found again under its module and name) with plain arguments (numbers,
    strings, booleans, None) is described: by that name and the arguments. Anything else is not,
    and is never memoised: a lambda or a closure (two of them can share a name and their keywords
    and still do different things), a function from outside the book (its code is not
    fingerprinted), or an argument such as a random generator whose state matters.
    """
    if not isinstance(attack, functools.partial):
        return None
    func = attack.func
    module, name = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(name, str) or not module.startswith("utils."):
        return None
    if "<" in name or "." in name:  # a lambda, a closure or a method
        return None
    try:
        if getattr(importlib.import_module(module), name) is not func:
            return None
    except (ImportError, AttributeError):
        return None
    plain = (int, float, str, bool, type(None))
    if not all(isinstance(a, plain) for a in attack.args):
        return None
    if not all(isinstance(v, plain) for v in attack.keywords.values()):
        return None
    kw = ", ".join(f"{k}={v!r}" for k, v in sorted(attack.keywords.items()))
    return f"{attack.func.__module__}.{attack.func.__qualname__}({', '.join(map(repr, attack.args))}; {kw})"


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _memo_path(model_key: str, attack_text: str, threat: str, restarts: int, x: torch.Tensor,
               y: torch.Tensor) -> Path:
    blob = "|".join([model_key, attack_text, threat, str(restarts), code_fingerprint(ATTACK_CODE),
                     _tensor_digest(x), _tensor_digest(y)])
    return config.cache_dir("robustness") / (hashlib.sha256(blob.encode()).hexdigest()[:24] + ".pt")


def _memo_load(path: Path, n: int) -> torch.Tensor | None:
    if not path.exists():
        return None
    try:
        ok = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        ok = None
    if not isinstance(ok, torch.Tensor) or ok.dtype != torch.bool or ok.shape != (n,):
        warnings.warn(f"ignoring the damaged result file {path.name}; measuring again", stacklevel=3)
        return None
    return ok


def _memo_save(path: Path, ok: torch.Tensor) -> None:
    atomic_write(path, lambda tmp: torch.save(ok.clone(), tmp))


@dataclass
class RobustnessTable:
    """Accuracies of several models under several attacks, with the per-example worst case.

    ``acc[model][attack]`` is a fraction; the column ``"clean"`` is the accuracy without attack
    and ``"worst case"`` (when more than one attack ran) the fraction of examples that survive
    every attack; it comes right after ``"clean"``, before the attacks' own columns, so that a
    wide table shows its headline first. ``correct[model][column]`` (when the table was measured, not assembled by hand)
    holds the ``[N]`` booleans behind each fraction, per example. ``seconds[model]`` is the time spent attacking that model. Displays itself as
    a Markdown table in a notebook; :meth:`markdown` gives the text.
    """

    models: list[str]
    attacks: list[str]
    acc: dict[str, dict[str, float]]
    seconds: dict[str, float]
    n: int
    notes: dict[str, str] = field(default_factory=dict)
    reused: dict[str, list[str]] = field(default_factory=dict)  # model -> attack columns read from the memo
    correct: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def columns(self) -> list[str]:
        if len(self.attacks) > 1:
            return ["clean", "worst case", *self.attacks]
        return ["clean", *self.attacks]

    def markdown(self, extra: Mapping[str, Mapping[str, str]] | None = None) -> str:
        """A Markdown table in percent; ``extra[column][model]`` adds text columns at the right."""
        extra = dict(extra or {})
        head = ["model", *self.columns, *extra]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for m in self.models:
            cells = [m] + [f"{100 * self.acc[m][c]:.1f}%" for c in self.columns]
            cells += [str(extra[c].get(m, "")) for c in extra]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def html(self, extra: Mapping[str, Mapping[str, str]] | None = None, caption: str = "") -> str:
        """The same table as :meth:`markdown`, as an HTML ``<table>`` (for pages that paste HTML)."""
        import html as _html
        extra = dict(extra or {})
        head = ["model", *self.columns, *extra]
        cells = "".join(f"<th>{_html.escape(h)}</th>" for h in head)
        rows = [f"<tr>{cells}</tr>"]
        for m in self.models:
            values = [f"{100 * self.acc[m][c]:.1f}%" for c in self.columns] + [str(extra[c].get(m, "")) for c in extra]
            rows.append(f"<tr><td>{_html.escape(m)}</td>"
                        + "".join(f'<td style="text-align: right">{_html.escape(v)}</td>' for v in values) + "</tr>")
        cap = f"<caption>{_html.escape(caption)}</caption>" if caption else ""
        return f'<table class="table">{cap}' + "".join(rows) + "</table>"

    def standard_errors(self, column: str = "worst case") -> dict[str, str]:
        """``model -> "± s"``: one standard error, in points, of ``column`` measured on ``n`` examples
        (``sqrt(p (1 - p) / n)``, a column of text for :meth:`markdown`'s ``extra``)."""
        if column not in self.columns:
            raise ValueError(f"no column {column!r}; the columns are {self.columns}")
        return {m: f"± {100 * math.sqrt(self.acc[m][column] * (1 - self.acc[m][column]) / self.n):.1f}"
                for m in self.models}

    def _repr_markdown_(self) -> str:
        return self.markdown() + f"\n\nAccuracy on {self.n:,} held-out digits."

    def __repr__(self) -> str:
        rows = [f"{m}: " + ", ".join(f"{c} {100 * self.acc[m][c]:.1f}%" for c in self.columns) for m in self.models]
        return "RobustnessTable(\n  " + "\n  ".join(rows) + f"\n  on {self.n} examples)"


def robustness_table(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                     attacks: Mapping[str, Attack | tuple[Attack, int]], *, eps: float, norm: str = "linf",
                     batch_size: int = 500, progress: bool = False,
                     keys: Mapping[str, str] | None = None) -> RobustnessTable:
    """Clean and robust accuracy of every model under every attack, and the worst case over them.

    ``attacks`` maps a column name to an attack, or to ``(attack, restarts)``. Each attack is run
    against every example that was correct clean (so columns are comparable), and the worst-case
    column combines them per example. Every attack shares the threat model ``eps``/``norm``, and each
    adversarial example is checked against it (:func:`robust_correct`).

    ``keys`` (optional) maps a model's name to its cache key (:attr:`utils.zoo.TrainedModel.key`);
    each column is then memoised as ``robust_correct(..., key=...)`` describes, and the columns
    read back from the memo are listed in ``reused``.
    """
    if not models:
        raise ValueError("robustness_table needs at least one model")
    specs: dict[str, tuple[Attack, int]] = {}
    for name, a in attacks.items():
        if name in ("clean", "worst case"):
            raise ValueError(f"{name!r} is a reserved column name")
        attack, restarts = a if isinstance(a, tuple) else (a, 1)
        specs[name] = (attack, integer(f"restarts of {name!r}", restarts))
    acc: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    reused: dict[str, list[str]] = {}
    correct: dict[str, dict[str, torch.Tensor]] = {}
    for m_name, model in models.items():
        start = time.perf_counter()
        clean = robust_correct(model, x, y, batch_size=batch_size)
        worst = clean.clone()
        row = {"clean": clean.float().mean().item()}
        per_example = correct[m_name] = {"clean": clean}
        for a_name, (attack, restarts) in specs.items():
            key = None if keys is None else keys.get(m_name)
            ok, was_reused = _robust_correct(model, x, y, [attack], eps=eps, norm=norm, restarts=restarts,
                                             batch_size=batch_size, key=key)
            if was_reused:
                reused.setdefault(m_name, []).append(a_name)
            row[a_name] = ok.float().mean().item()
            per_example[a_name] = ok
            worst &= ok
            if progress:
                print(f"{m_name:>20s} | {a_name}: {100 * row[a_name]:.1f}%", flush=True)
        if len(specs) > 1:
            row["worst case"] = worst.float().mean().item()
            per_example["worst case"] = worst
        acc[m_name] = row
        seconds[m_name] = time.perf_counter() - start
    return RobustnessTable(list(models), list(specs), acc, seconds, len(x), reused=reused, correct=correct)


def book_attacks(eps: float, profile: config.Profile | str | None = None) -> dict[str, tuple[Attack, int]]:
    """The attacks of the book's headline robust accuracy (L∞), as ``{column: (attack, restarts)}``
    for :func:`robustness_table`, whose ``"worst case"`` over them is the number every chapter from
    6 on reports: FGSM; PGD with the profile's steps and restarts on the cross-entropy and on the
    margin; APGD on the cross-entropy and APGD-T (targeted DLR, nine target classes), each with
    ``profile.apgd_steps`` iterations (Croce & Hein 2020); and the Square attack with
    ``profile.square_queries`` queries (Andriushchenko et al. 2020), which uses no gradient, so that
    a model whose gradients mislead the other five is still searched. Every attack is a
    ``functools.partial`` of a function of :mod:`utils.attacks`, so its per-example results are
    memoised across chapters when the table is given the models' ``keys``.
    """
    eps = real("eps", eps)
    if not isinstance(profile, config.Profile):
        profile = config.get_profile(profile)
    s, r, a, q = profile.pgd_steps, profile.restarts, profile.apgd_steps, profile.square_queries
    return {
        "FGSM": (functools.partial(fgsm, eps=eps), 1),
        f"PGD-{s} ×{r} (CE)": (functools.partial(pgd, eps=eps, steps=s), r),
        f"PGD-{s} ×{r} (margin)": (functools.partial(pgd, eps=eps, steps=s, loss="margin"), r),
        f"APGD-CE {a}": (functools.partial(apgd, eps=eps, steps=a), 1),
        f"APGD-T {a}": (functools.partial(apgd_targeted, eps=eps, steps=a), 1),
        f"Square {q:,}": (functools.partial(square, eps=eps, queries=q), 1),
    }

"""Robust accuracy measured the careful way: per example, worst case over attacks and restarts.

An example counts as *robust* only if the model classifies it correctly before any attack and
after every attack tried on it. :func:`robust_correct` runs a list of attacks one after another,
each only on the examples that are still standing (a broken example stays broken, so attacking it
again would change nothing and cost time); restarts of an attack are further attacks of the
same kind. :func:`robustness_table` does this for several models and several attacks, and adds
the per-example worst case over all of them, which is what a robust accuracy should report.

Introduced in chapter 6 and used in every chapter after it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from . import config
from .data import check_images, check_labels
from .evaluate import eval_mode, model_device
from .train import _count

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def robust_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   attacks: Attack | Sequence[Attack] = (), *, restarts: int = 1,
                   batch_size: int = 500, key: str | None = None) -> torch.Tensor:
    """``[N]`` booleans: is example ``i`` classified correctly clean *and* after every attack?

    ``attacks`` is one attack or a sequence of them, each a callable ``attack(model, x, y) ->
    x_adv``; every attack is run ``restarts`` times (an attack with a random start draws a new
    start each time). Each run sees only the examples that are still correctly classified, and
    an example's result is its worst case so far. With no attack this is the clean correctness.

    The model runs in evaluation mode on its own device and is left in the mode it was in. The
    result is on the CPU.

    ``key`` (optional): the model's cache key (:attr:`utils.zoo.TrainedModel.key`). When it is
    given and every attack can be described (:func:`describe_attack`), the result is kept under
    ``ADVBOOK_CACHE/robustness`` and read back the next time the same model meets the same attacks
    on the same digits, in this chapter or a later one. Delete that folder to measure again.
    """
    return _robust_correct(model, x, y, attacks, restarts=restarts, batch_size=batch_size, key=key)[0]


def _robust_correct(model, x, y, attacks, *, restarts, batch_size, key) -> tuple[torch.Tensor, bool]:
    """:func:`robust_correct`, and whether the result was read from the memo."""
    check_images(x)
    check_labels(y, n=len(x))
    restarts = _count("restarts", restarts)
    batch_size = _count("batch_size", batch_size)
    if callable(attacks):
        attacks = [attacks]
    attacks = list(attacks)
    for a in attacks:
        if not callable(a):
            raise TypeError(f"every attack must be callable as attack(model, x, y), got {type(a).__name__}")
    memo = None
    if key is not None and attacks:
        texts = [describe_attack(a) for a in attacks]
        if all(t is not None for t in texts):
            memo = _memo_path(str(key), " + ".join(texts), restarts, x, y)
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
                    check_images(x_adv, name="the attack's output")
                    standing[sel] = _correct(model, x_adv, yb).cpu()
    if memo is not None:
        _memo_save(memo, standing)
    return standing, False


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    attacks: Attack | Sequence[Attack] = (), *, restarts: int = 1,
                    batch_size: int = 500) -> float:
    """The fraction of :func:`robust_correct` (the worst case per example over every attack)."""
    return robust_correct(model, x, y, attacks, restarts=restarts, batch_size=batch_size).float().mean().item()


def accuracy_vs_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, make_attack: Callable[[float], Attack],
                    eps_values: Sequence[float], *, restarts: int = 1, batch_size: int = 500) -> list[float]:
    """Robust accuracy at every ε of ``eps_values``; ``make_attack(eps)`` returns the attack at ε.

    ε = 0 means no attack (the clean accuracy). Negative ε values are refused.
    """
    out = []
    for eps in eps_values:
        eps = float(eps)
        if not eps >= 0.0:
            raise ValueError(f"every eps must be >= 0, got {eps}")
        attacks = [] if eps == 0.0 else [make_attack(eps)]
        out.append(robust_accuracy(model, x, y, attacks, restarts=restarts, batch_size=batch_size))
    return out


# --------------------------------------------------------------------------------------------
# A memo of per-example results, so that the same model under the same attack is measured once
# --------------------------------------------------------------------------------------------

def describe_attack(attack: Attack) -> str | None:
    """A text that identifies ``attack``, or None when it cannot be described reliably.

    A ``functools.partial`` of a library function with plain arguments (numbers, strings,
    booleans, None) is described by the function's qualified name and the arguments; anything
    else (a lambda, a closure, an argument such as a random generator whose state matters) is
    not, and is never memoised.
    """
    if not isinstance(attack, functools.partial) or not hasattr(attack.func, "__qualname__"):
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


def _memo_path(model_key: str, attack_text: str, restarts: int, x: torch.Tensor, y: torch.Tensor) -> Path:
    blob = "|".join([model_key, attack_text, str(restarts), _tensor_digest(x), _tensor_digest(y)])
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(ok.clone(), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclass
class RobustnessTable:
    """Accuracies of several models under several attacks, with the per-example worst case.

    ``acc[model][attack]`` is a fraction; the column ``"clean"`` is the accuracy without attack
    and ``"worst case"`` (when more than one attack ran) the fraction of examples that survive
    every attack. ``seconds[model]`` is the time spent attacking that model. Displays itself as
    a Markdown table in a notebook; :meth:`markdown` gives the text.
    """

    models: list[str]
    attacks: list[str]
    acc: dict[str, dict[str, float]]
    seconds: dict[str, float]
    n: int
    notes: dict[str, str] = field(default_factory=dict)
    reused: dict[str, list[str]] = field(default_factory=dict)  # model -> attack columns read from the memo

    @property
    def columns(self) -> list[str]:
        cols = ["clean", *self.attacks]
        if len(self.attacks) > 1:
            cols.append("worst case")
        return cols

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

    def _repr_markdown_(self) -> str:
        return self.markdown() + f"\n\nAccuracy on {self.n:,} held-out digits."

    def __repr__(self) -> str:
        rows = [f"{m}: " + ", ".join(f"{c} {100 * self.acc[m][c]:.1f}%" for c in self.columns) for m in self.models]
        return "RobustnessTable(\n  " + "\n  ".join(rows) + f"\n  on {self.n} examples)"


def robustness_table(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                     attacks: Mapping[str, Attack | tuple[Attack, int]], *, batch_size: int = 500,
                     progress: bool = False, keys: Mapping[str, str] | None = None) -> RobustnessTable:
    """Clean and robust accuracy of every model under every attack, and the worst case over them.

    ``attacks`` maps a column name to an attack, or to ``(attack, restarts)``. Each attack is run
    against every example that was correct clean (so columns are comparable), and the worst-case
    column combines them per example.

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
        specs[name] = (attack, _count(f"restarts of {name!r}", restarts))
    acc: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    reused: dict[str, list[str]] = {}
    for m_name, model in models.items():
        start = time.perf_counter()
        clean = robust_correct(model, x, y, batch_size=batch_size)
        worst = clean.clone()
        row = {"clean": clean.float().mean().item()}
        for a_name, (attack, restarts) in specs.items():
            key = None if keys is None else keys.get(m_name)
            ok, was_reused = _robust_correct(model, x, y, [attack], restarts=restarts, batch_size=batch_size,
                                             key=key)
            if was_reused:
                reused.setdefault(m_name, []).append(a_name)
            row[a_name] = ok.float().mean().item()
            worst &= ok
            if progress:
                print(f"{m_name:>20s} | {a_name}: {100 * row[a_name]:.1f}%", flush=True)
        if len(specs) > 1:
            row["worst case"] = worst.float().mean().item()
        acc[m_name] = row
        seconds[m_name] = time.perf_counter() - start
    return RobustnessTable(list(models), list(specs), acc, seconds, len(x), reused=reused)

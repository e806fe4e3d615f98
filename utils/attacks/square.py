"""The Square attack (chapter 10): a score-based black-box attack in the L∞ ball that needs no gradient.

It sees only the model's output scores (the logits, or equally their log-probabilities: the margin
is the same for both) and counts every query. Andriushchenko, Croce, Flammarion & Hein, "Square
Attack: a query-efficient black-box adversarial attack via random search", ECCV 2020.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import integer, real
from .core import (LOSSES, Loss, LossFn, attacking_batch, check_inputs, check_output, generator_or_none,
                   loss_fn_of, random_like)

__all__ = ["SquareResult", "square", "square_trace", "square_fraction"]

#: Where the paper halves the fraction ``p`` of pixels a square covers, for a budget of 10,000 queries
#: (a smaller budget rescales these iterations proportionally).
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
REFERENCE_QUERIES = 10_000


def square_fraction(iteration: int, queries: int, p_init: float = 0.8) -> float:
    """The fraction ``p`` of the image a square covers at ``iteration`` (1, 2, ...) of a run of
    ``queries`` queries: ``p_init``, halved at the paper's iterations :data:`HALVINGS` of a
    10,000-query run, rescaled to ``queries`` (iteration ``i`` of ``queries`` counts as
    ``i · 10000 / queries``). The side of the square is ``round(sqrt(p · H · W))``.
    """
    iteration, queries = integer("iteration", iteration), integer("queries", queries)
    p_init = real("p_init", p_init, high=1.0, open_low=True)
    scaled = int(iteration * REFERENCE_QUERIES / queries)
    return p_init / 2 ** sum(scaled > h for h in HALVINGS)


@dataclass
class SquareResult:
    """What the Square attack did to each example.

    ``x_adv`` ``[N, C, H, W]``: the point returned (in the ε-ball and in [0, 1]); ``queries`` ``[N]``
    (int64): the forward passes the example cost, all of them counted (the clean digit, the initial
    stripes, one per iteration until it was fooled or the budget ran out); ``fooled`` ``[N]``:
    whether the model misclassifies ``x_adv``; ``loss`` ``[N]``: the attack's loss at ``x_adv``.
    """

    x_adv: torch.Tensor
    queries: torch.Tensor
    fooled: torch.Tensor
    loss: torch.Tensor

    def success_within(self, budget: int) -> float:
        """The fraction of examples fooled with at most ``budget`` queries."""
        return (self.fooled & (self.queries <= budget)).float().mean().item() if len(self.fooled) else 0.0

    def __repr__(self) -> str:
        q = self.queries[self.fooled].float()
        med = f"{q.median().item():.0f}" if len(q) else "-"
        return (f"SquareResult(n={len(self.fooled)}, fooled={self.fooled.float().mean().item():.1%}, "
                f"median queries of the fooled={med}, most queries={int(self.queries.max()) if len(self.queries) else 0})")


def _windows(n: int, h: int, w: int, side: int, generator, like: torch.Tensor) -> torch.Tensor:
    """One random ``side × side`` window per example: a boolean mask ``[n, 1, h, w]``."""
    top = (random_like(like, generator, shape=(n,)) * (h - side + 1)).long().clamp_(max=h - side)
    left = (random_like(like, generator, shape=(n,)) * (w - side + 1)).long().clamp_(max=w - side)
    rows = torch.arange(h, device=like.device)
    cols = torch.arange(w, device=like.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def _signs(shape: tuple[int, ...], generator, like: torch.Tensor) -> torch.Tensor:
    return torch.where(random_like(like, generator, shape=shape) < 0.5, -1.0, 1.0).to(like.dtype)


def square_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, queries: int = 1000,
                 p_init: float = 0.8, loss: Loss = "margin",
                 generator: torch.Generator | None = None) -> SquareResult:
    """The untargeted L∞ Square attack: a :class:`SquareResult` with the queries counted per example.

    Random search in the ε-ball that only reads the model's output scores. It starts from vertical
    stripes (every column of every channel moved by ``+eps`` or ``-eps`` at random, then clipped to
    [0, 1]); at every iteration it proposes, for each example not yet fooled, a new value for a
    random square window: ``x ± eps`` (one random sign per channel, the same on the whole window),
    and keeps the proposal if the loss went up. The square covers a fraction ``p`` of the image
    that starts at ``p_init`` and is halved on the paper's schedule (:func:`square_fraction`), so
    the search moves from coarse to fine. A proposal that would change nothing is flipped to the
    opposite sign. An example stops as soon as it is misclassified.

    ``loss``: ``"margin"`` (the paper's, ``max_{j≠y} f_j − f_y`` on the logits, the same as on the
    log-probabilities) or ``"ce"``, or a callable ``loss(logits, y) -> [N]`` to maximise.
    ``queries``: the most forward passes per example, counting the clean digit (an example the
    model already misclassifies costs one query and is returned unchanged) and the initial
    stripes; at least 2. No gradient is ever computed: the model runs under ``torch.no_grad`` in
    evaluation mode, and is left as it was found. Chapter 10.
    """
    check_inputs(model, x, y)
    eps = real("eps", eps)
    queries = integer("queries", queries, low=2)
    p_init = real("p_init", p_init, high=1.0, open_low=True)
    loss_fn: LossFn = loss_fn_of(loss, LOSSES)
    generator = generator_or_none(generator)
    with attacking_batch(model, x, y) as (x0, y0), torch.no_grad():
        n, c, h, w = x0.shape
        used = torch.zeros(n, dtype=torch.long, device=x0.device)
        x_best = x0.clone()
        if n == 0:
            return SquareResult(x_best, used.cpu(), torch.zeros(0, dtype=torch.bool), torch.zeros(0))

        def query(idx: torch.Tensor, xq: torch.Tensor, first: bool = False):
            logits = model(xq)
            if first:
                check_output(logits, y0)
            used[idx] += 1
            return loss_fn(logits, y0[idx]), logits.argmax(1) != y0[idx]

        everyone = torch.arange(n, device=x0.device)
        best_loss, fooled = query(everyone, x0, first=True)
        lo, hi = (x0 - eps).clamp(min=0.0), (x0 + eps).clamp(max=1.0)
        todo = (~fooled).nonzero().flatten()
        if eps > 0 and len(todo):
            stripes = eps * _signs((len(todo), c, 1, w), generator, x0)
            x_init = (x0[todo] + stripes).clamp(0.0, 1.0)
            l, f = query(todo, x_init)
            x_best[todo], best_loss[todo], fooled[todo] = x_init, l, f
            for i in range(1, queries - 1):
                todo = (~fooled).nonzero().flatten()
                if len(todo) == 0:
                    break
                side = int(round(math.sqrt(square_fraction(i, queries, p_init) * h * w)))
                side = min(max(side, 1), h - 1, w - 1) if min(h, w) > 1 else 1
                m = len(todo)
                window = _windows(m, h, w, side, generator, x0)
                current = x_best[todo]
                signs = _signs((m, c, 1, 1), generator, x0)
                proposal = torch.where(window, (x0[todo] + eps * signs).clamp(0.0, 1.0), current)
                same = (proposal == current).flatten(1).all(dim=1)
                if same.any():
                    flipped = torch.where(window, (x0[todo] - eps * signs).clamp(0.0, 1.0), current)
                    proposal = torch.where(same.view(-1, 1, 1, 1), flipped, proposal)
                proposal = torch.minimum(torch.maximum(proposal, lo[todo]), hi[todo])
                l, f = query(todo, proposal)
                take = l > best_loss[todo]
                sel = todo[take]
                x_best[sel], best_loss[sel], fooled[sel] = proposal[take], l[take], f[take]
        return SquareResult(x_best, used.cpu(), fooled.cpu(), best_loss.cpu())


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **params) -> torch.Tensor:
    """:func:`square_trace` with the book's attack contract: only the adversarial images ``x_adv``."""
    return square_trace(model, x, y, **params).x_adv

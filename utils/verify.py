"""Exact verification of a small ReLU network as a mixed-integer linear program (MILP).

* :func:`verify_milp`: for one digit and an L∞ radius ε, the *exact* worst margin
  ``max_{x'} max_{j≠y} z_j(x') − z_y(x')`` over the ball ``{x' : ‖x' − x‖∞ ≤ ε, x' ∈ [0, 1]}``:
  negative means no input of the ball is classified otherwise (a proof), non-negative comes with
  a point where another class wins.
* :func:`minimal_eps_milp`: the exact minimal adversarial radius, to a tolerance, by root-finding
  on the worst margin (which grows with ε).
* :func:`attack_minimal_eps`: the smallest radius at which an *attack* succeeds, by bisection: an
  upper bound on the exact one.

The MILP is that of Tjeng, Xiao & Tedrake, "Evaluating robustness of neural networks with mixed
integer programming", ICLR 2019, with big-M constants from interval bounds (:mod:`utils.certify`
bounds whole models; here the same arithmetic runs in float64), solved by HiGHS through
``scipy.optimize.milp``. Only perceptrons (``Normalize``, ``Flatten``, ``Linear``, ``ReLU``) are
handled. Introduced in chapter 11.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import optimize, sparse
from torch import nn

from .certify import bound_layers
from .checks import check_images, check_labels, integer, real
from .models import Normalize, eval_mode, model_device


def affine_chain(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """The model as affine maps ``[(W_1, b_1), …, (W_L, b_L)]`` (float64) with a ReLU between any two:
    ``z = W_L relu(… relu(W_1 x + b_1) …) + b_L`` for ``x`` the flattened pixels. A leading
    ``Normalize`` is folded into the first layer. Only perceptrons can be written this way;
    anything else gets a clear error."""
    chain: list[tuple[np.ndarray, np.ndarray]] = []
    shift, scale, want_linear = 0.0, 1.0, True
    for layer in bound_layers(model):
        if isinstance(layer, (Normalize, nn.Flatten)):
            if chain:
                raise ValueError(f"the MILP handles {type(layer).__name__} only before the first linear layer")
            if isinstance(layer, Normalize):
                shift, scale = float(layer.mean), float(layer.std)
        elif isinstance(layer, nn.Linear):
            if not want_linear:
                raise ValueError("the MILP needs a ReLU between two linear layers")
            w = layer.weight.detach().double().cpu().numpy()
            b = layer.bias.detach().double().cpu().numpy() if layer.bias is not None else np.zeros(len(w))
            if not chain:  # W((x − μ)/σ) + b = (W/σ) x + (b − W·1 μ/σ)
                b, w = b - w.sum(axis=1) * shift / scale, w / scale
            chain.append((w, b))
            want_linear = False
        elif isinstance(layer, nn.ReLU):
            if want_linear:
                raise ValueError("the MILP needs a linear layer before every ReLU")
            want_linear = True
        else:
            raise ValueError(f"the MILP handles perceptrons (Linear and ReLU) only, not {type(layer).__name__}")
    if not chain or want_linear:
        raise ValueError("the MILP needs a model that ends with a linear layer")
    return chain


def _predicted_class(chain, x_np: np.ndarray) -> int:
    h = x_np
    for w, b in chain[:-1]:
        h = np.maximum(w @ h + b, 0.0)
    w, b = chain[-1]
    return int(np.argmax(w @ h + b))


class _Program:
    """The constraints of Tjeng et al.'s MILP for one digit and one radius.

    Variables: the pixels ``x'`` (bounded by the ball and the pixel box), then per hidden layer the
    pre-activations ``ẑ``, the activations ``a`` and a binary ``δ`` per ReLU. ``ẑ = W a_prev + b``
    is an equality. A ReLU whose interval bounds ``[l, u]`` straddle 0 (*unstable*) is exactly
    ``a ≥ 0, a ≥ ẑ, a ≤ u·δ, a ≤ ẑ − l(1 − δ)`` with ``δ ∈ {0, 1}``; a stable one is ``a = ẑ``
    (``l ≥ 0``) or ``a = 0`` (``u ≤ 0``, through its bounds), and its ``δ`` is fixed at 0."""

    def __init__(self, chain, x: np.ndarray, eps: float, pre: list | None = None):
        self.chain = chain
        lo, hi = np.clip(x - eps, 0.0, 1.0), np.clip(x + eps, 0.0, 1.0)
        lbs, ubs, ints, blocks, rlo, rhi = [lo], [hi], [np.zeros(len(x))], [], [], []
        n, prev, self.unstable = len(x), np.arange(len(x)), 0
        self.last_box, self.pre, self.z_index = (lo, hi), [], []
        for layer, (w, b) in enumerate(chain[:-1]):
            c, r = w @ ((lo + hi) / 2) + b, np.abs(w) @ ((hi - lo) / 2)
            l, u = c - r, c + r
            if pre is not None:   # tighter bounds found earlier (by linear programs): keep the tighter of the two
                l, u = np.maximum(l, pre[layer][0]), np.minimum(u, pre[layer][1])
            self.pre.append((l, u))
            lo, hi = np.maximum(l, 0.0), np.maximum(u, 0.0)
            self.last_box = (lo, hi)
            k = len(b)
            z, a, d = n + np.arange(k), n + k + np.arange(k), n + 2 * k + np.arange(k)
            self.z_index.append(z)
            n += 3 * k
            on, off = l >= 0, u <= 0
            split = ~on & ~off
            self.unstable += int(split.sum())
            lbs += [l, lo, np.zeros(k)]
            ubs += [u, hi, split.astype(float)]
            ints += [np.zeros(k), np.zeros(k), split.astype(float)]
            eye = sparse.identity(k, format="csr")
            # rows as (coefficient matrices over [prev | z | a | d], lower, upper)
            blocks.append(({"prev": -w, "z": eye}, b, b, prev, z, a, d))
            sel = sparse.diags(on.astype(float), format="csr")[on]
            blocks.append(({"z": -sel, "a": sel}, np.zeros(on.sum()), np.zeros(on.sum()), prev, z, a, d))
            s = sparse.diags(split.astype(float), format="csr")[split]
            ls = l[split]
            blocks.append(({"z": -s, "a": s}, np.zeros(len(ls)), np.full(len(ls), np.inf), prev, z, a, d))
            blocks.append(({"a": s, "d": -sparse.diags(u, format="csr")[split]}, np.full(len(ls), -np.inf),
                           np.zeros(len(ls)), prev, z, a, d))
            blocks.append(({"z": -s, "a": s, "d": -sparse.diags(l, format="csr")[split]}, np.full(len(ls), -np.inf),
                           -ls, prev, z, a, d))
            prev = a
        self.n, self.last = n, prev
        r_all, c_all, v_all, offset = [], [], [], 0
        for coeffs, low, high, p, z, a, d in blocks:
            for name, idx in (("prev", p), ("z", z), ("a", a), ("d", d)):
                if name in coeffs:
                    m = sparse.coo_array(coeffs[name])
                    r_all.append(m.row + offset), c_all.append(idx[m.col]), v_all.append(m.data)
            offset += len(low)
            rlo.append(low), rhi.append(high)
        self.a = sparse.csr_array((np.concatenate(v_all), (np.concatenate(r_all), np.concatenate(c_all))),
                                  shape=(offset, n)) if v_all else sparse.csr_array((0, n))
        self.rlo = np.concatenate(rlo) if rlo else np.zeros(0)
        self.rhi = np.concatenate(rhi) if rhi else np.zeros(0)
        self.lb, self.ub, self.integrality = np.concatenate(lbs), np.concatenate(ubs), np.concatenate(ints)

    def margin_bounds(self, y: int) -> np.ndarray:
        """Interval upper bounds on ``z_j − z_y`` for every ``j`` (from the last hidden layer's box)."""
        w, b = self.chain[-1]
        lo, hi = self.last_box
        dw = w - w[y]
        return dw @ ((lo + hi) / 2) + np.abs(dw) @ ((hi - lo) / 2) + b - b[y]

    def _solve(self, c: np.ndarray, relax: bool, time_limit: float | None = None):
        options = {"mip_rel_gap": 1e-6, "presolve": False}
        if time_limit is not None:
            options["time_limit"] = float(time_limit)
        constraints = [optimize.LinearConstraint(self.a, self.rlo, self.rhi)] if self.a.shape[0] else []
        return optimize.milp(c, integrality=np.zeros(self.n) if relax else self.integrality,
                             bounds=optimize.Bounds(self.lb, self.ub), constraints=constraints, options=options)

    def tightened(self, x: np.ndarray, eps: float) -> "_Program":
        """The same program with the bounds of every hidden layer after the first tightened by linear
        programming: each unstable unit's minimum and maximum over the LP relaxation (binaries in
        [0, 1]) of the layers before it. Sound, since every real input satisfies the relaxation; each
        unit that becomes stable removes a binary (the progressive tightening of Tjeng et al.)."""
        program, pre = self, [tuple(b) for b in self.pre]
        for layer in range(1, len(self.pre)):
            l, u = (v.copy() for v in program.pre[layer])
            for unit in np.flatnonzero((l < 0) & (u > 0)):
                c = np.zeros(program.n)
                c[program.z_index[layer][unit]] = 1.0
                low, high = program._solve(c, relax=True), program._solve(-c, relax=True)
                if low.status == 0:
                    l[unit] = max(l[unit], low.fun)
                if high.status == 0:
                    u[unit] = min(u[unit], -high.fun)
            pre[layer] = (l, u)
            program = _Program(self.chain, x, eps, pre)
        return program

    def margin_objective(self, y: int, j: int) -> np.ndarray:
        w, _ = self.chain[-1]
        c = np.zeros(self.n)
        c[self.last] = -(w[j] - w[y])
        return c

    def relaxed_margin(self, y: int, j: int) -> float:
        """An upper bound on ``max z_j − z_y`` from the LP relaxation (cheaper than the MILP)."""
        res = self._solve(self.margin_objective(y, j), relax=True)
        b = self.chain[-1][1]
        return float(-res.fun + b[j] - b[y]) if res.status == 0 else np.inf

    def maximise_margin(self, y: int, j: int, time_limit: float | None):
        b = self.chain[-1][1]
        res = self._solve(self.margin_objective(y, j), relax=False, time_limit=time_limit)
        if res.status != 0:
            raise RuntimeError(f"the MILP for class {j} did not finish: {res.message}")
        return float(-res.fun + b[j] - b[y]), res.x


@dataclass
class Verification:
    """What :func:`verify_milp` found for one digit at one ε.

    ``worst_margin`` is ``max_{x'} max_{j≠y} z_j(x') − z_y(x')`` over the ball: negative means the
    digit is *verified* robust (``robust``); non-negative means another class can win (or tie), and
    ``x_worst`` ``[1, C, H, W]`` is a point where it does (for a robust digit, the point of the
    largest margin). ``target`` is the class ``j`` of the worst margin; ``unstable`` the number of
    ReLUs whose sign the interval bounds leave open (the binaries of the program); ``solves`` the
    number of MILPs solved (classes that interval bounds rule out are skipped)."""

    eps: float
    robust: bool
    worst_margin: float
    target: int
    x_worst: torch.Tensor
    unstable: int
    solves: int
    seconds: float


def _one_digit(model: nn.Module, x: torch.Tensor, y) -> tuple[list, np.ndarray, int]:
    check_images(x)
    if x.shape[0] != 1:
        raise ValueError(f"exact verification takes one digit at a time: x must have shape [1, C, H, W], "
                         f"got {tuple(x.shape)}")
    chain = affine_chain(model)
    y = int(y.item()) if isinstance(y, torch.Tensor) and y.numel() == 1 else y
    k = len(chain[-1][1])
    if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < k:
        raise ValueError(f"y must be a class label in 0..{k - 1}, got {y!r}")
    return chain, x.detach().double().cpu().flatten().numpy(), y


def verify_milp(model: nn.Module, x: torch.Tensor, y, eps: float, *, time_limit: float | None = None) -> Verification:
    """Exact L∞ verification of one digit: the worst margin over every ``x'`` with
    ``‖x' − x‖∞ ≤ eps`` and pixels in [0, 1]; the digit is robust when it is negative.

    For each other class ``j`` whose interval bound could beat the worst margin found so far (the
    most promising first), a MILP maximises ``z_j(x') − z_y(x')``. Exact for a ReLU perceptron up
    to HiGHS's tolerances (relative MIP gap 1e-6); the cost can grow exponentially with the number
    of unstable ReLUs. ``x``: ``[1, C, H, W]``; ``y``: a label. A ``time_limit`` (seconds per MILP)
    that runs out raises an error rather than returning an unproven answer. Tjeng et al. 2019.
    """
    eps = real("eps", eps)
    chain, x_np, y = _one_digit(model, x, y)
    start = time.perf_counter()
    program = _Program(chain, x_np, eps)
    if program.unstable:
        program = program.tightened(x_np, eps)
    bound = program.margin_bounds(y)
    best, target, best_x, solves = -np.inf, -1, None, 0
    for j in np.argsort(-bound).tolist():
        if j == y or bound[j] < best or (best_x is not None and program.relaxed_margin(y, j) < best):
            continue
        value, solution = program.maximise_margin(y, j, time_limit)
        solves += 1
        if value > best:
            best, target, best_x = value, j, solution
    d = x[0].numel()
    point = torch.from_numpy(np.clip(best_x[:d], 0.0, 1.0)).to(x.dtype).view_as(x.detach().cpu())
    return Verification(eps, bool(best < 0), float(best), target, point, program.unstable, solves,
                        time.perf_counter() - start)


@dataclass
class MinimalEps:
    """What :func:`minimal_eps_milp` found for one digit: the exact minimal adversarial L∞ radius
    ``ε*`` lies in ``(lower, upper]``: at ``lower`` the digit is verified robust, at ``upper`` the
    MILP found ``x_adv`` (``[1, C, H, W]``) where class ``target`` wins or ties. ``verifications``
    are the MILP calls made (each a :class:`Verification`), ``seconds`` their total time."""

    lower: float
    upper: float
    target: int
    x_adv: torch.Tensor
    verifications: list
    seconds: float

    @property
    def eps(self) -> float:
        """The midpoint of the bracket (within ``(upper − lower) / 2`` of the exact value)."""
        return (self.lower + self.upper) / 2


def minimal_eps_milp(model: nn.Module, x: torch.Tensor, y, *, eps_hi: float, tol: float = 1e-3,
                     time_limit: float | None = None, max_calls: int = 40) -> MinimalEps:
    """The exact minimal adversarial L∞ radius of one digit, to within ``tol`` (pixel units).

    The worst margin ``m(ε)`` of :func:`verify_milp` grows with ε and is negative at 0 for a
    correctly classified digit; its root is the minimal radius. Starting from the bracket
    ``[0, eps_hi]`` (``eps_hi``: a radius where an adversarial input exists, e.g. an attack's; it is
    doubled, up to 1, until the MILP confirms it), the Illinois variant of regula falsi shrinks the
    bracket until it is narrower than ``tol``. Every evaluation is a full MILP on the ball of that
    radius, so its big-M constants are as tight as interval bounds get there. A digit that is
    misclassified already has the bracket ``(0, 0]``.
    """
    eps_hi = real("eps_hi", eps_hi, open_low=True, high=1.0)
    tol = real("tol", tol, open_low=True)
    max_calls = integer("max_calls", max_calls, low=2)
    chain, x_np, y = _one_digit(model, x, y)
    start = time.perf_counter()
    calls: list[Verification] = []
    if _predicted_class(chain, x_np) != y:
        return MinimalEps(0.0, 0.0, _predicted_class(chain, x_np), x.detach().cpu().clone(), calls, 0.0)
    clean = verify_milp(model, x, y, 0.0, time_limit=time_limit)
    calls.append(clean)
    lo, m_lo = 0.0, clean.worst_margin
    hi_v = verify_milp(model, x, y, eps_hi, time_limit=time_limit)
    calls.append(hi_v)
    while hi_v.robust:
        if hi_v.eps >= 1.0:
            raise ValueError("no input of the pixel box is classified otherwise: there is no adversarial radius")
        lo, m_lo = hi_v.eps, hi_v.worst_margin
        hi_v = verify_milp(model, x, y, min(2 * hi_v.eps, 1.0), time_limit=time_limit)
        calls.append(hi_v)
    hi, m_hi, side = hi_v.eps, hi_v.worst_margin, 0
    while hi - lo > tol and len(calls) < max_calls:
        e = hi - m_hi * (hi - lo) / (m_hi - m_lo) if m_hi > m_lo else (lo + hi) / 2
        e = min(max(e, lo + 0.01 * (hi - lo)), hi - 0.01 * (hi - lo))
        v = verify_milp(model, x, y, e, time_limit=time_limit)
        calls.append(v)
        if v.robust:
            lo, m_lo = e, v.worst_margin
            m_hi = m_hi / 2 if side == -1 else m_hi   # Illinois: halve the stale end's value
            side = -1
        else:
            hi, m_hi, hi_v = e, v.worst_margin, v
            m_lo = m_lo / 2 if side == 1 else m_lo
            side = 1
    return MinimalEps(lo, hi, hi_v.target, hi_v.x_worst, calls, time.perf_counter() - start)


def attack_minimal_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       attack_at: Callable[[float], Callable[..., torch.Tensor]], *, eps_max: float = 0.5,
                       iters: int = 10) -> torch.Tensor:
    """Per digit ``[N]`` (float64, CPU): the smallest ε at which ``attack_at(ε)(model, x, y)`` changes
    the prediction, by bisection on ``[0, eps_max]`` over ``iters`` halvings. The value is the upper
    end of the final bracket, where the attack succeeded; ``inf`` where it fails at ``eps_max``; 0
    where ``x`` is misclassified already. An attack finds *some* adversarial example, so this is an
    upper bound on the exact minimal radius of :func:`minimal_eps_milp`.
    """
    eps_max = real("eps_max", eps_max, open_low=True)
    iters = integer("iters", iters)
    check_images(x)
    check_labels(y, num_classes=None, n=len(x))
    device = model_device(model)
    x, y = x.to(device), y.to(device)

    def fooled(eps: float, idx: torch.Tensor) -> torch.Tensor:
        x_adv = attack_at(eps)(model, x[idx], y[idx])
        with torch.no_grad(), eval_mode(model):
            return (model(x_adv).argmax(1) != y[idx]).cpu()

    with torch.no_grad(), eval_mode(model):
        wrong = (model(x).argmax(1) != y).cpu()
    lo = torch.zeros(len(x), dtype=torch.float64)
    hi = torch.full((len(x),), eps_max, dtype=torch.float64)
    found = torch.zeros(len(x), dtype=torch.bool)
    right = (~wrong).nonzero().flatten()
    if len(right):
        found[right] = fooled(eps_max, right)
    for _ in range(iters):
        for i in found.nonzero().flatten().tolist():   # one digit at a time: each has its own ε
            mid = float((lo[i] + hi[i]) / 2)
            if bool(fooled(mid, torch.tensor([i]))[0]):
                hi[i] = mid
            else:
                lo[i] = mid
    out = torch.where(found, hi, torch.tensor(float("inf"), dtype=torch.float64))
    out[wrong] = 0.0
    return out


@dataclass
class Sandwich:
    """Three answers for the same digits at one ε (CPU bool tensors ``[N]``): ``certified`` (interval
    bounds prove the digit robust), ``robust`` (the exact answer: no input of the ball is classified
    otherwise) and ``survives`` (the digit is correct and the attack did not break it). Per digit
    ``certified ⇒ robust ⇒ survives``, so the accuracies obey certified ≤ robust ≤ attacked.
    ``decided_by`` names what settled each digit; ``milp_seconds`` is the time spent in MILPs."""

    eps: float
    certified: torch.Tensor
    robust: torch.Tensor
    survives: torch.Tensor
    decided_by: list
    milp_seconds: float

    def accuracies(self) -> tuple[float, float, float]:
        """``(certified, exact robust, attacked)`` accuracy."""
        return tuple(float(t.double().mean()) for t in (self.certified, self.robust, self.survives))


def robustness_sandwich(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                        attack: Callable[..., torch.Tensor], *, time_limit: float | None = None) -> Sandwich:
    """Certified, exact and attacked robustness of each digit at ``eps`` (L∞), cheapest first: a
    misclassified digit is not robust; a digit the interval bounds certify is robust; a digit the
    attack (``attack(model, x, y)``, e.g. a ``functools.partial`` of PGD at ``eps``) breaks is not;
    every other digit goes to :func:`verify_milp`, which decides it exactly."""
    from .certify import certified as ibp_certified

    eps = real("eps", eps)
    check_images(x)
    check_labels(y, num_classes=None, n=len(x))
    device = model_device(model)
    cert = ibp_certified(model, x, y, eps)
    x_adv = attack(model, x.to(device), y.to(device))
    with torch.no_grad(), eval_mode(model):
        clean = (model(x.to(device)).argmax(1) == y.to(device)).cpu()
        survives = clean & (model(x_adv).argmax(1) == y.to(device)).cpu()
    robust, decided, seconds = torch.zeros(len(x), dtype=torch.bool), [], 0.0
    for i in range(len(x)):
        if not clean[i]:
            decided.append("misclassified")
        elif cert[i]:
            robust[i] = True
            decided.append("interval bounds")
        elif not survives[i]:
            decided.append("attack")
        else:
            v = verify_milp(model, x[i:i + 1], int(y[i]), eps, time_limit=time_limit)
            robust[i], seconds = v.robust, seconds + v.seconds
            decided.append("MILP")
    return Sandwich(eps, cert, robust, survives, decided, seconds)

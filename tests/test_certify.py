"""Certified robustness under L∞ (chapter 11): interval bounds, IBP training, exact verification as a MILP.

The bounds and the MILP are checked against hand computations on a 2-2-2 ReLU network whose exact
answers are known in closed form, against brute force on a grid for a random network with two
inputs, and for soundness by sampling and by attacking a CNN of the book's architecture.
"""

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.attacks import pgd
from utils.certify import (IntervalBoundTraining, certified, certified_accuracy, ibp_loss, interval_bounds,
                           margin_bounds)
from utils.models import build_model
from utils.objectives import CrossEntropy
from utils.verify import affine_chain, attack_minimal_eps, minimal_eps_milp, verify_milp


def hand_net() -> nn.Module:
    """Two inputs, two ReLUs, two logits: ``z_0 = 0`` and ``z_1 = relu(x1 + x2) + relu(x1 − x2) − 1.2``.

    On the pixel box ``z_1 + 1.2 = 2·max(x1, x2)``: at ``x = (0.5, 0.5)`` the margin ``z_1 − z_0`` is
    −0.2 and over the L∞ ball of radius e it is at most ``2e − 0.2``, so the exact minimal
    adversarial radius is 0.1. Over the ball of radius 0.25 the hidden pre-activations lie in
    [0.5, 1.5] and [−0.5, 0.5], so IBP bounds ``z_1`` by [−0.7, 0.8] while its exact range is [−0.7, 0.3].
    """
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        net[1].bias.zero_()
        net[3].weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        net[3].bias.copy_(torch.tensor([0.0, -1.2]))
    return net.eval()


X_HAND = torch.tensor([[[[0.5, 0.5]]]])   # one "image" of 1 x 1 x 2 pixels
Y_HAND = torch.tensor([0])


def random_net(seed: int, widths=(2, 8, 8, 3)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        with torch.no_grad():
            layers[-1].weight.mul_(4.0)   # steep enough that the classes meet inside the pixel box
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def grid_logits(net: nn.Module, x0: torch.Tensor, eps: float, steps: int = 401):
    """Every point of a fine grid over the ball ∩ box around a two-pixel input, and its logits."""
    lo, hi = (x0.flatten() - eps).clamp(0, 1), (x0.flatten() + eps).clamp(0, 1)
    g1, g2 = torch.meshgrid(torch.linspace(lo[0], hi[0], steps), torch.linspace(lo[1], hi[1], steps), indexing="ij")
    pts = torch.stack([g1.flatten(), g2.flatten()], 1).view(-1, 1, 1, 2)
    with torch.no_grad():
        return pts, net(pts)


# --------------------------------------------------------------------------------------------
# Interval bounds
# --------------------------------------------------------------------------------------------

def test_interval_bounds_match_the_hand_computation():
    lower, upper = interval_bounds(hand_net(), X_HAND, 0.25)
    assert torch.allclose(lower, torch.tensor([[0.0, -0.7]]), atol=1e-6)
    assert torch.allclose(upper, torch.tensor([[0.0, 0.8]]), atol=1e-6)
    # the margin z_0 − z_1 through the elided last layer: 1.2 − (a1 + a2) ≥ 1.2 − 1.5 − 0.5 = −0.8
    m = margin_bounds(hand_net(), X_HAND, Y_HAND, 0.25)
    assert torch.allclose(m, torch.tensor([[0.0, -0.8]]), atol=1e-6)
    # at eps = 0 the bounds are the logits themselves
    lower, upper = interval_bounds(hand_net(), X_HAND, 0.0)
    assert torch.allclose(lower, upper) and torch.allclose(lower, torch.tensor([[0.0, -0.2]]), atol=1e-6)


def test_the_pixel_box_clips_the_ball():
    x = torch.tensor([[[[0.0, 1.0]]]])
    lower, upper = interval_bounds(hand_net(), x, 0.5)
    # x1 in [0, 0.5], x2 in [0.5, 1]: z_1 + 1.2 = relu(x1 + x2) + relu(x1 − x2) in [0.5, 1.5] + [0, 0]
    assert torch.allclose(upper[0, 1], torch.tensor(0.3), atol=1e-6)


@pytest.mark.parametrize("arch,kwargs", [("cnn", {"width": 2, "hidden": 8}), ("mlp", {"hidden": 16})])
def test_interval_bounds_contain_sampled_and_attacked_points(arch, kwargs, tiny_batch):
    torch.manual_seed(0)
    model = build_model(arch, **kwargs).eval()
    x, y = tiny_batch[0][:8], tiny_batch[1][:8]
    eps = 0.1
    lower, upper = interval_bounds(model, x, eps)
    margins = margin_bounds(model, x, y, eps)
    points = [(x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1) for _ in range(200)]
    points += [(x + eps * torch.sign(torch.randn_like(x))).clamp(0, 1) for _ in range(50)]   # corners
    points += [pgd(model, x, y, eps, steps=10, loss=loss) for loss in ("ce", "margin")]
    for p in points:
        assert float((p - x).abs().max()) <= eps + 1e-6
        with torch.no_grad():
            z = model(p)
        assert (z >= lower - 1e-5).all() and (z <= upper + 1e-5).all()
        true_margin = z.gather(1, y.unsqueeze(1)) - z
        assert (true_margin >= margins - 1e-5).all()
    # the elided margin bound is never looser than the difference of the logit bounds
    naive = lower.gather(1, y.unsqueeze(1)) - upper
    assert (margins >= naive - 1e-5).all()


def test_certified_digits_are_never_broken_and_the_model_is_left_alone(tiny_batch):
    torch.manual_seed(0)
    model = build_model("mlp", hidden=16)
    model.train()
    x, y = tiny_batch
    ok = certified(model, x, y, 0.0)
    with torch.no_grad():
        model.eval()
        clean = model(x).argmax(1) == y
        model.train()
    assert torch.equal(ok, clean)    # at eps = 0 the certificate is the clean prediction
    assert model.training and all(p.grad is None for p in model.parameters())
    assert certified_accuracy(model, x, y, 0.3) <= certified_accuracy(model, x, y, 0.01) <= float(clean.double().mean())


def test_bounds_refuse_bad_input():
    net = hand_net()
    with pytest.raises(ValueError, match="eps"):
        interval_bounds(net, X_HAND, -0.1)
    with pytest.raises(ValueError, match="shape"):
        interval_bounds(net, X_HAND.flatten(), 0.1)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        interval_bounds(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(2)), X_HAND, 0.1)
    with pytest.raises(ValueError, match="labels"):
        margin_bounds(net, X_HAND, torch.tensor([0, 1]), 0.1)


# --------------------------------------------------------------------------------------------
# IBP training
# --------------------------------------------------------------------------------------------

def test_ibp_loss_and_objective_match_the_hand_computation():
    net = hand_net()
    # worst-case logits: z_0 = 0, z_1 = 0.8 (the margin's lower bound is −0.8): CE = log(1 + e^0.8)
    assert math.isclose(ibp_loss(net, X_HAND, Y_HAND, 0.25).item(), math.log1p(math.exp(0.8)), rel_tol=1e-6)
    objective = IntervalBoundTraining(eps=0.25, kappa=0.5, start=0.0, ramp=0.0)
    out = objective(net, X_HAND, Y_HAND, progress=1.0)
    clean_ce = math.log1p(math.exp(-0.2))        # logits (0, −0.2), class 0
    assert math.isclose(out.loss.item(), 0.5 * clean_ce + 0.5 * math.log1p(math.exp(0.8)), rel_tol=1e-6)
    assert torch.allclose(out.logits, torch.tensor([[0.0, -0.2]]), atol=1e-6)
    assert out.terms["eps"] == 0.25 and out.terms["kappa"] == 0.5


def test_the_schedule_warms_up_then_ramps_eps_up_and_kappa_down():
    objective = IntervalBoundTraining(eps=0.1, kappa=0.5, start=0.1, ramp=0.5)
    assert objective.schedule(0.05) == (0.0, 1.0)
    eps, kappa = objective.schedule(0.35)
    assert math.isclose(eps, 0.05) and math.isclose(kappa, 0.75)
    assert objective.schedule(0.9) == (0.1, 0.5)
    out = objective(hand_net(), X_HAND, Y_HAND, progress=0.0)   # warm-up: plain cross-entropy
    assert math.isclose(out.loss.item(), math.log1p(math.exp(-0.2)), rel_tol=1e-6)


def test_the_objective_trains_through_the_bounds_and_has_a_stable_spec():
    net = hand_net().train()
    out = IntervalBoundTraining(eps=0.25, kappa=0.0, start=0.0, ramp=0.0)(net, X_HAND, Y_HAND)
    out.loss.backward()
    assert net[1].weight.grad is not None and net[1].weight.grad.abs().sum() > 0
    assert IntervalBoundTraining(eps=0).spec() == IntervalBoundTraining(eps=0.0).spec()
    assert IntervalBoundTraining(eps=0.1).spec() != IntervalBoundTraining(eps=0.2).spec()


@pytest.mark.parametrize("kwargs", [{"eps": -0.1}, {"kappa": 1.5}, {"start": 1.0}, {"start": 0.6, "ramp": 0.6}])
def test_the_objective_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError):
        IntervalBoundTraining(**kwargs)


# --------------------------------------------------------------------------------------------
# Exact verification
# --------------------------------------------------------------------------------------------

def test_verify_milp_finds_the_exact_worst_margin_of_the_hand_net():
    v = verify_milp(hand_net(), X_HAND, 0, 0.25)
    assert math.isclose(v.worst_margin, 0.3, abs_tol=1e-6) and not v.robust and v.target == 1
    assert torch.allclose(v.x_worst.flatten(), torch.tensor([0.75, 0.25]), atol=1e-6) or \
        math.isclose(float(v.x_worst.flatten().max()), 0.75, abs_tol=1e-6)
    with torch.no_grad():
        z = hand_net()(v.x_worst)
    assert math.isclose(float(z[0, 1] - z[0, 0]), 0.3, abs_tol=1e-5)   # the point really has that margin
    v = verify_milp(hand_net(), X_HAND, 0, 0.05)
    assert v.robust and math.isclose(v.worst_margin, -0.1, abs_tol=1e-6)
    # IBP's bound (0.8 on z_1 − z_0 at 0.25) contains the exact value but is not it
    assert -margin_bounds(hand_net(), X_HAND, Y_HAND, 0.25)[0, 1] >= v.worst_margin


def test_minimal_eps_milp_brackets_the_closed_form():
    r = minimal_eps_milp(hand_net(), X_HAND, 0, eps_hi=0.3, tol=1e-4)
    assert r.lower < 0.1 <= r.upper + 1e-6 and r.upper - r.lower <= 1e-4
    assert r.target == 1 and all(v.eps <= 0.3 + 1e-12 for v in r.verifications)
    # an upper end that is not adversarial is doubled until it is
    r = minimal_eps_milp(hand_net(), X_HAND, 0, eps_hi=0.02, tol=1e-4)
    assert r.lower < 0.1 <= r.upper + 1e-6


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_verify_and_minimal_eps_agree_with_brute_force_on_a_grid(seed):
    net = random_net(seed)
    x0 = torch.rand(1, 1, 1, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = int(net(x0).argmax())
    eps, steps = 0.2, 401
    pts, z = grid_logits(net, x0, eps, steps)
    other = z.clone()
    other[:, y] = -math.inf
    grid_worst = float((other.max(1).values - z[:, y]).max())
    v = verify_milp(net, x0, y, eps)
    lipschitz = sum(float(m.weight.detach().abs().sum(1).max()) for m in net if isinstance(m, nn.Linear)) * 2
    assert grid_worst - 1e-6 <= v.worst_margin <= grid_worst + lipschitz * 2 * eps / (steps - 1)
    # the minimal radius: the L∞ distance to the nearest grid point of another class
    pts, z = grid_logits(net, x0, 1.0, steps)
    dist = (pts.flatten(1) - x0.flatten()).abs().max(1).values
    changed = z.argmax(1) != y
    if not changed.any():
        pytest.skip("this random net gives one class to the whole box")
    grid_eps = float(dist[changed].min())
    r = minimal_eps_milp(net, x0, y, eps_hi=min(grid_eps + 0.01, 1.0), tol=1e-4)
    assert r.lower <= grid_eps + 1e-6 and r.upper >= grid_eps - 2.0 / (steps - 1) - 1e-4


def test_an_attack_never_beats_the_exact_minimal_radius():
    found = attack_minimal_eps(hand_net(), X_HAND, Y_HAND, lambda e: partial(pgd, eps=e, steps=20, loss="margin"),
                               eps_max=0.5, iters=12)
    assert 0.1 - 1e-6 <= float(found[0]) <= 0.1 + 0.5 / 2 ** 12 + 1e-6
    # a digit the model gets wrong needs no perturbation; one the attack cannot break is inf
    assert float(attack_minimal_eps(hand_net(), X_HAND, torch.tensor([1]), lambda e: partial(pgd, eps=e),
                                    eps_max=0.5)[0]) == 0.0
    assert math.isinf(float(attack_minimal_eps(hand_net(), X_HAND, Y_HAND, lambda e: partial(pgd, eps=e),
                                               eps_max=0.05)[0]))


def test_affine_chain_folds_the_normalisation(tiny_batch):
    torch.manual_seed(0)
    model = build_model("mlp", hidden=8).eval()
    x = tiny_batch[0][:4]
    h = x.double().flatten(1).numpy().T
    chain = affine_chain(model)
    for w, b in chain[:-1]:
        h = np.maximum(w @ h + b[:, None], 0)
    w, b = chain[-1]
    with torch.no_grad():
        assert np.allclose(w @ h + b[:, None], model(x).double().numpy().T, atol=1e-4)


def test_verification_refuses_bad_input(tiny_batch):
    net = hand_net()
    with pytest.raises(ValueError, match="one digit"):
        verify_milp(net, torch.cat([X_HAND, X_HAND]), 0, 0.1)
    with pytest.raises(ValueError, match="eps"):
        verify_milp(net, X_HAND, 0, -0.1)
    with pytest.raises(ValueError, match="label"):
        verify_milp(net, X_HAND, 2, 0.1)
    with pytest.raises(ValueError, match="perceptrons"):
        verify_milp(build_model("cnn", width=2, hidden=4).eval(), tiny_batch[0][:1], 0, 0.1)
    with pytest.raises(ValueError, match="eps_hi"):
        minimal_eps_milp(net, X_HAND, 0, eps_hi=0.0)
    with pytest.raises(ValueError, match="no adversarial radius"):
        # class 1 never wins when its bias is −10
        robust = hand_net()
        with torch.no_grad():
            robust[3].bias[1] = -10.0
        minimal_eps_milp(robust, X_HAND, 0, eps_hi=0.5)


def test_ibp_training_makes_a_batch_certifiable_where_cross_entropy_does_not(tiny_batch):
    x, y = tiny_batch[0][:32], tiny_batch[1][:32]
    objectives = {"standard": CrossEntropy(), "ibp": IntervalBoundTraining(eps=0.05, kappa=0.5, start=0.0, ramp=0.0)}
    models = {}
    for name, objective in objectives.items():
        torch.manual_seed(0)
        model = build_model("mlp", hidden=32)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(150):
            out = (CrossEntropy() if step < 50 else objective)(model, x, y, progress=1.0)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        models[name] = model.eval()
    with torch.no_grad():
        bound = {name: ibp_loss(m, x, y, 0.05).item() for name, m in models.items()}
        clean = {name: (m(x).argmax(1) == y).double().mean().item() for name, m in models.items()}
    cert = {name: certified_accuracy(m, x, y, 0.05) for name, m in models.items()}
    assert bound["ibp"] < bound["standard"], bound
    assert cert["ibp"] >= cert["standard"] + 0.5, cert
    assert clean["ibp"] >= 0.9, clean

"""TRADES (Zhang et al. 2019): the KL term, the inner attack and the objective, checked against hand
computations on tiny batches, and the invariants every defence of the book keeps."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils import cache
from utils.defences import PGDAdversarial
from utils.models import build_model
from utils.objectives import CrossEntropy
from utils.trades import TRADES, trades_attack, trades_kl
from utils.train import StepOutput, fit


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", hidden=32)


@pytest.fixture
def batch(mnist5k_fast):
    return mnist5k_fast.x_train[:16].clone(), mnist5k_fast.y_train[:16].clone()


def linear_model():
    """Logits = W·x + b on 1×2×2 images (4 pixels, 3 classes), with fixed, hand-readable weights."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.0, 2.0, -1.0, 1.0], [-0.5, 0.0, 1.0, 1.5]]))
        model[1].bias.copy_(torch.tensor([0.1, -0.2, 0.0]))
    return model


def hand_logits(w, b, pixels):
    return [sum(wi * p for wi, p in zip(row, pixels)) + bi for row, bi in zip(w, b)]


def hand_log_softmax(z):
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


# --------------------------------------------------------------------------------------------
# The KL term and the loss, by hand
# --------------------------------------------------------------------------------------------

def test_trades_kl_matches_the_formula_on_hand_made_logits():
    clean = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    adv = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.5]])
    expected = []
    for zc, za in zip(clean.tolist(), adv.tolist()):
        lp, lq = hand_log_softmax(zc), hand_log_softmax(za)
        expected.append(sum(math.exp(a) * (a - b) for a, b in zip(lp, lq)))
    kl = trades_kl(clean, adv)
    assert kl.shape == (2,)
    assert kl.tolist() == pytest.approx(expected, rel=1e-6)
    assert kl[0] > 0.5 and kl[1] == 0.0          # identical rows: exactly 0
    # KL is not symmetric: the clean prediction is the first argument
    assert trades_kl(adv, clean)[0].item() != pytest.approx(kl[0].item(), rel=1e-3)
    with pytest.raises(ValueError, match="same shape"):
        trades_kl(clean, adv[:1])


def test_loss_is_ce_plus_beta_times_kl_by_hand_with_a_fixed_adversarial_batch(monkeypatch):
    model = linear_model()
    x = torch.tensor([[[[0.2, 0.9], [0.0, 0.5]]], [[[1.0, 0.3], [0.7, 0.1]]]])
    x_adv = torch.tensor([[[[0.3, 0.8], [0.1, 0.4]]], [[[0.9, 0.4], [0.6, 0.2]]]])
    y = torch.tensor([1, 0])
    monkeypatch.setattr("utils.trades.trades_attack", lambda *args, **kwargs: x_adv.clone())
    obj = TRADES(eps=0.1, alpha=0.05, steps=2, beta=2.5)
    out = obj(model, x, y)

    w, b = model[1].weight.tolist(), model[1].bias.tolist()
    ce, kl = [], []
    for xi, ai, yi in zip(x.flatten(1).tolist(), x_adv.flatten(1).tolist(), y.tolist()):
        lp = hand_log_softmax(hand_logits(w, b, xi))
        lq = hand_log_softmax(hand_logits(w, b, ai))
        ce.append(-lp[yi])
        kl.append(sum(math.exp(p) * (p - q) for p, q in zip(lp, lq)))
    expected = sum(ce) / 2 + 2.5 * sum(kl) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert out.terms["ce_clean"] == pytest.approx(sum(ce) / 2, rel=1e-6)
    assert out.terms["kl"] == pytest.approx(sum(kl) / 2, rel=1e-5, abs=1e-7)
    assert torch.equal(out.logits, model(x_adv)), "the logits returned are the adversarial ones"

    # the gradient flows through both the clean and the adversarial logits (Zhang et al.'s code)
    out.loss.backward()
    got = model[1].weight.grad.clone()
    model.zero_grad()
    clean, adv = model(x), model(x_adv)
    ref = F.cross_entropy(clean, y) + 2.5 * (F.softmax(clean, 1) * (F.log_softmax(clean, 1) - F.log_softmax(adv, 1))).sum(1).mean()
    ref.backward()
    assert torch.allclose(got, model[1].weight.grad, atol=1e-6)
    model.zero_grad()
    clean, adv = model(x), model(x_adv)
    only_adv = F.cross_entropy(clean, y) + 2.5 * trades_kl(clean.detach(), adv).mean()
    only_adv.backward()
    assert not torch.allclose(got, model[1].weight.grad, atol=1e-4), "the KL's clean side must carry gradient"


def test_beta_zero_is_plain_cross_entropy_on_clean_inputs(batch):
    model = tiny_model()
    x, y = batch
    torch.manual_seed(0)
    out = TRADES(eps=0.1, alpha=0.04, steps=2, beta=0.0)(model, x, y)
    out.loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = F.cross_entropy(model(x), y)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert out.terms["kl"] > 0.0, "the attack ran and moved the prediction; beta = 0 only ignores it"
    for g, p in zip(got, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-7)


# --------------------------------------------------------------------------------------------
# The inner attack
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_the_attack_raises_the_kl_and_stays_in_ball_and_box(norm, eps, batch):
    model = tiny_model()
    x, y = batch
    alpha = 0.02 if norm == "linf" else 0.25

    def kl_at(steps):
        x_adv = trades_attack(model, x, y, eps, alpha=alpha, steps=steps, norm=norm,
                              generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            return x_adv, trades_kl(model(x), model(x_adv))

    start, kl_start = kl_at(0)
    x_adv, kl = kl_at(10)
    assert (start - x).abs().max() < 0.01 and not torch.equal(start, x), "a small random start"
    assert kl.mean() > 20 * kl_start.mean() and (kl > kl_start).float().mean() > 0.9
    assert 0.0 <= x_adv.min() and x_adv.max() <= 1.0
    if norm == "linf":
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert (x_adv - x).abs().max() > 0.9 * eps
    else:
        norms = (x_adv - x).flatten(1).norm(dim=1)
        assert norms.max() <= eps + 1e-5 and norms.max() > 0.9 * eps
    # a stronger attack than a random point of the ball
    rand = (x + torch.empty_like(x).uniform_(-1, 1) * (eps if norm == "linf" else 0.0)).clamp(0, 1)
    with torch.no_grad():
        assert kl.mean() > trades_kl(model(x), model(rand)).mean()


def test_the_attack_runs_in_eval_mode_and_leaves_the_model_as_found(batch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 10))
    model.train()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(m.training))
    x, y = batch
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    torch.manual_seed(0)
    obj = TRADES(eps=0.1, alpha=0.04, steps=3)
    out = obj(model, x, y)
    # the clean prediction and 3 steps in evaluation mode, then the loss's two passes in training mode
    assert seen == [False] * 4 + [True, True]
    assert model.training and all(p.requires_grad for p in params)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in params), "the attack writes no .grad"
    # deterministic in evaluation mode: the same seed gives the same adversarial batch
    model.eval()
    torch.manual_seed(1)
    a = obj.adversarial(model, x, y)[0]
    torch.manual_seed(1)
    assert torch.equal(a, obj.adversarial(model, x, y)[0])
    assert out.loss.requires_grad


def test_eps_warmup_scales_eps_and_alpha_and_skips_the_attack_at_zero(batch, monkeypatch):
    model = tiny_model()
    x, y = batch
    obj = TRADES(eps=0.2, alpha=0.08, steps=2, beta=3.0, warmup=0.4)
    out = obj(model, x, y, progress=0.0)
    assert out.terms["eps"] == 0.0 and out.terms["kl"] == 0.0
    assert out.loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)
    seen = []

    def spy(model, x, y, eps, **kw):
        seen.append((eps, kw["alpha"]))
        return trades_attack(model, x, y, eps, **kw)

    monkeypatch.setattr("utils.trades.trades_attack", spy)
    reported = [obj(model, x, y, progress=p).terms["eps"] for p in (0.2, 0.4, 0.9)]
    assert seen == [pytest.approx((0.1, 0.04)), pytest.approx((0.2, 0.08)), pytest.approx((0.2, 0.08))]
    assert reported == pytest.approx([0.1, 0.2, 0.2])
    assert TRADES(eps=0.3, alpha=None, steps=10).step_size == pytest.approx(0.075)


# --------------------------------------------------------------------------------------------
# Spec, cache key, bad input, fit
# --------------------------------------------------------------------------------------------

OTHER = {"eps": 0.2, "alpha": 0.02, "steps": 7, "beta": 1.0, "start_std": 0.01, "norm": "l2", "warmup": 0.5}


def test_spec_changes_with_every_parameter_and_reaches_the_key(mnist5k_fast):
    obj = TRADES()
    base = obj.spec()
    assert json.loads(json.dumps(base)) == base and base["objective"] == "trades"
    spec = cache.ModelSpec("t", arch="mlp", arch_kwargs=(("hidden", 8),), objective=obj, epochs=1)
    key = spec.key(mnist5k_fast)
    names = [f.name for f in dataclasses.fields(obj) if f.init]
    assert set(names) == set(OTHER)
    for name in names:
        changed = dataclasses.replace(obj, **{name: OTHER[name]})
        assert changed.spec() != base, name
        assert dataclasses.replace(spec, objective=changed).key(mnist5k_fast) != key, name
    assert base != PGDAdversarial().spec() and base != CrossEntropy().spec()
    assert TRADES(beta=0).spec() == TRADES(beta=0.0).spec()
    hash(obj)
    # TRADES lives outside the modules every model depends on: its code is in its own models' keys only
    assert "utils.trades" in spec.training_code() and "utils.trades" not in cache.TRAINING_CODE


@pytest.mark.parametrize("kwargs, word", [
    (dict(beta=-1.0), "beta"), (dict(beta=float("inf")), "beta"), (dict(start_std=-0.001), "start_std"),
    (dict(eps=-0.1), "eps"), (dict(steps=0), "steps"), (dict(warmup=1.0), "warmup"), (dict(norm="l1"), "norm"),
])
def test_bad_parameters_are_rejected_with_a_clear_sentence(kwargs, word):
    with pytest.raises(ValueError, match=word):
        TRADES(**kwargs)


def test_bad_attack_arguments_are_rejected(batch):
    x, y = batch
    with pytest.raises(ValueError, match="alpha"):
        trades_attack(tiny_model(), x, y, 0.1, alpha=0.0)
    with pytest.raises(ValueError, match="x"):
        trades_attack(tiny_model(), x * 2, y, 0.1)


def test_fit_with_trades_trains_every_parameter_and_records_its_terms(mnist5k_fast):
    d = mnist5k_fast
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    hist = fit(model, d.x_train[:96], d.y_train[:96], TRADES(eps=0.1, alpha=0.04, steps=2), epochs=1,
               batch_size=32, progress=False)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert {"ce_clean", "kl", "eps", "acc_clean"} <= set(hist.records[0].terms)
    assert hist.records[0].terms["kl"] > 0
    out = TRADES(eps=0.1, alpha=0.04, steps=2)(model, d.x_train[:8], d.y_train[:8])
    assert isinstance(out, StepOutput) and out.logits.shape == (8, 10)

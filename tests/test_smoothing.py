"""Randomized smoothing (chapter 11): counts under noise, the Clopper-Pearson bound, CERTIFY and PREDICT,
the noisy-average model that attacks climb, and the Gaussian-augmentation objective.

The certificate is checked against the closed form for a linear classifier, whose smoothed classifier
has a known radius (the distance to its hyperplane), and the confidence bound against known values.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from utils.models import build_model
from utils.smoothing import (ABSTAIN, GaussianAugmentation, NoisyAverage, certify, clopper_pearson_lower,
                             noise_counts, predict_smoothed)


def linear_classifier() -> nn.Module:
    """Class 1 where ``3 x_1 − 4 x_2 + 0.5 > 0``, else class 0 (four pixels, the last two unused)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, -4.0, 0.0, 0.0]]))
        net[1].bias.copy_(torch.tensor([0.0, 0.5]))
    return net.eval()


def test_clopper_pearson_matches_known_values():
    assert math.isclose(clopper_pearson_lower(10, 10, 0.05).item(), 0.05 ** 0.1, rel_tol=1e-9)
    assert math.isclose(clopper_pearson_lower(5, 10, 0.025).item(), 0.18709, abs_tol=1e-4)   # the 95% interval
    assert clopper_pearson_lower(0, 10, 0.05).item() == 0.0
    bounds = clopper_pearson_lower(torch.tensor([0, 3, 7, 10]), 10, 0.01)
    assert bounds.shape == (4,) and (bounds[1:] > bounds[:-1]).all() and (bounds <= torch.tensor([0, .3, .7, 1.])).all()


def test_clopper_pearson_covers_the_true_proportion():
    # at p = 0.8, n = 50, the bound at alpha = 0.05 must lie below p in at least 95% of draws
    torch.manual_seed(0)
    k = torch.distributions.Binomial(50, torch.tensor(0.8)).sample((4000,))
    assert float((clopper_pearson_lower(k, 50, 0.05) <= 0.8).double().mean()) >= 0.95


def test_the_certified_radius_of_a_linear_classifier_approaches_the_distance_from_below():
    net = linear_classifier()
    x = torch.tensor([[[[0.5, 0.1, 0.3, 0.7]], [[0.2, 0.4, 0.0, 0.0]]]]).view(2, 1, 1, 4)
    margins = 3 * x[:, 0, 0, 0] - 4 * x[:, 0, 0, 1] + 0.5
    distance = margins.abs() / 5.0
    sigma = 0.5
    cert = certify(net, x, sigma, n0=100, n=100_000, alpha=0.001, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cert.prediction, (margins > 0).long())
    assert (cert.radius < distance).all() and (cert.radius > distance - 0.01).all()
    # p_A is Φ(d / σ); its lower bound sits just below
    p_true = torch.from_numpy(stats.norm.cdf((distance / sigma).numpy()))
    assert (cert.p_lower <= p_true).all() and (cert.p_lower > p_true - 0.01).all()


def test_noise_counts_are_counts_and_repeatable():
    net = linear_classifier()
    x = torch.full((3, 1, 1, 4), 0.5)
    a = noise_counts(net, x, 0.3, 250, batch_size=100, generator=torch.Generator().manual_seed(1))
    b = noise_counts(net, x, 0.3, 250, batch_size=64, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 10) and (a.sum(1) == 250).all() and a.dtype == torch.long
    assert torch.equal(a, b)   # the noise does not depend on how it is batched


def test_abstention_on_a_coin_flip_and_prediction_on_a_sure_thing():
    net = linear_classifier()
    on_boundary = torch.tensor([[[[0.3, 0.35, 0.0, 0.0]]]])   # 3·0.3 − 4·0.35 + 0.5 = 0
    far = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    x = torch.cat([on_boundary, far])
    cert = certify(net, x, 0.25, n0=100, n=2000, generator=torch.Generator().manual_seed(0))
    assert cert.prediction[0] == ABSTAIN and cert.radius[0] == 0.0
    assert cert.prediction[1] == 1 and cert.radius[1] > 0.25
    pred = predict_smoothed(net, x, 0.25, n=2000, generator=torch.Generator().manual_seed(0))
    assert pred[1] == 1
    assert cert.certified_accuracy(torch.tensor([1, 1]), 0.0) == 0.5


def test_smoothing_leaves_the_model_alone(tiny_batch):
    torch.manual_seed(0)
    model = build_model("mlp", hidden=8)
    model.train()
    certify(model, tiny_batch[0][:2], 0.25, n0=10, n=20)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_noisy_average_is_a_log_probability_model():
    torch.manual_seed(0)
    soft = NoisyAverage(linear_classifier(), 0.5, samples=8)
    out = soft(torch.full((5, 1, 1, 4), 0.5))
    assert out.shape == (5, 2) and torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)


def test_gaussian_augmentation_matches_a_hand_computation(tiny_batch):
    torch.manual_seed(0)
    model = build_model("mlp", hidden=8)
    x, y = tiny_batch[0][:8], tiny_batch[1][:8]
    torch.manual_seed(1)
    out = GaussianAugmentation(sigma=0.3)(model, x, y)
    torch.manual_seed(1)
    expected = F.cross_entropy(model(x + 0.3 * torch.randn_like(x)), y)
    assert torch.allclose(out.loss, expected) and out.terms["ce_noisy"] == pytest.approx(expected.item())
    assert GaussianAugmentation(0.5).spec() == {"objective": "gaussian_augmentation", "sigma": 0.5}


def test_bad_input_gets_one_clear_error():
    net = linear_classifier()
    x = torch.full((1, 1, 1, 4), 0.5)
    with pytest.raises(ValueError, match="sigma"):
        certify(net, x, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        GaussianAugmentation(sigma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        certify(net, x, 0.5, alpha=1.5)
    with pytest.raises(ValueError, match="k and n"):
        clopper_pearson_lower(11, 10)
    with pytest.raises(ValueError, match="shape"):
        noise_counts(net, x.flatten(), 0.5, 10)
    with pytest.raises(ValueError, match="n must be"):
        certify(net, x, 0.5, n=0)

import math

import pytest
import torch
import torch.nn.functional as F

from utils.energy import cross_entropy_from_energy, energy, joint_energy, summarize_logits


def test_seed_post_example_is_minus_2_4170():
    e = energy(torch.tensor([[2.0, 1.0, 0.1]]))
    assert e.shape == (1,)
    assert round(e.item(), 4) == -2.4170
    # the value a popular post prints is not a rounding of the true one
    assert abs(e.item() - (-2.31)) > 0.1


def test_energy_matches_definition_and_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 10, generator=g) * 3
    for T in (0.5, 1.0, 4.0):
        manual = -T * torch.log(torch.exp(logits / T).sum(dim=1))
        assert torch.allclose(energy(logits, T), manual, atol=1e-5)


def test_cross_entropy_is_joint_minus_free_energy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 10, generator=g) * 5
    y = torch.randint(0, 10, (200,), generator=g)
    ce = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(cross_entropy_from_energy(logits, y), ce, atol=1e-5)
    assert torch.allclose(joint_energy(logits, y), -logits[torch.arange(200), y])


def test_bounds_and_low_temperature_limit():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(100, 10, generator=g) * 2
    m = logits.max(dim=1).values
    e = energy(logits)
    assert torch.all(e <= -m + 1e-6)
    assert torch.all(e >= -m - math.log(10) - 1e-6)
    assert torch.allclose(energy(logits, T=1e-3), -m, atol=1e-2)


def test_shift_changes_energy_not_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.1]])
    assert torch.allclose(energy(logits + 3.0), energy(logits) - 3.0)
    assert torch.allclose(F.softmax(logits + 3.0, dim=1), F.softmax(logits, dim=1))


def test_log_confidence_is_max_logit_plus_energy():
    # log max_k p_k = max_k f_k + E(x): confidence and energy differ by the top logit.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(30, 10, generator=g)
    gap = logits.max(dim=1).values + energy(logits)
    assert torch.allclose(gap, F.softmax(logits, dim=1).max(dim=1).values.log(), atol=1e-5)
    assert torch.all(gap <= 0)


def test_gradient_of_energy_is_minus_softmax():
    logits = torch.randn(4, 10, requires_grad=True)
    (g,) = torch.autograd.grad(energy(logits).sum(), logits)
    assert torch.allclose(g, -F.softmax(logits, dim=1), atol=1e-6)


def test_summary_of_one_vector():
    s = summarize_logits([2.0, 1.0, 0.1])
    assert s.prediction == 0
    assert round(s.energy, 4) == -2.4170
    assert abs(sum(s.probs) - 1) < 1e-9
    assert "E=-2.4170" in repr(s)


@pytest.mark.parametrize("T", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_rejected(T):
    with pytest.raises(ValueError, match="temperature"):
        energy(torch.zeros(1, 3), T)


def test_bad_shapes_and_labels_are_rejected():
    with pytest.raises(ValueError, match="class dimension"):
        energy(torch.tensor(1.0))
    with pytest.raises(ValueError, match="labels"):
        joint_energy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        joint_energy(torch.zeros(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="one logit vector"):
        summarize_logits([[1.0, 2.0]])

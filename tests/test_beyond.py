"""Tests of the attacks beyond gradients and the ε-ball (chapter 10): the differentiable warp and the
spatial attacks, the Square attack (cross-checked against torchattacks 3.5.1), universal patches, and
transfer from a source model or an ensemble.

The model is a small MLP (64 hidden units) trained for five epochs on the 1,000 offline training
digits (about 88% test accuracy, two seconds of training).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils import attacks as A
from utils.checks import perturbation_size
from utils.evaluate import predict
from utils.models import build_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(mnist5k_fast):
    return mnist5k_fast


@pytest.fixture(scope="module")
def model(mlp64):
    return mlp64


@pytest.fixture(scope="module")
def batch(data):
    return data.x_test[:64].clone(), data.y_test[:64].clone()


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Counting(nn.Module):
    """A model that counts the images it is shown (its queries)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.seen = inner, 0

    def forward(self, x):
        self.seen += len(x)
        return self.inner(x)


class Scaled(nn.Module):
    """The same classifier with every logit multiplied by ``factor`` (a saturated softmax, the masking of
    defensive distillation)."""

    def __init__(self, inner: nn.Module, factor: float):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x):
        return self.inner(x) * self.factor


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            [p.requires_grad for p in model.parameters()], [p.grad for p in model.parameters()])


def _unchanged(model, before):
    sd, training, flags, grads = before
    after = _state(model)
    assert all(torch.equal(sd[k], after[0][k]) for k in sd)
    assert after[1] == training and after[2] == flags
    assert all(g is None for g in after[3])


# --------------------------------------------------------------------------------------------
# The warp
# --------------------------------------------------------------------------------------------

def test_warp_at_angle_zero_and_shift_zero_is_the_identity():
    x = torch.rand(4, 2, 28, 28)
    assert torch.allclose(A.rotate_translate(x, 0.0, 0.0), x, atol=1e-5)
    assert torch.allclose(A.rotate_translate(x, torch.zeros(4), torch.zeros(4, 2)), x, atol=1e-5)


@pytest.mark.parametrize("k", [1, -1, 3])
def test_quarter_turns_match_rot90(k):
    # Positive angles turn counter-clockwise as displayed, which is torch.rot90 over (H, W) with k > 0.
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(A.rotate_translate(x, 90.0 * k), torch.rot90(x, k, dims=(2, 3)), atol=1e-5)
    assert not torch.allclose(A.rotate_translate(x, 90.0 * k), torch.rot90(x, -k, dims=(2, 3)), atol=1e-2)


def test_half_turn_of_a_rectangle_matches_rot90():
    x = torch.rand(2, 3, 20, 32)
    assert torch.allclose(A.rotate_translate(x, 180.0), torch.rot90(x, 2, dims=(2, 3)), atol=1e-5)


@pytest.mark.parametrize("dx,dy", [(2, -3), (-1, 0), (0, 3), (3, 3)])
def test_integer_shifts_are_roll_with_zeros(dx, dy):
    x = torch.rand(2, 1, 28, 28)
    expected = torch.zeros_like(x)
    h, w = x.shape[2:]
    src = x[:, :, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    expected[:, :, max(0, dy):max(0, dy) + src.shape[2], max(0, dx):max(0, dx) + src.shape[3]] = src
    assert torch.allclose(A.rotate_translate(x, 0.0, (dx, dy)), expected, atol=1e-5)
    rolled = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    inside = expected != 0
    assert torch.equal(rolled[inside], expected[inside])


def test_per_example_parameters_apply_to_their_own_image():
    x = torch.rand(3, 1, 28, 28)
    angle = torch.tensor([0.0, 90.0, -90.0])
    out = A.rotate_translate(x, angle, torch.zeros(3, 2))
    for i in range(3):
        assert torch.allclose(out[i:i + 1], A.rotate_translate(x[i:i + 1], float(angle[i])), atol=1e-6)


def test_warp_is_differentiable_in_its_parameters():
    x = torch.rand(2, 1, 28, 28)
    p = torch.tensor([[10.0, 0.5, -0.5], [-5.0, 1.5, 0.0]], requires_grad=True)
    (g,) = torch.autograd.grad(A.rotate_translate(x, p[:, 0], p[:, 1:]).pow(2).sum(), p)
    assert torch.isfinite(g).all() and (g.abs() > 0).all()


@pytest.mark.parametrize("angle,shift", [(math.nan, 0.0), (math.inf, 0.0), (0.0, (math.nan, 1.0)),
                                         (torch.tensor([1.0, 2.0]), 0.0)])
def test_warp_refuses_parameters_that_are_not_finite_or_have_the_wrong_shape(angle, shift):
    with pytest.raises(ValueError, match="angle|shift"):
        A.rotate_translate(torch.rand(3, 1, 28, 28), angle, shift)


# --------------------------------------------------------------------------------------------
# Spatial attacks
# --------------------------------------------------------------------------------------------

def test_grid_search_stays_in_the_box_and_returns_the_warped_images(model, batch):
    x, y = batch
    r = A.spatial_grid_search(model, x, y, max_angle=20.0, max_shift=2.0, angles=5, shifts=3)
    assert r.angle.abs().max() <= 20.0 + 1e-6 and r.shift.abs().max() <= 2.0 + 1e-6
    assert torch.allclose(r.x_adv, A.rotate_translate(x, r.angle, r.shift), atol=1e-6)
    assert torch.equal(r.fooled, predict(model, r.x_adv) != y)
    assert r.evaluations == 5 * 3 * 3


def test_grid_search_finds_what_exhaustive_search_finds(model, batch):
    # An example is fooled exactly when some transformation of the grid is misclassified.
    x, y = batch
    r = A.spatial_grid_search(model, x, y, max_angle=30.0, max_shift=3.0, angles=3, shifts=3)
    any_wrong = torch.zeros(len(y), dtype=torch.bool)
    for a in (-30.0, 0.0, 30.0):
        for dx in (-3.0, 0.0, 3.0):
            for dy in (-3.0, 0.0, 3.0):
                any_wrong |= predict(model, A.rotate_translate(x, a, (dx, dy))) != y
    assert torch.equal(r.fooled, any_wrong)
    # Clean mistakes are found by the identity, which comes first.
    wrong = predict(model, x) != y
    assert (r.angle[wrong] == 0).all() and (r.shift[wrong] == 0).all()


def test_a_zero_box_is_the_clean_image(model, batch):
    x, y = batch
    r = A.spatial_grid_search(model, x, y, max_angle=0.0, max_shift=0.0, angles=3, shifts=3)
    assert torch.allclose(r.x_adv, x, atol=1e-5)
    assert torch.equal(r.fooled, predict(model, x) != y)


def test_spatial_attacks_fool_an_mlp_and_the_grid_is_at_least_as_strong_as_one_start(model, batch):
    x, y = batch
    grid = A.spatial_grid_search(model, x, y, angles=7, shifts=3)
    first = A.spatial_pgd_search(model, x, y, steps=10, generator=seeded(0))
    clean_wrong = (predict(model, x) != y).float().mean()
    assert grid.fooled.float().mean() > clean_wrong + 0.3
    assert first.fooled.float().mean() > clean_wrong + 0.3
    assert first.angle.abs().max() <= 30.0 + 1e-5 and first.shift.abs().max() <= 3.0 + 1e-5
    assert torch.allclose(first.x_adv, A.rotate_translate(x, first.angle, first.shift), atol=1e-5)


def test_spatial_pgd_never_does_worse_with_more_steps(model, batch):
    # The best iterate is kept, and the same seed gives the same start.
    x, y = batch
    few = A.spatial_pgd_search(model, x, y, steps=2, generator=seeded(3))
    many = A.spatial_pgd_search(model, x, y, steps=8, generator=seeded(3))
    assert (many.fooled | ~few.fooled).all()


def test_spatial_pgd_climbs_the_loss_from_the_identity(model, batch):
    x, y = batch
    r = A.spatial_pgd_search(model, x, y, steps=5, random_start=False, loss="ce")
    clean = F.cross_entropy(model(x), y, reduction="none").detach()
    assert (r.loss >= clean - 1e-5).all() and (r.loss > clean + 1e-3).float().mean() > 0.5


@pytest.mark.parametrize("attack", [A.spatial_grid, A.spatial_pgd])
def test_spatial_attacks_leave_the_model_and_inputs_as_found(model, batch, attack):
    x, y = batch
    x_before, y_before = x.clone(), y.clone()
    model.train()
    before = _state(model)
    out = attack(model, x, y, angles=3, shifts=3) if attack is A.spatial_grid else attack(model, x, y, steps=2)
    _unchanged(model, before)
    model.eval()
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert out.shape == x.shape and not out.requires_grad
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("kwargs,match", [({"max_angle": -1.0}, "max_angle"), ({"max_angle": math.nan}, "max_angle"),
                                          ({"max_angle": 200.0}, "max_angle"), ({"max_shift": -2}, "max_shift"),
                                          ({"angles": 0}, "angles"), ({"loss": "hinge"}, "loss")])
def test_spatial_bad_parameters_raise(model, batch, kwargs, match):
    x, y = batch
    with pytest.raises(ValueError, match=match):
        A.spatial_grid(model, x, y, **kwargs)


def test_worst_of_k_picks_the_highest_loss_and_has_a_spec(model, batch):
    x, y = batch
    objective = A.WorstOfK(k=4, max_angle=30, max_shift=3)
    torch.manual_seed(0)
    worst = objective.worst(model, x, y)
    torch.manual_seed(0)
    n = len(x)
    box = torch.tensor([30.0, 3.0, 3.0])
    losses = []
    for _ in range(4):
        p = (torch.rand(n, 3) * 2 - 1) * box
        losses.append(F.cross_entropy(model(A.rotate_translate(x, p[:, 0], p[:, 1:])), y, reduction="none").detach())
    best = torch.stack(losses).amax(dim=0)
    got = F.cross_entropy(model(worst), y, reduction="none").detach()
    assert torch.allclose(got, best, atol=1e-5)
    out = objective(model, x, y)
    assert out.loss.requires_grad and out.logits.shape == (n, 10)
    assert objective.spec() == {"objective": "worst_of_k_spatial", "k": 4, "max_angle": 30.0, "max_shift": 3.0}
    with pytest.raises(ValueError, match="k"):
        A.WorstOfK(k=0)


def test_worst_of_k_models_key_holds_the_spatial_module(mnist5k_fast):
    from utils import cache
    spec = cache.ModelSpec("spatial", objective=A.WorstOfK())
    assert spec.training_code() == cache.TRAINING_CODE + ("utils.attacks.spatial",)


# --------------------------------------------------------------------------------------------
# Square
# --------------------------------------------------------------------------------------------

def test_square_fraction_follows_the_papers_schedule():
    assert A.square_fraction(1, 10_000) == 0.8
    assert A.square_fraction(10, 10_000) == 0.8 and A.square_fraction(11, 10_000) == 0.4
    assert A.square_fraction(51, 10_000) == 0.2 and A.square_fraction(201, 10_000) == 0.1
    assert A.square_fraction(9_999, 10_000) == pytest.approx(0.8 / 512)
    # A budget of 1,000 queries runs the same schedule ten times faster.
    assert A.square_fraction(1, 1_000) == 0.8 and A.square_fraction(2, 1_000) == 0.4
    assert A.square_fraction(5, 1_000) == 0.4 and A.square_fraction(6, 1_000) == 0.2


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_square_stays_in_the_ball_and_the_box(model, batch, eps):
    x, y = batch
    r = A.square_trace(model, x, y, eps=eps, queries=50, generator=seeded(0))
    assert perturbation_size(r.x_adv, x).max() <= eps + 1e-6
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    assert torch.equal(r.fooled, predict(model, r.x_adv) != y)


def test_square_counts_every_query_exactly(model, batch):
    x, y = batch
    spy = Counting(model)
    r = A.square_trace(spy, x, y, eps=0.2, queries=40, generator=seeded(0))
    assert int(r.queries.sum()) == spy.seen
    assert r.queries.max() <= 40 and r.queries.min() >= 1
    wrong = predict(model, x) != y
    assert (r.queries[wrong] == 1).all()                   # already wrong: one query, unchanged
    assert torch.equal(r.x_adv[wrong], x[wrong])
    survivors = ~r.fooled
    assert (r.queries[survivors] == 40).all()              # not fooled: the whole budget


def test_square_breaks_an_undefended_model_and_a_saturated_one_alike(model, batch):
    x, y = batch
    right = predict(model, x) == y
    plain = A.square_trace(model, x, y, eps=0.3, queries=200, generator=seeded(0))
    masked = A.square_trace(Scaled(model, 1000.0), x, y, eps=0.3, queries=200, generator=seeded(0))
    assert plain.fooled[right].float().mean() > 0.9
    # The margin is scaled by 1000: the same proposals are accepted, so the same points come back.
    assert torch.equal(plain.fooled, masked.fooled) and torch.equal(plain.queries, masked.queries)
    assert torch.allclose(plain.x_adv, masked.x_adv)


def test_square_at_eps_zero_changes_nothing(model, batch):
    x, y = batch
    r = A.square_trace(model, x, y, eps=0.0, queries=10)
    assert torch.equal(r.x_adv, x) and (r.queries == 1).all()


def test_square_is_reproducible_and_leaves_the_model_as_found(model, batch):
    x, y = batch
    model.train()
    before = _state(model)
    a = A.square(model, x, y, eps=0.2, queries=30, generator=seeded(5))
    b = A.square(model, x, y, eps=0.2, queries=30, generator=seeded(5))
    _unchanged(model, before)
    model.eval()
    assert torch.equal(a, b)


def test_square_matches_torchattacks(model, data):
    # The same digits, eps and budget: our Square and torchattacks' leave similar robust accuracies.
    torchattacks = pytest.importorskip("torchattacks")
    x, y = data.x_test[:200], data.y_test[:200]
    right = predict(model, x) == y
    ours = A.square(model, x, y, eps=0.15, queries=300, generator=seeded(0))
    theirs = torchattacks.Square(model, norm="Linf", eps=0.15, n_queries=300, p_init=0.8, seed=0)(x, y)
    acc_ours = (right & (predict(model, ours) == y)).float().mean().item()
    acc_theirs = (right & (predict(model, theirs.detach()) == y)).float().mean().item()
    assert perturbation_size(theirs.detach(), x).max() <= 0.15 + 1e-5
    assert acc_ours < right.float().mean().item() - 0.4            # the attack does something
    assert abs(acc_ours - acc_theirs) <= 0.08, (acc_ours, acc_theirs)


@pytest.mark.parametrize("kwargs,exc,match", [({"eps": -0.1}, ValueError, "eps"), ({"eps": math.nan}, ValueError, "eps"),
                                              ({"eps": 0.1, "queries": 1}, ValueError, "queries"),
                                              ({"eps": 0.1, "p_init": 0.0}, ValueError, "p_init"),
                                              ({"eps": 0.1, "loss": "dlr"}, ValueError, "loss"),
                                              ({"eps": 0.1, "generator": 3}, TypeError, "generator")])
def test_square_bad_parameters_raise(model, batch, kwargs, exc, match):
    x, y = batch
    with pytest.raises(exc, match=match):
        A.square(model, x, y, **kwargs)


def test_square_refuses_pixels_outside_the_box(model, batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.square(model, x * 2, y, eps=0.1)


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------

def test_the_patch_changes_only_the_pixels_inside_its_square():
    x = torch.rand(5, 1, 28, 28)
    patch = torch.rand(1, 6, 6)
    pos = A.random_positions(5, 6, 28, 28, seeded(0))
    out = A.apply_patch(x, patch, pos)
    for i, (r, c) in enumerate(pos.tolist()):
        assert torch.equal(out[i, :, r:r + 6, c:c + 6], patch)
        mask = torch.ones(28, 28, dtype=torch.bool)
        mask[r:r + 6, c:c + 6] = False
        assert torch.equal(out[i, 0][mask], x[i, 0][mask])


def test_random_positions_keep_the_patch_inside_and_reach_every_corner():
    pos = A.random_positions(4000, 6, 28, 28, seeded(1))
    assert pos.min() == 0 and pos[:, 0].max() == 22 and pos[:, 1].max() == 22
    assert torch.equal(pos, A.random_positions(4000, 6, 28, 28, seeded(1)))


def test_the_patch_is_differentiable():
    x = torch.rand(3, 1, 28, 28)
    patch = torch.rand(1, 4, 4, requires_grad=True)
    (g,) = torch.autograd.grad(A.apply_patch(x, patch, torch.tensor([[0, 0], [10, 3], [24, 24]])).sum(), patch)
    assert torch.equal(g, torch.full_like(g, 3.0))


def test_train_patch_pushes_towards_its_target_and_leaves_the_model(model, data):
    x, y = data.x_test[:200], data.y_test[:200]
    model.train()
    before = _state(model)
    result = A.train_patch(model, data.x_train, target=0, size=8, steps=60, batch_size=32, alpha=0.05, margin=4,
                           generator=seeded(0))
    _unchanged(model, before)
    model.eval()
    assert result.patch.shape == (1, 8, 8) and result.patch.min() >= 0 and result.patch.max() <= 1
    assert len(result.losses) == len(result.hits) == 60
    pos = A.random_positions(len(x), 8, 28, 28, seeded(1), margin=4)
    target = torch.zeros(len(x), dtype=torch.long)

    def target_loss(patch):
        with torch.no_grad():
            return F.cross_entropy(model(A.apply_patch(x, patch, pos)), target).item()

    trained, random = target_loss(result.patch), target_loss(torch.rand(1, 8, 8, generator=seeded(2)))
    assert trained < random - 0.5, (trained, random)          # held-out digits, fresh positions
    # The contract's attack pastes the same patch at the same places.
    assert torch.equal(A.patch_attack(model, x, y, patch=result.patch, positions=pos), A.apply_patch(x, result.patch, pos))


def test_random_positions_respect_the_margin():
    pos = A.random_positions(2000, 8, 28, 28, seeded(3), margin=4)
    assert pos.min() == 4 and pos.max() == 28 - 8 - 4
    with pytest.raises(ValueError, match="margin"):
        A.random_positions(10, 8, 28, 28, margin=11)


@pytest.mark.parametrize("patch,match", [(torch.rand(1, 30, 30), "larger"), (torch.rand(1, 4, 5), "square"),
                                         (torch.rand(3, 4, 4), "channels"), (torch.rand(1, 4, 4) + 1, r"\[0, 1\]")])
def test_bad_patches_raise(model, batch, patch, match):
    x, y = batch
    with pytest.raises(ValueError, match=match):
        A.patch_attack(model, x, y, patch=patch)


def test_train_patch_refuses_a_patch_larger_than_the_image(model, data):
    with pytest.raises(ValueError, match="larger"):
        A.train_patch(model, data.x_train[:10], target=1, size=29)
    with pytest.raises(ValueError, match="alpha"):
        A.train_patch(model, data.x_train[:10], target=1, alpha=-0.1)


# --------------------------------------------------------------------------------------------
# Transfer
# --------------------------------------------------------------------------------------------

def test_transfer_attack_runs_the_attack_on_the_source_only(model, batch):
    x, y = batch
    target = Counting(build_model("mlp", hidden=16).eval())
    pgd = functools.partial(A.pgd, eps=0.2, steps=5, generator=seeded(0))
    out = A.transfer_attack(target, x, y, source=model, attack=pgd)
    assert target.seen == 0
    assert torch.equal(out, A.pgd(model, x, y, eps=0.2, steps=5, generator=seeded(0)))


def test_ensemble_averages_log_probabilities_and_ignores_the_scale_of_logits(model, batch):
    x, _ = batch
    other = build_model("mlp", hidden=16).eval()
    ens = A.Ensemble([Scaled(model, 100.0), other])
    expected = (F.log_softmax(100.0 * model(x), dim=1) + F.log_softmax(other(x), dim=1)) / 2
    assert torch.allclose(ens(x), expected, atol=1e-5)
    assert torch.allclose(A.Ensemble([model, other], combine="logits")(x), (model(x) + other(x)) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="combine"):
        A.Ensemble([model], combine="vote")
    with pytest.raises(ValueError, match="non-empty"):
        A.Ensemble([])


def test_an_attack_on_an_ensemble_leaves_its_members_as_found(model, batch):
    x, y = batch
    model.train()
    before = _state(model)
    A.pgd(A.Ensemble([model, build_model("mlp", hidden=16)]), x, y, eps=0.1, steps=2)
    _unchanged(model, before)
    model.eval()


def test_every_public_function_is_documented_and_exported():
    public = (A.rotate_translate, A.spatial_grid_search, A.spatial_pgd_search, A.spatial_grid, A.spatial_pgd,
              A.square_trace, A.square, A.square_fraction, A.apply_patch, A.random_positions, A.train_patch,
              A.patch_attack, A.transfer_attack)
    for fn in public:
        assert fn.__doc__ and len(fn.__doc__) > 40, fn.__name__
        assert "return" in fn.__annotations__, fn.__name__
        assert fn.__name__ in A.__all__
    for fn in (A.rotate_translate, A.spatial_grid_search, A.square_trace, A.train_patch, A.transfer_attack):
        assert "Chapter 10" in fn.__doc__, fn.__name__

"""The options of the training loop that change what is trained beyond the objective: random shifts of
the digits and an exponential moving average of the weights (Rebuffi et al. 2021), each checked
against what it claims (hand-made shifts, a hand-computed average) and against the cache key."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils import cache
from utils.augment import random_shift
from utils.models import build_model
from utils.objectives import CrossEntropy
from utils.train import StepOutput, StopTraining, WeightAverage, fit, make_loader


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", hidden=8)


def shifted_by(x, dy, dx):
    """One image moved by (dy, dx) pixels with zeros filling in, written with torch.roll and a mask."""
    out = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    h, w = x.shape[-2:]
    rows, cols = torch.arange(h), torch.arange(w)
    keep = ((rows - dy >= 0) & (rows - dy < h))[:, None] & ((cols - dx >= 0) & (cols - dx < w))[None, :]
    return out * keep


class Recording:
    """CrossEntropy that also records every batch it is given and the weights it sees."""

    def __init__(self):
        self.batches, self.weights = [], []

    def __call__(self, model, x, y, *, progress=1.0):
        self.batches.append((x.clone(), y.clone()))
        self.weights.append([p.detach().clone() for p in model.parameters()])
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss, logits, {})

    def spec(self):
        return {"objective": "recording"}


# --------------------------------------------------------------------------------------------
# Random shifts
# --------------------------------------------------------------------------------------------

def test_random_shift_moves_each_digit_by_a_few_pixels_with_zeros_filling_in(mnist5k_fast):
    x = mnist5k_fast.x_train[:64]
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    moves = []
    for xi, oi in zip(x, out):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(oi, shifted_by(xi, dy, dx))]
        assert matches, "every output is its input moved by at most 2 pixels each way, zeros filling in"
        moves.append(matches[0])
    assert len(set(moves)) > 10, "each digit gets its own shift"
    assert sum(m != (0, 0) for m in moves) > 50, "most digits move"
    # MNIST digits sit inside a blank border: a shift of 2 loses no ink (but for a rare digit at the edge)
    kept_ink = (out.sum(dim=(1, 2, 3)) - x.sum(dim=(1, 2, 3))).abs() < 1e-3
    assert kept_ink.float().mean() > 0.9


def test_random_shift_is_repeatable_with_its_seed_and_off_at_zero(mnist5k_fast):
    x = mnist5k_fast.x_train[:32]
    a = random_shift(x, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, random_shift(x, 2, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, random_shift(x, 2, torch.Generator().manual_seed(6)))
    assert random_shift(x, 0) is x
    with pytest.raises(ValueError, match="max_shift"):
        random_shift(x, -1)
    with pytest.raises(TypeError, match="max_shift"):
        random_shift(x, 1.5)


def test_fit_with_shift_trains_on_shifted_digits_with_their_labels_and_repeatably(mnist5k_fast):
    d = mnist5k_fast
    x, y = d.x_train[:96], d.y_train[:96]
    plain, shifted, again = Recording(), Recording(), Recording()
    fit(tiny_model(), x, y, plain, epochs=2, batch_size=32, seed=3, progress=False)
    fit(tiny_model(), x, y, shifted, epochs=2, batch_size=32, seed=3, progress=False, shift=2)
    fit(tiny_model(), x, y, again, epochs=2, batch_size=32, seed=3, progress=False, shift=2)
    # off: the objective sees exactly the loader's batches
    loader = make_loader(x, y, 32, shuffle=True, seed=3)
    loader_batches = [b for _ in range(2) for b in loader]
    assert len(plain.batches) == len(loader_batches) == 6
    for (xb, yb), (lx, ly) in zip(plain.batches, loader_batches):
        assert torch.equal(xb, lx) and torch.equal(yb, ly)
    # on: the same digits in the same order, with their labels, each moved by at most 2 pixels
    for (xs, ys), (xb, yb) in zip(shifted.batches, plain.batches):
        assert torch.equal(ys, yb)
        assert not torch.equal(xs, xb)
        assert (xs != xb).flatten(1).any(dim=1).float().mean() > 0.5
        for xi, si in zip(xb[:4], xs[:4]):
            assert any(torch.equal(si, shifted_by(xi, dy, dx)) for dy in range(-2, 3) for dx in range(-2, 3))
    # repeatable with the seed
    assert all(torch.equal(a[0], b[0]) for a, b in zip(shifted.batches, again.batches))
    with pytest.raises(ValueError, match="shift"):
        fit(tiny_model(), x, y, CrossEntropy(), epochs=1, shift=-1, progress=False)


# --------------------------------------------------------------------------------------------
# Weight averaging
# --------------------------------------------------------------------------------------------

def test_weight_average_equals_the_hand_computed_average_and_tau_zero_is_the_last_weights():
    model = nn.Linear(3, 2)
    steps = [torch.randn(2, 3) for _ in range(3)]
    for tau in (0.0, 0.5, 0.9):
        with torch.no_grad():
            model.weight.zero_()
        average = WeightAverage(model, tau)
        assert torch.equal(average.averages()[0], model.weight), "before any step: the live weights"
        for w in steps:
            with torch.no_grad():
                model.weight.copy_(w)
            average.update()
        coeffs = [(1 - tau) * tau ** 2, (1 - tau) * tau, 1 - tau]
        expected = sum(c * w for c, w in zip(coeffs, steps)) / (1 - tau ** 3)
        assert torch.allclose(average.averages()[0], expected, atol=1e-6), tau
        if tau == 0.0:
            assert torch.equal(average.averages()[0], steps[-1])
    with pytest.raises(ValueError, match="ema"):
        WeightAverage(model, 1.0)
    with pytest.raises(ValueError, match="ema"):
        WeightAverage(model, -0.1)


def test_fit_returns_the_averaged_weights_and_trains_along_the_same_path(mnist5k_fast):
    d = mnist5k_fast
    x, y = d.x_train[:64], d.y_train[:64]
    tau = 0.6
    live, averaged = Recording(), Recording()
    seen_by_callback = []
    last = tiny_model()
    fit(last, x, y, live, epochs=3, batch_size=64, lr=0.05, schedule="constant", progress=False)
    model = tiny_model()
    fit(model, x, y, averaged, epochs=3, batch_size=64, lr=0.05, schedule="constant", progress=False, ema=tau,
        callback=lambda m, r: seen_by_callback.append([p.detach().clone() for p in m.parameters()]))
    # one step per epoch: the objective saw w_0, w_1, w_2, the same with and without averaging
    for a, b in zip(live.weights, averaged.weights):
        assert all(torch.equal(p, q) for p, q in zip(a, b)), "averaging must not change the optimiser's path"
    trajectory = live.weights[1:] + [[p.detach() for p in last.parameters()]]   # w_1, w_2, w_3

    def hand_average(t):
        coeffs = [(1 - tau) * tau ** (t - k) for k in range(1, t + 1)]
        return [sum(c * w[i] for c, w in zip(coeffs, trajectory[:t])) / (1 - tau ** t)
                for i in range(len(trajectory[0]))]

    for got, want in zip(model.parameters(), hand_average(3)):
        assert torch.allclose(got, want, atol=1e-6)
    assert not all(torch.allclose(p, q) for p, q in zip(model.parameters(), last.parameters()))
    # the callback saw the average so far (the model as it would be returned at that epoch)
    for t, seen in enumerate(seen_by_callback, start=1):
        assert all(torch.allclose(s, h, atol=1e-6) for s, h in zip(seen, hand_average(t))), t


def test_a_stopped_run_keeps_the_average_and_the_test_accuracy_is_the_averaged_models(mnist5k_fast):
    d = mnist5k_fast
    x, y = d.x_train[:64], d.y_train[:64]
    kept = []

    def stop_at_two(model, record):
        kept.append([p.detach().clone() for p in model.parameters()])
        if record.epoch == 2:
            raise StopTraining("enough")

    model = tiny_model()
    with pytest.raises(StopTraining):
        fit(model, x, y, CrossEntropy(), epochs=4, batch_size=32, lr=0.05, progress=False, ema=0.5,
            callback=stop_at_two)
    assert all(torch.equal(p, k) for p, k in zip(model.parameters(), kept[-1]))
    model = tiny_model()
    hist = fit(model, x, y, CrossEntropy(), epochs=2, batch_size=32, lr=0.05, progress=False, ema=0.5,
               x_test=d.x_test[:100], y_test=d.y_test[:100])
    with torch.no_grad():
        acc = (model(d.x_test[:100]).argmax(1) == d.y_test[:100]).float().mean().item()
    assert hist.records[-1].test_acc == pytest.approx(acc)


def test_weight_averaging_leaves_batchnorm_buffers_as_trained():
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def bn_model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    plain, averaged = bn_model(), bn_model()
    fit(plain, x, y, CrossEntropy(), epochs=2, batch_size=16, progress=False)
    fit(averaged, x, y, CrossEntropy(), epochs=2, batch_size=16, progress=False, ema=0.9)
    for name, buffer in plain.named_buffers():
        assert torch.equal(buffer, dict(averaged.named_buffers())[name]), name
    assert int(averaged[2].num_batches_tracked) == 8
    assert not torch.equal(plain[1].weight, averaged[1].weight)


# --------------------------------------------------------------------------------------------
# The cache key
# --------------------------------------------------------------------------------------------

def test_shift_and_ema_reach_the_key_and_their_defaults_leave_it_as_it_was(mnist5k_fast):
    spec = cache.ModelSpec("opt", arch="mlp", arch_kwargs=(("hidden", 8),), epochs=1)
    keys = set(spec.key_dict(mnist5k_fast))
    assert keys == {"format", "code", "name", "arch", "arch_kwargs", "objective", "epochs", "batch_size", "lr",
                    "schedule", "weight_decay", "seed", "data", "profile"}
    key = spec.key(mnist5k_fast)
    shifted = dataclasses.replace(spec, shift=2)
    averaged = dataclasses.replace(spec, ema=0.995)
    assert shifted.key_dict(mnist5k_fast)["shift"] == 2 and averaged.key_dict(mnist5k_fast)["ema"] == 0.995
    assert len({key, shifted.key(mnist5k_fast), averaged.key(mnist5k_fast),
                dataclasses.replace(spec, shift=1).key(mnist5k_fast)}) == 4
    assert dataclasses.replace(spec, ema=0).key(mnist5k_fast) == key
    for bad, word in ((dict(shift=-1), "shift"), (dict(ema=1.0), "ema"), (dict(ema=-0.5), "ema")):
        with pytest.raises(ValueError, match=word):
            dataclasses.replace(spec, **bad)


def test_load_or_train_passes_shift_and_ema_to_fit(mnist5k_fast, tmp_path, monkeypatch):
    seen = {}
    real_fit = cache.fit

    def spy(*args, **kwargs):
        seen.update(shift=kwargs["shift"], ema=kwargs["ema"])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(cache, "fit", spy)
    spec = cache.ModelSpec("opt", arch="mlp", arch_kwargs=(("hidden", 8),), epochs=1, batch_size=250, shift=1,
                           ema=0.9)
    trained = cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
    assert seen == {"shift": 1, "ema": 0.9} and trained.status == "trained"
    assert cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False).from_cache


def test_candidate_spec_builds_recipes_on_the_books_budget_with_the_new_knobs():
    from utils.overfitting import BestCheckpoint
    from utils.trades import TRADES
    from utils.zoo import book_spec, candidate_spec

    book = book_spec("pgd_at", "fast")
    plain = candidate_spec("pgd_at_plain", "pgd_at", "fast")
    assert dataclasses.replace(plain, name="pgd_at") == book, "a candidate with no knobs is the book's PGD-AT"
    rule = BestCheckpoint(n=200)
    trades = candidate_spec("trades_x", "trades", "full", beta=3.0, steps=20, epochs=30, shift=2, ema=0.995,
                            checkpoint=rule)
    assert isinstance(trades.objective, TRADES)
    assert (trades.objective.beta, trades.objective.steps, trades.objective.eps) == (3.0, 20, 0.3)
    assert (trades.epochs, trades.shift, trades.ema, trades.checkpoint) == (30, 2, 0.995, rule)
    assert candidate_spec("ce", CrossEntropy(), "fast").objective == CrossEntropy()
    small = candidate_spec("small", "pgd_at", "full", arch="small_cnn", arch_kwargs=(("width", 32),), lr=3e-3)
    assert (small.arch, small.arch_kwargs, small.lr) == ("small_cnn", (("width", 32),), 3e-3)
    with pytest.raises(ValueError, match="book"):
        candidate_spec("pgd_at", "trades")
    with pytest.raises(ValueError, match="objective"):
        candidate_spec("x", "mart")

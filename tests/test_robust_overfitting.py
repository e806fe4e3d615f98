"""Robust overfitting (Rice et al. 2020): validation digits carved from the training digits, never the
test digits, and the best checkpoint by robust accuracy on them against the last one."""

import dataclasses
import functools

import pytest
import torch

from utils import cache
from utils.attacks import pgd
from utils.data import MNISTData, validation_split
from utils.evaluate import evaluate
from utils.models import build_model
from utils.objectives import CrossEntropy
from utils.overfitting import BestCheckpoint, BestCheckpointWatch
from utils.train import EpochRecord, fit


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", hidden=8)


def labelled_data(n_train=230, n_test=40):
    """Synthetic digits whose first pixel numbers them (train 1..n_train, test above) and whose classes
    are unbalanced (class c has about c + 1 shares)."""
    weights = torch.arange(1, 11, dtype=torch.float)
    y_train = torch.multinomial(weights, n_train, replacement=True, generator=torch.Generator().manual_seed(0))
    x_train = torch.zeros(n_train, 1, 28, 28)
    x_train[:, 0, 0, 0] = torch.arange(1, n_train + 1) / 1000
    x_test = torch.zeros(n_test, 1, 28, 28)
    x_test[:, 0, 0, 0] = torch.arange(n_train + 1, n_train + n_test + 1) / 1000
    y_test = torch.arange(n_test) % 10
    return MNISTData(x_train, y_train, x_test, y_test, source="mnist5k", subset={"profile": "fast"})


def ids(x):
    return set(torch.round(x[:, 0, 0, 0] * 1000).long().tolist())


# --------------------------------------------------------------------------------------------
# The validation split
# --------------------------------------------------------------------------------------------

def test_validation_split_is_disjoint_stratified_seeded_and_of_the_right_size():
    data = labelled_data()
    x_before, y_before = data.x_train.clone(), data.y_train.clone()
    train, x_val, y_val = validation_split(data, 50, seed=1)
    assert len(y_val) == 50 and len(train.y_train) == 180 and x_val.shape == (50, 1, 28, 28)
    assert ids(x_val).isdisjoint(ids(train.x_train))
    assert ids(x_val) | ids(train.x_train) == set(range(1, 231))
    # every digit keeps its own label
    by_id = dict(zip(ids_list(data.x_train), data.y_train.tolist()))
    assert all(by_id[i] == c for i, c in zip(ids_list(x_val), y_val.tolist()))
    assert all(by_id[i] == c for i, c in zip(ids_list(train.x_train), train.y_train.tolist()))
    # stratified: each class gives its share of 50, to within one digit
    counts, shares = torch.bincount(data.y_train, minlength=10), torch.bincount(y_val, minlength=10)
    assert ((shares.float() - counts.float() * 50 / 230).abs() < 1.0).all(), (counts, shares)
    # the remaining training digits keep their order; the data handed in is unchanged
    assert ids_list(train.x_train) == sorted(ids_list(train.x_train))
    assert torch.equal(data.x_train, x_before) and torch.equal(data.y_train, y_before)
    # seeded
    again = validation_split(data, 50, seed=1)
    other = validation_split(data, 50, seed=2)
    assert torch.equal(again[1], x_val) and torch.equal(again[0].x_train, train.x_train)
    assert ids(other[1]) != ids(x_val)
    assert train.subset["validation"] == {"n": 50, "seed": 1} and train.subset["profile"] == "fast"
    assert train.key() != data.key()


def ids_list(x):
    return torch.round(x[:, 0, 0, 0] * 1000).long().tolist()


def test_validation_split_never_uses_the_test_digits(mnist5k_fast):
    data = labelled_data()
    train, x_val, _ = validation_split(data, 100)
    assert ids(x_val) <= set(range(1, 231)), "validation digits come from the training digits"
    assert train.x_test is data.x_test and train.y_test is data.y_test, "the test digits are handed on untouched"
    d = mnist5k_fast
    train, x_val, y_val = validation_split(d, 100, seed=0)
    test_rows = {tuple(r) for r in (d.x_test.flatten(1) * 255).round().long().tolist()}
    train_rows = {tuple(r) for r in (d.x_train.flatten(1) * 255).round().long().tolist()}
    val_rows = [tuple(r) for r in (x_val.flatten(1) * 255).round().long().tolist()]
    assert all(r in train_rows for r in val_rows) and not any(r in test_rows for r in val_rows)
    assert set(y_val.tolist()) == set(range(10))
    assert len(train.y_train) == len(d.y_train) - 100 and len(train.y_test) == len(d.y_test)


@pytest.mark.parametrize("n, error", [(0, ValueError), (230, ValueError), (-5, ValueError), (2.5, TypeError)])
def test_validation_split_rejects_a_bad_size(n, error):
    with pytest.raises(error, match="n "):
        validation_split(labelled_data(), n)


# --------------------------------------------------------------------------------------------
# The best checkpoint
# --------------------------------------------------------------------------------------------

def _record(epoch):
    return EpochRecord(epoch=epoch, train_loss=0.0, train_acc=0.0, test_loss=None, test_acc=None, seconds=0.0,
                       lr=1e-3, terms={})


@pytest.mark.parametrize("keep", ["best", "last"])
def test_the_watch_keeps_the_best_epochs_weights_and_ends_as_the_rule_says(keep, mnist5k_fast):
    d = mnist5k_fast
    watch = BestCheckpoint(n=64, eps=0.05, keep=keep).watch(d.x_train[:64], d.y_train[:64])
    sequence = iter([0.30, 0.55, 0.40, 0.55, 0.20])
    snapshots = []

    def fake_measure(m):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(sequence)

    watch.measure = fake_measure
    model = tiny_model()
    fit(model, d.x_train[64:192], d.y_train[64:192], CrossEntropy(), epochs=5, batch_size=32, progress=False,
        callback=watch)
    assert watch.accs == [0.30, 0.55, 0.40, 0.55, 0.20] and watch.best_epoch == 4  # ties: the later epoch
    last = {k: v.clone() for k, v in model.state_dict().items()}
    watch.finish(model)
    want = snapshots[3] if keep == "best" else last
    assert all(torch.equal(a, want[k]) for k, a in model.state_dict().items())
    assert watch.record()["kept_epoch"] == (4 if keep == "best" else 5)


def test_the_watch_measures_real_pgd_accuracy_on_the_validation_digits(mnist5k_fast):
    d = mnist5k_fast
    model = tiny_model()
    fit(model, d.x_train, d.y_train, CrossEntropy(), epochs=1, batch_size=100, progress=False)
    x, y = d.x_train[:100], d.y_train[:100]
    watch = BestCheckpointWatch(x, y, BestCheckpoint(n=100, eps=0.05, steps=3, seed=4))
    model.train()
    acc = watch.measure(model)
    assert model.training and acc == watch.measure(model), "the same attack every epoch"
    attack = functools.partial(pgd, eps=0.05, steps=3, generator=torch.Generator().manual_seed(4))
    assert acc == evaluate(model, x, y, attack).acc
    assert acc < evaluate(model, x, y).acc
    watch(model, _record(1))
    assert watch.accs == [acc] and watch.best_epoch == 1
    with pytest.raises(RuntimeError, match="no epoch"):
        BestCheckpoint().watch(x, y).restore(model)
    with pytest.raises(TypeError, match="BestCheckpoint"):
        BestCheckpointWatch(x, y, rule="best")


@pytest.mark.parametrize("keep", ["best", "last"])
def test_load_or_train_trains_without_the_validation_digits_and_keeps_the_chosen_epoch(keep, mnist5k_fast, tmp_path,
                                                                                        monkeypatch):
    rule = BestCheckpoint(n=100, eps=0.05, steps=2, keep=keep)
    spec = cache.ModelSpec("ckpt", arch="mlp", arch_kwargs=(("hidden", 8),), epochs=3, batch_size=100, lr=3e-3,
                           checkpoint=rule)
    sizes = []
    real_fit = cache.fit
    monkeypatch.setattr(cache, "fit", lambda model, x, y, *a, **k: sizes.append(len(y)) or real_fit(model, x, y, *a, **k))
    trained = cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
    assert sizes == [len(mnist5k_fast.y_train) - 100]
    v = trained.validation
    assert v["epochs"] == [1, 2, 3] and v["n"] == 100
    assert v["kept_epoch"] == (v["best_epoch"] if keep == "best" else 3)
    _, x_val, y_val = rule.split(mnist5k_fast)
    acc = rule.watch(x_val, y_val).measure(trained.model)
    assert acc == pytest.approx(v["accs"][v["kept_epoch"] - 1]), "the model is the kept epoch's"
    again = cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
    assert again.from_cache and again.validation == v


def test_the_checkpoint_rule_reaches_the_key_and_rejects_bad_values(mnist5k_fast):
    spec = cache.ModelSpec("ckpt", arch="mlp", arch_kwargs=(("hidden", 8),), epochs=1)
    assert "checkpoint" not in spec.key_dict(mnist5k_fast)
    rule = BestCheckpoint()
    with_rule = dataclasses.replace(spec, checkpoint=rule)
    entry = with_rule.key_dict(mnist5k_fast)["checkpoint"]
    assert entry["train_data"]["n_train"] == len(mnist5k_fast.y_train) - 500
    keys = {spec.key(mnist5k_fast), with_rule.key(mnist5k_fast)}
    for field, value in dict(n=100, eps=0.1, steps=5, alpha=0.05, keep="last", seed=1).items():
        changed = dataclasses.replace(rule, **{field: value})
        assert changed.spec() != rule.spec(), field
        keys.add(dataclasses.replace(spec, checkpoint=changed).key(mnist5k_fast))
    assert len(keys) == 8
    for bad, word in ((dict(keep="middle"), "keep"), (dict(n=0), "n"), (dict(eps=0.0), "eps"),
                      (dict(steps=0), "steps"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=word):
            BestCheckpoint(**bad)
    with pytest.raises(TypeError, match="checkpoint"):
        cache.ModelSpec("ckpt", checkpoint="best")

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from utils import cache, zoo
from utils.evaluate import Metrics, confusion_matrix, evaluate, predict
from utils.models import MnistCNN, Normalize, build_model, count_parameters, eval_mode
from utils.objectives import CrossEntropy
from utils.train import History, StepOutput, fit


def tiny_spec(**overrides):
    base = dict(name="tiny", arch="mlp", arch_kwargs=(("hidden", 16),), epochs=1, batch_size=100, lr=3e-3)
    base.update(overrides)
    return cache.ModelSpec(**base)


def test_models_take_pixels_and_keep_normalisation_in_the_state_dict():
    m = build_model("cnn", width=4)
    assert m(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert "normalize.mean" in m.state_dict() and "normalize.std" in m.state_dict()
    n = Normalize()
    assert torch.allclose(n(torch.full((1,), 0.1307)), torch.zeros(1), atol=1e-6)
    assert count_parameters(MnistCNN()) > count_parameters(MnistCNN(width=8))
    with pytest.raises(ValueError, match="architecture"):
        build_model("resnet")


def test_fit_learns_and_restores_mode(mnist5k_fast):
    d = mnist5k_fast
    torch.manual_seed(0)
    model = build_model("mlp", hidden=32)
    before = evaluate(model, d.x_test, d.y_test)
    model.train()
    hist = fit(model, d.x_train, d.y_train, CrossEntropy(), epochs=3, batch_size=50, lr=3e-3,
               x_test=d.x_test, y_test=d.y_test, progress=False)
    after = evaluate(model, d.x_test, d.y_test)
    assert model.training, "fit must leave the model in the mode it found it in"
    assert len(hist) == 3 and hist.records[2].train_loss < hist.records[0].train_loss
    assert after.acc > 0.8 > before.acc
    assert hist.records[-1].test_acc == pytest.approx(after.acc)
    assert History.from_list(hist.to_list()).records == hist.records


def test_fit_rejects_non_finite_loss(mnist5k_fast):
    class Exploding:
        def __call__(self, model, x, y, *, progress=1.0):
            logits = model(x)
            return StepOutput(logits.sum() * float("nan"), logits)

        def spec(self):
            return {"objective": "nan"}

    with pytest.raises(FloatingPointError, match="loss became nan"):
        fit(build_model("mlp", hidden=8), mnist5k_fast.x_train[:64], mnist5k_fast.y_train[:64], Exploding(),
            epochs=1, progress=False)


def test_fit_rejects_bad_arguments(mnist5k_fast):
    d = mnist5k_fast
    m = build_model("mlp", hidden=8)
    with pytest.raises(ValueError, match="lr"):
        fit(m, d.x_train[:8], d.y_train[:8], CrossEntropy(), epochs=1, lr=0, progress=False)
    with pytest.raises(ValueError, match="schedule"):
        fit(m, d.x_train[:8], d.y_train[:8], CrossEntropy(), epochs=1, schedule="step", progress=False)
    with pytest.raises(ValueError, match="4 labels but there are 8"):
        fit(m, d.x_train[:8], d.y_train[:4], CrossEntropy(), epochs=1, progress=False)
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropy(label_smoothing=1.0)


def test_evaluate_with_an_attack_and_metrics(mnist5k_fast):
    d = mnist5k_fast
    torch.manual_seed(0)
    model = build_model("mlp", hidden=8)
    model.train()
    flipped = evaluate(model, d.x_test[:50], d.y_test[:50], attack=lambda m, x, y: 1 - x)
    plain = evaluate(model, d.x_test[:50], d.y_test[:50])
    assert model.training
    assert flipped.n == plain.n == 50 and flipped != plain
    logits = model.eval()(d.x_test[:50]).detach()
    assert plain.loss == pytest.approx(F.cross_entropy(logits, d.y_test[:50]).item(), rel=1e-5)
    assert "acc=" in repr(plain) and isinstance(plain, Metrics)
    with eval_mode(model.train()):
        assert not model.training
    assert model.training


def test_confusion_matrix_counts():
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    p = torch.tensor([0, 1, 1, 2, 0, 2])
    cm = confusion_matrix(y, p, num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert cm.sum() == 6


def test_key_covers_everything_that_defines_a_model(mnist5k_fast):
    d = mnist5k_fast
    k = tiny_spec().key(d)
    assert k == tiny_spec().key(d)
    for change in (dict(epochs=2), dict(seed=1), dict(lr=1e-3), dict(arch_kwargs=(("hidden", 32),)),
                   dict(objective=CrossEntropy(label_smoothing=0.1)), dict(batch_size=50)):
        assert tiny_spec(**change).key(d) != k, change
    other_data = dataclasses.replace(d, y_train=d.y_train.flip(0))
    assert tiny_spec().key(other_data) != k
    with pytest.raises(ValueError, match="name"):
        cache.ModelSpec(name="has space")


def test_cache_miss_then_hit_gives_identical_weights(mnist5k_fast, tmp_path):
    spec = tiny_spec()
    first = cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
    assert first.status == "trained" and first.path.exists()
    assert list(tmp_path.glob("*.sha256")) == [], "one file carries its own digest; no checksum beside it"
    assert first.path.read_bytes().startswith(b"advbook-checkpoint 2 ")
    assert not first.model.training
    second = cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
    assert second.from_cache and second.train_seconds == first.train_seconds
    for (n1, p1), (n2, p2) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(predict(first.model, mnist5k_fast.x_test), predict(second.model, mnist5k_fast.x_test))
    assert len(second.history) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_header", "garbage"])
def test_damaged_checkpoint_is_retrained_never_trusted(mnist5k_fast, tmp_path, damage):
    spec = tiny_spec()
    first = cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
    path = first.path
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        i = len(blob) // 2
        path.write_bytes(blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:])
    elif damage == "no_header":
        path.write_bytes(blob.partition(b"\n")[2])
    else:
        path.write_bytes(b"not a checkpoint")
    with pytest.warns(cache.CacheWarning, match="retraining 'tiny'"):
        again = cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
    assert again.status.startswith("retrained")
    # the new checkpoint is intact and is loaded next time
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
    assert third.from_cache


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_pickled_code_is_refused(mnist5k_fast, tmp_path, capsys):
    """Even with a matching checksum, a payload that needs arbitrary unpickling is not loaded (weights_only)."""
    spec = tiny_spec()
    first = cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
    payload = {"format": cache.FORMAT_VERSION, "key": first.key, "state_dict": {}, "history": [],
               "train_seconds": 0.0, "evil": _Evil()}
    cache.save_checkpoint(payload, first.path)   # with a correct digest of its own
    with pytest.warns(cache.CacheWarning, match="could not be read"):
        again = cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
    assert "this must never run" not in capsys.readouterr().out
    assert again.status.startswith("retrained")


def test_standard_spec_follows_the_profile():
    assert zoo.standard_spec("fast").epochs < zoo.standard_spec("full").epochs
    assert zoo.standard_spec("fast").name == "standard"


def test_auroc_matches_pair_counting_with_ties():
    from utils.evaluate import auroc

    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 6, (40,), generator=g).float() + 0.5
    neg = torch.randint(0, 5, (30,), generator=g).float()
    neg[:5] = pos[:5]  # ties
    brute = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
    assert auroc(pos, neg) == pytest.approx(brute.item(), abs=1e-12)
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        auroc(torch.tensor([]), torch.tensor([1.0]))


def test_fit_leaves_no_parameter_gradients(mnist5k_fast):
    model = build_model("mlp", hidden=8)
    fit(model, mnist5k_fast.x_train[:64], mnist5k_fast.y_train[:64], CrossEntropy(), epochs=1, progress=False)
    assert all(p.grad is None for p in model.parameters())

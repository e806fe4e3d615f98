"""The book's model registry, early stopping inside the cache, and defensive distillation."""

import pytest
import torch
import torch.nn.functional as F

from utils import cache, config, zoo
from utils.attacks import pgd
from utils.defences import FastFGSM
from utils.evaluate import evaluate, predict_logits
from utils.objectives import Distillation, TemperatureCrossEntropy
from utils.overfitting import CatastrophicOverfittingCheck, EarlyStop
from utils.train import StopTraining, fit


def tiny(name="tiny", **overrides):
    base = dict(name=name, arch="mlp", arch_kwargs=(("hidden", 32),), epochs=3, batch_size=100, lr=3e-3)
    base.update(overrides)
    return cache.ModelSpec(**base)


@pytest.mark.parametrize("profile", ["fast", "full"])
def test_every_book_model_has_a_recipe_and_the_defences_share_one_budget(profile, mnist5k_fast):
    p = config.get_profile(profile)
    specs = {n: zoo.book_spec(n, p) for n in zoo.BOOK_MODELS if n != "distilled"}
    keys = {s.key(mnist5k_fast) for s in specs.values()}
    assert len(keys) == len(specs), "two models of the book would share a cache entry"
    adversarial = [s for n, s in specs.items() if n in ("pgd_at", "fast_at", "alp", "enaet", "enaet_weighted")]
    assert {(s.epochs, s.batch_size, s.lr, s.schedule) for s in adversarial} == {
        (p.defence_epochs, p.batch_size, 1e-3, "cosine")}
    for s in adversarial:
        assert s.objective.eps == zoo.DEFENCE_EPS
    assert {s.objective.steps for n, s in specs.items() if n in ("pgd_at", "alp", "enaet")} == {p.train_pgd_steps}
    assert specs["standard"] == zoo.standard_spec(p)
    assert {(s.arch, s.shift) for s in specs.values()} == {(zoo.ARCH, zoo.SHIFT)}, "one network, one augmentation"
    assert zoo.ARCH == "small_cnn" and zoo.SHIFT > 0
    assert specs["fast_at"].early_stop.action == "stop"
    assert specs["fast_at_overfit"].early_stop.action == "record"


def test_book_spec_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="unknown model"):
        zoo.book_spec("robust", "fast")
    with pytest.raises(ValueError, match="teacher"):
        zoo.book_spec("distilled", "fast")


def test_early_stop_is_part_of_the_key_and_validated(mnist5k_fast):
    d = mnist5k_fast
    plain = tiny(objective=FastFGSM(eps=0.1))
    guarded = tiny(objective=FastFGSM(eps=0.1), early_stop=EarlyStop(eps=0.1, steps=3))
    recorded = tiny(objective=FastFGSM(eps=0.1), early_stop=EarlyStop(eps=0.1, steps=3, action="record"))
    assert len({plain.key(d), guarded.key(d), recorded.key(d)}) == 3
    for bad in (dict(eps=-0.1), dict(steps=0), dict(n=0), dict(action="warn"), dict(drop=2.0)):
        with pytest.raises(ValueError):
            EarlyStop(**bad)
    with pytest.raises(TypeError):
        tiny(early_stop={"eps": 0.1})


def test_guard_measurements_are_kept_with_the_checkpoint(mnist5k_fast, tmp_path):
    spec = tiny(objective=FastFGSM(eps=0.1), early_stop=EarlyStop(eps=0.1, steps=3, n=64, action="record"))
    first = cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
    assert first.guard["epochs"] == [1, 2, 3] and len(first.guard["accs"]) == 3
    assert not first.stopped_early
    # the guard's accuracy is PGD on the first n training digits: recompute the last one
    check = spec.early_stop.check(mnist5k_fast.x_train, mnist5k_fast.y_train)
    assert len(check.x_check) == 64 and torch.equal(check.x_check, mnist5k_fast.x_train[:64])
    assert check.measure(first.model) == pytest.approx(first.guard["accs"][-1])
    second = cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
    assert second.from_cache and second.guard == first.guard


class _Collapse(CatastrophicOverfittingCheck):
    """Reports a made-up collapse at epoch 3 so that the stopping path runs deterministically."""

    def measure(self, model):
        return {1: 0.5, 2: 0.6, 3: 0.1}[len(self.accs) + 1]


def test_early_stop_restores_the_best_epoch(mnist5k_fast, tmp_path, monkeypatch):
    d = mnist5k_fast
    spec = tiny(objective=FastFGSM(eps=0.1), epochs=5, early_stop=EarlyStop(eps=0.1, steps=2, n=32))
    monkeypatch.setattr(EarlyStop, "check", lambda self, x, y: _Collapse(x[: self.n], y[: self.n], self))
    out = cache.load_or_train(spec, d, device="cpu", cache=tmp_path, progress=False)
    assert out.stopped_early and out.guard["stopped_at"] == 3 and out.guard["best_epoch"] == 2
    assert len(out.history) == 3  # epochs 4 and 5 never ran
    # the weights are those of epoch 2: retrain two epochs of the same run and compare
    ref = spec.build()
    with pytest.raises(StopTraining):
        fit(ref, d.x_train, d.y_train, spec.objective, epochs=5, batch_size=spec.batch_size, lr=spec.lr,
            seed=spec.seed, progress=False, callback=_StopAfter(2))
    for a, b in zip(out.model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a.cpu(), b)


class _StopAfter:
    def __init__(self, epoch):
        self.epoch = epoch

    def __call__(self, model, record):
        if record.epoch == self.epoch:
            raise StopTraining("enough")


def test_temperature_cross_entropy_is_cross_entropy_at_T():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    out = TemperatureCrossEntropy(10.0)(model, x, y)
    assert out.loss.item() == pytest.approx(F.cross_entropy(model(x) / 10.0, y).item())
    assert TemperatureCrossEntropy(1.0)(model, x, y).loss.item() == pytest.approx(F.cross_entropy(model(x), y).item())
    with pytest.raises(ValueError):
        TemperatureCrossEntropy(0.0)


def test_distillation_loss_is_minimal_at_the_teachers_soft_labels():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    obj = Distillation(teacher, "k", temperature=5.0)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(teacher.state_dict())
    other = torch.nn.Linear(4, 3)
    # cross-entropy against soft labels is smallest (the teacher's entropy) when the student equals the teacher
    assert obj(twin, x, y).loss.item() < obj(other, x, y).loss.item()
    soft = F.softmax(teacher(x) / 5.0, 1)
    entropy = -(soft * soft.log()).sum(1).mean().item()
    assert obj(twin, x, y).loss.item() == pytest.approx(entropy, rel=1e-5)
    assert obj.spec()["teacher"] == "k"
    assert Distillation(teacher, "k2").spec() != obj.spec()
    with pytest.raises(TypeError):
        Distillation("not a model", "k")


def test_distilled_model_masks_gradients_but_is_not_robust(mnist5k_fast, tmp_path):
    """The chapter-9 lesson in miniature: FGSM on cross-entropy is stopped by saturation, a margin loss is not."""
    d = mnist5k_fast
    out = zoo.load_book_model("distilled", d, "fast", device="cpu", cache=tmp_path, progress=False)
    assert out.spec.objective.teacher_key == zoo.load_book_model(
        "distillation_teacher", d, "fast", device="cpu", cache=tmp_path, progress=False).key
    x, y = d.x_test[:200], d.y_test[:200]
    logits = predict_logits(out.model, x)
    assert logits.abs().max() > 100, "the distilled logits should be about T times too large"
    clean = evaluate(out.model, x, y).acc
    ce = evaluate(out.model, x, y, lambda m, a, b: pgd(m, a, b, 0.2, steps=10)).acc
    margin = evaluate(out.model, x, y, lambda m, a, b: pgd(m, a, b, 0.2, steps=10, loss="margin")).acc
    assert clean > 0.7
    assert ce > clean - 0.25, "PGD on the cross-entropy should look like it fails"
    assert margin < ce - 0.4, (clean, ce, margin)

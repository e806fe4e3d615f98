"""Robust accuracy as the worst case per example over attacks and restarts."""

import functools

import pytest
import torch

from utils.attacks import fgsm, pgd
from utils.evaluate import evaluate
from utils.models import MnistMLP
from utils.robustness import RobustnessTable, accuracy_vs_eps, robust_accuracy, robust_correct, robustness_table


@pytest.fixture(scope="module")
def model_and_data(mnist5k_fast):
    from utils.train import CrossEntropy, fit
    torch.manual_seed(0)
    m = MnistMLP(hidden=64)
    fit(m, mnist5k_fast.x_train, mnist5k_fast.y_train, CrossEntropy(), epochs=2, batch_size=100, lr=3e-3,
        progress=False)
    m.eval()
    return m, mnist5k_fast.x_test[:200], mnist5k_fast.y_test[:200]


class Counting:
    """An attack that records how many examples it was asked to attack."""

    def __init__(self, attack):
        self.attack, self.seen = attack, []

    def __call__(self, model, x, y):
        self.seen.append(len(x))
        return self.attack(model, x, y)


def test_no_attack_is_clean_accuracy(model_and_data):
    m, x, y = model_and_data
    assert robust_accuracy(m, x, y) == pytest.approx(evaluate(m, x, y).acc)
    identity = lambda model, a, b: a.clone()
    assert robust_accuracy(m, x, y, identity) == pytest.approx(evaluate(m, x, y).acc)


def test_only_survivors_are_attacked_and_results_are_per_example_worst_case(model_and_data):
    m, x, y = model_and_data
    attack = Counting(functools.partial(pgd, eps=0.1, steps=5, generator=torch.Generator().manual_seed(0)))
    ok = robust_correct(m, x, y, attack, restarts=3, batch_size=64)
    clean_ok = (m(x).argmax(1) == y)
    # first restart sees exactly the clean-correct examples, in batches of 64
    n_clean = int(clean_ok.sum())
    first = attack.seen[: -(-n_clean // 64)]
    assert sum(first) == n_clean
    # every later restart sees fewer or as many examples as the one before
    assert sum(attack.seen) <= 3 * n_clean
    assert not (ok & ~clean_ok).any(), "an example misclassified clean cannot be robust"
    single = robust_correct(m, x, y, functools.partial(pgd, eps=0.1, steps=5,
                                                       generator=torch.Generator().manual_seed(0)))
    assert not (ok & ~single).any(), "restarts can only remove examples from the robust set"


def test_worst_case_over_attacks_is_below_each(model_and_data):
    m, x, y = model_and_data
    table = robustness_table({"mlp": m}, x, y, {
        "FGSM": functools.partial(fgsm, eps=0.1),
        "PGD": (functools.partial(pgd, eps=0.1, steps=5), 2),
    })
    row = table.acc["mlp"]
    assert table.columns == ["clean", "FGSM", "PGD", "worst case"]
    assert row["worst case"] <= min(row["FGSM"], row["PGD"]) <= row["clean"]
    assert row["clean"] == pytest.approx(evaluate(m, x, y).acc)
    md = table.markdown()
    assert md.splitlines()[0] == "| model | clean | FGSM | PGD | worst case |"
    assert f"{100 * row['PGD']:.1f}%" in md
    assert "200 held-out digits" in table._repr_markdown_()


def test_accuracy_falls_with_eps_and_starts_at_clean(model_and_data):
    m, x, y = model_and_data
    accs = accuracy_vs_eps(m, x, y, lambda e: functools.partial(pgd, eps=e, steps=5), [0.0, 0.05, 0.1, 0.3])
    assert accs[0] == pytest.approx(evaluate(m, x, y).acc)
    assert all(a >= b for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < 0.05


def test_bad_input_is_refused(model_and_data):
    m, x, y = model_and_data
    with pytest.raises(ValueError):
        robust_correct(m, x, y, restarts=0)
    with pytest.raises(ValueError):
        robust_correct(m, x * 2, y)
    with pytest.raises(TypeError):
        robust_correct(m, x, y, ["pgd"])
    with pytest.raises(ValueError):
        accuracy_vs_eps(m, x, y, lambda e: functools.partial(pgd, eps=e), [-0.1])
    with pytest.raises(ValueError, match="reserved"):
        robustness_table({"m": m}, x, y, {"clean": functools.partial(fgsm, eps=0.1)})
    with pytest.raises(ValueError):
        robust_correct(m, x, y, lambda model, a, b: a + 5.0)  # an attack leaving the pixel box

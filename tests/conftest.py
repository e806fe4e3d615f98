"""Shared fixtures: every test gets its own cache folder, and tiny data and models are built once."""

from __future__ import annotations

import pytest
import torch

from utils import config
from utils.data import load_mnist


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's cache."""
    monkeypatch.setenv(config.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(config.OFFLINE_ENV, "1")
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train faster on one thread: on a shared 2-core machine torch's second thread only
    adds contention (a trained-model fixture ran several times slower with it). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; the count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist5k_fast():
    """The fast-profile subset of the bundled 5k digits (1,000 train / 500 test)."""
    return load_mnist("fast", source="mnist5k")


@pytest.fixture(scope="session")
def tiny_batch(mnist5k_fast):
    torch.manual_seed(0)
    return mnist5k_fast.x_test[:64].clone(), mnist5k_fast.y_test[:64].clone()


@pytest.fixture(scope="module")
def mlp64(mnist5k_fast):
    """A perceptron with 64 hidden units trained for five epochs on the fast subset (above 85% clean):
    the model the attack tests (APGD, chapter 10's attacks) run against. Built once per module."""
    from utils.evaluate import accuracy
    from utils.models import build_model
    from utils.objectives import CrossEntropy
    from utils.train import fit

    torch.manual_seed(0)
    net = build_model("mlp", hidden=64)
    fit(net, mnist5k_fast.x_train, mnist5k_fast.y_train, CrossEntropy(), epochs=5, batch_size=32, lr=3e-3,
        progress=False)
    net.eval()
    assert accuracy(net, mnist5k_fast.x_test, mnist5k_fast.y_test) > 0.85
    return net

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


@pytest.fixture(scope="session")
def mnist5k_fast():
    """The fast-profile subset of the bundled 5k digits (1,000 train / 500 test)."""
    return load_mnist("fast", source="mnist5k")


@pytest.fixture(scope="session")
def tiny_batch(mnist5k_fast):
    torch.manual_seed(0)
    return mnist5k_fast.x_test[:64].clone(), mnist5k_fast.y_test[:64].clone()

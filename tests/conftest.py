"""Shared fixtures: the CPU backend and cached zoo subjects (loaded once per test session)."""
from functools import cache

import pytest
import torch

from modhifi.backend import choose_backend
from modhifi.zoo import ZOO, open_subject


@pytest.fixture(scope="session")
def cpu():
    return choose_backend("cpu")


@cache
def subject(name: str):
    """A zoo model with its data, loaded once for the whole run (read-only: tests copy it)."""
    if not ZOO[name].checkpoint.is_file():
        pytest.fail(f"zoo checkpoint for {name} is missing: run python -m modhifi.zoo train {name}")
    return open_subject(name, device=torch.device("cpu"))

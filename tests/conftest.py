"""Shared fixtures: the CPU backend and cached zoo subjects (loaded once per test session)."""
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

from modhifi.backend import choose_backend
from modhifi.zoo import ZOO, open_subject


@pytest.fixture(scope="session")
def cpu():
    return choose_backend("cpu")


@pytest.fixture(autouse=True)
def _environment():
    """The environment as it was before each test: `main()` run in the test process sets
    variables for its process (`quiet_dependency_warnings`), which the processes that later
    tests start must not inherit."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@cache
def subject(name: str):
    """A zoo model with its data, loaded once for the whole run (read-only: tests copy it)."""
    if not ZOO[name].checkpoint.is_file():
        pytest.fail(f"zoo checkpoint for {name} is missing: run python -m modhifi.zoo train {name}")
    return open_subject(name, device=torch.device("cpu"))


# --- the suite writes only under temporary folders -----------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _repository_state() -> str | None:
    """`git status` of the checkout (tracked changes and new files), None outside a git checkout."""
    try:
        done = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def pytest_sessionstart(session):
    session.config.stash[_BEFORE] = _repository_state()


def pytest_sessionfinish(session, exitstatus):
    before, after = session.config.stash.get(_BEFORE, None), _repository_state()
    if before is not None and after is not None and after != before:
        changed = sorted(set(after.splitlines()) - set(before.splitlines()))
        print(f"\nthe test run wrote into the repository: {changed}; tests must write only under "
              "temporary folders", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[str | None]()

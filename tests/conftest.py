"""Test-wide isolation.

Privacy is on by default, and every DP run spends from a ledger keyed by the site's
data fingerprint. Tests synthesize the same seeded cohorts again and again, so a shared
ledger (the default ``~/.mmfed/privacy-ledger``) would carry one test's spending into the
next and make later runs decline. Each test gets its own ledger folder instead; child
processes inherit it through the environment. Module- and session-scoped fixtures run
before any per-test fixture, so the process also gets a folder of its own at start-up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mmfed.privacy.ledger import LEDGER_ENV

_SESSION_LEDGER = ""


def pytest_configure(config: pytest.Config) -> None:
    global _SESSION_LEDGER
    _SESSION_LEDGER = tempfile.mkdtemp(prefix="mmfed-test-ledger-")
    os.environ[LEDGER_ENV] = _SESSION_LEDGER


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_LEDGER:
        shutil.rmtree(_SESSION_LEDGER, ignore_errors=True)


@pytest.fixture(autouse=True)
def own_privacy_ledger(tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.mktemp("ledger")
    monkeypatch.setenv(LEDGER_ENV, str(folder))
    return folder


# The longest test files, longest first. `make test` hands whole files to three
# workers (--dist loadfile) in collection order; starting the longest ones first keeps
# one long file from starting last and running alone at the end.
LONGEST_FIRST = (
    "e2e/test_deployment.py", "test_resume.py", "e2e/test_site_crash.py",
    "e2e/test_curious_deployment.py", "e2e/test_site_trust.py", "test_utility.py",
    "e2e/test_stop.py",
    "test_explain.py", "test_secure_federation.py", "test_bad_updates.py",
    "test_modality_aware.py", "test_privacy.py", "test_flwr_run.py", "test_simulate.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = Path(__file__).resolve().parent
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def place(item: pytest.Item) -> int:
        try:
            name = Path(item.path).resolve().relative_to(tests).as_posix()
        except ValueError:
            return len(rank)
        return rank.get(name, len(rank))

    items.sort(key=place)  # stable: the rest keep their order

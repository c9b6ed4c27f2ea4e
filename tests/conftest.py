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

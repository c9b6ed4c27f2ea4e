"""The project is a valid Flower app: `flwr run .` runs the same pipeline as mmfed simulate.

`flwr run` starts a local SuperLink that outlives it; the test gives Flower its own
FLWR_HOME/HOME so it can find that SuperLink by its command line and stop it by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import QUIET

ROOT = Path(__file__).resolve().parents[1]


def _pids_mentioning(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_flwr_run_dot(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    app = tmp_path / "app"
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(
        ".venv", "runs", ".git", "*.egg-info", "__pycache__", ".*_cache"))
    out = tmp_path / "run"
    flwr = Path(sys.executable).with_name("flwr")
    env = {**os.environ, **QUIET, "HOME": str(home), "FLWR_HOME": str(home / ".flwr"),
           # flwr starts `flower-superlink` from PATH: the venv's bin must be on it
           "PATH": f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    overrides = (f'rounds=2 out="{out}" data.patients_per_site=50 data.sites=2 '
                 'train.batch_size=16 privacy.min_cohort=2')
    try:
        proc = subprocess.run([str(flwr), "run", ".", "--stream", "--run-config", overrides],
                              cwd=app, env=env, capture_output=True, text=True, timeout=420)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        deadline = time.monotonic() + 60
        while not (out / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(1)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["mode"] == "federated"
        assert 0.0 <= summary["final"]["auroc"] <= 1.0
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2
        assert "data.dir" in (out / "config.toml").read_text() or "[data]" in (
            out / "config.toml").read_text()
    finally:
        # SIGTERM first, then SIGKILL whatever is left, for up to 15 s: on a loaded
        # machine a SuperLink may still be starting a child when it is first asked
        deadline = time.monotonic() + 15
        sig = signal.SIGTERM
        while _pids_mentioning(str(home)) and time.monotonic() < deadline:
            for pid in _pids_mentioning(str(home)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(1)
            sig = signal.SIGKILL
    assert not _pids_mentioning(str(home))

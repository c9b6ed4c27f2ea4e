"""Shared helpers for tests that run mmfed as a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mmfed.ml.process import QUIET_ENV, quiet_env

MMFED = [sys.executable, "-m", "mmfed.cli"]
QUIET = QUIET_ENV  # what tests add to a child's environment: `{**os.environ, **QUIET}`


def run_mmfed(*args: str | Path, timeout: float = 600, cwd: Path | None = None
              ) -> subprocess.CompletedProcess[str]:
    env = quiet_env()
    return subprocess.run([*MMFED, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)

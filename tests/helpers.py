"""Shared helpers for tests that run mmfed as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MMFED = [sys.executable, "-m", "mmfed.cli"]
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
         "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "OMP_NUM_THREADS": "1"}


def run_mmfed(*args: str | Path, timeout: float = 600, cwd: Path | None = None
              ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **QUIET}
    return subprocess.run([*MMFED, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)

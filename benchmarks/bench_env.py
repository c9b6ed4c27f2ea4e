"""What every benchmark needs to run mmfed as a child process, quietly and comparably.

One thread per process (``OMP_NUM_THREADS=1``: oversubscribing 2 cores distorts every
timing), and Flower's telemetry, update check and runtime dependency installation off.
Scripts in this folder import it by name (``python benchmarks/x.py`` puts the folder on
``sys.path``).
"""

from __future__ import annotations

import subprocess
import sys

from mmfed.ml.process import quiet_env

ENV = quiet_env()
MMFED = [sys.executable, "-m", "mmfed.cli"]


def mmfed(*args: str) -> None:
    """Run one mmfed command; stop the benchmark with the command's error if it fails."""
    proc = subprocess.run([*MMFED, *args], env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"mmfed {' '.join(args[:2])} failed: {proc.stderr.strip()[-800:]}")

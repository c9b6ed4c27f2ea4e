"""Process-wide set-up: one compute thread, quiet warnings, a quiet Flower environment.

These settings belong to a whole process, not to a library call, so they are made
once at the entry points (the CLI commands, the ClientApp's train and evaluate
handlers, the ServerApp's main) instead of inside the functions those call. The
environment is spelled once here because mmfed, its tests and its benchmarks all
start Flower and mmfed child processes that must behave the same way.

Nothing here imports torch or flwr at module level: the ClientApp's secure-aggregation
stage handlers import this module's callers in a fresh process per message.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

# Flower's own switches: no telemetry, no update check, no package installs at run time.
FLOWER_QUIET_ENV: Final[Mapping[str, str]] = MappingProxyType({
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
})
# Everything a quiet, comparable mmfed process needs: Flower's switches, one OpenMP
# thread (set before torch is imported, so every process on a small machine gets one
# core's worth rather than oversubscribing them all), every Ray worker's log lines shown
# rather than deduplicated, Ray leaving CUDA_VISIBLE_DEVICES alone for actors that ask
# for no GPU, and no fork warnings from tokenizer libraries.
QUIET_ENV: Final[Mapping[str, str]] = MappingProxyType({
    **FLOWER_QUIET_ENV,
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
})

_threads_limited = False


def quiet_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for a child process: ``base`` (default: this process's) with
    ``QUIET_ENV`` on top, so a child is quiet whatever the caller's shell exported."""
    return {**(os.environ if base is None else base), **QUIET_ENV}


def limit_threads() -> None:
    """One torch thread for this process; later calls cost nothing.

    Sites, simulation workers and the centralized reference run side by side on
    machines with few cores, where oversubscribing them slows training many times over.
    """
    global _threads_limited
    if _threads_limited:
        return
    import torch  # here, not at the top: the callers' modules must stay cheap to import

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    _threads_limited = True


def quiet_warnings() -> None:
    """Hide library deprecation chatter, which users cannot act on, from a run's output."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")


def quiet_process(debug: bool = False) -> None:
    """Set up an mmfed process that talks to Flower: the quiet environment (what the
    user exported wins), mmfed's own lines on stderr as ``mmfed: LEVEL: message``
    (``mmfed server`` scans a ServerApp's stream for ``mmfed: ERROR``), and Flower's
    chatter and deprecation warnings kept down unless ``debug``."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    mmfed_log = logging.getLogger("mmfed")
    if not mmfed_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("mmfed: %(levelname)s: %(message)s"))
        mmfed_log.addHandler(handler)
        mmfed_log.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        quiet_warnings()

"""The ServerApp of runs submitted to the Docker Compose federation (server/README.md).

``mmfed server`` prepares a run directory before it submits the run; a run submitted
with ``flwr run server/app ...`` to the Compose SuperLink has nobody to do that. This
thin layer does it inside the ``serverapp`` container: it picks a run directory in
the ``runs`` volume, named after Flower's run ID unless ``out`` is set, and freezes the
config there (which gives the run an ID for the sites' privacy ledgers). Then it runs
the same pipeline as ``mmfed server``, through mmfed's one ServerApp factory. It ships
in the app bundle; mmfed itself comes from the image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import Context

from mmfed.config import RunConfig
from mmfed.run.prepare import PreparedRun, freeze_config, validate_holdout
from mmfed.run.rundir import RunDir
from mmfed.server.app import server_app

RUNS = Path("/app/runs")  # the `runs` volume of the serverapp service

log = logging.getLogger("mmfed")


def prepare(run_config: dict[str, Any], flower_run_id: int, runs: Path = RUNS
            ) -> tuple[RunConfig, RunDir]:
    """Validated config and a fresh run directory, before any site is contacted."""
    cfg = RunConfig.from_flower(run_config)
    validate_holdout(Path(cfg["data.dir"]))
    out = Path(cfg["out"]) if cfg["out"] else runs / f"run-{flower_run_id}"
    run = RunDir(out, fresh=True)  # refuses a folder that already holds a run
    freeze_config(cfg, run)
    return cfg, run


def _prepare(context: Context) -> PreparedRun:
    cfg, run = prepare(dict(context.run_config), context.run_id)
    log.info("run directory %s", cfg["out"])
    return PreparedRun(cfg, run)


app = server_app(_prepare, standalone=True)

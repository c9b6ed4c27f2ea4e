"""The ServerApp of runs submitted to the Docker Compose federation (server/README.md).

``mmfed server`` prepares a run directory before it submits the run; a run submitted
with ``flwr run server/app ...`` to the Compose SuperLink has nobody to do that. This
thin layer does it inside the ``serverapp`` container: it picks a run directory in
the ``runs`` volume, named after Flower's run ID unless ``out`` is set, gives the run
an ID for the sites' privacy ledgers, and writes ``config.toml``. Then it runs the
same pipeline as ``mmfed server``. It ships in the app bundle; mmfed itself comes from
the image.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

RUNS = Path("/app/runs")  # the `runs` volume of the serverapp service

log = logging.getLogger("mmfed")
app = ServerApp()


def prepare(run_config: dict[str, Any], flower_run_id: int, runs: Path = RUNS) -> Any:
    """Validated config and a fresh run directory, before any site is contacted."""
    from mmfed.config import RunConfig
    from mmfed.run.rundir import RunDir
    from mmfed.server.deployed import validate_holdout

    cfg = RunConfig.from_flower(run_config)
    validate_holdout(Path(cfg["data.dir"]))
    out = Path(cfg["out"]) if cfg["out"] else runs / f"run-{flower_run_id}"
    run = RunDir(out, fresh=True)  # refuses a folder that already holds a run
    cfg.set("out", str(out))
    if not cfg["run_id"]:
        cfg.set("run_id", uuid.uuid4().hex)
    run.write_config(cfg)
    return cfg, run


@app.main()
def main(grid: Grid, context: Context) -> None:
    from mmfed.errors import MmfedError
    from mmfed.server.app import run_and_record
    from mmfed.simulate import quiet_flower

    quiet_flower(debug=False)
    try:
        cfg, run = prepare(dict(context.run_config), context.run_id)
        log.info("run directory %s", cfg["out"])
        run_and_record(grid, cfg, run, expected_sites=int(cfg["data.sites"]))
    except MmfedError as exc:
        log.error("%s", exc)  # one line in `flwr log`, instead of a traceback
        raise

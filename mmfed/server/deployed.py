"""The ServerApp ``mmfed server`` submits to its SuperLink (``mmfed.server.deployed:app``).

Unlike ``flwr run .`` (``mmfed.server.app:app``), a deployed server holds no site data:
only the holdout it evaluates on. So it checks just ``data.dir/holdout`` and waits for
``data.sites`` SuperNodes (the number of admitted sites), and it writes into the run
directory that ``mmfed server`` already created with the fully resolved config.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mmfed.config import RunConfig
from mmfed.errors import DataError, MmfedError

log = logging.getLogger("mmfed")
app = ServerApp()


def validate_holdout(data_dir: Path) -> Path:
    """The server's evaluation set must check clean before any site is contacted."""
    from mmfed.data.reader import read_site

    holdout = data_dir / "holdout"
    if not holdout.is_dir():
        raise DataError(f"{data_dir}: no holdout/ folder (the server's evaluation set)")
    result = read_site(holdout)
    if not result.ok:
        extra = len(result.problems) - 1
        more = f" (and {extra} more; run `mmfed data check {holdout}`)" if extra else ""
        raise DataError(f"{holdout}: {result.problems[0]}{more}", result.problems)
    return holdout


@app.main()
def main(grid: Grid, context: Context) -> None:
    from mmfed.run.resume import find_resume_point, truncate_metrics
    from mmfed.run.rundir import RunDir
    from mmfed.server.app import run_and_record
    from mmfed.simulate import quiet_flower

    quiet_flower(debug=False)
    try:
        cfg = RunConfig.from_flower(dict(context.run_config))
        if not cfg["out"]:
            raise MmfedError("run config has no 'out': submit runs with `mmfed server`")
        validate_holdout(Path(cfg["data.dir"]))
        run = RunDir(Path(cfg["out"]), fresh=False)
        # a fresh run has no checkpoints; after `mmfed server --resume` the last complete
        # round is where this run continues
        point = find_resume_point(run.path, cfg)
        if point is not None:
            truncate_metrics(run.path, point)
        run_and_record(grid, cfg, run, expected_sites=int(cfg["data.sites"]), resume=point)
    except MmfedError as exc:
        # one line `mmfed server` can find in the stream and show as the reason
        log.error("%s", exc)
        raise

"""The Flower ServerApp: turns a run config into a federated run and its run directory.

``flwr run .`` reaches ``app`` with the config from ``[tool.flwr.app.config]``;
``mmfed simulate`` builds its own ServerApp with ``make_server_app`` so it can pass an
already validated config, a prepared run directory and a progress display.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mmfed.config import RunConfig
from mmfed.run.resume import ResumePoint
from mmfed.run.rundir import RunDir
from mmfed.server.loop import Federation, RoundCallback


def run_and_record(grid: Grid, cfg: RunConfig, run: RunDir,
                   on_round: RoundCallback | None = None,
                   expected_sites: int | None = None,
                   resume: ResumePoint | None = None) -> None:
    """Run every round and write ``summary.json``; shared by both entry points.

    With ``resume``, rounds 1..k are taken from the checkpoint and metrics as they are.
    """
    from mmfed.run.tracking import TensorBoardLog, chain

    started = time.perf_counter()
    tensorboard = TensorBoardLog(run.path)
    fed = Federation(grid, cfg, run, on_round=chain(on_round, tensorboard),
                     expected_sites=expected_sites)
    fed.resume_point = resume
    try:
        result = fed.run_rounds()
    finally:
        tensorboard.close()
    run.write_summary({"rounds": result.rounds, "final": result.final,
                       "final_patterns": result.patterns,
                       "sites": fed.site_summary(),
                       "wall_seconds": round(time.perf_counter() - started, 2),
                       "mode": "federated",
                       **({"resumed_after_round": resume.round} if resume else {})})


def make_server_app(cfg: RunConfig, run: RunDir, on_round: RoundCallback | None = None,
                    expected_sites: int | None = None,
                    resume: ResumePoint | None = None) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_and_record(grid, cfg, run, on_round, expected_sites, resume)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the same pipeline as ``mmfed simulate``."""
    from mmfed.simulate import prepare_run

    cfg = RunConfig.from_flower(dict(context.run_config))
    cfg, run = prepare_run(cfg, Path(cfg["out"] or "runs/flwr-run"))
    run_and_record(grid, cfg, run, expected_sites=cfg["data.sites"])

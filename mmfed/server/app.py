"""The Flower ServerApps: one factory, one run loop, several ways to prepare the run.

Every ServerApp is ``server_app(prepare)``: ``prepare`` turns Flower's context into a
``PreparedRun`` (validated config, run directory, resume point), and then the same
``run_and_record`` runs every round and writes ``summary.json``. The ways differ only
in who prepared what:

- ``app`` (``flwr run .``, named in pyproject.toml): prepares like ``mmfed simulate``,
  from the app's config plus ``--run-config``;
- ``deployed_app`` (``mmfed.server.deployed:app``, what ``mmfed server`` submits):
  ``mmfed server`` made the run directory already; only the holdout is checked;
- ``mmfed simulate`` and the Compose app pass a preparation of their own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mmfed.config import FLWR_RUN_OUT, RunConfig
from mmfed.errors import MmfedError
from mmfed.ml.process import limit_threads, quiet_process
from mmfed.run.prepare import PreparedRun, prepare_flwr_run, prepare_submitted
from mmfed.run.resume import ResumePoint
from mmfed.run.rundir import RunDir
from mmfed.run.tracking import RoundCallback, TensorBoardLog, chain
from mmfed.server.loop import Federation
from mmfed.server.transport import PacedGrid

log = logging.getLogger("mmfed")
Prepare = Callable[[Context], PreparedRun]


def run_and_record(grid: Grid, prepared: PreparedRun,
                   on_round: RoundCallback | None = None) -> None:
    """Run every round and write ``summary.json``; what every ServerApp does.

    With a resume point, rounds 1..k are taken from the checkpoint and metrics as they are.
    """
    cfg, run, resume = prepared.cfg, prepared.run, prepared.resume
    started = time.perf_counter()
    tensorboard = TensorBoardLog(run.path)
    fed = Federation(grid, cfg, run, on_round=chain(on_round, tensorboard),
                     expected_sites=int(cfg["data.sites"]), admitted=prepared.admitted)
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


def standalone_process() -> None:
    """Set up a ServerApp process that Flower started and nobody else configured.

    mmfed's lines go to stderr as ``mmfed: LEVEL: message`` (``mmfed server`` scans the
    stream for ``mmfed: ERROR`` to show why a run failed), Flower's own chatter is
    kept to errors, and torch uses one thread like every other mmfed process.
    """
    quiet_process()
    limit_threads()


def server_app(prepare: Prepare, on_round: RoundCallback | None = None, *,
               standalone: bool = False, workers: int | None = None) -> ServerApp:
    """The ServerApp that prepares its run with ``prepare`` and then runs it.

    ``standalone``: the app runs in a process of its own (a deployment's ServerApp
    process), which it sets up itself, and an ``MmfedError`` is logged as one line
    before it propagates, so that the operator sees the reason rather than a traceback.
    ``workers``: a simulation that runs this many sites at once; its stages are paced
    (``PacedGrid``) to keep them all fed without flooding Flower's per-node sweep.
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        if standalone:
            standalone_process()
        if workers is not None:
            grid = PacedGrid(grid, slow=2 * workers + 2, wide=max(32, 8 * workers))
        try:
            run_and_record(grid, prepare(context), on_round)
        except MmfedError as exc:
            if standalone:
                log.error("%s", exc)
            raise

    return server


def prepared(cfg: RunConfig, run: RunDir, resume: ResumePoint | None = None) -> Prepare:
    """A preparation already done by the caller (``mmfed simulate``)."""
    ready = PreparedRun(cfg, run, resume)
    return lambda _context: ready


def _flwr_run(context: Context) -> PreparedRun:
    return prepare_flwr_run(dict(context.run_config), Path(FLWR_RUN_OUT))


def _submitted(context: Context) -> PreparedRun:
    return prepare_submitted(dict(context.run_config))


app = server_app(_flwr_run)
deployed_app = server_app(_submitted, standalone=True)

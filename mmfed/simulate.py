"""``mmfed simulate``: a whole federation on one machine with Flower's simulation engine.

Everything that can be wrong with the inputs (config, site folders, holdout) is
checked before Ray starts, so a bad folder costs a second and one clear line rather
than a Ray traceback a minute later.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from mmfed.config import RunConfig
from mmfed.data.reader import list_sites
from mmfed.errors import DataError, UsageError
from mmfed.ml.device import resolve_device, simulation_gpus
from mmfed.ml.process import quiet_process
from mmfed.run.prepare import default_out, prepare_run, validate_federation
from mmfed.run.progress import Progress
from mmfed.run.resume import (
    ResumePoint,
    find_resume_point,
    load_run_config,
    refuse_run_flags,
    truncate_metrics,
)
from mmfed.run.rundir import RunDir, read_metrics


def ray_backend_config(cfg: RunConfig, debug: bool = False) -> dict[str, Any]:
    """Ray resources for the simulation: a fixed pool of workers, whatever the site count.

    Flower runs one actor per ``simulation.cpus_per_site`` CPUs and sends every site's
    messages to whichever actor is free, so the number of processes (and their memory)
    depends on the machine, not on the number of sites. On CUDA each actor also asks
    for its share of the GPUs (see ``mmfed.ml.device.simulation_gpus``).
    """
    cpus = float(cfg["simulation.cpus_per_site"])
    address = ray_address(cfg)
    if address:
        # An existing cluster owns its resources: Ray refuses num_cpus/num_gpus when it
        # attaches, and the per-site request below is all the actors need.
        gpus_per_site = float(cfg["simulation.gpus_per_site"]) \
            if cfg["train.device"].startswith("cuda") else 0.0
        return {"client_resources": {"num_cpus": cpus, "num_gpus": gpus_per_site},
                "init_args": {"address": address, "logging_level": "error",
                              "log_to_driver": debug}}
    total_cpus = local_cpus(cpus)
    gpus_per_site, gpus = simulation_gpus(cfg["train.device"],
                                          float(cfg["simulation.gpus_per_site"]),
                                          int(total_cpus // cpus))
    # address="local": a new Ray on this machine even where `ray start` left a cluster
    # behind (ray.init would otherwise attach to it, and then refuse num_cpus).
    init_args: dict[str, Any] = {"address": "local", "num_cpus": total_cpus, "num_gpus": gpus,
                                 "include_dashboard": False, "logging_level": "error",
                                 "log_to_driver": debug}
    return {"client_resources": {"num_cpus": cpus, "num_gpus": gpus_per_site},
            "init_args": init_args}


def local_cpus(cpus_per_site: float) -> int:
    """The CPUs Ray is given on this machine: all of them, and at least one site's share."""
    return max(int(os.cpu_count() or 1), math.ceil(cpus_per_site))


def ray_workers(cfg: RunConfig) -> int:
    """How many sites Ray runs at once: its CPUs over ``simulation.cpus_per_site``.

    On an existing cluster Ray is attached already (``check_cluster_reaches``) and its
    CPUs are counted there; on this machine they are the ones ``ray_backend_config``
    gives Ray.
    """
    cpus = float(cfg["simulation.cpus_per_site"])
    if ray_address(cfg):
        import ray

        total = float(ray.cluster_resources().get("CPU", cpus))
    else:
        total = local_cpus(cpus)
    return max(1, int(total // cpus))


def check_split_cache_env() -> bool:
    """Whether the user set ``MMFED_SPLIT_CACHE_MIB``; a bad value is a one-line refusal
    (checked first thing, not after the site folders have been read)."""
    from mmfed.site.state import SPLIT_CACHE_ENV, split_cache_mib

    raw = os.environ.get(SPLIT_CACHE_ENV)
    if raw is not None and split_cache_mib(raw) is None:
        raise UsageError(f"{SPLIT_CACHE_ENV}={raw!r}: want a positive whole number of "
                         "MiB (the encoded splits each simulation worker may hold)")
    return raw is not None


def set_split_cache(workers: int) -> None:
    """Give each local Ray worker room to hold every site's encoded splits.

    A worker answers for any site (Flower hands each message to whichever worker is
    free), so with the default bound a federation of hundreds of sites is re-read from
    disk for nearly every training message (``mmfed.site.state``). Here each worker
    may use up to 30% of the machine's memory shared among the workers, and never
    less than the default; a worker only holds what its sites' splits take (about
    1.2 MiB per small synthetic site). Workers inherit this process's environment
    when Ray starts here; nodes of an existing cluster take the variable from their
    own environment. A value the user exported wins, and a bad one is refused here.
    """
    from mmfed.site.state import CACHE_BYTES, SPLIT_CACHE_ENV

    if check_split_cache_env():
        return
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not on this platform: the default bound
        return
    share = int(0.3 * memory / max(1, workers)) // 2**20
    os.environ[SPLIT_CACHE_ENV] = str(max(CACHE_BYTES // 2**20, share))


def ray_address(cfg: RunConfig) -> str:
    """The Ray cluster to attach to: the config key, else Ray's own ``RAY_ADDRESS``."""
    return str(cfg["simulation.ray_address"] or os.environ.get("RAY_ADDRESS", "")).strip()


def check_cluster_reaches(address: str, folders: list[Path], debug: bool = False) -> None:
    """Attach to the cluster and check, on every alive node, that the site folders exist.

    A virtual site may run on any node, so a folder only the driver's machine has would
    fail minutes later inside a Ray actor; checked here it is one line. Ray stays
    initialised, and Flower's backend then uses this connection.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    host, _, port = address.rpartition(":")
    if host and port.isdigit() and "://" not in address:
        # Ray retries an address nobody answers at for minutes; one connect says it now.
        import socket

        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise UsageError(f"cannot attach to the Ray cluster at {address!r}: {exc} "
                             "(is `ray start --head` running there?)") from None
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=debug,
                 include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot attach to the Ray cluster at {address!r}: {first}") from None

    @ray.remote(num_cpus=0)
    def missing(paths: list[str]) -> list[str]:
        return [p for p in paths if not (Path(p) / "site.toml").is_file()]

    wanted = [str(f.resolve()) for f in folders]
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    answers = ray.get([missing.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(wanted) for n in nodes])
    for node, lost in zip(nodes, answers, strict=True):
        if lost:
            ray.shutdown()
            raise DataError(f"Ray node {node.get('NodeManagerAddress', '?')} cannot read "
                            f"{len(lost)} site folder(s), e.g. {lost[0]}: every node must "
                            f"see the site folders at the same path (a shared filesystem)")


def run_simulation(cfg: RunConfig, run: RunDir, *, live: bool | None = None,
                   debug: bool = False, resume: ResumePoint | None = None) -> None:
    """Run the federation on Ray: one virtual SuperNode per site folder."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    quiet_process(debug)  # after the import: flwr sets its logger up when imported

    # Not at the top: these import flwr and torch, which read the environment that
    # quiet_process has just set (Flower's telemetry switch, one OpenMP thread).
    from mmfed.server.app import prepared, server_app
    from mmfed.site.app import app as client_app

    check_encoders_early(cfg)
    n_sites = int(cfg["data.sites"])
    backend = ray_backend_config(cfg, debug)
    address = ray_address(cfg)
    if address:
        root = Path(cfg["data.dir"])  # the holdout is read here, by the server
        check_cluster_reaches(address, list_sites(root), debug)
    workers = ray_workers(cfg)
    set_split_cache(workers)
    with Progress(cfg["rounds"], f"mmfed simulate ({n_sites} sites)", live=live) as progress:
        server = server_app(prepared(cfg, run, resume), on_round=progress.round_done,
                            workers=workers)
        flwr_run_simulation(server_app=server, client_app=client_app,
                            num_supernodes=n_sites, backend_config=backend,  # type: ignore[arg-type]
                            verbose_logging=debug)
    if not (run.path / "summary.json").exists():
        raise DataError(f"the simulation ended without finishing its rounds; see the log "
                        f"above and {run.path / 'metrics.jsonl'}")


def resume_simulation(run_path: Path, args: argparse.Namespace) -> int:
    """``mmfed simulate --resume RUN``: continue a crashed run after its last full round."""
    refuse_run_flags((("--config", args.config), ("--data", args.data), ("--seed", args.seed),
                      ("--out", args.out), ("--sites", args.sites), ("--rounds", args.rounds),
                      ("--set", args.overrides), ("--dp", args.dp), ("--no-dp", args.no_dp),
                      ("--secagg", args.secagg), ("--no-secagg", args.no_secagg)))
    run_path = run_path.resolve()
    cfg = load_run_config(run_path)
    validate_federation(Path(cfg["data.dir"]))
    point = find_resume_point(run_path, cfg)
    truncate_metrics(run_path, point)
    run = RunDir(run_path, fresh=False)
    done = point.round if point else 0
    print(f"resuming {run_path} after round {done} of {cfg['rounds']}", flush=True)
    started = time.perf_counter()
    run_simulation(cfg, run, live=False if args.no_progress else None, debug=args.debug,
                   resume=point)
    return _report_done(cfg, run, started)


def simulate_from_args(args: argparse.Namespace) -> int:
    check_split_cache_env()
    if getattr(args, "resume", None):
        return resume_simulation(Path(args.resume), args)
    extra = {"seed": args.seed, "rounds": args.rounds, "data.sites": args.sites,
             "data.dir": str(args.data) if args.data else None,
             "privacy.enabled": False if args.no_dp else (True if args.dp else None)}
    if args.dp and args.no_dp:
        raise UsageError("--dp and --no-dp contradict each other")
    if args.secagg and args.no_secagg:
        raise UsageError("--secagg and --no-secagg contradict each other")
    extra["secagg.enabled"] = False if args.no_secagg else (True if args.secagg else None)
    cfg = RunConfig.load(args.config, args.overrides, extra)
    approve_named_encoders(cfg)
    if args.data and args.sites:
        raise UsageError("--sites only applies to synthesized data; with --data the "
                         "federation folder decides")
    resolve_device(cfg["train.device"])  # a missing GPU is one line, before any work
    out = args.out or (Path(cfg["out"]) if cfg["out"] else default_out("simulate"))
    cfg, run = prepare_run(cfg, out)
    started = time.perf_counter()
    run_simulation(cfg, run, live=False if args.no_progress else None, debug=args.debug)
    return _report_done(cfg, run, started)


def check_encoders_early(cfg: RunConfig) -> None:
    """Build a model with the run's own encoders once, on the first site's columns, so a
    wrong shape or a layer DP-SGD refuses is one line before Ray starts, not after every
    site has joined (the server checks again on the federation's schema)."""
    from mmfed.ml.encoders import check_private, custom_encoders

    if not custom_encoders(cfg.model_spec()):
        return
    from mmfed.data.reader import load_site
    from mmfed.ml.features import pooled_schema
    from mmfed.ml.model import build_model

    sites = list_sites(Path(cfg["data.dir"]))
    model = build_model(pooled_schema([load_site(sites[0])]), cfg.model_spec())
    if cfg["privacy.enabled"]:
        check_private(model)


def approve_named_encoders(cfg: RunConfig) -> None:
    """One person runs every simulated site, so naming an encoder approves it there; a
    deployed site approves encoder code in its own policy file instead. A simulated
    site with its own ``privacy.site.NAME.approved_encoders`` keeps that list, and a
    run-wide list given explicitly is used as it is."""
    from mmfed.ml.encoders import custom_encoders, encoder_digest

    named = custom_encoders(cfg.model_spec())
    if not named or cfg["privacy.approved_encoders"]:
        return
    digests = [encoder_digest(entry) for entry in named.values()]
    cfg.set("privacy.approved_encoders", digests)
    for (key, entry), digest in zip(named.items(), digests, strict=True):
        print(f"simulated sites approve model.{key} {entry} (code {digest[:12]})", flush=True)


def _report_done(cfg: RunConfig, run: RunDir, started: float) -> int:
    last = read_metrics(run.path)[-1]
    from mmfed.ml.task import headline_text

    print(f"done: {cfg['rounds']} rounds over {cfg['data.sites']} sites in "
          f"{time.perf_counter() - started:.1f}s; {headline_text(None, last['global'])}; "
          f"run directory {run.path}")
    return 0

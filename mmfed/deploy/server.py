"""``mmfed server``: one federated run as real processes, start to finish.

Order matters and is the point of this module: check every input first (config,
holdout, certificates, site keys, ports), start the SuperLink on loopback, register
the admitted sites' keys, only then open the public Fleet gateway (so no site can race
its own registration), submit the run, follow ``metrics.jsonl`` for progress, and stop
every process it started, whichever way the run ends.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from mmfed.config import RunConfig, unflatten
from mmfed.deploy import credentials as creds
from mmfed.deploy.processes import (
    ChildDied,
    Supervisor,
    check_port_free,
    child_env,
    flower_executable,
    free_port,
    join_host_port,
    last_meaningful,
    stop_signals,
    strip_ansi,
    wait_for_port,
)
from mmfed.errors import MmfedError, UsageError

log = logging.getLogger("mmfed")
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 9092  # the public Fleet port sites connect to
CONNECTION = "mmfed"  # the SuperLink connection name in the private Flower config


@dataclass
class ServerPlan:
    """Everything checked and decided before the first process starts."""

    cfg: RunConfig
    run_path: Path
    host: str
    port: int
    tls: creds.ServerCredentials | None
    admitted: list[creds.AdmittedSite]
    sites: int
    resume: bool = False  # continue run_path after its last complete round


def say(text: str) -> None:
    print(f"mmfed server: {text}", file=sys.stderr, flush=True)


def plan_from_args(args: argparse.Namespace) -> ServerPlan:
    from mmfed.run.prepare import check_cohort, default_out, validate_holdout
    from mmfed.server.secure_settings import check_distributed_settings, check_secagg_settings

    resume = getattr(args, "resume", None)
    if resume:
        from mmfed.run.resume import load_run_config, refuse_run_flags

        refuse_run_flags((("--config", args.config), ("--data", args.data),
                          ("--seed", args.seed), ("--rounds", args.rounds),
                          ("--set", args.overrides), ("--out", args.out),
                          ("--sites", args.sites)))
        cfg = load_run_config(Path(resume).resolve())
        args.sites = int(cfg["data.sites"])
        args.out = Path(resume)
    else:
        cfg = RunConfig.load(args.config, args.overrides,
                             {"seed": args.seed, "rounds": args.rounds,
                              "data.dir": str(args.data) if args.data else None})
    if not cfg["data.dir"]:
        raise UsageError("give --data DIR: a folder holding holdout/, the server's evaluation "
                         "set (site data stays at the sites)")
    data_dir = Path(cfg["data.dir"]).resolve()
    cfg.set("data.dir", str(data_dir))
    validate_holdout(data_dir)

    host, port = args.host, args.port
    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: must be between 1 and 65535")
    tls: creds.ServerCredentials | None = None
    admitted: list[creds.AdmittedSite] = []
    if args.insecure:
        if args.admit:
            raise UsageError("--admit needs TLS (Flower authenticates SuperNodes only over "
                             "TLS); drop --insecure or --admit")
        if args.sites is None:
            raise UsageError("with --insecure, say how many sites to wait for: --sites N")
        if args.certs is not None:
            raise UsageError("--certs and --insecure contradict each other")
    else:
        if args.certs is None:
            raise UsageError("give --certs DIR (from `mmfed certs init`), or --insecure for "
                             "a plain-text test federation")
        if not args.admit:
            raise UsageError("give --admit SITE.pub (repeatable) or --admit FOLDER of .pub "
                             "files: the sites allowed to join")
        tls = creds.server_credentials(args.certs)
        admitted = creds.collect_admitted(args.admit)
        names = creds.certificate_names(tls.cert)
        if host not in ("0.0.0.0", "::") and host not in names:
            raise UsageError(f"--host {host} is not in {tls.cert}'s names ({', '.join(names)}); "
                             "sites could not verify it: rerun `mmfed certs init --host "
                             f"{host} ...`")
    sites = args.sites if args.sites is not None else len(admitted)
    if sites < 1:
        raise UsageError("--sites must be at least 1")
    if admitted and sites > len(admitted):
        raise UsageError(f"--sites {sites} but only {len(admitted)} site key(s) admitted")
    cfg.set("data.sites", sites)
    check_distributed_settings(cfg)
    if cfg["secagg.enabled"]:
        check_secagg_settings(cfg, sites)
    else:  # the request stops asking for it; each site's own policy still decides
        cfg.set("privacy.secure_aggregation", "optional")
    check_cohort(cfg, sites)
    if cfg["federation.min_sites"] > sites:
        raise UsageError(f"federation.min_sites = {cfg['federation.min_sites']} but only "
                         f"{sites} site(s) will join")
    check_port_free(host, port, "--port")
    out = Path(args.out) if args.out else (Path(cfg["out"]) if cfg["out"] else
                                            default_out("server"))
    return ServerPlan(cfg, out.resolve(), host, port, tls, admitted, sites, bool(resume))


def app_pyproject(cfg: RunConfig) -> str:
    """The app this server ships: mmfed's components and the fully resolved run config
    (see :func:`mmfed.deploy.release.deployment_pyproject`)."""
    from mmfed.deploy.release import deployment_pyproject

    return deployment_pyproject(unflatten(cfg.to_flower()))


def flower_config(address: str, ca: Path | None) -> str:
    conn: dict[str, Any] = {"address": address}
    conn.update({"root-certificates": str(ca)} if ca else {"insecure": True})
    return tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}})


def register_sites(plan: ServerPlan, env: dict[str, str]) -> dict[str, int]:
    """``flwr supernode register`` for every admitted key (in parallel: each takes ~2 s)."""
    flwr = flower_executable("flwr")
    procs = {site.name: subprocess.Popen(
        [flwr, "supernode", "register", str(site.path), CONNECTION, "--name", site.name,
         "--format", "json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        stdin=subprocess.DEVNULL, start_new_session=True) for site in plan.admitted}
    node_ids: dict[str, int] = {}
    problems: list[str] = []
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        text = strip_ansi(output.decode(errors="replace"))
        try:
            reply = json.loads(text[text.index("{"):text.rindex("}") + 1])
        except ValueError:
            reply = {}
        if proc.returncode == 0 and reply.get("success"):
            node_ids[name] = int(reply["node-id"])
        else:
            reason = reply.get("error-message") or last_meaningful(text.splitlines())
            problems.append(f"{name}: {reason}")
    if problems:
        raise MmfedError("could not register site keys with the SuperLink: "
                         + "; ".join(problems))
    return node_ids


class MetricsFollower:
    """Reads ``metrics.jsonl`` as rounds are appended (the ServerApp writes it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_lines(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # only whole lines
        self.offset += end
        return [json.loads(line) for line in data[:end].decode().splitlines() if line.strip()]


def serve(plan: ServerPlan, *, live: bool | None = None) -> int:
    from mmfed.deploy.gateway import FleetGateway, GatewaySettings
    from mmfed.run.prepare import freeze_config
    from mmfed.run.progress import Progress
    from mmfed.run.rundir import RunDir, read_metrics

    cfg = plan.cfg
    run = RunDir(plan.run_path, fresh=not plan.resume)
    freeze_config(cfg, run)
    logs = plan.run_path / "logs"
    logs.mkdir(exist_ok=True)
    public = join_host_port(plan.host, plan.port)
    started = time.perf_counter()
    if plan.tls is None:
        say(f"WARNING: --insecure: plain-text transport on {public}. Model updates and "
            "metadata travel unencrypted and any machine that reaches this port can join as "
            "a site. Use it only on a private test network.")

    with tempfile.TemporaryDirectory(prefix="mmfed-server-") as tmp, stop_signals(), \
            Supervisor() as sup:
        flwr_home = Path(tmp) / "flwr-home"
        flwr_home.mkdir()
        env = child_env({"FLWR_HOME": str(flwr_home)})
        internal = free_port()
        superlink = [flower_executable("flower-superlink"), "--host", "127.0.0.1", "--port",
                     str(internal), "--isolation", "subprocess",
                     "--disable-runtime-dependency-installation"]
        if plan.tls is not None:
            superlink += ["--ssl-ca-certfile", str(plan.tls.ca), "--ssl-certfile",
                          str(plan.tls.cert), "--ssl-keyfile", str(plan.tls.key),
                          "--enable-supernode-auth"]
        else:
            superlink += ["--insecure"]
        link = sup.spawn("SuperLink", superlink, log_path=logs / "superlink.log", env=env)
        if not wait_for_port("127.0.0.1", internal, 60.0, link.running):
            sup.check()
            raise MmfedError(f"the SuperLink did not open its port within 60 s; see "
                             f"{logs / 'superlink.log'}")
        (flwr_home / "config.toml").write_text(flower_config(
            f"127.0.0.1:{internal}", plan.tls.ca if plan.tls else None), encoding="utf-8")
        node_ids = register_sites(plan, env) if plan.admitted else {}
        for site in plan.admitted:
            say(f"admitted {site.name} ({site.fingerprint}) as node {node_ids[site.name]}")
        gateway = FleetGateway(GatewaySettings(
            plan.host, plan.port, f"{'https' if plan.tls else 'http'}://127.0.0.1:{internal}",
            plan.tls.cert if plan.tls else None, plan.tls.key if plan.tls else None,
            plan.tls.ca if plan.tls else None))
        gateway.start()
        try:
            _write_deployment(plan, node_ids, public)
            say(f"listening on {public} (TLS {'on' if plan.tls else 'OFF'}, SuperNode "
                f"authentication {'on' if plan.tls else 'OFF'}); waiting for {plan.sites} "
                f"site(s): mmfed client --server HOST:{plan.port} --ca ca.pem --key SITE.key "
                "--data SITE_FOLDER")
            app_dir = Path(tmp) / "app"
            app_dir.mkdir()
            (app_dir / "pyproject.toml").write_text(app_pyproject(cfg), encoding="utf-8")
            from mmfed.deploy.release import path_hash, short

            say(f"shipping app {short(path_hash(app_dir))} (mmfed's own release; sites "
                "serve it only if it is theirs or in their approved list)")
            errors: list[str] = []

            def on_line(line: str) -> None:
                text = strip_ansi(line).strip()
                if text.startswith("mmfed: ERROR"):
                    errors.append(text.removeprefix("mmfed: ERROR:").strip())
                if text.startswith("mmfed: "):
                    print(text, file=sys.stderr, flush=True)
                elif "Successfully started run" in text:
                    say(text.lower().replace("successfully started", "started"))

            submit = sup.spawn("flwr run", [flower_executable("flwr"), "run", str(app_dir),
                                            CONNECTION, "--stream"],
                               log_path=logs / "serverapp.log", env=env, on_line=on_line,
                               critical=False, cwd=app_dir)
            follower = MetricsFollower(plan.run_path / "metrics.jsonl")
            with Progress(cfg["rounds"], f"mmfed server ({plan.sites} sites)",
                          live=live) as progress:
                while submit.running():
                    for line in follower.new_lines():
                        progress.round_done(line)
                    sup.check()
                    time.sleep(0.5)
                for line in follower.new_lines():
                    progress.round_done(line)
            if not (plan.run_path / "summary.json").exists():
                # `flwr run` often notices a dead SuperLink before the loop above does; the
                # SuperLink's death is the cause, so it is the error reported
                _blame_a_dead_child(sup, 2.0)
        finally:
            gateway.stop()
    if not (plan.run_path / "summary.json").exists():
        reason = errors[-1] if errors else last_meaningful(submit.tail)
        raise MmfedError(f"the run did not finish: {reason} (see "
                         f"{logs / 'serverapp.log'} and {logs / 'superlink.log'})")
    last = read_metrics(plan.run_path)[-1]
    from mmfed.ml.task import headline_text

    trained = sum(1 for s in last["sites"].values() if s.get("status") == "trained")
    print(f"done: {cfg['rounds']} rounds, {trained} of {plan.sites} sites trained in the last "
          f"round, in {time.perf_counter() - started:.1f}s; "
          f"{headline_text(None, last['global'])}; run directory {plan.run_path}")
    return 0


def _blame_a_dead_child(sup: Supervisor, within: float) -> None:
    """Raise ChildDied if a critical child is dead or dies within `within` seconds (its
    sockets close before its exit status can be read, so a moment is allowed)."""
    deadline = time.monotonic() + within
    while True:
        sup.check()
        if time.monotonic() >= deadline:
            return
        time.sleep(0.1)


def _write_deployment(plan: ServerPlan, node_ids: dict[str, int], public: str) -> None:
    """Who was admitted, for the record (public fingerprints only, nothing secret)."""
    from mmfed.files import atomic_write_bytes

    record = {"address": public, "tls": plan.tls is not None,
              "supernode_auth": plan.tls is not None, "sites_expected": plan.sites,
              "admitted": [{"site": s.name, "fingerprint": s.fingerprint,
                            "node_id": node_ids.get(s.name)} for s in plan.admitted],
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_bytes(plan.run_path / "deployment.json",
                       (json.dumps(record, indent=2) + "\n").encode())


def server_from_args(args: argparse.Namespace) -> int:
    from mmfed.ml.process import quiet_process

    quiet_process(args.debug)
    plan = plan_from_args(args)
    try:
        return serve(plan, live=False if args.no_progress else None)
    except ChildDied as exc:
        raise MmfedError(f"{exc}; every other process was stopped") from None

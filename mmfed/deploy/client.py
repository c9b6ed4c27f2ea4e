"""``mmfed client``: one hospital's site node, started only on data that checks clean.

It supervises ``mmfed.deploy.node``, the one long-lived process that reads the site's
data and talks to the SuperLink (no Flower SuperNode, no per-message app processes,
no local port: see that module for why). A node that lost its server is restarted
once the server answers again; one that crashed is reported, never retried blindly.

Refusals are made as early and as plainly as possible: bad site data, an unreadable
or world-readable key, a bad address or a busy port stop the command before anything
starts; a server whose certificate the site's CA does not vouch for is detected by a
TLS handshake of our own, before Flower's retry loop would hide it; and a key the
server has not admitted ends the client with a line naming the key's fingerprint.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from mmfed.deploy import credentials as creds
from mmfed.deploy.processes import (
    Child,
    ChildDied,
    StopRequested,
    Supervisor,
    child_env,
    join_host_port,
    last_meaningful,
    parse_host_port,
    stop_signals,
    strip_ansi,
)
from mmfed.errors import ConfigError, DataError, MmfedError, UsageError
from mmfed.privacy.ledger import ledger_dir

log = logging.getLogger("mmfed")
NOT_ADMITTED = ("Failed to activate SuperNode", "code: 2004")


class NotAdmitted(MmfedError):
    """The SuperLink does not know this site's key."""


class ServerUntrusted(MmfedError):
    """The server's certificate does not verify against the site's CA."""


CRASH_WINDOW = 120.0  # seconds: more than MAX_CRASHES node crashes within it end the client
MAX_CRASHES = 3


@dataclass
class ClientPlan:
    site: str
    data: Path
    host: str
    port: int
    ca: Path | None
    key: Path | None
    fingerprint: str | None
    policy: Path | None
    ledger_dir: Path
    wait_admission: float
    wait_server: float
    verbose: bool
    log_file: Path | None = None


def say(site: str, text: str) -> None:
    print(f"mmfed client {site}: {text}", file=sys.stderr, flush=True)


def validate_site(folder: Path) -> str:
    """The same checks as ``mmfed data check``: a site with bad data never joins."""
    from mmfed.data.reader import read_site

    result = read_site(folder)
    if not result.ok or result.site is None:
        extra = len(result.problems) - 1
        more = f" (and {extra} more)" if extra else ""
        raise DataError(f"{folder}: {result.problems[0]}{more}; not starting (run `mmfed data "
                        f"check {folder}` for the full list)", result.problems)
    return result.site.name


def plan_from_args(args: argparse.Namespace) -> ClientPlan:
    from mmfed.deploy.release import load_approval
    from mmfed.privacy.policy import load_policy

    host, port = parse_host_port(args.server)
    data = Path(args.data).expanduser().resolve()
    name = validate_site(data)
    if args.site is not None and args.site != name:
        raise UsageError(f"--site {args.site} but {data}/site.toml names the site {name!r}")
    ca = key = None
    fingerprint = None
    if args.insecure:
        if args.ca is not None or args.key is not None:
            raise UsageError("--insecure turns TLS and SuperNode authentication off: drop "
                             "--ca and --key, or drop --insecure")
    else:
        if args.ca is None or args.key is None:
            raise UsageError("give --ca ca.pem (the federation's CA) and --key SITE.key (from "
                             "`mmfed keys new`), or --insecure for a plain-text test")
        ca = Path(args.ca).expanduser().resolve()
        creds.load_certificates(ca)
        key = Path(args.key).expanduser().resolve()
        fingerprint = creds.fingerprint(creds.load_site_private_key(key).public_key())
    policy = None
    if args.policy is not None:
        policy = Path(args.policy).expanduser().resolve()
        load_policy(policy)  # refuse a bad policy now, not at the first round
        load_approval(policy)
    ledger = ledger_dir(args.ledger_dir or "").resolve()
    try:
        ledger.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{ledger}: cannot create the privacy ledger folder "
                          f"({exc.strerror})") from None
    return ClientPlan(name, data, host, port, ca, key, fingerprint, policy, ledger,
                      float(args.wait_admission), float(args.wait_server),
                      bool(args.verbose),
                      Path(args.log).expanduser().resolve() if args.log else None)


def probe_server(plan: ClientPlan) -> None:
    """Connect once ourselves: a wrong CA is a configuration error, not a reason to retry."""
    address = join_host_port(plan.host, plan.port)
    deadline = time.monotonic() + plan.wait_server if plan.wait_server > 0 else None
    announced = False
    context = None
    if plan.ca is not None:
        context = ssl.create_default_context(cafile=str(plan.ca))
    while True:
        try:
            with socket.create_connection((plan.host, plan.port), timeout=10) as sock:
                if context is None:
                    return
                with context.wrap_socket(sock, server_hostname=plan.host):
                    return
        except ssl.SSLCertVerificationError as exc:
            raise ServerUntrusted(
                f"the server at {address} is not trusted by {plan.ca}: "
                f"{exc.verify_message} (wrong --ca, or the server's certificate does not "
                f"name {plan.host}); not connecting") from None
        except ssl.SSLError as exc:
            raise ServerUntrusted(f"TLS with {address} failed ({exc.reason}); is the server "
                                  "started with --insecure?") from None
        except OSError as exc:
            if deadline is not None and time.monotonic() > deadline:
                raise MmfedError(f"cannot reach the server at {address} "
                                 f"({exc.strerror or type(exc).__name__}) after "
                                 f"{plan.wait_server:.0f} s") from None
            if not announced:
                say(plan.site, f"server {address} not reachable yet "
                    f"({exc.strerror or type(exc).__name__}); retrying")
                announced = True
            time.sleep(2.0)


def node_plan_file(plan: ClientPlan, folder: Path) -> Path:
    """What the site node needs, as a private file: any path (spaces, quotes) survives."""
    from mmfed.deploy.node import NodePlan

    policy = plan.policy
    if policy is None:
        # mmfed's default site policy: DP on, ε = 8, δ = 1e-5 (the server can only tighten)
        from mmfed.privacy.policy import PrivacyPolicy

        policy = folder / "default-policy.toml"
        policy.write_text(tomli_w.dumps(PrivacyPolicy().as_dict()), encoding="utf-8")
    path = folder / "node-plan.json"
    NodePlan(plan.site, str(plan.data), join_host_port(plan.host, plan.port),
             str(plan.ca) if plan.ca else None, str(plan.key) if plan.key else None,
             str(policy), str(plan.ledger_dir), plan.verbose).write(path)
    return path


def run_client(plan: ClientPlan) -> int:
    from mmfed.deploy import node as site_node

    address = join_host_port(plan.host, plan.port)
    if plan.ca is None:
        say(plan.site, f"WARNING: --insecure: plain-text connection to {address}; model "
            "updates travel unencrypted and the server is not authenticated")
    if plan.policy is None:
        say(plan.site, "no --policy: using mmfed's default site policy (DP on, ε 8, δ 1e-5)")
    try:
        with stop_signals():
            probe_server(plan)
        with tempfile.TemporaryDirectory(prefix=f"mmfed-client-{plan.site}-") as tmp, \
                stop_signals(), Supervisor() as sup:
            folder = Path(tmp)
            folder.chmod(0o700)
            plan_file = node_plan_file(plan, folder)
            env = child_env({"FLWR_HOME": str(folder / "flwr-home")})
            admission_deadline = time.monotonic() + plan.wait_admission
            crashes: list[float] = []
            while True:
                node, state = _start(sup, plan, plan_file, env, folder)
                code = _follow(sup, node)
                if code not in site_node.EXIT_CODES:
                    # A crash (a bug, the OOM killer): everything the node keeps across
                    # rounds is rebuilt from disk (ledger, release copies, audit log are
                    # written atomically), so a new node continues where it stopped.
                    now = time.monotonic()
                    crashes = [t for t in crashes if now - t < CRASH_WINDOW] + [now]
                    if len(crashes) > MAX_CRASHES:
                        raise ChildDied(node, f"crashed {len(crashes)} times within "
                                        f"{CRASH_WINDOW:.0f} s; not restarting it again")
                    say(plan.site, f"the site node (pid {node.pid}) died unexpectedly "
                        f"(code {code}); restarting it")
                    continue
                if code == site_node.EXIT_LOST:
                    if state["connected"]:
                        say(plan.site, "the server is gone (restarted for a new run?); "
                            "reconnecting")
                    with stop_signals():
                        probe_server(plan)
                    admission_deadline = time.monotonic() + plan.wait_admission
                    continue
                if code == site_node.EXIT_UNTRUSTED:
                    raise ServerUntrusted(f"TLS with the server failed: "
                                          f"{last_meaningful(node.tail)}")
                if code == site_node.EXIT_BAD_SETUP:  # it said why in its last line
                    raise MmfedError(last_meaningful(node.tail).removeprefix(
                        "mmfed: error: "))
                if code != site_node.EXIT_NOT_ADMITTED:
                    raise ChildDied(node)
                if state["connected"]:  # admitted before: a restarted server re-registers
                    admission_deadline = time.monotonic() + plan.wait_admission
                if time.monotonic() >= admission_deadline:
                    raise NotAdmitted(
                        f"the server at {address} refused site {plan.site}: its key "
                        f"({plan.fingerprint}) is not admitted; the server operator must "
                        f"start `mmfed server` with --admit {plan.site}.pub")
                say(plan.site, "not admitted (yet); retrying in 2 s")
                time.sleep(2.0)
    except StopRequested:
        say(plan.site, "stopped; the site node has exited")
        return 0


def _start(sup: Supervisor, plan: ClientPlan, plan_file: Path, env: dict[str, str],
           folder: Path) -> tuple[Child, dict[str, bool]]:
    from mmfed.deploy.node import CONNECTED

    state: dict[str, bool] = {"connected": False}

    def on_line(line: str) -> None:
        text = strip_ansi(line).strip()
        if text.startswith(CONNECTED):
            say(plan.site, f"connected to {join_host_port(plan.host, plan.port)} as "
                f"node {text.rsplit(' ', 1)[-1]} (data {plan.data})")
            state["connected"] = True
        elif plan.verbose:
            print(f"[{plan.site}] {text}", file=sys.stderr, flush=True)
        elif text.startswith(("mmfed client", "mmfed: error")):
            print(text, file=sys.stderr, flush=True)
        # Flower's own lines (retries, the connection errors the node recovers from) stay
        # in the log; a node that cannot recover says why itself, and is quoted on exit.

    child = sup.spawn("site node", [sys.executable, "-m", "mmfed.deploy.node", "--plan",
                                    str(plan_file)], env=env,
                      log_path=plan.log_file or folder / "node.log", on_line=on_line,
                      cwd=folder)
    return child, state


def _follow(sup: Supervisor, node: Child) -> int:
    """Wait for the site node to end; its exit code says why."""
    while node.running():
        sup.reap_orphans()
        time.sleep(0.2)
    if node.reader is not None:
        node.reader.join(timeout=2.0)
    code = node.proc.poll()
    return -1 if code is None else code


def client_from_args(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_client(plan)

"""``mmfed client``: one hospital's SuperNode, started only on data that checks clean.

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
    check_port_free,
    child_env,
    flower_executable,
    free_port,
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


class Reconnect(Exception):
    """The SuperLink forgot this node (a new ``mmfed server`` has fresh state): start over."""


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
    runtime_port: int
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
    ledger = ledger_dir(args.ledger_dir or "").resolve()
    try:
        ledger.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{ledger}: cannot create the privacy ledger folder "
                          f"({exc.strerror})") from None
    runtime_port = args.runtime_port if args.runtime_port is not None else free_port()
    if not 0 < runtime_port < 65536:
        raise UsageError(f"--runtime-port {runtime_port}: must be between 1 and 65535")
    check_port_free("127.0.0.1", runtime_port, "--runtime-port")
    return ClientPlan(name, data, host, port, ca, key, fingerprint, policy, ledger,
                      runtime_port, float(args.wait_admission), float(args.wait_server),
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


def node_config_file(plan: ClientPlan, folder: Path) -> Path:
    """Node config as a TOML file, so any path (spaces, quotes) survives intact."""
    policy = plan.policy
    if policy is None:
        # mmfed's default site policy: DP on, ε = 8, δ = 1e-5 (the server can only tighten)
        from mmfed.privacy.policy import PrivacyPolicy

        policy = folder / "default-policy.toml"
        policy.write_text(tomli_w.dumps(PrivacyPolicy().as_dict()), encoding="utf-8")
    path = folder / "node-config.toml"
    path.write_text(tomli_w.dumps({"data-dir": str(plan.data), "policy": str(policy),
                                   "ledger-dir": str(plan.ledger_dir)}), encoding="utf-8")
    return path


def supernode_argv(plan: ClientPlan, node_config: Path) -> list[str]:
    argv = [flower_executable("flower-supernode"), "--superlink",
            join_host_port(plan.host, plan.port), "--node-config", str(node_config),
            "--host", "127.0.0.1", "--port", str(plan.runtime_port),
            "--isolation", "subprocess"]
    if plan.ca is not None and plan.key is not None:
        argv += ["--root-certificates", str(plan.ca), "--auth-supernode-private-key",
                 str(plan.key)]
    else:
        argv += ["--insecure"]
    return argv


def run_client(plan: ClientPlan) -> int:
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
            node_config = node_config_file(plan, folder)
            env = child_env({"FLWR_HOME": str(folder / "flwr-home")})
            admission_deadline = time.monotonic() + plan.wait_admission
            while True:
                node, state = _start(sup, plan, node_config, env, folder)
                outcome = _follow(sup, node, folder)
                if outcome is Reconnect and state["connected"]:
                    say(plan.site, "the server no longer knows this node (restarted for a "
                        "new run?); reconnecting")
                    admission_deadline = time.monotonic() + plan.wait_admission
                    time.sleep(1.0)
                    continue
                if outcome is Reconnect:
                    outcome = ChildDied(node)
                if outcome is not NotAdmitted:
                    assert isinstance(outcome, BaseException)
                    raise outcome
                if state["connected"]:  # admitted before: a restarted server re-registers
                    admission_deadline = time.monotonic() + plan.wait_admission
                if time.monotonic() >= admission_deadline:
                    raise NotAdmitted(
                        f"the server at {address} refused site {plan.site}: its key "
                        f"({plan.fingerprint}) is not admitted; the server operator must "
                        f"start `mmfed server` with --admit {plan.site}.pub")
                say(plan.site, "not admitted (yet); retrying in 3 s")
                time.sleep(3.0)
    except StopRequested:
        say(plan.site, "stopped; the SuperNode and its apps have exited")
        return 0


def _start(sup: Supervisor, plan: ClientPlan, node_config: Path, env: dict[str, str],
           folder: Path) -> tuple[Child, dict[str, bool]]:
    state: dict[str, bool] = {"connected": False}

    def on_line(line: str) -> None:
        text = strip_ansi(line).strip()
        if plan.verbose:
            print(f"[{plan.site}] {text}", file=sys.stderr, flush=True)
        elif "SuperNode ID:" in text and not state["connected"]:
            state["connected"] = True
            say(plan.site, f"connected to {join_host_port(plan.host, plan.port)} as node "
                f"{text.rsplit(':', 1)[-1].strip()} (data {plan.data})")
        elif "WARNING" in text and "Connection attempt failed" in text:
            pass  # Flower retries by itself; the server may just be restarting
        elif "ERROR" in text:
            print(f"mmfed client {plan.site}: flower: {text}", file=sys.stderr, flush=True)

    child = sup.spawn("SuperNode", supernode_argv(plan, node_config), env=env,
                      log_path=plan.log_file or folder / "supernode.log", on_line=on_line,
                      cwd=folder)
    return child, state


def _follow(sup: Supervisor, node: Child, folder: Path
            ) -> BaseException | type[NotAdmitted] | type[Reconnect]:
    """Wait for the SuperNode to end; classify why."""
    while node.running():
        sup.reap_orphans()
        time.sleep(0.5)
    if node.reader is not None:
        node.reader.join(timeout=2.0)
    text = "\n".join(strip_ansi(line) for line in node.tail)
    if any(marker in text for marker in NOT_ADMITTED):
        return NotAdmitted
    if "CERTIFICATE_VERIFY_FAILED" in text or ("SSL" in text and "handshake" in text):
        return ServerUntrusted(f"TLS with the server failed: {last_meaningful(node.tail)}")
    code = node.proc.poll()
    if code is not None and code >= 0 and (code == 0 or "401 Unauthorized" in text):
        # Flower 1.41 ends a SuperNode (exit 0, or an HTTP 401) when the SuperLink no
        # longer knows its node id; the caller reconnects if it had been connected
        return Reconnect
    if node.log_path is not None and node.log_path.parent == folder:
        node.log_path = None  # a temporary folder about to go: the reason is quoted instead
    return ChildDied(node)


def client_from_args(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_client(plan)

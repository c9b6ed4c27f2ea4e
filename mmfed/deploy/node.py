"""A deployed site's one long-lived process: the only one that reads the site's data.

``mmfed client`` starts this process instead of Flower's ``flower-supernode``. It
connects to the SuperLink with Flower's own Fleet connection (TLS, SuperNode
authentication, heartbeats: ``flwr.supernode.fleet_http_connection``) and runs its own
message loop around it, because that loop decides three things Flower's SuperNode
does not let a site decide:

* **No received code runs here.** A SuperNode installs the app (FAB) the SuperLink
  ships and imports it in a fresh process per message, so whoever controls the
  SuperLink could run anything next to the patient data. This loop never installs or
  imports a FAB: it hashes it (``mmfed.deploy.release``), serves the run only if the
  hash is approved by the site (its installed release, or its policy's ``[apps]``
  list), and then answers with the mmfed code the site installed. An unapproved app
  gets an error reply naming its hash, and nothing of it is executed, so nothing of
  the site folder can reach the server through it.
* **Warm state.** torch, the encoded site data, the model and the
  secure-aggregation state live here across messages and rounds (a fresh process per
  message paid 3–5 s of imports per message).
* **Its own polling.** The SuperNode sleeps 3 s whenever a pull finds nothing (fixed
  in Flower's loop, not configurable), which a secure round paid once per message
  trip. Here the next pull follows 50 ms after a reply, backing off to 0.25 s while a
  run is active and to 2 s after two minutes without a message.

Every request served or refused is written to the site's audit trail
(``mmfed.privacy.audit``) with its run, round and the app hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from mmfed.errors import MmfedError

log = logging.getLogger("mmfed")

POLL_MIN = 0.05  # seconds after a reply before the next pull: the next message is near
POLL_BUSY = 0.25  # the longest wait between pulls while a run is active
POLL_IDLE = 2.0  # ... and once nothing came for BUSY_FOR seconds (between runs)
BUSY_FOR = 120.0
POLL_GROWTH = 1.3
PULL_RETRY_FIRST = 0.02  # seconds before re-asking for a message object not there yet
PULL_RETRY_CAP = 0.5
LOST_AFTER = 10.0  # seconds of failing calls before the connection is given up and rebuilt
RUNS_KEPT = 4  # runs whose context (secure-aggregation state) is kept

# Exit codes ``mmfed client`` understands.
EXIT_STOPPED = 0
EXIT_NOT_ADMITTED = 3
EXIT_UNTRUSTED = 4
EXIT_LOST = 5
EXIT_BAD_SETUP = 6
EXIT_CODES = frozenset({EXIT_STOPPED, EXIT_NOT_ADMITTED, EXIT_UNTRUSTED, EXIT_LOST,
                        EXIT_BAD_SETUP})
CONNECTED = "mmfed-node: connected as node"  # the line ``mmfed client`` waits for


@dataclass(frozen=True)
class NodePlan:
    """What ``mmfed client`` hands to the node process (a private file, 0600)."""

    site: str
    data: str
    address: str
    ca: str | None
    key: str | None
    policy: str
    ledger_dir: str
    verbose: bool = False

    def write(self, path: Path) -> None:
        from mmfed.files import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(asdict(self)).encode(), private=True)

    @classmethod
    def read(cls, path: Path) -> NodePlan:
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise MmfedError(f"{path}: not a node plan written by mmfed client ({exc})"
                             ) from None


class _Stop(BaseException):
    """SIGTERM: leave the connection (Flower deactivates the node) and exit.

    A BaseException, so that Flower's connection context, which logs and swallows
    ``Exception`` once connected, lets it through."""


class _Forgotten(Exception):
    """Flower's heartbeat found the SuperLink no longer knows this node (it sends
    SIGINT to its own process for that): rebuild the connection, keep the warm state."""


@dataclass
class _Run:
    app_hash: str
    refusal: str | None
    context: Any  # flwr.app.Context
    run_id: str  # mmfed's run id, from the run config


class _FlowerErrors(logging.Handler):
    """Flower's last error lines, to tell "not admitted" from "unreachable" when its
    connection setup exits the process."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines = [*self.lines[-20:], record.getMessage()]


def say(site: str, text: str) -> None:
    print(f"mmfed client {site}: {text}", file=sys.stderr, flush=True)


class SiteNode:
    """The message loop: pull, check the app, answer with the installed ClientApp."""

    def __init__(self, plan: NodePlan) -> None:
        from mmfed.deploy.release import load_approval
        from mmfed.privacy.audit import AuditLog

        self.plan = plan
        policy = Path(plan.policy)
        self.approval = load_approval(policy)
        self.audit = AuditLog(Path(plan.ledger_dir))
        self.node_config: dict[str, bool | float | int | str] = {
            "data-dir": plan.data, "policy": plan.policy, "ledger-dir": plan.ledger_dir}
        self.runs: OrderedDict[int, _Run] = OrderedDict()
        self.node_id = 0

    # -- warm start -------------------------------------------------------------
    def warm(self) -> None:
        """Pay the imports and the first read of the site folder once, before joining."""
        from mmfed.ml import training  # noqa: F401  (torch, opacus)
        from mmfed.ml.process import limit_threads
        from mmfed.site import runtime

        limit_threads()
        runtime.open_site(Path(self.plan.data))

    # -- connection -------------------------------------------------------------
    def serve(self) -> int:
        from flwr.supernode.fleet_http_connection import http_request_response

        keys = None
        if self.plan.key is not None:
            from mmfed.deploy import credentials as creds

            private = creds.load_site_private_key(Path(self.plan.key))
            keys = (private, private.public_key())
        root = Path(self.plan.ca).read_bytes() if self.plan.ca else None
        errors = _FlowerErrors()
        logging.getLogger("flwr").addHandler(errors)
        self.audit.append("started", site=self.plan.site, server=self.plan.address,
                          approved=list(self.approval.allowed()))
        try:
            while True:
                try:
                    with http_request_response(self.plan.address, root is None, root, keys,
                                               None, LOST_AFTER) as conn:
                        self.node_id = int(conn[0])
                        print(f"{CONNECTED} {self.node_id}", file=sys.stderr, flush=True)
                        self.loop(*conn[1:])
                except _Forgotten:
                    pass
                except SystemExit:  # Flower's connection setup gave up (flwr_exit)
                    return self._setup_failed(errors.lines)
                say(self.plan.site, "lost the server (restarted, or the network); "
                    "reconnecting")
                time.sleep(1.0)
        except _Stop:
            return EXIT_STOPPED
        finally:
            self.audit.append("stopped", site=self.plan.site)

    def _setup_failed(self, lines: list[str]) -> int:
        text = "\n".join(lines)
        if "2004" in text:
            return EXIT_NOT_ADMITTED
        if "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in text:
            say(self.plan.site, "TLS with the server failed: " + (lines[-1] if lines else ""))
            return EXIT_UNTRUSTED
        return EXIT_LOST

    def loop(self, receive: Any, send: Any, get_run: Any, get_fab: Any, pull_object: Any,
             push_object: Any, confirm: Any) -> None:
        wait = POLL_MIN
        last = time.monotonic()
        while True:
            got = receive()
            if got is None:
                time.sleep(wait)
                idle = time.monotonic() - last > BUSY_FOR
                wait = min(wait * POLL_GROWTH, POLL_IDLE if idle else POLL_BUSY)
                continue
            wait = POLL_MIN
            message, tree = got
            self.handle(message, tree, send, get_run, get_fab, pull_object, push_object,
                        confirm)
            last = time.monotonic()

    # -- one message ------------------------------------------------------------
    def run_for(self, run_id: int, get_run: Any, get_fab: Any) -> _Run:
        """The run's approval and context, decided once per run before any message of it
        is answered."""
        known = self.runs.get(run_id)
        if known is not None:
            self.runs.move_to_end(run_id)
            return known
        from flwr.app import Context, RecordDict
        from flwr.common.config import get_fused_config_from_fab

        from mmfed.deploy.release import fab_hash

        info = get_run(run_id)
        fab = get_fab(info.fab_hash, run_id)
        refusal: str | None
        digest = "unreadable"
        if hashlib.sha256(fab.content).hexdigest() != info.fab_hash:
            refusal = "the app received does not match the hash the server announced"
        else:
            try:
                digest = fab_hash(fab.content)
                refusal = self.approval.check(digest)
            except MmfedError as exc:
                refusal = f"the app cannot be checked: {exc}"
        run_config: dict[str, Any] = {}
        if refusal is None:
            run_config = get_fused_config_from_fab(fab.content, info)
        context = Context(run_id=run_id, node_id=self.node_id, node_config=self.node_config,
                          state=RecordDict(), run_config=run_config,
                          series_id=info.series_id)
        entry = _Run(digest, refusal, context, str(run_config.get("run_id", "")))
        if refusal is not None:
            say(self.plan.site, f"REFUSED run {run_id}: {refusal}")
        else:
            say(self.plan.site, f"serving run {run_id} (app {digest[:12]}, approved)")
        self.runs[run_id] = entry
        while len(self.runs) > RUNS_KEPT:
            self.runs.popitem(last=False)
        return entry

    def handle(self, message: Any, tree: Any, send: Any, get_run: Any, get_fab: Any,
               pull_object: Any, push_object: Any, confirm: Any) -> None:
        from flwr.app import Error, Message
        from flwr.supercore.inflatable.inflatable_utils import (
            pull_and_inflate_object_from_tree,
        )
        from flwr.supercore.task_identity import TaskIdentity

        from mmfed import wire
        from mmfed.site.app import app

        run_id = int(message.metadata.run_id)
        TaskIdentity.run_id = run_id  # what Flower's run_clientapp sets for a task
        TaskIdentity.node_id = self.node_id
        run = self.run_for(run_id, get_run, get_fab)
        # The server pushes a message's objects after the message itself, so a pull can
        # find one not there yet; Flower's default first retry waits 1 s, paid on most
        # trips. A site's messages are small: retry soon, and often.
        message = pull_and_inflate_object_from_tree(
            tree, lambda oid: pull_object(run_id, oid),
            lambda oid: confirm(run_id, oid), return_type=Message,
            initial_backoff=PULL_RETRY_FIRST, backoff_cap=PULL_RETRY_CAP)
        message.metadata.__dict__["_message_id"] = tree.object_id
        kind = message.metadata.message_type
        round_num = int(message.metadata.group_id) if message.metadata.group_id.isdigit() \
            else 0
        started = time.perf_counter()
        if run.refusal is not None:
            reason = f"{self.plan.site} refused the run: {run.refusal}"
            reply = Message(Error(wire.ERR_APP_REFUSED, reason), reply_to=message)
        else:
            try:
                reply = app(message, run.context)
            except Exception as exc:
                log.exception("site handler failed")
                reply = Message(Error(wire.ERR_SITE, f"{self.plan.site}: internal error "
                                      f"({type(exc).__name__}: {exc})"), reply_to=message)
        self._audit(run, kind, round_num, reply)
        self._send(reply, run_id, time.perf_counter() - started, send, push_object)

    def _audit(self, run: _Run, kind: str, round_num: int, reply: Any) -> None:
        from mmfed import wire

        common: dict[str, str | int] = {"site": self.plan.site, "request": kind,
                                        "run_id": run.run_id, "round": round_num,
                                        "app_hash": run.app_hash}
        if reply.has_error():
            self.audit.append("refused", **common, reason=str(reply.error.reason))
            return
        declined = wire.declined_of(reply.content)
        if declined is not None:
            self.audit.append("refused", **common, reason=declined)
        else:
            self.audit.append("served", **common)

    @staticmethod
    def _send(reply: Any, run_id: int, seconds: float, send: Any, push_object: Any) -> None:
        from flwr.supercore.inflatable.inflatable_object import (
            get_all_nested_objects,
            get_object_tree,
            no_object_id_recompute,
        )
        from flwr.supercore.inflatable.inflatable_utils import push_objects

        with no_object_id_recompute():
            reply.metadata.__dict__["_message_id"] = reply.object_id
            tree = get_object_tree(reply)
            to_push, session = send(reply, tree, seconds)
            push_objects(get_all_nested_objects(reply),
                         lambda oid, data: push_object(run_id, session, oid, data),
                         object_ids_to_push=set(to_push))


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def _on_int(signum: int, frame: FrameType | None) -> None:
    # Only Flower's heartbeat sends SIGINT here: the node runs in its own session, so a
    # Ctrl-C at the terminal reaches ``mmfed client``, which stops this with SIGTERM.
    raise _Forgotten()


def main(argv: list[str] | None = None) -> int:
    from mmfed.ml.process import quiet_process

    parser = argparse.ArgumentParser(prog="python -m mmfed.deploy.node")
    parser.add_argument("--plan", type=Path, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_int)
    try:
        plan = NodePlan.read(args.plan)
        quiet_process(plan.verbose)
        node = SiteNode(plan)
        node.warm()
        return node.serve()
    except _Stop:
        return EXIT_STOPPED
    except MmfedError as exc:
        print(f"mmfed: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_SETUP
    finally:
        sys.stderr.flush()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # Flower's exit path may have left a force-exit timer thread running

"""Where a round's time and a site's memory go: a deployment as sites run it vs simulation.

The same federation runs twice on one synthetic cohort (default model, ``--sites``
sites, DP, secure aggregation and local evaluation on, same rounds and seed):

- ``mmfed simulate`` (Ray, all sites and the server in one process tree);
- a deployment on loopback as sites run it: ``mmfed certs init`` for TLS, one
  ``mmfed keys new`` per site, ``mmfed server --certs --admit SITE.pub ...`` and one
  ``mmfed client --ca --key`` per site with mmfed's default site policy (DP on, ε 8,
  δ 1e-5, the simulation's defaults too). The server and every client start together,
  as when a federation is brought up at once; each client retries until the server
  listens.

What it reports, and why each figure is taken the way it is:

- **per-stage medians over rounds 2..R** of every figure under ``seconds`` in each
  run's ``metrics.jsonl``. The stage names are read from the file, not listed here:
  what the server times (train, secagg_*, evaluate, ...) changes with the protocol, and
  a fixed list would silently drop a new stage or report a merged one as zero. Round 1
  is left out because it also pays for loading data and calibrating DP noise. A stage
  that ran in only some of those rounds (one that runs in the last round only, say) is
  the median over the rounds it ran in, and ``stage_rounds`` names them. ``unattributed``
  is the median of (round − the named stages): time the server spends in the round
  without naming it as a stage.
- **deployed / simulated ratios** per stage present in both runs, and for the round.
- **time to the first round**: from starting ``mmfed server`` (or ``mmfed simulate``)
  to the first line of ``metrics.jsonl``, i.e. everything a federation pays before it
  has a result: process start, TLS, admission, data loading, round 1.
- **peak memory per site**: the RSS high-water mark (``VmHWM``) of the ``mmfed client``
  process and all its descendants, found by walking the ``/proc/*/stat`` parent links
  every 0.5 s while it runs. Only the client's pid is trusted, never process names:
  what ``mmfed client`` starts under itself is an implementation detail that changes.
  Per tree: the largest sum over the processes alive at one sample (an upper bound on
  the tree's footprint: shared pages such as torch's libraries count in every process)
  and the largest single process. A process that starts and ends between two samples
  is missed. The server's tree and the whole simulation are sampled the same way.

Every process it starts is tracked by pid and stopped (SIGTERM, then SIGKILL after a
grace period) on success, failure, timeout, Ctrl-C and SIGTERM alike. This script
makes itself a child subreaper, so a helper whose parent died is reparented here and
is still found and stopped. A failed run (a process exiting non-zero or too early,
the ``--timeout`` running out, or a site left out of any round, e.g. because it refused
the run) names the process, prints the end of its log and exits non-zero: figures from
a federation that lost sites compare nothing. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench_env import ENV, MMFED  # same folder

from mmfed.deploy.processes import descendants, proc_table

SAMPLE_SECONDS = 0.5  # memory sampling period (as the brief for this figure fixes it)
POLL_SECONDS = 0.2  # how often the waits look at processes and metrics.jsonl
STOP_GRACE = 60.0  # seconds a process gets after SIGTERM before SIGKILL
LOG_TAIL = 30  # lines of a failed process's log to print
HOLDOUT = 300  # server holdout patients
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
RUN_ENV = {**ENV, "PYTHONUNBUFFERED": "1"}  # logs complete up to the moment of a failure


class RunFailed(Exception):
    """A step of the benchmark failed; the message names the process and quotes its log."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM to the benchmark: unwinds through every ``finally`` (cleanup)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@dataclass(frozen=True)
class Deadline:
    """The whole run's time limit: every wait takes what is left of it, not its own."""

    end: float
    total: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, doing: str, waiting_for: Started | None = None) -> None:
        """Fail once the time is up, quoting the log of the process being waited for."""
        if self.left() > 0:
            return
        what = f"--timeout {self.total:.0f} s ran out while {doing}"
        raise RunFailed(waiting_for.report(f"still running: {what}") if waiting_for else what)


# --------------------------------------------------------------------------- /proc


def tree(root: int, table: dict[int, tuple[int, str]], with_root: bool = True) -> list[int]:
    """``root`` and its living descendants, by parent links (zombies hold no memory)."""
    return ([root] if with_root and root in table else []) + descendants(root, table)


def vm_hwm_kib(pid: int) -> int:
    """The process's resident-set high-water mark in KiB; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def become_subreaper() -> bool:
    """Orphaned descendants are reparented to this process instead of init, so the
    final cleanup finds a helper even after the process that started it died."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(
            PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


@dataclass
class TreePeak:
    sum_kib: int = 0  # largest sum of VmHWM over the tree's processes at one sample
    process_kib: int = 0  # largest VmHWM of any one process of the tree
    processes_at_peak: int = 0
    pids_seen: set[int] = field(default_factory=set)

    def as_dict(self) -> dict[str, float | int]:
        return {"peak_sum_mib": round(self.sum_kib / 1024, 1),
                "peak_process_mib": round(self.process_kib / 1024, 1),
                "processes_at_peak": self.processes_at_peak,
                "processes_seen": len(self.pids_seen)}


class MemoryWatch:
    """Samples named process trees every ``SAMPLE_SECONDS`` in a thread until stopped.

    A tree is given by its root pid only; ``with_root=False`` measures the descendants
    alone (used for this script's own pid, to see the whole simulation).
    """

    def __init__(self) -> None:
        self.roots: dict[str, tuple[int, bool]] = {}
        self.peaks: dict[str, TreePeak] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, name: str, pid: int, with_root: bool = True) -> None:
        with self._lock:
            self.roots[name] = (pid, with_root)
            self.peaks.setdefault(name, TreePeak())
        self.sample()  # a first figure even for a process shorter than one period

    def forget(self, name: str) -> None:
        with self._lock:
            self.roots.pop(name, None)

    def sample(self) -> None:
        table = proc_table()
        with self._lock:
            roots = dict(self.roots)
        for name, (root, with_root) in roots.items():
            sizes = {pid: vm_hwm_kib(pid) for pid in tree(root, table, with_root)}
            sizes = {pid: kib for pid, kib in sizes.items() if kib > 0}
            with self._lock:
                peak = self.peaks[name]
                peak.pids_seen.update(sizes)
                total = sum(sizes.values())
                if total > peak.sum_kib:
                    peak.sum_kib, peak.processes_at_peak = total, len(sizes)
                peak.process_kib = max([peak.process_kib, *sizes.values()])

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()


# --------------------------------------------------------------------------- processes


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    related_logs: tuple[Path, ...] = ()  # logs the process writes elsewhere (its helpers')

    @property
    def pid(self) -> int:
        return self.proc.pid

    def report(self, what: str) -> str:
        """``what`` happened to this process, with the end of each of its logs."""
        parts = [f"{self.name} (pid {self.pid}) {what}"]
        for path in (self.log, *self.related_logs):
            with contextlib.suppress(OSError):
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
                if lines:
                    parts.append(f"--- last {min(len(lines), LOG_TAIL)} lines of {path}:\n"
                                 + "\n".join(lines[-LOG_TAIL:]))
        return "\n".join(parts)


class Processes:
    """Every process this benchmark starts, and the one way they are all stopped.

    Children run in their own sessions so a Ctrl-C at the terminal reaches this script
    only, and every exit path stops them the same way, by pid: the terminal's signal
    would otherwise hit the clients and the server at once, and whichever noticed first
    would be reported as the failure.
    """

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Started] = []

    def start(self, name: str, args: Sequence[str | Path],
              related_logs: Sequence[Path] = ()) -> Started:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as sink:
            proc = subprocess.Popen([*MMFED, *map(str, args)], env=RUN_ENV, stdout=sink,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        started = Started(name, proc, log, tuple(related_logs))
        self.started.append(started)
        return started

    def run(self, name: str, args: Sequence[str | Path], deadline: Deadline) -> None:
        """One short command to completion; its failure stops the benchmark."""
        started = self.start(name, args)
        while started.proc.poll() is None:
            deadline.check(f"running {name}", started)
            time.sleep(POLL_SECONDS)
        if started.proc.returncode != 0:
            raise RunFailed(started.report(f"failed with exit code {started.proc.returncode}"))

    def stop(self, targets: Sequence[Started], grace: float = STOP_GRACE) -> dict[str, int]:
        """SIGTERM to each (as an operator would stop it), SIGKILL to any still running
        after ``grace`` seconds; returns each one's exit code."""
        for s in targets:
            if s.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    s.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace
        codes: dict[str, int] = {}
        for s in targets:
            try:
                codes[s.name] = s.proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"deployment_round: {s.name} (pid {s.pid}) ignored SIGTERM for "
                      f"{grace:.0f} s; killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    s.proc.kill()
                codes[s.name] = s.proc.wait()
        return codes

    def stop_all(self, grace: float = STOP_GRACE) -> list[int]:
        """Stop everything still running, then every descendant left behind (by pid);
        returns the pids that had to be killed that way. Signals are ignored meanwhile,
        so a second Ctrl-C cannot cut the cleanup short."""
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.stop([s for s in self.started if s.proc.poll() is None], grace)
            return self.kill_leftovers(wait=10.0)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def kill_leftovers(self, wait: float) -> list[int]:
        """Descendants of this script that outlived their parents: given ``wait`` seconds
        to exit, then SIGKILLed by pid; orphans' zombies are reaped here."""
        end = time.monotonic() + wait
        while True:
            left = tree(os.getpid(), self._reap_orphans(), with_root=False)
            if not left or time.monotonic() >= end:
                break
            time.sleep(POLL_SECONDS)
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if left:
            print(f"deployment_round: killed leftover processes {left}", file=sys.stderr)
            time.sleep(POLL_SECONDS)
            self._reap_orphans()
        return left

    def _reap_orphans(self) -> dict[int, tuple[int, str]]:
        """Reap exited orphans reparented here (as subreaper); returns the process table.
        The processes started here are left to Popen, which would lose their exit code
        if they were reaped behind its back."""
        own = {s.pid for s in self.started}
        table = proc_table()
        for pid, (ppid, state) in table.items():
            if ppid == os.getpid() and state == "Z" and pid not in own:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        return table


# --------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    metrics: list[dict[str, Any]]
    first_round_seconds: float
    wall_seconds: float


def metrics_started(path: Path) -> bool:
    """True once ``metrics.jsonl`` holds a whole line (the first round is on disk)."""
    try:
        with open(path, "rb") as fh:
            return b"\n" in fh.read(1 << 20)
    except OSError:
        return False


def read_metrics(path: Path, rounds: int, who: Started) -> list[dict[str, Any]]:
    try:
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError) as exc:
        raise RunFailed(who.report(f"left no readable {path}: {exc}")) from None
    if [line.get("round") for line in lines] != list(range(1, rounds + 1)):
        raise RunFailed(who.report(f"wrote rounds {[x.get('round') for x in lines]} to "
                                   f"{path}, expected 1..{rounds}"))
    return lines


def untrained(lines: list[dict[str, Any]], sites: Sequence[str]) -> dict[str, str]:
    """Sites that did not train in some round, with the first status seen ("absent" if a
    round has no entry for it). A comparison where sites were left out is not one."""
    found: dict[str, str] = {}
    for line in lines:
        entries = line.get("sites") or {}
        for site in sites:
            entry = entries.get(site)
            status = entry.get("status") if isinstance(entry, dict) else "absent"
            if status != "trained" and site not in found:
                found[site] = f"{status} in round {line.get('round')}"
    return found


def simulate(procs: Processes, watch: MemoryWatch, data: Path, out: Path, common: list[str],
             sites: tuple[str, ...], deadline: Deadline) -> RunResult:
    """``mmfed simulate`` to completion, timed from its start to its first round.

    Its memory is sampled over all of this script's descendants (only the simulation
    runs then), so Ray daemons that detach from the driver are counted too.
    """
    metrics = out / "metrics.jsonl"
    t0 = time.perf_counter()
    sim = procs.start("simulate", ["simulate", "--data", data, "--out", out, "--no-progress",
                                   *common, "--set",
                                   f"privacy.ledger_dir={out.parent / 'ledger-sim'}"])
    watch.add("simulation", os.getpid(), with_root=False)
    first: float | None = None
    while sim.proc.poll() is None:
        if first is None and metrics_started(metrics):
            first = time.perf_counter() - t0
        deadline.check("waiting for mmfed simulate", sim)
        time.sleep(POLL_SECONDS)
    wall = time.perf_counter() - t0
    watch.sample()
    watch.forget("simulation")
    if sim.proc.returncode != 0:
        raise RunFailed(sim.report(f"failed with exit code {sim.proc.returncode}"))
    if first is None:  # the whole run fit between two polls
        first = wall
    procs.kill_leftovers(wait=20.0)  # Ray's daemons must not run into the deployment
    rounds = int(common[common.index("--rounds") + 1])
    lines = read_metrics(metrics, rounds, sim)
    missing = untrained(lines, sites)
    if missing:
        raise RunFailed(sim.report(f"left sites out: {missing}"))
    return RunResult(lines, first, wall)


@dataclass(frozen=True)
class Credentials:
    certs: Path
    keys: Path
    sites: tuple[str, ...]


def make_credentials(procs: Processes, root: Path, sites: tuple[str, ...],
                     deadline: Deadline) -> Credentials:
    """What an operator makes before a federation: the server's TLS certificates and
    one authentication key pair per site (the .pub goes to the server, the .key stays)."""
    certs, keys = root / "certs", root / "keys"
    procs.run("certs-init", ["certs", "init", "--out", certs, "--host", "127.0.0.1"], deadline)
    for site in sites:
        procs.run(f"keys-{site}", ["keys", "new", "--site", site, "--out", keys], deadline)
    return Credentials(certs, keys, sites)


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it; the server checks again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deploy(procs: Processes, watch: MemoryWatch, data: Path, out: Path, common: list[str],
           cred: Credentials, deadline: Deadline) -> tuple[RunResult, dict[str, int]]:
    """``mmfed server`` and one ``mmfed client`` per site until the server ends the run;
    then each client is stopped with SIGTERM. Returns the run and the clients' exit codes.

    Any client exiting before the server does is a failure: the server would otherwise
    wait out its round timeout for a site that is gone.
    """
    metrics = out / "metrics.jsonl"
    port = free_port()
    admit = [arg for site in cred.sites for arg in ("--admit", cred.keys / f"{site}.pub")]
    t0 = time.perf_counter()
    server = procs.start("server", [
        "server", "--data", data, "--certs", cred.certs, *admit, "--host", "127.0.0.1",
        "--port", str(port), "--out", out, "--no-progress", *common],
        related_logs=[out / "logs" / "serverapp.log", out / "logs" / "superlink.log"])
    watch.add("server", server.pid)
    clients: list[Started] = []
    for site in cred.sites:
        supernode_log = out.parent / f"supernode-{site}.log"
        clients.append(procs.start(f"client-{site}", [
            "client", "--data", data / site, "--site", site, "--server", f"127.0.0.1:{port}",
            "--ca", cred.certs / "ca.pem", "--key", cred.keys / f"{site}.key",
            "--ledger-dir", out.parent / f"ledger-{site}",
            "--wait-server", str(max(1, int(deadline.left()))), "--log", supernode_log],
            related_logs=[supernode_log]))
        watch.add(site, clients[-1].pid)
    first: float | None = None
    while server.proc.poll() is None:
        if first is None and metrics_started(metrics):
            first = time.perf_counter() - t0
        for client in clients:
            if client.proc.poll() is not None:
                raise RunFailed(client.report(
                    f"exited with code {client.proc.returncode} before the run ended"))
        deadline.check("waiting for the deployed run to finish", server)
        time.sleep(POLL_SECONDS)
    wall = time.perf_counter() - t0
    if server.proc.returncode != 0:
        raise RunFailed(server.report(f"failed with exit code {server.proc.returncode}"))
    codes = procs.stop(clients)
    watch.sample()
    for name in ("server", *cred.sites):
        watch.forget(name)
    lines = read_metrics(metrics, int(common[common.index("--rounds") + 1]), server)
    missing = untrained(lines, cred.sites)
    if missing:  # e.g. a site refused the run: its log says why, the server's says how
        first_out = next(c for c in clients if c.name == f"client-{next(iter(missing))}")
        raise RunFailed(server.report(f"ran without every site: {missing}") + "\n"
                        + first_out.report("did not train"))
    return RunResult(lines, wall if first is None else first, wall), codes


# --------------------------------------------------------------------------- figures


def _seconds(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def later_rounds(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rounds 2..R: round 1 also loads data and calibrates DP noise."""
    return [line for line in lines if line["round"] >= 2] or lines


def stage_rounds(lines: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Each stage timed under ``seconds`` in rounds 2..R -> the rounds it ran in, in the
    order the stages first appear ("round" first). Read from the file, not listed here."""
    found: dict[str, list[int]] = {}
    for line in later_rounds(lines):
        for key, value in (line.get("seconds") or {}).items():
            if _seconds(value) is not None:
                found.setdefault(key, []).append(int(line["round"]))
    return dict(sorted(found.items(), key=lambda kv: kv[0] != "round"))  # sort is stable


def stage_medians(lines: list[dict[str, Any]]) -> dict[str, float]:
    """Median of every stage over the rounds 2..R it ran in. A stage that runs in some
    rounds only (e.g. the last) keeps its real cost instead of a median of zeros;
    ``stage_rounds`` says which rounds those were."""
    ran = stage_rounds(lines)
    by_round = {int(line["round"]): line.get("seconds") or {} for line in lines}
    return {k: round(statistics.median(_seconds(by_round[r][k]) or 0.0 for r in rounds), 3)
            for k, rounds in ran.items()}


def round1(lines: list[dict[str, Any]]) -> dict[str, float]:
    """Round 1's own figures, kept apart: it alone pays for data loading, the schema's
    secure statistics and DP calibration, so it would skew the medians."""
    seconds = lines[0].get("seconds") or {}
    return {k: round(v, 3) for k, v in ((k, _seconds(x)) for k, x in seconds.items())
            if v is not None}


def unattributed(lines: list[dict[str, Any]]) -> float:
    """Median over rounds 2..R of the round's time not covered by any named stage: work
    the server does not time as a stage (today the local-evaluation trip, checkpoints),
    so a growing remainder is visible even before someone names it."""
    rest = []
    for line in later_rounds(lines):
        figures = {k: _seconds(v) for k, v in (line.get("seconds") or {}).items()}
        rest.append((figures.get("round") or 0.0)
                    - sum(v for k, v in figures.items() if k != "round" and v is not None))
    return round(statistics.median(rest), 3)


def ratios(dep: dict[str, float], sim: dict[str, float]) -> dict[str, float]:
    """Deployed / simulated for every stage both runs have, where the simulated one took
    measurable time (a 0 s stage has no meaningful ratio)."""
    return {k: round(dep[k] / sim[k], 2) for k in dep if k in sim and sim[k] > 0}


def min_trained(lines: list[dict[str, Any]]) -> int:
    """The fewest sites that trained in any round (all of them, in a healthy run)."""
    return min(sum(1 for s in (line.get("sites") or {}).values()
                   if isinstance(s, dict) and s.get("status") == "trained") for line in lines)


def table(result: dict[str, Any]) -> str:
    """The human-readable summary printed before the JSON line."""
    sim, dep, ratio = result["simulation"], result["deployment"], result["ratio"]
    rows = [f"deployment_round: {result['sites']} sites x ~{result['patients_per_site']} "
            f"patients, {result['rounds']} rounds, seed {result['seed']}; DP + secure "
            "aggregation + local evaluation; deployed over TLS with SuperNode "
            f"authentication: {result['deployment_tls']}",
            f"load average at start / end: {result['load_average']['start']} / "
            f"{result['load_average']['end']} on {result['cpus']} CPUs",
            "",
            f"median over rounds {result['median_of_rounds']} that each stage ran in (s)",
            f"{'stage':20s} {'simulation':>11s} {'deployment':>11s} {'ratio':>7s}"]
    ran, every = result["stage_rounds"], list(range(2, result["rounds"] + 1))
    for key in [*sim, *(k for k in dep if k not in sim)]:
        s = f"{sim[key]:11.2f}" if key in sim else f"{'-':>11s}"
        d = f"{dep[key]:11.2f}" if key in dep else f"{'-':>11s}"
        r = f"{ratio[key]:7.2f}" if key in ratio else f"{'-':>7s}"
        where = {run: ran[run].get(key, []) for run in ("simulation", "deployment")}
        note = ("" if all(w == every for w in where.values()) else
                f"  ran in rounds {where['simulation']} (sim), {where['deployment']} (dep)")
        rows.append(f"{key:20s} {s} {d} {r}{note}")
    rest = result["unattributed"]
    rows.append(f"{'(round - stages)':20s} {rest['simulation']:11.2f} "
                f"{rest['deployment']:11.2f} {'':>7s}")
    one = result["round1"]
    rows.append(f"{'round 1 (round)':20s} {one['simulation'].get('round', 0.0):11.2f} "
                f"{one['deployment'].get('round', 0.0):11.2f}")
    first = result["time_to_first_round"]
    rows.append(f"{'time to first round':20s} {first['simulation']:11.2f} "
                f"{first['deployment']:11.2f} {first['ratio']:7.2f}")
    rows += ["", "peak memory (VmHWM, MiB): sum over the process tree / largest process "
             "/ processes at the peak sample",
             f"{'tree':20s} {'sum':>9s} {'largest':>9s} {'procs':>6s}"]
    mem = result["memory_mib"]
    for name, peak in [*mem["sites"].items(), ("server (deployed)", mem["server"]),
                       ("simulation (all)", mem["simulation"])]:
        rows.append(f"{name:20s} {peak['peak_sum_mib']:9.1f} {peak['peak_process_mib']:9.1f} "
                    f"{peak['processes_at_peak']:6d}")
    rows.append(f"{'site max':20s} {mem['site_max']['peak_sum_mib']:9.1f} "
                f"{mem['site_max']['peak_process_mib']:9.1f}")
    return "\n".join(rows)


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def workdir(keep: Path | None) -> Iterator[Path]:
    """A fresh temporary folder, or ``--workdir`` (kept, for reading the logs later)."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="deployment-round-") as tmp:
            yield Path(tmp)
        return
    keep.mkdir(parents=True, exist_ok=True)
    if any(keep.iterdir()):
        raise RunFailed(f"--workdir {keep} is not empty")
    yield keep.resolve()


def measure(args: argparse.Namespace, root: Path, procs: Processes,
            deadline: Deadline) -> dict[str, Any]:
    sites = tuple(f"site-{i}" for i in range(1, args.sites + 1))
    load_start = [round(x, 2) for x in os.getloadavg()]
    data = root / "fed"
    procs.run("synth", ["data", "synth", "--out", data, "--sites", str(args.sites),
                        "--patients-per-site", str(args.patients), "--holdout", str(HOLDOUT),
                        "--seed", str(args.seed)], deadline)
    # Identical for both runs; the defaults (DP, secure aggregation, local evaluation
    # on) are spelled out so a changed default cannot make the comparison unequal.
    common = ["--rounds", str(args.rounds), "--seed", str(args.seed),
              "--set", "privacy.enabled=true", "--set", "secagg.enabled=true",
              "--set", "federation.local_eval=true"]
    with MemoryWatch() as watch:
        print("deployment_round: simulating ...", file=sys.stderr, flush=True)
        sim = simulate(procs, watch, data, root / "sim", common, sites, deadline)
        cred = make_credentials(procs, root, sites, deadline)
        print("deployment_round: deploying ...", file=sys.stderr, flush=True)
        dep, client_codes = deploy(procs, watch, data, root / "deployed", common, cred,
                                   deadline)
    deployment = json.loads((root / "deployed" / "deployment.json").read_text())
    sim_s, dep_s = stage_medians(sim.metrics), stage_medians(dep.metrics)
    site_peaks = {site: watch.peaks[site].as_dict() for site in sites}
    return {
        "sites": args.sites, "patients_per_site": args.patients, "rounds": args.rounds,
        "seed": args.seed, "median_of_rounds": f"2..{args.rounds}",
        "deployment_tls": bool(deployment.get("tls")) and bool(deployment.get("supernode_auth")),
        "simulation": sim_s, "deployment": dep_s, "ratio": ratios(dep_s, sim_s),
        "stage_rounds": {"simulation": stage_rounds(sim.metrics),
                         "deployment": stage_rounds(dep.metrics)},
        "round1": {"simulation": round1(sim.metrics), "deployment": round1(dep.metrics)},
        "unattributed": {"simulation": unattributed(sim.metrics),
                         "deployment": unattributed(dep.metrics)},
        "time_to_first_round": {
            "simulation": round(sim.first_round_seconds, 2),
            "deployment": round(dep.first_round_seconds, 2),
            "ratio": round(dep.first_round_seconds / sim.first_round_seconds, 2)},
        "memory_mib": {
            "sites": site_peaks,
            "site_max": {k: max(float(p[k]) for p in site_peaks.values())
                         for k in ("peak_sum_mib", "peak_process_mib")},
            "server": watch.peaks["server"].as_dict(),
            "simulation": watch.peaks["simulation"].as_dict()},
        "min_sites_trained": {"simulation": min_trained(sim.metrics),
                              "deployment": min_trained(dep.metrics)},
        "clients_stopped_cleanly": all(code == 0 for code in client_codes.values()),
        "wall_seconds": {"simulation": round(sim.wall_seconds, 1),
                         "deployment": round(dep.wall_seconds, 1)},
        "cpus": os.cpu_count(),
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3, help="sites (default 3)")
    parser.add_argument("--patients", "--patients-per-site", dest="patients", type=int,
                        default=200, help="mean patients per site (default 200)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds; medians are over rounds 2..R (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds for the whole benchmark (default 3600)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep data, runs and logs here (an empty or new folder)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is warm-up)")
    if args.sites < 1:
        parser.error("--sites must be at least 1")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    become_subreaper()
    deadline = Deadline.after(args.timeout)
    try:
        with workdir(args.workdir) as root:
            logs = root / "logs"
            logs.mkdir()
            procs = Processes(logs)
            try:
                result = measure(args, root, procs, deadline)
            finally:
                procs.stop_all()
    except RunFailed as exc:
        print(f"deployment_round: FAILED: {exc}", file=sys.stderr)
        # the headline again last: callers that keep only the tail (run_all) see it
        print(f"deployment_round: FAILED: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"deployment_round: stopped by {exc}; every process it started was stopped",
              file=sys.stderr)
        return 128 + exc.signum
    print(table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

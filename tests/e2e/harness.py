"""Real-process harness for the deployment tests: start, watch, stop, and prove it stopped.

Every process a test starts carries a unique marker in its environment, which every
descendant inherits (Flower's helpers included, even those that start new sessions),
so "nothing is left running" is checked by scanning /proc, not by trusting pids.
Network namespaces are created and always deleted here too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import QUIET

MARKER = "MMFED_E2E_MARKER"


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout:.0f}s; log:\n"
                                 + self.text()[-3000:]) from None


@dataclass
class Harness:
    root: Path
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: list[Started] = field(default_factory=list)

    def mmfed(self, name: str, *args: str | Path, netns: str | None = None) -> Started:
        cmd = [sys.executable, "-m", "mmfed.cli", *map(str, args)]
        if netns is not None:
            cmd = [ip_command(), "netns", "exec", netns, *cmd]
        return self.command(name, cmd)

    def command(self, name: str, cmd: list[str], env: dict[str, str] | None = None,
                cwd: Path | None = None) -> Started:
        """Any program, marked like the mmfed ones (e.g. a SuperLink a test runs itself)."""
        log = self.root / f"{name}.log"
        env = {**os.environ, **QUIET, **(env or {}), MARKER: self.marker,
               "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=cwd)
        started = Started(name, proc, log)
        self.started.append(started)
        return started

    def marked(self) -> list[int]:
        """Every living process that carries this harness's marker."""
        needle = f"{MARKER}={self.marker}".encode()
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as fh:
                    if needle not in fh.read():
                        continue
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    state = fh.read().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if state != b"Z":
                found.append(int(entry.name))
        return found

    def marked_running(self, program: str) -> list[int]:
        """Marked processes whose command line names ``program`` (e.g. flower-superlink)."""
        found = []
        for pid in self.marked():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if program.encode() in fh.read():
                        found.append(pid)
            except OSError:
                continue
        return found

    def stop(self, started: Started, timeout: float = 30.0) -> int:
        """SIGTERM, as `docker stop` or Ctrl-C would: the command must end by itself."""
        if started.proc.poll() is None:
            started.proc.send_signal(signal.SIGTERM)
        return started.wait(timeout)

    def cleanup(self) -> list[int]:
        """Last resort after a failure: kill whatever is left; returns what had to be."""
        for s in self.started:
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.marked():
            time.sleep(0.2)
        leftover = self.marked()
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for s in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.proc.wait(timeout=5)
        return leftover


def small_kit(root: Path, sites: tuple[str, ...], seed: int, task: str = "binary") -> Path:
    """A small TLS federation kit in ``root``: 40-patient sites, their keys, a CA."""
    from mmfed.cli import main
    from mmfed.data.synth import SynthSettings, synthesize

    synthesize(root / "fed", SynthSettings(sites=len(sites), patients_per_site=40,
                                           holdout=40, genes=20, seed=seed, image_size=32,
                                           task=task))
    for site in sites:
        assert main(["keys", "new", "--site", site, "--out", str(root / "keys")]) == 0
    assert main(["certs", "init", "--out", str(root / "certs"), "--host", "127.0.0.1"]) == 0
    return root


def wait_for_text(started: Started, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in started.text():
            return
        if started.proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{started.name}: no {needle!r} within {timeout:.0f}s; log:\n"
                         + started.text()[-3000:])


def wait_until(condition: Callable[[], bool], timeout: float, started: Started) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if started.proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{started.name}: condition not met within {timeout:.0f}s; log:\n"
                         + started.text()[-3000:])


def ip_command() -> str:
    found = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if Path(p).exists()), None)
    if found is None:
        raise RuntimeError("the netns test needs iproute2's `ip` (apt-get install iproute2)")
    return found


def ip(*args: str, netns: str | None = None) -> None:
    cmd = [ip_command(), *(["netns", "exec", netns, ip_command()] if netns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")


def free_subnet() -> str:
    """A /24 from 198.18.0.0/15 (RFC 2544, reserved for network tests) that no route uses.

    Private ranges such as 10/8 are often a cluster's own network; a bridge there could
    divert real traffic while the test runs.
    """
    routes = subprocess.run([ip_command(), "-4", "route", "show", "table", "all"],
                            capture_output=True, text=True, timeout=30).stdout
    for _ in range(50):
        rand = uuid.uuid4().int
        prefix = f"198.{18 + rand % 2}.{(rand >> 1) % 256}"
        if f"{prefix}." not in routes and "198.18.0.0/15" not in routes:
            return prefix
    raise RuntimeError("no free /24 in 198.18.0.0/15 for the test network")


@dataclass(frozen=True)
class Hosts:
    server_ip: str
    namespaces: tuple[str, ...]


@contextlib.contextmanager
def separate_hosts(count: int) -> Iterator[Hosts]:
    """``count`` network namespaces on a bridge with the server's address in the root one.

    Names and the /24 are random per call so parallel runs cannot collide; everything
    is deleted on the way out, whatever happened.
    """
    if os.geteuid() != 0:
        raise RuntimeError("the netns test must run as root (it creates network namespaces)")
    tag = uuid.uuid4().hex[:5]
    subnet = free_subnet()
    bridge = f"mf{tag}br"
    namespaces = tuple(f"mmfed-{tag}-{i}" for i in range(1, count + 1))
    made_bridge = False
    made_ns: list[str] = []
    try:
        ip("link", "add", bridge, "type", "bridge")
        made_bridge = True
        ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for i, ns in enumerate(namespaces, start=1):
            ip("netns", "add", ns)
            made_ns.append(ns)
            host_end, ns_end = f"mf{tag}h{i}", f"mf{tag}n{i}"
            ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            ip("link", "set", ns_end, "netns", ns)
            ip("link", "set", host_end, "master", bridge)
            ip("link", "set", host_end, "up")
            ip("addr", "add", f"{subnet}.{10 + i}/24", "dev", ns_end, netns=ns)
            ip("link", "set", ns_end, "up", netns=ns)
            ip("link", "set", "lo", "up", netns=ns)  # each SuperNode's runtime API is loopback
        yield Hosts(f"{subnet}.1", namespaces)
    finally:
        for ns in made_ns:  # deleting a namespace deletes its veth end and so the pair
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                ip("netns", "del", ns)
        if made_bridge:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                ip("link", "del", bridge)

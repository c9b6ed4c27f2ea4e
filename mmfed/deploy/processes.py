"""Child processes that always die with their parent's decision, never by accident.

Flower's daemons start helpers in new sessions (``flower-superexec``, then one
``flwr-serverapp`` / ``flwr-clientapp`` per task) that only notice their parent is gone
by polling, seconds later. Killing a process group therefore does not reach them.
The supervisor makes this process a *child subreaper* (Linux ``prctl``), so every
descendant, however detached, stays in our process tree, and stopping means: every
descendant gets SIGTERM, the stragglers SIGKILL after a grace period, and all are reaped.
SIGINT and SIGTERM become a ``StopRequested`` exception in the main thread so the same
path runs for Ctrl-C, ``docker stop`` and errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from mmfed.errors import MmfedError, UsageError
from mmfed.ml.process import quiet_env

log = logging.getLogger("mmfed")
PR_SET_CHILD_SUBREAPER = 36
# Children's output is read line by line as it comes, for the logs and error messages.
UNBUFFERED_ENV = {"PYTHONUNBUFFERED": "1"}
# SuperExec checks for new work every second by default; each secure-aggregation stage
# is one message per site, so that second was paid up to four times a round.
LATENCY_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


class StopRequested(MmfedError):
    """SIGINT/SIGTERM: stop everything, then exit with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise StopRequested(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise ``StopRequested`` in the main thread."""
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def flower_executable(name: str) -> str:
    """Flower's console scripts next to this interpreter first (a venv need not be on PATH)."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise MmfedError(f"`{name}` not found next to {sys.executable} or on PATH; is flwr "
                         "installed in this environment?")
    return found


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Flower starts its helpers by name from PATH: put this interpreter's bin first."""
    env = {**quiet_env({**LATENCY_ENV, **os.environ}), **UNBUFFERED_ENV, **(extra or {})}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def parse_host_port(text: str, what: str = "--server") -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``; anything else is a one-line usage error."""
    host, sep, port_text = text.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"{what} {text!r}: expected HOST:PORT, e.g. 10.0.0.5:9092 or "
                         "[::1]:9092")
    if ":" in host and not bracketed:
        raise UsageError(f"{what} {text!r}: write IPv6 addresses in brackets, e.g. "
                         "[::1]:9092")
    if any(c.isspace() or c in "/@?#" for c in host):
        raise UsageError(f"{what} {text!r}: not a host name or address")
    return host, int(port_text)


def join_host_port(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def check_port_free(host: str, port: int, what: str) -> None:
    """Fail before starting anything rather than leave a half-started federation."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == 98:  # EADDRINUSE
                raise MmfedError(f"{what} {join_host_port(host, port)} is already in use "
                                 "(another server running? choose another port)") from None
            raise MmfedError(f"cannot listen on {join_host_port(host, port)} for {what}: "
                             f"{exc.strerror}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float,
                  alive: Callable[[], bool] = lambda: True) -> bool:
    """True once something accepts connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.1)
    return False


def proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process, from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces
        table[int(entry.name)] = (int(rest[1]), rest[0])
    return table


def descendants(root: int | None = None,
                table: dict[int, tuple[int, str]] | None = None) -> list[int]:
    """Living (non-zombie) descendants of ``root`` (default: this process), from one
    ``proc_table`` snapshot (taken now unless given)."""
    root = os.getpid() if root is None else root
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    queue = deque(children.get(root, []))
    while queue:
        pid = queue.popleft()
        if table[pid][1] != "Z":
            found.append(pid)
        queue.extend(children.get(pid, []))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def _become_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


@dataclass
class Child:
    """One started program, its log and a tail of its output for error messages."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path | None
    critical: bool
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=400))
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None


class Supervisor:
    """Starts children, notices when one dies, and stops every descendant on exit."""

    def __init__(self, grace: float = 10.0) -> None:
        self.grace = grace
        self.children: list[Child] = []
        self.subreaper = _become_subreaper()
        self._lock = threading.Lock()
        self._last_reap = 0.0
        self._hurry = False

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def spawn(self, name: str, argv: Sequence[str], *, log_path: Path | None = None,
              env: dict[str, str] | None = None, critical: bool = True,
              on_line: Callable[[str], None] | None = None,
              cwd: Path | None = None) -> Child:
        """Start ``argv`` in its own session, its output to ``log_path`` (and ``on_line``)."""
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env or child_env(),
                                start_new_session=True, cwd=cwd)
        child = Child(name, proc, log_path, critical)
        sink: IO[str] | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            sink = open(log_path, "a", encoding="utf-8")

        def pump() -> None:
            assert proc.stdout is not None
            try:
                for raw in iter(proc.stdout.readline, b""):
                    line = raw.decode(errors="replace").rstrip("\n")
                    child.tail.append(line)
                    if sink is not None:
                        sink.write(line + "\n")
                        sink.flush()
                    if on_line is not None:
                        on_line(line)
            finally:
                if sink is not None:
                    sink.close()

        child.reader = threading.Thread(target=pump, name=f"log-{name}", daemon=True)
        child.reader.start()
        with self._lock:
            self.children.append(child)
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return child

    def reap_orphans(self, every: float = 5.0) -> None:
        """Collect helpers that outlived their parent and then exited (we are their reaper).

        Scanning /proc costs a few milliseconds, so it runs at most every ``every`` seconds.
        """
        now = time.monotonic()
        if now - self._last_reap < every:
            return
        self._last_reap = now
        me = os.getpid()
        managed = {c.pid for c in self.children}
        for pid, (ppid, state) in proc_table().items():
            if ppid == me and state == "Z" and pid not in managed:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)

    def check(self) -> None:
        """Raise if a critical child ended on its own: the federation cannot go on."""
        self.reap_orphans()
        for child in self.children:
            if child.critical and not child.running():
                raise ChildDied(child)

    def stop(self, child: Child, timeout: float | None = None) -> int | None:
        """Stop one child and whatever it started; its exit code (None if it had to be killed)."""
        tree = [child.pid, *descendants(child.pid)] if child.running() else []
        self._terminate(tree, self.grace if timeout is None else timeout)
        code = child.proc.poll()
        if child.reader is not None:
            child.reader.join(timeout=2.0)
        return code

    def stop_all(self) -> None:
        """SIGTERM to every descendant, SIGKILL after the grace period, reap them all.

        A second Ctrl-C (or SIGTERM) while this runs skips the grace period instead of
        interrupting the cleanup half-way.
        """
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._hurry_up)
        try:
            self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _hurry_up(self, signum: int, frame: FrameType | None) -> None:
        self._hurry = True

    def _stop_all(self) -> None:
        tree = descendants()
        for child in self.children:
            if child.running() and child.pid not in tree:
                tree.append(child.pid)
        self._terminate(tree, self.grace)
        for child in self.children:
            if child.reader is not None:
                child.reader.join(timeout=2.0)
        # anything started meanwhile by a dying parent
        late = descendants()
        if late:
            self._terminate(late, 2.0)

    def _terminate(self, pids: list[int], grace: float) -> None:
        popen = {c.pid: c.proc for c in self.children}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self._hurry:
            self._reap(pids, popen)
            if not any(_alive(p) for p in pids):
                break
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                log.debug("pid %d ignored SIGTERM for %.0fs; killing it", pid, grace)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            self._reap(pids, popen)
            if not any(_alive(p) for p in pids):
                break
            time.sleep(0.05)

    @staticmethod
    def _reap(pids: list[int], popen: dict[int, subprocess.Popen[bytes]]) -> None:
        """Collect exit statuses so no zombie is left (orphans are ours as subreaper)."""
        for pid in pids:
            if pid in popen:
                popen[pid].poll()
                continue
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


class ChildDied(MmfedError):
    """A process the command depends on ended unexpectedly."""

    def __init__(self, child: Child, reason: str | None = None) -> None:
        self.child = child
        code = child.proc.poll()
        where = f"; see {child.log_path}" if child.log_path else ""
        last = reason or last_meaningful(child.tail)
        super().__init__(f"{child.name} (pid {child.pid}) exited unexpectedly with code {code}"
                         + (f": {last}" if last else "") + where)


def last_meaningful(lines: Sequence[str]) -> str:
    """The last log line worth showing: an error if there is one.

    Flower's CLI prints errors in rich panels; a panel's top border ("╭─ Error ──╮") is no
    message, so each panel is folded into one line of its title and its text first."""
    cleaned = _fold_panels([strip_ansi(line).strip() for line in lines if line.strip()])
    for line in reversed(cleaned):
        if "ERROR" in line or "Error" in line or "error:" in line:
            return line[:300]
    return cleaned[-1][:300] if cleaned else ""


_BORDER = "─━═╭╮╰╯┌┐└┘│┃║ "


def _fold_panels(lines: list[str]) -> list[str]:
    out: list[str] = []
    title: str | None = None
    body: list[str] = []
    for line in lines:
        if line.startswith(("╭", "┌")):
            title, body = line.strip(_BORDER), []
        elif title is not None and line.startswith(("│", "┃", "║")):
            text = line.strip(_BORDER)
            if text:
                body.append(text)
        elif title is not None and line.startswith(("╰", "└")):
            out.append(_panel_line(title, body))
            title = None
        else:
            if title is not None:  # a panel cut off by the tail: keep what it had
                out.append(_panel_line(title, body))
                title = None
            out.append(line)
    if title is not None:
        out.append(_panel_line(title, body))
    return [line for line in out if line]


def _panel_line(title: str, body: list[str]) -> str:
    text = " ".join(body)
    return f"{title}: {text}" if title and text else title or text


def strip_ansi(text: str) -> str:
    out, skip = [], False
    for ch in text:
        if ch == "\x1b":
            skip = True
            continue
        if skip:
            if ch.isalpha():
                skip = False
            continue
        out.append(ch)
    return "".join(out)

"""The site's audit trail: an append-only, hash-chained log of what the site did.

A hospital's privacy officer has to be able to show, after the fact, which requests
the site served or refused and which releases it paid for, and to notice when that
record was changed. Each line of ``audit.jsonl`` (in the site's privacy folder, next
to the ledger) is one canonical JSON object carrying the hash of the line before it,
so editing, reordering or removing a line breaks the chain at a point ``verify`` can
name. A chain cannot see its own end being cut off, so ``audit.head`` records the
last sequence number and hash after every append: removing the last entries leaves
the head pointing past the end of the log.

This is tamper-*evident* against edits by hand, tools and accidents, not against an
attacker who can rewrite the whole folder consistently (the chain is not keyed): the
folder is kept private to the site's account for that.

Several processes (simulation workers of one machine) may append to one folder, so
every append holds an exclusive lock on ``.audit.lock`` while it reads the head,
appends one line through an ``O_APPEND`` descriptor, fsyncs it and rewrites the head.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mmfed.errors import DataError
from mmfed.files import PRIVATE_DIR, PRIVATE_FILE, atomic_write_bytes, private_dir

LOG_NAME = "audit.jsonl"
HEAD_NAME = "audit.head"
LOCK_NAME = ".audit.lock"
GENESIS = "0" * 64
# Set by the log itself; a caller's field of the same name would make the entry lie.
RESERVED = frozenset({"seq", "time", "kind", "prev", "hash"})
# What a release entry copies from the ledger entry it cost (the ledger's own ``time``
# is kept as ``ledger_time``: ``time`` is the audit entry's).
RELEASE_FIELDS = ("site", "run_id", "round", "sigma", "sample_rate", "steps", "epsilon",
                  "delta", "accountant", "fingerprint")
# ... and, for a distributed-DP release, what its accounting rests on
DISTRIBUTED_FIELDS = ("mechanism", "rounds", "mu_total", "mu_share", "l1", "l2",
                      "survivors", "colluders")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# How much of the log's end an append reads at first to find the last entry; doubled
# until one complete line is in it (entries are a few hundred bytes).
_TAIL_CHUNK = 8192

JsonValue = str | int | float | bool | None | list[Any] | dict[str, Any]


def canonical(obj: Mapping[str, Any]) -> str:
    """The one serialization that is hashed and written: sorted keys, no whitespace,
    ASCII only. Verification re-serializes every line and compares, so an edit that
    parses to the same value (spacing, an escape's letter case, ``1.0`` as ``1.00``)
    is still seen."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 over the previous entry's hash and this entry without its own hash."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256((str(entry.get("prev", "")) + canonical(body)).encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _position(raw: bytes) -> tuple[int, str] | None:
    """(seq, hash) of a serialized entry or head, or None if it is not one: an append
    must never stop on a damaged line; verification reports it instead."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    seq, digest = obj.get("seq"), obj.get("hash")
    if (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0
            or not isinstance(digest, str) or not _HEX64.fullmatch(digest)):
        return None
    return seq, digest


def _last_entry(fd: int) -> tuple[tuple[int, str] | None, bool]:
    """The last readable entry's (seq, hash) and whether the log ends mid-line (a crash
    during a write), read from the end so an append does not cost the whole log."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None, False
    ends_mid_line = os.pread(fd, 1, size - 1) != b"\n"
    chunk = _TAIL_CHUNK
    while True:
        start = max(0, size - chunk)
        tail = os.pread(fd, size - start, start)
        lines = tail.split(b"\n")
        if start > 0:
            lines = lines[1:]  # may begin mid-line
        if ends_mid_line:
            lines = lines[:-1]
        for line in reversed(lines):
            if line and (found := _position(line)) is not None:
                return found, ends_mid_line
        if start == 0:
            return None, ends_mid_line
        chunk *= 2


class AuditLog:
    """The audit trail of one site privacy folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOG_NAME
        self.head_path = self.folder / HEAD_NAME

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        private_dir(self.folder)
        fd = os.open(self.folder / LOCK_NAME, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _head_file(self) -> tuple[int, str] | None:
        try:
            return _position(self.head_path.read_bytes())
        except FileNotFoundError:
            return None

    def append(self, kind: str, **fields: JsonValue) -> dict[str, Any]:
        """Append one entry durably and return it (with ``seq``, ``time``, ``prev``,
        ``hash``).

        The next position is the later of the log's last entry and the head file:
        after a crash between the line and the head the log is ahead, and after the
        last lines were cut off the head is, so the new entry continues from where
        the trail really was and the gap stays visible instead of being papered over.
        """
        if not kind:
            raise ValueError("an audit entry needs a kind")
        clash = RESERVED.intersection(fields)
        if clash:
            raise ValueError(f"audit fields {sorted(clash)} are set by the log itself")
        with self._locked():
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
            try:
                in_log, mid_line = _last_entry(fd)
                candidates = [p for p in (in_log, self._head_file()) if p is not None]
                seq, prev = -1, GENESIS
                if candidates:
                    # On a tie the log's own hash wins: it is what the chain links to.
                    seq, prev = max(candidates, key=lambda p: p[0])
                entry: dict[str, Any] = {**fields, "seq": seq + 1, "time": _now(),
                                         "kind": kind, "prev": prev}
                try:
                    entry["hash"] = entry_hash(entry)
                    line = canonical(entry)
                except (TypeError, ValueError) as exc:
                    raise TypeError(f"audit entry {kind!r}: fields must be JSON values "
                                    f"({exc})") from None
                data = (b"\n" if mid_line else b"") + line.encode() + b"\n"
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            head = {"seq": entry["seq"], "hash": entry["hash"], "entries": entry["seq"] + 1}
            atomic_write_bytes(self.head_path, (canonical(head) + "\n").encode(), private=True)
        return entry

    def served(self, kind: str, run_id: str, round_num: int, app_hash: str,
               site: str) -> dict[str, Any]:
        """A request the site answered; ``kind`` is the request's (train, evaluate),
        stored as ``request`` because ``kind`` names the audit entry's own kind."""
        return self.append("served", request=kind, run_id=run_id, round=round_num,
                           app_hash=app_hash, site=site)

    def refused(self, kind: str, run_id: str, round_num: int, app_hash: str, reason: str,
                site: str) -> dict[str, Any]:
        """A request the site declined, with the one-line reason it gave."""
        return self.append("refused", request=kind, run_id=run_id, round=round_num,
                           app_hash=app_hash, reason=reason, site=site)

    def release(self, ledger_entry: Mapping[str, Any]) -> dict[str, Any]:
        """The privacy ledger entry a release cost, copied so that the trail alone shows
        every release with its (σ, q, steps) and the ε after it."""
        fields: dict[str, JsonValue] = {k: ledger_entry[k] for k in
                                        (*RELEASE_FIELDS, *DISTRIBUTED_FIELDS)
                                        if k in ledger_entry}
        if "time" in ledger_entry:
            fields["ledger_time"] = ledger_entry["time"]
        return self.append("release", **fields)


@dataclass
class AuditReport:
    """What ``verify`` found: a summary for the operator and every problem, named."""

    folder: Path
    entries: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    first_time: str | None = None
    last_time: str | None = None
    head_seq: int | None = None
    head_hash: str | None = None
    problems: list[str] = field(default_factory=list)
    # Not evidence of tampering, but worth a line (a crash between an append and its
    # head update).
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def path(self) -> Path:
        return self.folder / LOG_NAME


def _span(first: int, last: int) -> str:
    return f"entry {first}" if first == last else f"entries {first}–{last}"


def _check_mode(path: Path, expected: int, what: str, problems: list[str]) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        problems.append(f"{what} is a symbolic link (replaced?)")
        return
    mode = st.st_mode & 0o777
    if mode & 0o077:
        problems.append(f"{what} has mode {mode:04o}: group or others can access it "
                        f"(expected {expected:04o})")


def _check_lines(raw: bytes, report: AuditReport) -> dict[int, str]:
    """Check every line and the links between neighbours; returns seq → stored hash of
    the entries that parsed, for the gap and head checks."""
    problems = report.problems
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    elif raw:
        problems.append(f"line {len(lines)}: incomplete (no end of line: a crash while "
                        "appending, or edited)")
    report.entries = len(lines)
    hashes: dict[int, str] = {}
    first_line: dict[int, int] = {}
    kinds: Counter[str] = Counter()
    before: tuple[int, str] | None = None  # the previous line's (seq, hash), if readable
    highest = -1
    for number, line in enumerate(lines, 1):
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            problems.append(f"line {number}: not a JSON object (edited?)")
            before = None
            continue
        seq, digest, prev = obj.get("seq"), obj.get("hash"), obj.get("prev")
        kind, when = obj.get("kind"), obj.get("time")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            problems.append(f"line {number}: no valid seq (edited?)")
            before = None
            continue
        where = f"line {number} (seq {seq})"
        bad = [name for name, value in (("hash", digest), ("prev", prev))
               if not isinstance(value, str) or not _HEX64.fullmatch(value)]
        bad += [name for name, value in (("kind", kind), ("time", when))
                if not isinstance(value, str) or not value]
        if bad:
            problems.append(f"{where}: missing or malformed {', '.join(bad)} (edited?)")
        elif entry_hash(obj) != digest:
            problems.append(f"{where}: hash mismatch (entry edited)")
        elif canonical(obj).encode() != line:
            problems.append(f"{where}: not in canonical form (edited)")
        if seq in first_line:
            problems.append(f"{where}: seq {seq} already appears on line "
                            f"{first_line[seq]} (duplicated?)")
        elif seq < highest:
            problems.append(f"{where}: out of order after seq {highest} (reordered?)")
        if seq == 0 and prev != GENESIS:
            problems.append(f"{where}: the first entry must have prev = 64 zeros")
        elif before is not None and seq == before[0] + 1 and prev != before[1]:
            problems.append(f"{where}: prev does not match the hash of seq {before[0]} "
                            f"on line {number - 1} (entry replaced or inserted?)")
        first_line.setdefault(seq, number)
        if isinstance(digest, str):
            hashes.setdefault(seq, digest)
        highest = max(highest, seq)
        if isinstance(kind, str):
            kinds[kind] += 1
        if isinstance(when, str):
            report.first_time = report.first_time or when
            report.last_time = when
        before = (seq, digest) if isinstance(digest, str) else None
    report.counts = dict(sorted(kinds.items()))
    # From the sorted seqs, not range(highest): an edited seq of 10**12 must not hang.
    expected = 0
    for seq in sorted(first_line):
        if seq > expected:
            problems.append(f"{_span(expected, seq - 1)} missing (deleted?)")
        expected = seq + 1
    return hashes


def _check_head(report: AuditReport, hashes: dict[int, str], log_exists: bool) -> None:
    problems = report.problems
    head_path = report.folder / HEAD_NAME
    last = max(hashes, default=-1)
    try:
        raw = head_path.read_bytes()
    except FileNotFoundError:
        if report.entries:
            problems.append(f"{HEAD_NAME} missing (deleted? the end of the log cannot be "
                            "checked)")
        return
    position = _position(raw)
    if (position is None or raw != (canonical(json.loads(raw)) + "\n").encode()
            or json.loads(raw).get("entries") != position[0] + 1):
        problems.append(f"{HEAD_NAME}: not a valid head record (edited?)")
        return
    seq, digest = position
    report.head_seq, report.head_hash = seq, digest
    if not log_exists:
        problems.append(f"{LOG_NAME} missing but {HEAD_NAME} records {seq + 1} entries "
                        "(log deleted?)")
    elif seq > last:
        problems.append(f"{_span(last + 1, seq)} missing at the end: {HEAD_NAME} records "
                        f"{seq + 1} entries, the log ends at seq {last} (truncated?)")
    elif seq not in hashes:
        problems.append(f"{HEAD_NAME} names seq {seq}, which the log lacks")
    elif hashes[seq] != digest:
        problems.append(f"{HEAD_NAME} hash does not match entry {seq} (head or entry "
                        "edited?)")
    elif seq < last:
        if seq == last - 1:
            report.warnings.append(f"{HEAD_NAME} is one entry behind the log (a crash "
                                   "between an append and its head update?)")
        else:
            problems.append(f"{HEAD_NAME} records seq {seq} but the log goes on to seq "
                            f"{last} (an older head put back?)")


def verify(folder: Path) -> AuditReport:
    """Check a folder's audit trail; every problem is a line in ``problems``.

    Raises ``DataError`` only when there is nothing to check (no folder, or neither a
    log nor a head file): a damaged trail is a report, never an exception.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: privacy folder not found")
    log, head = folder / LOG_NAME, folder / HEAD_NAME
    if not log.exists() and not head.exists():
        raise DataError(f"{folder}: no audit log ({LOG_NAME}) in this folder")
    report = AuditReport(folder)
    _check_mode(folder, PRIVATE_DIR, f"folder {folder}", report.problems)
    _check_mode(log, PRIVATE_FILE, LOG_NAME, report.problems)
    _check_mode(head, PRIVATE_FILE, HEAD_NAME, report.problems)
    try:
        raw = log.read_bytes() if log.exists() else b""
        hashes = _check_lines(raw, report)
        _check_head(report, hashes, log.exists())
    except OSError as exc:
        raise DataError(f"{folder}: cannot read the audit trail: {exc.strerror}") from None
    return report


def summary(report: AuditReport) -> str:
    """One line for ``mmfed privacy show``: where the trail is and whether it holds."""
    if report.ok:
        state = "intact"
    else:
        n = len(report.problems)
        state = (f"{n} problem{'s' if n != 1 else ''}: run mmfed audit verify "
                 f"{report.folder}")
    entries = f"{report.entries} entr{'y' if report.entries == 1 else 'ies'}"
    return f"audit log: {report.path} ({entries}, {state})"


def verify_command(folder: Path) -> int:
    """``mmfed audit verify``: the summary and "intact" (0), or one line per problem on
    stderr (1)."""
    report = verify(folder)
    for warning in report.warnings:
        print(f"warning: {report.path}: {warning}", file=sys.stderr)
    if not report.ok:
        for problem in report.problems:
            print(f"{report.path}: {problem}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{kind} {n}" for kind, n in report.counts.items()) or "none"
    head = f"{report.head_hash[:16]}…" if report.head_hash else "none"
    print(f"{report.path}: {report.entries} entries ({counts})")
    print(f"first {report.first_time or '-'}, last {report.last_time or '-'}")
    print(f"head seq {report.head_seq}, hash {head}")
    print("intact")
    return 0

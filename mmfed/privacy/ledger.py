"""The site's privacy ledger: every release of a trained update, durably recorded.

One JSON-lines file per dataset fingerprint, outside any run directory, rewritten
atomically (temporary file, fsync, rename) under an exclusive lock. An entry is
written before the update leaves the site, so a crash can only over-count spending,
never under-count it. The ledger stores the (σ, q, steps) events themselves; ε is
recomputed from them, so restarts compose exactly. Each entry is also appended to the
folder's tamper-evident audit trail (``mmfed.privacy.audit``), which a ledger rewritten
in place cannot be.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfed.errors import DataError
from mmfed.files import PRIVATE_FILE, atomic_write_bytes, private_dir
from mmfed.privacy.accounting import Event, SkellamEvent, epsilon_mixed, epsilon_of
from mmfed.privacy.audit import AuditLog

DEFAULT_LEDGER_DIR = Path("~/.mmfed/privacy-ledger")
# Where the ledger lives when no config names one: lets a container image or a test
# harness move every site's ledger at once without editing each config.
LEDGER_ENV = "MMFED_LEDGER_DIR"
FORMAT = "mmfed-privacy-ledger/1"
SKELLAM = "skellam"  # a distributed-DP release (mmfed.privacy.distributed)


def site_fingerprint(folder: Path | str) -> str:
    """SHA-256 over every data file of the site (names and bytes), so the same data under
    another path or in another run has the same ledger, and changed data a new one."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def ledger_dir(configured: str) -> Path:
    """The configured folder, else ``$MMFED_LEDGER_DIR``, else ``~/.mmfed/privacy-ledger``."""
    chosen = configured or os.environ.get(LEDGER_ENV, "") or str(DEFAULT_LEDGER_DIR)
    return Path(os.path.expanduser(chosen))


@dataclass(frozen=True)
class Entry:
    run_id: str
    round: int
    sigma: float
    sample_rate: float
    steps: int
    epsilon: float
    delta: float
    accountant: str
    time: float
    site: str
    mechanism: str = "gaussian"
    # distributed DP: (rounds, aggregate μ, L1, L2 in code units); None for DP-SGD
    skellam: SkellamEvent | None = None

    @property
    def event(self) -> Event:
        return (self.sigma, self.sample_rate, self.steps)


def history_epsilon(records: list[dict[str, Any]], delta: float, accountant: str) -> float:
    """ε of a ledger's records, recomputed from their events alone.

    DP-SGD releases are (σ, q, steps) events for the chosen accountant; a history with
    distributed-DP releases composes everything in Rényi DP (the Skellam bound has no
    PRV form), so such a ledger refuses any other accountant.
    """
    gaussian = [(float(r["sigma"]), float(r["sample_rate"]), int(r["steps"]))
                for r in records if r.get("mechanism", "gaussian") != SKELLAM]
    skellam = [(int(r["rounds"]), float(r["mu_total"]), float(r["l1"]), float(r["l2"]))
               for r in records if r.get("mechanism") == SKELLAM]
    if not skellam:
        return epsilon_of(gaussian, delta, accountant)
    if accountant != "rdp":
        raise DataError(f"the privacy ledger holds distributed-DP releases, which only the "
                        f"rdp accountant composes; privacy.accountant is {accountant!r}")
    return epsilon_mixed(gaussian, skellam, delta)


class PrivacyLedger:
    """Append-only spending history of one dataset."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self.path = directory / f"{fingerprint[:32]}.jsonl"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        private_dir(self.directory)
        fd = os.open(self.directory / f".{self.path.name}.lock", os.O_WRONLY | os.O_CREAT,
                     PRIVATE_FILE)
        with os.fdopen(fd, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{self.path}: privacy ledger line {number} is corrupt; "
                                "refusing to train (the spent budget is unknown)") from None
            if record.get("fingerprint") != self.fingerprint:
                raise DataError(f"{self.path}: privacy ledger line {number} belongs to "
                                "another dataset; refusing to train")
            records.append(record)
        return records

    def entries(self) -> list[Entry]:
        try:
            return [Entry(run_id=str(r["run_id"]), round=int(r["round"]),
                          sigma=float(r["sigma"]), sample_rate=float(r["sample_rate"]),
                          steps=int(r["steps"]), epsilon=float(r["epsilon"]),
                          delta=float(r["delta"]), accountant=str(r["accountant"]),
                          time=float(r["time"]), site=str(r.get("site", "")),
                          mechanism=str(r.get("mechanism", "gaussian")),
                          skellam=(int(r["rounds"]), float(r["mu_total"]), float(r["l1"]),
                                   float(r["l2"])) if r.get("mechanism") == SKELLAM else None)
                    for r in self._read()]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{self.path}: privacy ledger has a malformed entry; refusing "
                            "to train (the spent budget is unknown)") from None

    def history(self) -> list[Event]:
        """The DP-SGD events (distributed-DP releases are in ``skellam_history``)."""
        return [e.event for e in self.entries() if e.skellam is None]

    def skellam_history(self) -> list[SkellamEvent]:
        return [e.skellam for e in self.entries() if e.skellam is not None]

    def spent(self, delta: float, accountant: str) -> float:
        return history_epsilon(self._read(), delta, accountant)

    def record(self, *, run_id: str, round_num: int, event: Event, delta: float,
               accountant: str, site: str, distributed: dict[str, Any] | None = None
               ) -> Entry:
        """Append one release durably, and to the folder's audit trail; ε after it is
        recomputed from the full history.

        ``distributed``: a distributed-DP release, with every figure its accounting
        needs (``rounds``, ``mu_total``, ``l1``, ``l2``) and those that justify them
        (noise share, survivors assumed, scale, modulus bits, rounding inflation,
        wraparound bound), so that the ledger alone recomputes its ε.
        """
        with self._locked():
            existing = self._read()
            record = {"format": FORMAT, "fingerprint": self.fingerprint, "site": site,
                      "run_id": run_id, "round": round_num, "sigma": event[0],
                      "sample_rate": event[1], "steps": event[2],
                      "delta": delta, "accountant": accountant, "time": time.time()}
            if distributed is not None:
                record.update(distributed, mechanism=SKELLAM)
            record["epsilon"] = history_epsilon([*existing, record], delta, accountant)
            text = "".join(json.dumps(r) + "\n" for r in [*existing, record])
            atomic_write_bytes(self.path, text.encode(), private=True)
            # Still under the ledger's lock, so the trail lists one dataset's releases in
            # ledger order. If this fails the record fails and the update is not sent:
            # no release leaves the site without its audit entry (the ledger then
            # over-counts, as after any crash).
            AuditLog(self.directory).release(record)
        return self.entries()[-1]

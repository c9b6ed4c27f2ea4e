"""The site's copy of what it released each round, so a repeated request costs nothing.

When a server crashes mid-round and resumes, it asks the sites to train that round
again from the same global model. Training again would be a second noisy release of
the same data and would have to be paid for twice. Instead the site answers with the
update it already produced: re-sending a released output is post-processing and
spends no privacy, so the ledger counts every trained round exactly once.

The copy lives next to the ledger (site-private, outside any run directory), is keyed
by run id, round and a hash of the global model it was trained from, and is written
durably *before* the ledger entry, which is written before the update leaves the
site. Only the two most recent rounds of a run are kept.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from mmfed.files import atomic_write_bytes, private_dir

KEEP_ROUNDS = 2


class ReleaseCache:
    """Released updates of one dataset, by (run id, round, global model)."""

    def __init__(self, ledger_directory: Path, fingerprint: str) -> None:
        self.directory = ledger_directory / f"{fingerprint}.releases"

    def _path(self, run_id: str, round_num: int) -> Path:
        safe = hashlib.sha256(run_id.encode()).hexdigest()[:16]
        return self.directory / f"{safe}-round-{round_num:05d}.npz"

    def load(self, run_id: str, round_num: int, global_hash: str
             ) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
        """The update released for this request, or None (unreadable copies are ignored:
        the site then trains and pays again, which over-counts but never under-counts)."""
        path = self._path(run_id, round_num)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["__meta__"]).decode())
                if meta.get("global") != global_hash or meta.get("run_id") != run_id:
                    return None
                state = {k: data[k].copy() for k in data.files if k != "__meta__"}
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None
        return state, {str(k): float(v) for k, v in meta["metrics"].items()}

    def save(self, run_id: str, round_num: int, global_hash: str,
             state: dict[str, np.ndarray], metrics: dict[str, Any]) -> None:
        meta = {"run_id": run_id, "round": round_num, "global": global_hash,
                "metrics": {k: float(v) for k, v in metrics.items()}}
        buf = io.BytesIO()
        arrays: dict[str, Any] = {"__meta__": np.frombuffer(json.dumps(meta).encode(),
                                                            dtype=np.uint8), **state}
        np.savez(buf, allow_pickle=False, **arrays)
        private_dir(self.directory.parent)  # the ledger folder, if this is its first file
        atomic_write_bytes(self._path(run_id, round_num), buf.getvalue(), private=True)
        for old in range(round_num - KEEP_ROUNDS, 0, -1):
            stale = self._path(run_id, old)
            if not stale.exists():
                break
            stale.unlink()

"""Durable files shared by every side: atomic writes and content hashes of models.

A run directory (server), a privacy ledger and its release copies (site) and a
checkpoint (both, on resume) must each survive a crash at any instant with either
the old or the new content, and a model is named by one hash wherever it is stored.
Keeping these here, below every role package, is what lets the site's privacy code
and the server's run directory share them without importing each other.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of ``data``.

    The temporary file is fsynced before the rename and the folder after it, so the
    new content is on disk, not only in the page cache, when this returns.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def state_hash(state: dict[str, np.ndarray]) -> str:
    """Hash of a model's parameters (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        arr = np.ascontiguousarray(state[key])
        digest.update(f"{key}|{arr.dtype.str}|{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()

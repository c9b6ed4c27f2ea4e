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

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by its owner only; tighten it if it exists.

    A privacy ledger and the released-update copies beside it tell anyone who can read
    them how much of a dataset's budget is spent and what was released: other accounts
    on the site's machine have no business there, and a folder an older version made
    with the default umask is tightened on first use.
    """
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    if path.stat().st_mode & 0o777 != PRIVATE_DIR:
        path.chmod(PRIVATE_DIR)
    return path


def atomic_write_bytes(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of ``data``.

    The temporary file is fsynced before the rename and the folder after it, so the
    new content is on disk, not only in the page cache, when this returns. With
    ``private`` the file is created 0600 (before any byte is written, so there is no
    moment at which others could open it) and its folder is made private.
    """
    if private:
        private_dir(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, PRIVATE_FILE if private else 0o666)
    with os.fdopen(fd, "wb") as fh:
        if private:
            os.fchmod(fh.fileno(), PRIVATE_FILE)  # an old temporary file kept its mode
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

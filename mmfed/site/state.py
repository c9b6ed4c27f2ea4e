"""What a site process keeps between messages: its data, read once, and its encoded splits.

A simulation worker answers many sites' messages in turn, and a deployed site answers
many rounds, while reading and encoding a site costs more than a round of training on
it. So both are kept, in one ``SiteState`` per process. Entries are keyed by the
site's data fingerprint, the one its privacy ledger is named by: changed data is
never answered from memory, and the same data is one entry whatever its folder is
called. Memory is bounded in bytes per kind of entry, least recently used out first,
so a worker stays flat however many sites the federation has.

A message that finds its site's encoded splits held never reads the site: its data
is read only when something asks for it (``LoadedSite.data``). So in a simulation
where each worker answers for hundreds of sites, only the splits need to stay held,
and ``mmfed simulate`` gives them a larger bound (``MMFED_SPLIT_CACHE_MIB``, sized from
the machine's memory and its workers): with the default 256 MiB, 1,000 small sites
on 2 workers re-read a site for almost every training message.

Nothing here imports torch or pandas at module level: the ClientApp imports this
module in every process, including those that only run a secure-aggregation stage.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

from mmfed.errors import MmfedError
from mmfed.ml.features import EncodedSite, FeatureSchema, encode, split_indices

if TYPE_CHECKING:  # the reader pulls in pandas; only messages that read data need it
    from mmfed.data.reader import SiteData

# Per process and per kind of entry (site data, encoded splits).
CACHE_BYTES = 256 * 2**20
SPLIT_CACHE_ENV = "MMFED_SPLIT_CACHE_MIB"  # the encoded splits' bound, when set


def split_cache_mib(raw: str | None) -> int | None:
    """``MMFED_SPLIT_CACHE_MIB`` as a number of MiB; None when unset or not a positive
    whole number (``mmfed simulate`` refuses such a value in one line before Ray starts;
    a process that meets one anyway keeps the default rather than fail on import)."""
    raw = (raw or "").strip()
    return int(raw) if raw.isdigit() and int(raw) >= 1 else None


def split_cache_bytes() -> int:
    """The encoded splits' bound: ``MMFED_SPLIT_CACHE_MIB`` if set, else ``CACHE_BYTES``."""
    mib = split_cache_mib(os.environ.get(SPLIT_CACHE_ENV))
    return CACHE_BYTES if mib is None else mib * 2**20

K = TypeVar("K")
V = TypeVar("V")
# What the fingerprint of a folder was computed from: every file's path, size and
# modification time. While it is unchanged the files are not hashed again.
_Signature = tuple[tuple[str, int, int], ...]
_SplitKey = tuple[str, str, float, int]


def nbytes(value: object) -> int:
    """Array bytes held by a cached value (names and ids are small by comparison)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, tuple | list):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return sum(nbytes(v) for v in vars(value).values())
    return 0


class _BoundedLRU(Generic[K, V]):
    """A mapping that forgets its least recently used entries beyond a byte bound.

    The newest entry always stays, even alone over the bound: the message being
    answered needs it.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._held = 0  # bytes of all entries, kept as they come and go

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None when absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V) -> None:
        self.discard([key])
        size = nbytes(value)
        self._entries[key] = (value, size)
        self._held += size
        while len(self._entries) > 1 and self._held > self.max_bytes:
            _, (_, size) = self._entries.popitem(last=False)
            self._held -= size

    def discard(self, keys: list[K]) -> None:
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._held -= entry[1]

    def keys(self) -> list[K]:
        """Least recently used first."""
        return list(self._entries)

    def values(self) -> list[V]:
        """Least recently used first."""
        return [value for value, _ in self._entries.values()]


@dataclass(frozen=True)
class LoadedSite:
    """One site folder as one message sees it: the fingerprint it is kept under,
    computed once for the message and passed on instead of recomputed, its name, and
    its data, read (or taken from memory) only when asked for."""

    folder: Path
    fingerprint: str
    name: str
    _read: Callable[[], SiteData] = field(repr=False, compare=False)

    @property
    def data(self) -> SiteData:
        return self._read()


def schema_key(schema: FeatureSchema) -> str:
    """Identifies a federation schema: the same site encodes differently under another."""
    text = repr(sorted(schema.to_config().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _signature(folder: Path) -> _Signature:
    found = []
    for path in folder.rglob("*"):
        try:
            info = path.stat()
        except OSError:  # a dangling link, which the fingerprint skips as well
            continue
        if stat.S_ISREG(info.st_mode):
            found.append((str(path.relative_to(folder)), info.st_size, info.st_mtime_ns))
    return tuple(sorted(found))


class SiteState:
    """The site data and encoded splits one process holds, keyed by data fingerprint."""

    def __init__(self, max_bytes: int = CACHE_BYTES, split_bytes: int | None = None) -> None:
        self._sites: _BoundedLRU[str, SiteData] = _BoundedLRU(max_bytes)
        self._splits: _BoundedLRU[_SplitKey, tuple[EncodedSite, EncodedSite]] = (
            _BoundedLRU(max_bytes if split_bytes is None else split_bytes))
        self._fingerprints: dict[str, tuple[_Signature, str]] = {}  # resolved folder ->
        self._names: dict[str, str] = {}  # fingerprint -> the site's name (site.toml)

    def fingerprint(self, folder: Path) -> str:
        """The privacy ledger's fingerprint of the folder, hashed again only after a
        file changed (hashing reads every byte of every image; a stat does not)."""
        from mmfed.privacy.ledger import site_fingerprint  # no cost to stage handlers

        where = str(folder.resolve())
        signature = _signature(folder)
        known = self._fingerprints.get(where)
        if known is not None and known[0] == signature:
            return known[1]
        fingerprint = site_fingerprint(folder)
        self._fingerprints[where] = (signature, fingerprint)
        if known is not None and known[1] != fingerprint:
            self._forget(known[1])
        return fingerprint

    def _forget(self, fingerprint: str) -> None:
        """Drop what was kept for data a folder no longer holds, unless another folder
        still holds it: stale copies would only take the room of current ones."""
        if any(fp == fingerprint for _, fp in self._fingerprints.values()):
            return
        self._sites.discard([fingerprint])
        self._splits.discard([k for k in self._splits.keys() if k[0] == fingerprint])
        self._names.pop(fingerprint, None)

    def open(self, folder: Path) -> LoadedSite:
        """The folder as of now; its data is read the first time this process meets
        it (for its name) and afterwards only when used and no longer held."""
        fingerprint = self.fingerprint(folder)
        name = self._names.get(fingerprint)
        if name is None:
            name = self._data(folder, fingerprint).name
        return LoadedSite(folder, fingerprint, name,
                          lambda: self._data(folder, fingerprint))

    def _data(self, folder: Path, fingerprint: str) -> SiteData:
        data = self._sites.get(fingerprint)
        if data is None:
            from mmfed.data.reader import load_site  # pandas: only when data is read

            data = load_site(folder)
            if self.fingerprint(folder) != fingerprint:
                # read later than fingerprinted (data is read when first used): what was
                # read may not be what the message's ledger entry is keyed by
                raise MmfedError(f"{folder}: the site's files changed while a message was "
                                 "answered; the next message reads them again")
            self._sites.put(fingerprint, data)
            self._names[fingerprint] = data.name
        return data

    def splits(self, site: LoadedSite, schema: FeatureSchema, val_fraction: float,
               seed: int) -> tuple[EncodedSite, EncodedSite]:
        """(train, validation) split of the site, encoded under the federation schema."""
        key = (site.fingerprint, schema_key(schema), float(val_fraction), int(seed))
        found = self._splits.get(key)
        if found is None:
            enc = encode(site.data, schema)
            train, val = split_indices(site.data.ids, site.data.labels, val_fraction, seed)
            found = (enc.subset(train), enc.subset(val))
            self._splits.put(key, found)
        return found

    def cached_sites(self) -> list[str]:
        """Names of the sites held, least recently used first."""
        return [data.name for data in self._sites.values()]


_STATE = SiteState(split_bytes=split_cache_bytes())


def site_state() -> SiteState:
    """This process's site state."""
    return _STATE

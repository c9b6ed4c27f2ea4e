"""What a site approves: the content hash of a Flower app (FAB), and the site's allowlist.

A deployed mmfed site never executes code it receives: its long-lived site process
(``mmfed.deploy.node``) runs the mmfed it has installed, and the FAB a server ships
decides only *whether* the run is served. The approval is a content hash over the
FAB's files, so that an operator can review a release once and approve exactly it:

* every file of the FAB except Flower's own metadata (``.info/``) counts, by path and
  SHA-256 — one extra module anywhere changes the hash;
* ``pyproject.toml`` counts without its run-config table (``[tool.flwr.app.config]``)
  and without ``[tool.flwr.federations]``. The run config changes with every run
  (rounds, ε, seeds); what it may ask for is decided by the site's privacy policy,
  message by message, not by this hash.

The app ``mmfed server`` ships holds no code at all, only a ``pyproject.toml`` naming
mmfed's components and stamping the digest of the mmfed sources the server has
installed (``[tool.mmfed] code``). A site's default approval is the hash of that same
app built from *its* installed sources, so a site serves a server that runs the
release it runs itself, and any other release only once its operator approved it.

Zip timestamps or compression never enter the hash: a FAB and the folder it was built
from hash the same.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import tomli_w

from mmfed import __version__
from mmfed.config import ENTRY_POINT
from mmfed.errors import ConfigError, UsageError

PYPROJECT = "pyproject.toml"
HASH_CHARS = 64
SHORT = 12  # characters of a hash shown in one-line messages
SERVER_COMPONENT = "mmfed.server.deployed:app"
CLIENT_COMPONENT = "mmfed.site.app:app"


def short(digest: str) -> str:
    return digest[:SHORT]


def _pyproject_identity(content: bytes) -> bytes:
    """The parts of pyproject.toml that say what code runs (not the run's settings)."""
    try:
        tree = tomllib.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{PYPROJECT}: not valid TOML ({exc})") from None
    flwr = tree.get("tool", {}).get("flwr", {})
    if isinstance(flwr, dict):
        flwr.pop("federations", None)
        app = flwr.get("app")
        if isinstance(app, dict):
            app.pop("config", None)
    return json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str).encode()


def content_hash(files: Mapping[str, bytes]) -> str:
    """The approval hash of an app given as path → bytes."""
    if PYPROJECT not in files:
        raise ConfigError(f"not a Flower app: no {PYPROJECT}")
    manifest = []
    for path in sorted(files):
        if path.startswith(".info/"):
            continue
        data = _pyproject_identity(files[path]) if path == PYPROJECT else files[path]
        manifest.append(f"{path}\0{hashlib.sha256(data).hexdigest()}")
    return hashlib.sha256("\n".join(manifest).encode()).hexdigest()


def fab_files(fab: bytes) -> dict[str, bytes]:
    """A FAB's files; a FAB that is not a zip, or is a suspicious one, is refused."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            names = [info for info in archive.infolist() if not info.is_dir()]
            if sum(info.file_size for info in names) > 200 * 2**20:
                raise ConfigError("the app unpacks to more than 200 MB")
            return {info.filename: archive.read(info) for info in names}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ConfigError(f"not a Flower app archive (FAB): {exc}") from None


def fab_hash(fab: bytes) -> str:
    return content_hash(fab_files(fab))


def path_hash(path: Path) -> str:
    """``mmfed app hash PATH``: a ``.fab`` file, or an app folder built as ``flwr build``
    would (its .gitignore and include/exclude rules apply)."""
    if path.is_dir():
        from flwr.cli.build import build_fab_from_disk

        if not (path / PYPROJECT).is_file():
            raise UsageError(f"{path}: not a Flower app folder (no {PYPROJECT})")
        try:
            return fab_hash(build_fab_from_disk(path))
        except ValueError as exc:
            raise ConfigError(f"{path}: flwr cannot build this app ({exc})") from None
    try:
        return fab_hash(path.read_bytes())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file or folder") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None


@lru_cache(maxsize=1)
def installed_code_digest() -> str:
    """SHA-256 over the installed mmfed package's Python sources, by path."""
    root = Path(__file__).resolve().parents[1]
    manifest = [f"{p.relative_to(root).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}"
                for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts]
    return hashlib.sha256("\n".join(manifest).encode()).hexdigest()


def deployment_pyproject(config: Mapping[str, Any] | None = None) -> str:
    """The app ``mmfed server`` ships: mmfed's components, this installation's code
    digest, and (for a run) the fully resolved run config as the app's defaults —
    Flower accepts ``--run-config`` overrides only for keys the app declares."""
    app: dict[str, Any] = {"publisher": "mmfed",
                           "components": {"serverapp": SERVER_COMPONENT,
                                          "clientapp": CLIENT_COMPONENT}}
    if config:
        app["config"] = dict(config)
    return tomli_w.dumps({
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "mmfed-deployment", "version": "1.0.0",
                    "description": "mmfed federated run submitted by mmfed server",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": app},
                 "mmfed": {"version": __version__, "code": installed_code_digest()}}})


@lru_cache(maxsize=1)
def installed_app_hash() -> str:
    """The hash of the app an ``mmfed server`` with these same sources ships."""
    return content_hash({PYPROJECT: deployment_pyproject().encode()})


@dataclass(frozen=True)
class Approval:
    """Which apps a site serves: its operator's list, and (by default) the release it
    has installed."""

    approved: tuple[str, ...] = ()
    trust_installed: bool = True

    def allowed(self) -> tuple[str, ...]:
        return (*self.approved, installed_app_hash()) if self.trust_installed \
            else self.approved

    def check(self, digest: str) -> str | None:
        """None if the app may run here, else the one-line reason it may not."""
        if digest in self.allowed():
            return None
        how = ("it is neither this site's installed mmfed release "
               f"({short(installed_app_hash())}) nor in its approved list"
               if self.trust_installed else "it is not in this site's approved list")
        return (f"app {short(digest)} is not approved at this site: {how} (review it, "
                f"then add its hash to [apps] approved in the site policy)")


def approval_from_mapping(values: object, where: str) -> Approval:
    """The ``[apps]`` table of a site policy file."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: [apps] must be a table")
    unknown = sorted(set(values) - {"approved", "trust_installed"})
    if unknown:
        raise ConfigError(f"{where}: [apps]: unknown key(s) {', '.join(map(repr, unknown))} "
                          "(known: 'approved', 'trust_installed')")
    approved = values.get("approved", [])
    if not isinstance(approved, list) or not all(isinstance(h, str) for h in approved):
        raise ConfigError(f"{where}: [apps] approved must be a list of app hashes")
    for digest in approved:
        if len(digest) != HASH_CHARS or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{where}: [apps] approved: {digest!r} is not an app hash "
                              f"({HASH_CHARS} lowercase hex characters from `mmfed app "
                              "hash`)")
    trust = values.get("trust_installed", True)
    if not isinstance(trust, bool):
        raise ConfigError(f"{where}: [apps] trust_installed must be true or false")
    if not approved and not trust:
        raise ConfigError(f"{where}: [apps] approves no app at all (trust_installed = "
                          "false and an empty approved list): this site could never train")
    return Approval(tuple(approved), trust)


def load_approval(policy: Path | None) -> Approval:
    """The approval part of a site policy file (its ``[apps]`` table); none → defaults."""
    if policy is None:
        return Approval()
    try:
        tree = tomllib.loads(policy.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{policy}: privacy policy file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{policy}: cannot read the site policy ({exc})") from None
    return approval_from_mapping(tree["apps"], str(policy)) if "apps" in tree else Approval()


def app_command(path: Path | None, installed: bool, encoder: str | None = None) -> int:
    """``mmfed app hash``: print the approval hash of PATH, of the installed release, or
    of an encoder entry point's code (what ``approved_encoders`` lists)."""
    if sum((installed, path is not None, encoder is not None)) != 1:
        raise UsageError("mmfed app hash: give an app folder or .fab file, --installed, or "
                         "--encoder ENTRY")
    if encoder is not None:
        if not re.fullmatch(ENTRY_POINT, encoder):
            raise UsageError(f"mmfed app hash --encoder: {encoder!r} is not "
                             '"package.module:factory"')
        from mmfed.ml.encoders import encoder_digest

        print(f"{encoder_digest(encoder)}  {encoder} (approve it as approved_encoders in the "
              "site policy)")
    elif path is None:
        print(f"{installed_app_hash()}  mmfed {__version__} as `mmfed server` ships it "
              f"(code {short(installed_code_digest())})")
    else:
        print(f"{path_hash(path)}  {path}")
    return 0


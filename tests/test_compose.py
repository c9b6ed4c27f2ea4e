"""The deployment kit is wired correctly: docker-compose.yml, Dockerfiles, gateway, templates.

No Docker engine runs here, so the compose file is checked statically, the way
`docker compose` reads it: variables resolved to their defaults, then every service's
command parsed by the argument parser of the program its image runs: Flower 1.41's
own parsers for the coordinator (flower-superlink, flower-superexec), mmfed's own CLI
parser for the sites (`mmfed client`). A misspelt or removed flag therefore fails
here, not at a hospital. Then come the cross-service checks: TLS files are mounted
where the flags point, SuperNode authentication is on, only the Fleet gateway is
public, each site is one service that alone holds its data (read-only), key, policy
and persistent privacy folder, no coordinator service (which runs code no site
approved) can reach any of a site's files, and the addresses and ports agree.
`compose_problems` returns every fault it finds; `test_checker_catches` breaks the
real file in one way at a time and expects that fault to be named, so these tests can
fail.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import importlib.util
import io
import json
import posixpath
import re
import shlex
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmfed.deploy.credentials import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY
from mmfed.errors import UsageError
from mmfed.ml.process import FLOWER_QUIET_ENV, QUIET_ENV

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
GATEWAY_CONF = "server/fleet-gateway.conf"
APP = ROOT / "server" / "app"
SITES = (1, 2, 3)
SITE_NAMES = tuple(f"site-{i}" for i in SITES)
FLOWER = "1.41.0"
GATEWAY = "fleet-gateway"
# The coordinator's services: they run code that no site approved (the SuperLink, the
# gateway, and every ServerApp a run submits), so none may reach a site's files.
SERVER_SIDE = ("superlink", GATEWAY, "serverapp")
EXPECTED = {*SERVER_SIDE, *SITE_NAMES}
# Each role: the stock image it runs, or the Dockerfile it is built from.
STOCK = {"superlink": "flwr/superlink"}
BUILT = {"serverapp": "server/Dockerfile", "site": "client/Dockerfile"}
ENTRYPOINT = {"server/Dockerfile": ["flower-superexec"], "client/Dockerfile": ["mmfed"]}
# The coordinator's private network: whoever is on it can reach the Control API.
LINK_MEMBERS = set(SERVER_SIDE)
SITE_NETWORKS = ["wan"]  # a site reaches the gateway, and nothing of the coordinator's
FLWR_ENV = FLOWER_QUIET_ENV  # every Flower container: the switches mmfed's own children get
SECRETS_DIR = "/run/secrets"  # where compose mounts a secret whose target is a bare name
# Accepted by Flower 1.41 only to print a deprecation warning, or ignored.
DEPRECATED = ("--fleet-api-address", "--fleet-api-type", "--control-api-address",
              "--serverappio-api-address", "--clientappio-api-address", "--appio-api-address",
              "--auth-list-public-keys", "--auth-supernode-public-key", "--plugin-type")
LOOPBACK = ("127.0.0.1", "::1", "[::1]")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def role(name: str) -> str:
    return name if name == GATEWAY else name.split("-")[0]


def interpolate(value: Any, unresolved: list[str]) -> Any:
    """Resolve ${VAR:-default} as `docker compose` does when VAR is unset."""
    if isinstance(value, dict):
        return {k: interpolate(v, unresolved) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, unresolved) for v in value]
    if not isinstance(value, str):
        return value

    def default(match: re.Match[str]) -> str:
        if match.group(2) is None:
            unresolved.append(match.group(1))
            return ""
        return match.group(3)

    return _VAR.sub(default, value)


def load_compose() -> tuple[dict[str, Any], list[str]]:
    unresolved: list[str] = []
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return interpolate(raw, unresolved), unresolved


@dataclass(frozen=True)
class Mount:
    source: str  # host path, volume name, or (for a secret) the secret's file
    target: str
    read_only: bool
    secret: str = ""  # the secret's name, for a compose secret

    @property
    def named(self) -> bool:
        return not self.secret and not self.source.startswith((".", "/", "~"))


def mounts(service: dict[str, Any], secrets: dict[str, Any] | None = None) -> list[Mount]:
    """The service's volumes and, with the top-level ``secrets``, its secrets: compose
    without swarm bind-mounts each secret's file read-only at /run/secrets/TARGET."""
    found = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):  # long syntax
            found.append(Mount(str(item.get("source", "")), str(item.get("target", "")),
                               bool(item.get("read_only", False))))
        else:
            parts = str(item).split(":")
            mode = parts[2] if len(parts) > 2 else "rw"
            found.append(Mount(parts[0], parts[1] if len(parts) > 1 else "",
                               "ro" in mode.split(",")))
    for item in service.get("secrets") or []:
        name = str(item if isinstance(item, str) else item.get("source", ""))
        target = name if isinstance(item, str) else str(item.get("target") or name)
        if not target.startswith("/"):
            target = f"{SECRETS_DIR}/{target}"
        declared = (secrets or {}).get(name) or {}
        found.append(Mount(str(declared.get("file", "")), target, True, secret=name))
    return found


def mount_in(found: list[Mount], path: str | None) -> Mount | None:
    """The mount that holds ``path`` inside the container, if any."""
    if not path:
        return None
    for m in found:
        if path == m.target or path.startswith(m.target.rstrip("/") + "/"):
            return m
    return None


def mount_of(service: dict[str, Any], path: str | None,
             secrets: dict[str, Any] | None = None) -> Mount | None:
    return mount_in(mounts(service, secrets), path)


def within(path: str, folder: str) -> bool:
    """Whether host path ``path`` is ``folder`` or lies inside it (bind-mounting
    ``folder`` exposes ``path``)."""
    p, f = posixpath.normpath(path), posixpath.normpath(folder)
    if f == ".":  # the project folder holds every relative path
        return not p.startswith(("/", "..", "~"))
    if f == "/":
        return p.startswith("/")
    return p == f or p.startswith(f + "/")


def overlaps(a: str, b: str) -> bool:
    return within(a, b) or within(b, a)


@dataclass(frozen=True)
class Published:
    ip: str  # "" = every interface of the host
    host_port: int
    container_port: int


def published(service: dict[str, Any]) -> list[Published]:
    found = []
    for item in service.get("ports", []):
        parts = str(item).rsplit(":", 2)
        ip = parts[0] if len(parts) == 3 else ""
        found.append(Published(ip, int(parts[-2]), int(parts[-1])))
    return found


def dockerfile_entrypoint(dockerfile: str) -> list[str]:
    text = (ROOT / dockerfile).read_text(encoding="utf-8")
    found = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    return [str(a) for a in json.loads(found[-1])] if found else []


def entrypoint(service: dict[str, Any]) -> list[str]:
    """The program (and its first arguments) that receives the service's command."""
    if "build" in service:
        return dockerfile_entrypoint(str(service["build"].get("dockerfile", "Dockerfile")))
    image = str(service.get("image", ""))
    return {"flwr/superlink": ["flower-superlink"]}.get(image.split(":")[0], [])


def command_parser(exe: str) -> argparse.ArgumentParser | None:
    """The program's own argument parser: Flower's (pinned at 1.41.0), or mmfed's CLI."""
    if exe == "mmfed":
        from mmfed.cli import build_parser
        return build_parser()
    if exe == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
        return _parse_args_run_superlink()
    if exe == "flower-superexec":
        from flwr.supercore.cli.flower_superexec import _parse_args
        return _parse_args()
    return None


def host_port(address: str | None) -> tuple[str, int | None]:
    host, _, port = (address or "").rpartition(":")
    return host, int(port) if port.isdigit() else None


def nginx_directives(text: str) -> list[list[str]]:
    """`name arg...;` statements of an nginx file, comments removed (enough for checks)."""
    text = re.sub(r"#[^\n]*", "", text)
    return [shlex.split(stmt.strip()) for stmt in re.split(r"[;{}]", text) if stmt.strip()]


def compose_problems(compose: dict[str, Any],
                     gateway_conf: str | None = None) -> list[str]:
    """Every wiring fault in a parsed, interpolated compose file (empty when sound)."""
    problems: list[str] = []
    services: dict[str, dict[str, Any]] = compose.get("services") or {}
    volumes_declared = compose.get("volumes") or {}
    networks_declared = compose.get("networks") or {}
    secrets_declared = compose.get("secrets") or {}
    held = {name: mounts(svc, secrets_declared) for name, svc in services.items()}

    for name in sorted(EXPECTED - set(services)):
        problems.append(f"service {name} is missing")
    for name in sorted(set(services) - EXPECTED):
        problems.append(f"unexpected service {name}")

    args: dict[str, argparse.Namespace] = {}
    for name, svc in sorted(services.items()):
        kind = role(name)
        if kind in STOCK:
            if svc.get("image") != f"{STOCK[kind]}:{FLOWER}" or "build" in svc:
                problems.append(f"{name}: must run {STOCK[kind]}:{FLOWER} (got "
                                f"{svc.get('image')!r})")
        elif kind in BUILT:
            build = svc.get("build") or {}
            if build.get("context") != "." or build.get("dockerfile") != BUILT[kind]:
                problems.append(f"{name}: must be built from {BUILT[kind]} with the "
                                "repository root as context")
        elif kind == GATEWAY and not re.fullmatch(r"nginx:\d+\.\d+\.\d+(-alpine)?",
                                                  str(svc.get("image"))):
            problems.append(f"{name}: must run a pinned nginx:X.Y.Z image")
        if not svc.get("restart"):
            problems.append(f"{name}: no restart policy")
        for net in svc.get("networks") or []:
            if net not in networks_declared:
                problems.append(f"{name}: network {net} is not declared")
        if "link" in (svc.get("networks") or []) and name not in LINK_MEMBERS:
            problems.append(f"{name}: joins the coordinator's private network (it could "
                            "reach the unauthenticated Control API)")
        for m in held[name]:
            if m.secret:
                if m.secret not in secrets_declared:
                    problems.append(f"{name}: secret {m.secret} is not declared")
                elif not m.source:
                    problems.append(f"{name}: secret {m.secret} must come from a file")
            elif m.named and m.source not in volumes_declared:
                problems.append(f"{name}: volume {m.source} is not declared")
            if Path(m.source).name == CA_KEY:
                problems.append(f"{name}: mounts the CA private key {m.source}")
        for p in published(svc):
            if kind == "site":
                problems.append(f"{name}: publishes port {p.host_port} (a site opens no "
                                "port: it only connects out)")
            elif name != GATEWAY and p.ip not in LOOPBACK:
                problems.append(f"{name}: publishes port {p.host_port} beyond loopback "
                                f"(only {GATEWAY} may face the sites)")
        if kind == GATEWAY:
            continue  # not a Flower process: checked with its nginx file below
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        for key, value in FLWR_ENV.items():
            if str(env.get(key)) != value:
                problems.append(f"{name}: environment {key} must be {value}")
        threads = QUIET_ENV["OMP_NUM_THREADS"]
        if kind == "site" and str(env.get("OMP_NUM_THREADS")) != threads:
            problems.append(f"{name}: environment OMP_NUM_THREADS must be {threads}")
        command = svc.get("command")
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            problems.append(f"{name}: command must be a list of strings")
            continue
        for flag in DEPRECATED:
            if any(c == flag or c.startswith(flag + "=") for c in command):
                problems.append(f"{name}: {flag} is deprecated in Flower {FLOWER}")
        program = entrypoint(svc)
        exe = program[0] if program else ""
        parser = command_parser(exe)
        if parser is None:
            problems.append(f"{name}: no known program receives its command (got {exe!r})")
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args[name] = parser.parse_args([*program[1:], *command])
        except SystemExit:  # Flower's parsers
            lines = err.getvalue().strip().splitlines() or ["?"]
            problems.append(f"{name}: {exe} rejects its command: {lines[-1]}")
        except UsageError as exc:  # mmfed's
            problems.append(f"{name}: {exe} rejects its command: {exc}")

    def mounted_file(name: str, path: str | None, basename: str, what: str) -> Mount | None:
        m = mount_in(held[name], path)
        if m is None:
            problems.append(f"{name}: {what} {path} is not mounted")
        elif not m.read_only:
            problems.append(f"{name}: {what} must be mounted read-only")
        elif m.source and Path(m.source).name != basename and m.target == path:
            problems.append(f"{name}: {what} comes from {m.source}, expected a {basename}")
        return m

    # The SuperLink: TLS, SuperNode authentication, state that survives a restart.
    link = args.get("superlink")
    link_port = None
    if link is not None:
        svc = services["superlink"]
        link_port = link.port
        if link.insecure:
            problems.append("superlink: TLS is off (--insecure)")
        mounted_file("superlink", link.ssl_ca_certfile, CA_CERT, "CA certificate")
        mounted_file("superlink", link.ssl_certfile, SERVER_CERT, "server certificate")
        mounted_file("superlink", link.ssl_keyfile, SERVER_KEY, "server key")
        if not link.enable_supernode_auth:
            problems.append("superlink: supernode authentication is off")
        if link.isolation != "process":
            problems.append("superlink: --isolation must be process (ServerApps run in the "
                            "serverapp service)")
        if link.runtime_dependency_install:
            problems.append("superlink: runtime dependency installation is on")
        if link.host != "0.0.0.0":
            problems.append("superlink: must listen on 0.0.0.0 inside its container")
        if (svc.get("networks") or []) != ["link"]:
            problems.append("superlink: must be on the private network link only")
        state = mount_in(held["superlink"], link.database)
        if state is None or state.read_only:
            problems.append("superlink: its database is not on a writable mount")

    # The gateway: the public face, Fleet API only, TLS on both sides.
    gateway_port = None
    if GATEWAY in services:
        svc = services[GATEWAY]
        conf = next((m for m in held[GATEWAY] if m.target == "/etc/nginx/nginx.conf"), None)
        if conf is None or not conf.read_only or conf.source != f"./{GATEWAY_CONF}":
            problems.append(f"{GATEWAY}: must mount ./{GATEWAY_CONF} read-only as "
                            "/etc/nginx/nginx.conf")
        text = gateway_conf if gateway_conf is not None else (
            ROOT / GATEWAY_CONF).read_text(encoding="utf-8")
        directives = nginx_directives(text)

        def values(name: str) -> list[list[str]]:
            return [d[1:] for d in directives if d and d[0] == name]

        listens = values("listen")
        if len(listens) != 1 or "ssl" not in listens[0] or not listens[0][0].isdigit():
            problems.append(f"{GATEWAY}: must listen on exactly one port, with ssl")
        else:
            gateway_port = int(listens[0][0])
            if gateway_port not in [p.container_port for p in published(svc)]:
                problems.append(f"{GATEWAY}: its port {gateway_port} is not published")
        for directive, basename, what in (("ssl_certificate", SERVER_CERT, "certificate"),
                                          ("ssl_certificate_key", SERVER_KEY, "key"),
                                          ("proxy_ssl_trusted_certificate", CA_CERT,
                                           "CA certificate")):
            found = values(directive)
            mounted_file(GATEWAY, found[0][0] if found else None, basename, what)
        passes = values("proxy_pass")
        locations = [v[0] for v in values("location")]
        if len(passes) != 1 or [loc for loc in locations if loc != "/"] != ["/v1/fleet/"]:
            problems.append(f"{GATEWAY}: must pass on /v1/fleet/ and nothing else")
        elif link_port is not None and passes[0] != [f"https://superlink:{link_port}"]:
            problems.append(f"{GATEWAY}: proxies to {passes[0]}, but the SuperLink is "
                            f"https://superlink:{link_port}")
        if values("proxy_ssl_verify") != [["on"]] or values("proxy_ssl_name") != [
                ["superlink"]]:
            problems.append(f"{GATEWAY}: must verify the SuperLink's certificate")
        if sorted(svc.get("networks") or []) != ["link", "wan"]:
            problems.append(f"{GATEWAY}: networks must be link and wan")

    def dials(name: str, address: str | None, host: str, port: int | None) -> None:
        if port is None:
            return  # the target's own fault is reported already
        got_host, got_port = host_port(address)
        if (got_host, got_port) != (host, port):
            problems.append(f"{name}: dials {address}, but it should dial {host}:{port}")

    def secure_client(name: str, ns: argparse.Namespace) -> None:
        if ns.insecure:
            problems.append(f"{name}: TLS to the SuperLink is off (--insecure)")
        elif not ns.root_certificates:
            problems.append(f"{name}: no --root-certificates (would trust the system CAs "
                            "instead of the federation's)")
        else:
            mounted_file(name, ns.root_certificates, CA_CERT, "CA certificate")

    server = args.get("serverapp")
    if server is not None:
        dials("serverapp", server.runtime_api_address, "superlink", link_port)
        secure_client("serverapp", server)
        if not any(m.read_only and m.target.endswith("/holdout") for m in held["serverapp"]):
            problems.append("serverapp: no read-only holdout mount")
        if not any(m.named and not m.read_only for m in held["serverapp"]):
            problems.append("serverapp: no writable volume for run directories")

    # Each site: one `mmfed client` that alone holds the site's data, key, policy and
    # privacy folder, and connects out through the gateway.
    site_files: dict[str, dict[str, str]] = {}  # site -> what of it no one else may mount
    data_sources: dict[str, str] = {}
    for name in SITE_NAMES:
        ns = args.get(name)
        if ns is None:
            continue
        svc = services[name]
        if ns.command != "client":
            problems.append(f"{name}: must run `mmfed client` (got `mmfed {ns.command}`)")
            continue
        own: dict[str, str] = {}
        site_files[name] = own
        dials(name, ns.server, GATEWAY, gateway_port)
        if ns.insecure:
            problems.append(f"{name}: TLS and SuperNode authentication are off (--insecure)")
        needed: list[Mount | None] = []
        if ns.ca is None:
            problems.append(f"{name}: no --ca (it could not tell the federation's server "
                            "from any other)")
        else:
            needed.append(mounted_file(name, str(ns.ca), CA_CERT, "CA certificate"))
        if ns.key is None:
            problems.append(f"{name}: no --key (the SuperLink admits only registered site "
                            "keys)")
        else:
            key = mounted_file(name, str(ns.key), f"{name}.key", "site private key")
            needed.append(key)
            if key is not None and key.source and not key.named:
                own["private key"] = key.source
        data = mount_in(held[name], str(ns.data))
        needed.append(data)
        if data is None:
            problems.append(f"{name}: --data {ns.data} is not mounted")
        else:
            if not data.read_only:
                problems.append(f"{name}: site data must be mounted read-only")
            if data.named or data.secret or not data.source:
                problems.append(f"{name}: site data must be the site's own folder, not a "
                                "volume")
            else:
                own["data"] = data.source
            if data.source in data_sources.values():
                problems.append(f"{name}: shares its data folder {data.source}")
            data_sources[name] = data.source
        if ns.policy is None:
            problems.append(f"{name}: no --policy (mmfed's default policy would apply, not "
                            "the site's own limits and approved apps)")
        else:
            policy = mount_in(held[name], str(ns.policy))
            needed.append(policy)
            if policy is None or not policy.read_only:
                problems.append(f"{name}: policy {ns.policy} is not mounted read-only")
        if ns.ledger_dir is None:
            problems.append(f"{name}: no --ledger-dir (the privacy ledger and audit trail "
                            "would live in the container and go with it)")
        else:
            ledger = mount_in(held[name], str(ns.ledger_dir))
            needed.append(ledger)
            if ledger is None or not ledger.named:
                problems.append(f"{name}: --ledger-dir {ns.ledger_dir} is not on a named "
                                "volume")
            elif ledger.read_only:
                problems.append(f"{name}: the privacy volume must be writable")
            elif not (volumes_declared.get(ledger.source) or {}).get("external"):
                problems.append(f"{name}: ledger volume {ledger.source} must be external so "
                                "`docker compose down -v` cannot erase it")
            else:
                own["privacy volume"] = ledger.source
        for m in held[name]:
            if m not in needed:
                problems.append(f"{name}: mounts {m.source} at {m.target}, which a site does "
                                "not need")
        if (svc.get("networks") or []) != SITE_NETWORKS:
            problems.append(f"{name}: must be on network {' and '.join(SITE_NETWORKS)} only "
                            f"(got {svc.get('networks')})")
        if svc.get("expose"):
            problems.append(f"{name}: exposes a port (a site opens none)")
        if svc.get("cap_drop") != ["ALL"]:
            problems.append(f"{name}: must drop all capabilities (cap_drop: [ALL])")
        if "no-new-privileges:true" not in (svc.get("security_opt") or []):
            problems.append(f"{name}: must set security_opt no-new-privileges:true")

    # No service but the site's own mounts any of its files: not the coordinator's
    # (which run code no site approved), not another site's. Folders count too: a
    # mount of ./fed exposes ./fed/site-1.
    for other in sorted(held):
        for site, own in sorted(site_files.items()):
            if other == site:
                continue
            for what, source in own.items():
                volume = what == "privacy volume"
                if any(m.source == source if volume else
                       (not m.named and bool(m.source) and overlaps(source, m.source))
                       for m in held[other]):
                    problems.append(f"{other}: mounts {site}'s {what}")

    # The server's private key stays with the SuperLink and the gateway; the CA's key
    # is on no machine here. A folder that holds either counts as the key.
    server_keys = {m.source for n in ("superlink", GATEWAY) for m in held.get(n, [])
                   if Path(m.source).name == SERVER_KEY}
    ca_keys = {posixpath.join(posixpath.dirname(m.source), CA_KEY)
               for ms in held.values() for m in ms if Path(m.source).name == CA_CERT}
    for name, found in sorted(held.items()):
        for m in found:
            if m.named or not m.source:
                continue
            if name not in ("superlink", GATEWAY) and (
                    Path(m.source).name == SERVER_KEY
                    or any(within(k, m.source) for k in server_keys)):
                problems.append(f"{name}: mounts the server's private key ({m.source})")
            if Path(m.source).name != CA_KEY and any(within(k, m.source) for k in ca_keys):
                problems.append(f"{name}: mounts the CA private key with {m.source}")

    users: dict[str, set[str]] = {}
    for name, found in held.items():
        for m in found:
            if m.named:
                users.setdefault(m.source, set()).add(name)
    for volume, names in sorted(users.items()):
        if len(names) > 1:
            problems.append(f"volume {volume} is shared by {', '.join(sorted(names))}")
    external = [v.get("name", k) for k, v in volumes_declared.items()
                if isinstance(v, dict) and v.get("external")]
    if len(set(external)) != len(external):
        problems.append("two external volumes have the same name")

    listening = [p for p in (link_port, gateway_port) if p]
    if len(set(listening)) != len(listening):
        problems.append(f"ports are not distinct: {sorted(listening)}")
    host_ports = [p.host_port for svc in services.values() for p in published(svc)]
    if len(set(host_ports)) != len(host_ports):
        problems.append(f"published host ports collide: {sorted(host_ports)}")
    return problems


def test_compose_file_is_wired_correctly() -> None:
    compose, unresolved = load_compose()
    assert compose_problems(compose) == []
    assert unresolved == [], f"variables without a default: {unresolved}"


# Each case breaks the real compose file (or gateway file) in one way; the checker must
# name the fault. Edits take the parsed compose dict.
Edit = Callable[[dict[str, Any]], None]


def _drop_mount(name: str, target: str) -> Edit:
    def edit(c: dict[str, Any]) -> None:
        svc = c["services"][name]
        svc["volumes"] = [v for v in svc["volumes"] if mounts({"volumes": [v]})[0].target
                          != target]
    return edit


def _replace_arg(name: str, old: str, new: str | None) -> Edit:
    def edit(c: dict[str, Any]) -> None:
        cmd = c["services"][name]["command"]
        i = next(k for k, a in enumerate(cmd) if a.startswith(old))
        if new is None:
            del cmd[i]
        else:
            cmd[i] = new
    return edit


def _set(path: str, value: Any) -> Edit:
    def edit(c: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = c
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


def _append(name: str, key: str, value: Any) -> Edit:
    return lambda c: c["services"][name].setdefault(key, []).append(value)


def _swap_ledger(c: dict[str, Any]) -> None:
    vols = c["services"]["site-3"]["volumes"]
    vols[:] = [v.replace("ledger-site-3:", "ledger-site-1:") for v in vols]


def _old_supernode(c: dict[str, Any]) -> None:
    c["services"]["supernode-1"] = {"image": f"flwr/supernode:{FLOWER}",
                                    "command": ["--superlink=fleet-gateway:9092"],
                                    "restart": "unless-stopped"}


MISWIRINGS: dict[str, tuple[Edit, str]] = {
    # a site's privacy folder: its own, persistent, writable, external
    "ledger volume missing": (_drop_mount("site-2", "/app/ledger"),
                              "site-2: --ledger-dir /app/ledger is not on a named volume"),
    "two sites share a ledger": (_swap_ledger, "volume ledger-site-1 is shared by site-1, "
                                 "site-3"),
    "ledger not external": (_set("volumes/ledger-site-2", {}),
                            "site-2: ledger volume ledger-site-2 must be external"),
    "ledger mounted read-only": (_set("services/site-1/volumes/2",
                                      "ledger-site-1:/app/ledger:ro"),
                                 "site-1: the privacy volume must be writable"),
    "privacy volume in the serverapp": (_append("serverapp", "volumes",
                                                "ledger-site-2:/app/ledger:ro"),
                                        "serverapp: mounts site-2's privacy volume"),
    # a site's data: read-only, its own, nowhere else
    "site data mounted read-write": (_set("services/site-1/volumes/0",
                                          "./fed/site-1:/app/site"),
                                     "site-1: site data must be mounted read-only"),
    "site sees another site's data": (_set("services/site-2/volumes/0",
                                           "./fed/site-1:/app/site:ro"),
                                      "site-2: shares its data folder ./fed/site-1"),
    "site data in the serverapp": (_append("serverapp", "volumes",
                                           "./fed/site-1:/app/data/site-1:ro"),
                                   "serverapp: mounts site-1's data"),
    "federation folder in the serverapp": (_append("serverapp", "volumes",
                                                   "./fed:/app/fed:ro"),
                                           "serverapp: mounts site-3's data"),
    "site data in the SuperLink": (_append("superlink", "volumes",
                                           "./fed/site-2/records.csv:/tmp/r.csv:ro"),
                                   "superlink: mounts site-2's data"),
    "site mounts the holdout": (_append("site-1", "volumes",
                                        "./fed/holdout:/app/holdout:ro"),
                                "site-1: mounts ./fed/holdout at /app/holdout, which a "
                                "site does not need"),
    # a site's command: `mmfed client`, complete, TLS, through the gateway
    "site without the CA": (_replace_arg("site-2", "--ca=", None), "site-2: no --ca"),
    "site without its key": (_replace_arg("site-2", "--key=", None), "site-2: no --key"),
    "site without a policy": (_replace_arg("site-1", "--policy=", None),
                              "site-1: no --policy"),
    "site without a ledger folder": (_replace_arg("site-3", "--ledger-dir=", None),
                                     "site-3: no --ledger-dir"),
    "site without its data": (_replace_arg("site-1", "--data=", None),
                              "site-1: mmfed rejects its command: mmfed client: the "
                              "following arguments are required: --data"),
    "site in plain text": (_append("site-3", "command", "--insecure"),
                           "site-3: TLS and SuperNode authentication are off"),
    "misspelt mmfed flag": (_replace_arg("site-1", "--ledger-dir=",
                                         "--ledger-directory=/app/ledger"),
                            "site-1: mmfed rejects its command"),
    "site runs another mmfed command": (_set("services/site-2/command",
                                             ["data", "check", "/app/site"]),
                                        "site-2: must run `mmfed client`"),
    "site bypasses the gateway": (_replace_arg("site-2", "--server=",
                                               "--server=superlink:8000"),
                                  "site-2: dials superlink:8000, but it should dial "
                                  "fleet-gateway:9092"),
    "policy not mounted": (_drop_mount("site-2", "/app/policy.toml"),
                           "site-2: policy /app/policy.toml is not mounted read-only"),
    "CA not mounted at a site": (lambda c: c["services"]["site-1"].pop("secrets"),
                                 "site-1: CA certificate /run/secrets/ca.pem is not mounted"),
    "site key from another site": (_set("secrets/site-1-key/file", "./keys/site-2.key"),
                                   "site-1: site private key comes from ./keys/site-2.key"),
    "undeclared secret": (lambda c: c["secrets"].pop("site-3-key"),
                          "site-3: secret site-3-key is not declared"),
    # keys stay where they belong
    "server key at a site": (_append("site-1", "volumes",
                                     f"./certs/{SERVER_KEY}:/app/s.key:ro"),
                             "site-1: mounts the server's private key"),
    "server key as a site's key": (_set("secrets/site-2-key/file", f"./certs/{SERVER_KEY}"),
                                   "site-2: mounts the server's private key"),
    "certificate folder at a site": (_append("site-3", "volumes", "./certs:/app/certs:ro"),
                                     "site-3: mounts the server's private key"),
    "server key in the serverapp": (_append("serverapp", "volumes",
                                            f"./certs/{SERVER_KEY}:/app/s.key:ro"),
                                    "serverapp: mounts the server's private key"),
    "site key at the SuperLink": (_append("superlink", "volumes",
                                          "./keys/site-1.key:/app/keys/site-1.key:ro"),
                                  "superlink: mounts site-1's private key"),
    "site key given to the gateway": (_append(GATEWAY, "secrets", "site-3-key"),
                                      f"{GATEWAY}: mounts site-3's private key"),
    "CA key mounted": (_append("superlink", "volumes",
                               f"./certs/{CA_KEY}:/app/certificates/{CA_KEY}:ro"),
                       f"superlink: mounts the CA private key ./certs/{CA_KEY}"),
    "certificate folder in the serverapp": (_append("serverapp", "volumes",
                                                    "./certs:/app/certs:ro"),
                                            "serverapp: mounts the CA private key with "
                                            "./certs"),
    # a site's container: isolated, unprivileged, no port
    "site on the private network": (_set("services/site-1/networks", ["wan", "link"]),
                                    "site-1: joins the coordinator's private network"),
    "site opens a port": (_set("services/site-2/ports", ["127.0.0.1:9094:9094"]),
                          "site-2: publishes port 9094 (a site opens no port"),
    "site keeps its capabilities": (lambda c: c["services"]["site-1"].pop("cap_drop"),
                                    "site-1: must drop all capabilities"),
    "site built from the server's image": (_set("services/site-3/build/dockerfile",
                                                "server/Dockerfile"),
                                           "site-3: must be built from client/Dockerfile"),
    "site threads unlimited": (_set("services/site-2/environment", dict(FLWR_ENV)),
                               "site-2: environment OMP_NUM_THREADS must be 1"),
    "old SuperNode left in": (_old_supernode, "unexpected service supernode-1"),
    # the coordinator
    "node auth off": (_replace_arg("superlink", "--enable-supernode-auth", None),
                      "superlink: supernode authentication is off"),
    "TLS off": (_append("superlink", "command", "--insecure"),
                "superlink: TLS is off (--insecure)"),
    "certificate not mounted": (_drop_mount("superlink", "/app/certificates/server.pem"),
                                "superlink: server certificate /app/certificates/server.pem "
                                "is not mounted"),
    "misspelt flag": (_replace_arg("superlink", "--enable-supernode-auth",
                                   "--enable-supernode-authentication"),
                      "superlink: flower-superlink rejects its command"),
    "deprecated flag": (_append("superlink", "command", "--fleet-api-type=grpc-rere"),
                        "superlink: --fleet-api-type is deprecated"),
    "SuperLink published to the world": (_set("services/superlink/ports", ["8000:8000"]),
                                         "superlink: publishes port 8000 beyond loopback"),
    "ServerApp dials the wrong port": (
        _replace_arg("serverapp", "--runtime-api-address=",
                     "--runtime-api-address=superlink:9091"),
        "serverapp: dials superlink:9091, but it should dial superlink:8000"),
    "duplicate ports": (_replace_arg("superlink", "--port=", "--port=9092"),
                        "ports are not distinct"),
    "unpinned image": (_set("services/superlink/image", "flwr/superlink:latest"),
                       "superlink: must run flwr/superlink:1.41.0"),
    "telemetry on": (_set("services/serverapp/environment", {}),
                     "serverapp: environment FLWR_TELEMETRY_ENABLED must be 0"),
    "undeclared volume": (lambda c: c["volumes"].pop("runs"),
                          "serverapp: volume runs is not declared"),
    "no restart policy": (lambda c: c["services"]["site-3"].pop("restart"),
                          "site-3: no restart policy"),
    "service missing": (lambda c: c["services"].pop("site-3"), "service site-3 is missing"),
}

GATEWAY_MISWIRINGS: dict[str, tuple[Callable[[str], str], str]] = {
    "gateway passes on the Control API": (
        lambda t: t.replace("location / {", "location /v1/control/ {\n"
                            "proxy_pass https://superlink:8000;\n}\nlocation / {"),
        "fleet-gateway: must pass on /v1/fleet/ and nothing else"),
    "gateway trusts anything upstream": (
        lambda t: t.replace("proxy_ssl_verify on;", "proxy_ssl_verify off;"),
        "fleet-gateway: must verify the SuperLink's certificate"),
    "gateway on another port": (lambda t: t.replace("listen 9092 ssl;", "listen 9093 ssl;"),
                                "fleet-gateway: its port 9093 is not published"),
    "gateway without TLS": (lambda t: t.replace("listen 9092 ssl;", "listen 9092;"),
                            "fleet-gateway: must listen on exactly one port, with ssl"),
}


@pytest.mark.parametrize("case", sorted(MISWIRINGS))
def test_checker_catches(case: str) -> None:
    edit, expected = MISWIRINGS[case]
    original = load_compose()[0]
    compose = copy.deepcopy(original)
    edit(compose)
    assert compose != original, "the edit changed nothing"
    found = compose_problems(compose)
    assert any(expected in p for p in found), found


@pytest.mark.parametrize("case", sorted(GATEWAY_MISWIRINGS))
def test_checker_catches_gateway(case: str) -> None:
    edit, expected = GATEWAY_MISWIRINGS[case]
    text = (ROOT / GATEWAY_CONF).read_text(encoding="utf-8")
    broken = edit(text)
    assert broken != text
    found = compose_problems(load_compose()[0], gateway_conf=broken)
    assert any(expected in p for p in found), found



@pytest.mark.parametrize("kind", sorted(BUILT))
def test_dockerfile_pins_flower_and_installs_torch_first(kind: str) -> None:
    dockerfile = BUILT[kind]
    text = (ROOT / dockerfile).read_text(encoding="utf-8")
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()]
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    # Flower's own image (flwr 1.41.0 in /python/venv, user app), in the Python mmfed
    # supports
    assert froms == [f"flwr/superexec:{FLOWER}-py3.11-ubuntu24.04"]
    runs = [ln for ln in lines if ln.startswith("RUN ")]
    torch_at = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_at]
    mmfed_at = next(i for i, r in enumerate(runs) if "pip install" in r and "/app/src" in r)
    assert torch_at < mmfed_at
    copies = [ln.split()[1:] for ln in lines if ln.startswith(("COPY ", "ADD "))]
    sources = {s for c in copies for s in c[:-1] if not s.startswith("--")}
    assert sources == {"pyproject.toml", "README.md", "mmfed"}, "copy only the package"
    assert dockerfile_entrypoint(dockerfile) == ENTRYPOINT[dockerfile]
    # the base image's unprivileged user (uid 49999) is kept: no USER switches back
    assert [ln for ln in lines if ln.startswith("USER ")] == []
    # the sed that drops the Ray extra must still match pyproject.toml's flwr pin
    sed = re.search(r"sed -i '(s/.*?/.*?/)'", text)
    assert sed is not None
    pattern, replacement = sed.group(1)[2:-1].split("/")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    patched = re.sub(pattern, replacement, pyproject)
    deps = tomllib.loads(patched)["project"]["dependencies"]
    assert f"flwr=={FLOWER}" in deps and patched != pyproject


def test_site_image_runs_mmfed_client() -> None:
    """client/Dockerfile installs what `mmfed client` needs, and the privacy folder the
    compose file mounts starts out private to the image's user."""
    dockerfile = BUILT["site"]
    text = re.sub(r"\\\n", " ", (ROOT / dockerfile).read_text(encoding="utf-8"))
    runs = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("RUN ")]
    # the entrypoint is the console script pip installs from pyproject.toml
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["mmfed"] == "mmfed.cli:main"
    assert dockerfile_entrypoint(dockerfile) == ["mmfed"]
    install = next(r for r in runs if "pip install" in r and "/app/src" in r)
    assert "mmfed client --help" in install, "the build must prove `mmfed client` starts"
    # Flower's Fleet connection the site node uses needs httpx, which flwr requires
    # without its simulation extra (the one the image drops)
    from flwr.supernode import fleet_http_connection  # noqa: F401

    requires = importlib.metadata.requires("flwr") or []
    assert any(r.startswith("httpx") and "extra ==" not in r for r in requires)
    # every site's privacy folder is made 0700 in the image (a fresh named volume copies
    # the folder's owner and mode), and the data folder exists for the read-only mount
    compose = load_compose()[0]
    parser = command_parser("mmfed")
    assert parser is not None
    for name in SITE_NAMES:
        ns = parser.parse_args(compose["services"][name]["command"])
        ledger, data = str(ns.ledger_dir), str(ns.data)
        assert any(re.search(rf"mkdir -p [^&]*{re.escape(ledger)}\b", r) for r in runs)
        assert any(re.search(rf"chmod 0?700 {re.escape(ledger)}(\s|$)", r) for r in runs)
        assert any(re.search(rf"mkdir -p [^&]*{re.escape(data)}\b", r) for r in runs)


def test_compose_app_needs_the_sites_approval(tmp_path: Path) -> None:
    """A site serves only apps its policy approves: the app the Compose route submits
    (server/app) is refused under the template policy, and served once its hash is
    added under [apps] approved, as server/README.md tells the rehearsal to do."""
    from mmfed.deploy.release import load_approval, path_hash
    from mmfed.privacy.policy import load_policy

    template = ROOT / "configs" / "site-policy.toml"
    digest = path_hash(APP)
    refusal = load_approval(template).check(digest)
    assert refusal is not None and digest[:12] in refusal
    approved = tmp_path / "site-1.toml"
    text = template.read_text(encoding="utf-8")
    assert "\napproved = []\n" in text  # the template's [apps] table, empty
    approved.write_text(text.replace("\napproved = []\n", f'\napproved = ["{digest}"]\n'),
                        encoding="utf-8")
    assert load_approval(approved).check(digest) is None
    load_policy(approved)  # `mmfed client` loads the same file as its privacy policy
    readme = (ROOT / "server" / "README.md").read_text(encoding="utf-8")
    assert "mmfed app hash server/app" in readme and "[apps]" in readme


def test_dockerignore_keeps_secrets_and_data_out() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # allow-list: nothing enters the context unless named
    assert {ln[1:] for ln in lines if ln.startswith("!")} == {"pyproject.toml", "README.md",
                                                             "mmfed"}


def test_site_policy_template_loads() -> None:
    from mmfed.privacy.policy import FIELDS, PrivacyPolicy, load_policy

    path = ROOT / "configs" / "site-policy.toml"
    policy = load_policy(path)
    assert policy == PrivacyPolicy()  # the template shows the defaults
    assert policy.enabled
    # every field is written out (and so documented), none left implicit; [apps] says
    # which apps the site serves (mmfed.deploy.release)
    tree = tomllib.loads(path.read_text(encoding="utf-8"))
    assert set(tree) == {*FIELDS, "apps"}
    assert tree["apps"] == {"approved": [], "trust_installed": True}


def test_deployment_config_loads() -> None:
    from mmfed.config import RunConfig

    cfg = RunConfig.load(ROOT / "configs" / "deployment.toml")
    assert cfg["privacy.enabled"] is True
    assert cfg["secagg.enabled"] is True
    assert cfg["federation.min_sites"] >= 2  # secure aggregation needs two survivors


def _compose_app() -> Any:
    spec = importlib.util.spec_from_file_location("compose_server_app",
                                                  APP / "compose_server_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compose_app_matches_the_deployment() -> None:
    """server/app is what `flwr run` submits: its components exist, it declares every key
    of configs/deployment.toml (Flower refuses overrides of undeclared keys), and its
    paths are where docker-compose.yml mounts the holdout and the runs volume."""
    from flwr.common.config import flatten_dict

    from mmfed.config import RunConfig

    app = tomllib.loads((APP / "pyproject.toml").read_text(encoding="utf-8"))
    components = app["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "compose_server_app:app",
                          "clientapp": "mmfed.site.app:app"}
    module = _compose_app()
    assert module.app.__class__.__name__ == "ServerApp"
    from mmfed.site import app as client_app

    assert client_app.app.__class__.__name__ == "ClientApp"
    declared = flatten_dict(app["tool"]["flwr"]["app"]["config"])
    cfg = RunConfig.from_flower(declared)  # every declared value is valid
    deployment = flatten_dict(tomllib.loads(
        (ROOT / "configs" / "deployment.toml").read_text(encoding="utf-8")))
    assert set(deployment) <= set(declared), set(deployment) - set(declared)
    assert {k: declared[k] for k in deployment} == deployment  # same defaults
    serverapp = load_compose()[0]["services"]["serverapp"]
    holdout = mount_of(serverapp, f"{cfg['data.dir']}/holdout")
    assert holdout is not None and holdout.read_only
    runs = mount_of(serverapp, str(module.RUNS))
    assert runs is not None and runs.named and not runs.read_only
    assert cfg["data.sites"] == len(SITES)


def test_compose_app_prepares_a_run_directory(tmp_path: Path) -> None:
    from mmfed.data.synth import SynthSettings, synthesize
    from mmfed.errors import DataError

    module = _compose_app()
    data = tmp_path / "data"
    synthesize(data, SynthSettings(sites=1, patients_per_site=20, holdout=20, genes=10))
    runs = tmp_path / "runs"
    config = {"data.dir": str(data), "rounds": 2, "privacy.enabled": True}
    cfg, run = module.prepare(config, 4242, runs)
    assert run.path == runs / "run-4242" and cfg["out"] == str(runs / "run-4242")
    written = tomllib.loads((runs / "run-4242" / "config.toml").read_text())
    assert written["run_id"] == cfg["run_id"] and len(cfg["run_id"]) == 32
    assert written["rounds"] == 2 and written["privacy"]["enabled"] is True
    chosen, _ = module.prepare({**config, "out": str(tmp_path / "mine")}, 7, runs)
    assert chosen["out"] == str(tmp_path / "mine")
    with pytest.raises(DataError, match="holdout"):
        module.prepare({"data.dir": str(tmp_path / "nothing")}, 8, runs)


def _readme_commands(path: Path, program: str) -> list[list[str]]:
    """Every `program ...` the README's shell blocks run: on its own line, in a `for`
    loop's body, or through `docker compose exec SERVICE`; continuations joined."""
    text = path.read_text(encoding="utf-8")
    call = re.compile(rf"(?:^|\bdo |&& |\bexec [\w-]+ ){program} (.*?)\s*(?:;|&&|\||$)")
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip().removeprefix("$ ").split(" #", 1)[0]
            commands.extend(shlex.split(m.group(1)) for m in call.finditer(line))
    return commands


@pytest.mark.parametrize("readme", ["server/README.md", "client/README.md"])
def test_readme_mmfed_commands_exist(readme: str) -> None:
    """Every `mmfed ...` the operators are told to type parses with the real CLI."""
    from mmfed.cli import build_parser
    from mmfed.errors import UsageError

    commands = _readme_commands(ROOT / readme, "mmfed")
    assert commands, f"{readme} shows no mmfed command"
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except UsageError as exc:
            pytest.fail(f"{readme}: `mmfed {' '.join(argv)}`: {exc}")

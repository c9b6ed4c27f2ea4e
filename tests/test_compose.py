"""The deployment kit is wired correctly: docker-compose.yml, Dockerfiles, gateway, templates.

No Docker engine runs here, so the compose file is checked statically, the way
`docker compose` reads it: variables resolved to their defaults, then every Flower
service's command parsed by the argparse parser of the Flower 1.41 executable its
image runs (flower-superlink, flower-supernode, flower-superexec). A misspelt or
removed flag therefore fails here, not at a hospital. Then come the cross-service
checks: TLS files are mounted where the flags point, SuperNode authentication is on,
only the Fleet gateway is public, each site has its own read-only data and its own
persistent ledger, and the addresses and ports agree. `compose_problems` returns every
fault it finds; `test_checker_catches` breaks the real file in one way at a time and
expects that fault to be named, so these tests can fail.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
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
from mmfed.ml.process import FLOWER_QUIET_ENV, QUIET_ENV

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
GATEWAY_CONF = "server/fleet-gateway.conf"
APP = ROOT / "server" / "app"
SITES = (1, 2, 3)
FLOWER = "1.41.0"
GATEWAY = "fleet-gateway"
EXPECTED = {"superlink", GATEWAY, "serverapp", *(f"supernode-{i}" for i in SITES),
            *(f"clientapp-{i}" for i in SITES)}
# Each role: the stock image it runs, or the Dockerfile it is built from.
STOCK = {"superlink": "flwr/superlink", "supernode": "flwr/supernode"}
BUILT = {"serverapp": "server/Dockerfile", "clientapp": "client/Dockerfile"}
# The coordinator's private network: whoever is on it can reach the Control API.
LINK_MEMBERS = {"superlink", GATEWAY, "serverapp"}
FLWR_ENV = FLOWER_QUIET_ENV  # every Flower container: the switches mmfed's own children get
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
    source: str
    target: str
    read_only: bool

    @property
    def named(self) -> bool:
        return not self.source.startswith((".", "/", "~"))


def mounts(service: dict[str, Any]) -> list[Mount]:
    found = []
    for item in service.get("volumes", []):
        if isinstance(item, dict):  # long syntax
            found.append(Mount(str(item.get("source", "")), str(item.get("target", "")),
                               bool(item.get("read_only", False))))
        else:
            parts = str(item).split(":")
            mode = parts[2] if len(parts) > 2 else "rw"
            found.append(Mount(parts[0], parts[1] if len(parts) > 1 else "",
                               "ro" in mode.split(",")))
    return found


def mount_of(service: dict[str, Any], path: str | None) -> Mount | None:
    """The mount that holds ``path`` inside the container, if any."""
    if not path:
        return None
    for m in mounts(service):
        if path == m.target or path.startswith(m.target.rstrip("/") + "/"):
            return m
    return None


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


def dockerfile_entrypoint(dockerfile: str) -> str:
    text = (ROOT / dockerfile).read_text(encoding="utf-8")
    found = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    return str(json.loads(found[-1])[0]) if found else ""


def executable(service: dict[str, Any]) -> str:
    """The Flower executable that receives the service's command as its arguments."""
    if "build" in service:
        return dockerfile_entrypoint(str(service["build"].get("dockerfile", "Dockerfile")))
    image = str(service.get("image", ""))
    return {"flwr/superlink": "flower-superlink",
            "flwr/supernode": "flower-supernode"}.get(image.split(":")[0], "")


def flower_parser(exe: str) -> argparse.ArgumentParser | None:
    """Flower's own argument parser for each executable (Flower pinned at 1.41.0)."""
    if exe == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
        return _parse_args_run_superlink()
    if exe == "flower-supernode":
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
        return _parse_args_run_supernode()
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
    from flwr.common.config import parse_config_args

    problems: list[str] = []
    services: dict[str, dict[str, Any]] = compose.get("services") or {}
    volumes_declared = compose.get("volumes") or {}
    networks_declared = compose.get("networks") or {}

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
        for m in mounts(svc):
            if m.named and m.source not in volumes_declared:
                problems.append(f"{name}: volume {m.source} is not declared")
            if Path(m.source).name == CA_KEY:
                problems.append(f"{name}: mounts the CA private key {m.source}")
            if Path(m.source).name == SERVER_KEY and name not in ("superlink", GATEWAY):
                problems.append(f"{name}: mounts the server's private key")
        for p in published(svc):
            if name != GATEWAY and p.ip not in LOOPBACK:
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
        if kind == "clientapp" and str(env.get("OMP_NUM_THREADS")) != threads:
            problems.append(f"{name}: environment OMP_NUM_THREADS must be {threads}")
        command = svc.get("command")
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            problems.append(f"{name}: command must be a list of strings")
            continue
        for flag in DEPRECATED:
            if any(c == flag or c.startswith(flag + "=") for c in command):
                problems.append(f"{name}: {flag} is deprecated in Flower {FLOWER}")
        exe = executable(svc)
        parser = flower_parser(exe)
        if parser is None:
            problems.append(f"{name}: no known Flower executable (got {exe!r})")
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args[name] = parser.parse_args(command)
        except SystemExit:
            lines = err.getvalue().strip().splitlines() or ["?"]
            problems.append(f"{name}: {exe} rejects its command: {lines[-1]}")

    def mounted_file(name: str, path: str | None, basename: str, what: str) -> None:
        m = mount_of(services[name], path)
        if m is None:
            problems.append(f"{name}: {what} {path} is not mounted")
        elif not m.read_only:
            problems.append(f"{name}: {what} must be mounted read-only")
        elif Path(m.source).name != basename and m.target == path:
            problems.append(f"{name}: {what} comes from {m.source}, expected a {basename}")

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
        state = mount_of(svc, link.database)
        if state is None or state.read_only:
            problems.append("superlink: its database is not on a writable mount")

    # The gateway: the public face, Fleet API only, TLS on both sides.
    gateway_port = None
    if GATEWAY in services:
        svc = services[GATEWAY]
        conf = next((m for m in mounts(svc) if m.target == "/etc/nginx/nginx.conf"), None)
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
        svc = services["serverapp"]
        dials("serverapp", server.runtime_api_address, "superlink", link_port)
        secure_client("serverapp", server)
        if not any(m.read_only and m.target.endswith("/holdout") for m in mounts(svc)):
            problems.append("serverapp: no read-only holdout mount")
        if not any(m.named and not m.read_only for m in mounts(svc)):
            problems.append("serverapp: no writable volume for run directories")

    node_ports: dict[str, int] = {}
    data_sources: dict[str, str] = {}
    for i in SITES:
        node_name, app_name = f"supernode-{i}", f"clientapp-{i}"
        node, app = args.get(node_name), args.get(app_name)
        if node is None or app is None:
            continue
        node_svc, app_svc = services[node_name], services[app_name]
        dials(node_name, node.superlink, GATEWAY, gateway_port)
        secure_client(node_name, node)
        if not node.auth_supernode_private_key:
            problems.append(f"{node_name}: no --auth-supernode-private-key")
        else:
            mounted_file(node_name, node.auth_supernode_private_key, f"site-{i}.key",
                         "site private key")
        if node.isolation != "process":
            problems.append(f"{node_name}: --isolation must be process (the ClientApp runs "
                            f"in {app_name})")
        node_ports[node_name] = node.port
        try:
            node_config = parse_config_args([node.node_config or ""])
        except Exception as exc:  # click.ClickException: Flower's own verdict
            problems.append(f"{node_name}: --node-config does not parse ({exc})")
            node_config = {}
        node_networks = node_svc.get("networks") or []
        if sorted(node_networks) != sorted(["wan", f"site-{i}"]):
            problems.append(f"{node_name}: networks must be wan and site-{i} (got "
                            f"{node_networks})")

        # The ClientApp reaches only its own SuperNode and holds the site's files.
        dials(app_name, app.runtime_api_address, node_name, node.port)
        if (app_svc.get("networks") or []) != [f"site-{i}"]:
            problems.append(f"{app_name}: must be on network site-{i} only")
        if not (networks_declared.get(f"site-{i}") or {}).get("internal"):
            problems.append(f"network site-{i} must be internal (no route out of the site)")
        for other, svc in services.items():
            if f"site-{i}" in (svc.get("networks") or []) and other not in (node_name,
                                                                            app_name):
                problems.append(f"{other}: joins site-{i}'s private network")
        data = mount_of(app_svc, str(node_config.get("data-dir", "")))
        if data is None:
            problems.append(f"{app_name}: data-dir {node_config.get('data-dir')} is not "
                            "mounted")
        else:
            if not data.read_only:
                problems.append(f"{app_name}: site data must be mounted read-only")
            if data.named:
                problems.append(f"{app_name}: site data must be the site's own folder, "
                                "not a volume")
            if data.source in data_sources.values():
                problems.append(f"{app_name}: shares its data folder {data.source}")
            data_sources[app_name] = data.source
            for other, svc in services.items():
                if other != app_name and any(m.source == data.source for m in mounts(svc)):
                    problems.append(f"{other}: mounts {app_name}'s data")
        policy = mount_of(app_svc, str(node_config.get("policy", "")))
        if policy is None or not policy.read_only:
            problems.append(f"{app_name}: policy {node_config.get('policy')} is not mounted "
                            "read-only")
        ledger = mount_of(app_svc, str(node_config.get("ledger-dir", "")))
        if ledger is None or not ledger.named:
            problems.append(f"{app_name}: ledger-dir {node_config.get('ledger-dir')} is not "
                            "on a named volume")
        elif ledger.read_only:
            problems.append(f"{app_name}: the ledger volume must be writable")
        elif not (volumes_declared.get(ledger.source) or {}).get("external"):
            problems.append(f"{app_name}: ledger volume {ledger.source} must be external so "
                            "`docker compose down -v` cannot erase it")

    users: dict[str, set[str]] = {}
    for name, svc in services.items():
        for m in mounts(svc):
            if m.named:
                users.setdefault(m.source, set()).add(name)
    for volume, names in sorted(users.items()):
        if len(names) > 1:
            problems.append(f"volume {volume} is shared by {', '.join(sorted(names))}")
    external = [v.get("name", k) for k, v in volumes_declared.items()
                if isinstance(v, dict) and v.get("external")]
    if len(set(external)) != len(external):
        problems.append("two external volumes have the same name")

    listening = [*node_ports.values(), *(p for p in (link_port, gateway_port) if p)]
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
        svc["volumes"] = [v for v in svc["volumes"] if f":{target}" not in v]
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
    return lambda c: c["services"][name][key].append(value)


def _swap_ledger(c: dict[str, Any]) -> None:
    vols = c["services"]["clientapp-3"]["volumes"]
    vols[:] = [v.replace("ledger-site-3:", "ledger-site-1:") for v in vols]


MISWIRINGS: dict[str, tuple[Edit, str]] = {
    "ledger volume missing": (_drop_mount("clientapp-2", "/app/ledger"),
                              "clientapp-2: ledger-dir /app/ledger is not on a named volume"),
    "two sites share a ledger": (_swap_ledger, "volume ledger-site-1 is shared by "
                                 "clientapp-1, clientapp-3"),
    "ledger not external": (_set("volumes/ledger-site-2", {}),
                            "clientapp-2: ledger volume ledger-site-2 must be external"),
    "data mounted writable": (_set("services/clientapp-1/volumes/0",
                                   "./fed/site-1:/app/site"),
                              "clientapp-1: site data must be mounted read-only"),
    "site sees another site's data": (_set("services/clientapp-2/volumes/0",
                                           "./fed/site-1:/app/site:ro"),
                                      "clientapp-2: shares its data folder ./fed/site-1"),
    "node auth off": (_replace_arg("superlink", "--enable-supernode-auth", None),
                      "superlink: supernode authentication is off"),
    "TLS off": (_append("superlink", "command", "--insecure"),
                "superlink: TLS is off (--insecure)"),
    "site without the CA": (_replace_arg("supernode-2", "--root-certificates", None),
                            "supernode-2: no --root-certificates"),
    "certificate not mounted": (_drop_mount("superlink", "/app/certificates/server.pem"),
                                "superlink: server certificate /app/certificates/server.pem "
                                "is not mounted"),
    "CA key mounted": (_append("superlink", "volumes",
                               f"./certs/{CA_KEY}:/app/certificates/{CA_KEY}:ro"),
                       f"superlink: mounts the CA private key ./certs/{CA_KEY}"),
    "server key at a site": (_append("supernode-1", "volumes",
                                     f"./certs/{SERVER_KEY}:/app/s.key:ro"),
                             "supernode-1: mounts the server's private key"),
    "misspelt flag": (_replace_arg("superlink", "--enable-supernode-auth",
                                   "--enable-supernode-authentication"),
                      "superlink: flower-superlink rejects its command"),
    "deprecated flag": (_append("supernode-1", "command", "--clientappio-api-address=x:1"),
                        "supernode-1: --clientappio-api-address is deprecated"),
    "SuperLink published to the world": (_set("services/superlink/ports", ["8000:8000"]),
                                         "superlink: publishes port 8000 beyond loopback"),
    "site on the private network": (_set("services/supernode-1/networks",
                                         ["wan", "site-1", "link"]),
                                    "supernode-1: joins the coordinator's private network"),
    "site bypasses the gateway": (_replace_arg("supernode-2", "--superlink=",
                                               "--superlink=superlink:8000"),
                                  "supernode-2: dials superlink:8000, but it should dial "
                                  "fleet-gateway:9092"),
    "ClientApp dials the wrong SuperNode": (
        _replace_arg("clientapp-1", "--runtime-api-address=",
                     "--runtime-api-address=supernode-1:9095"),
        "clientapp-1: dials supernode-1:9095, but it should dial supernode-1:9094"),
    "ServerApp dials the wrong port": (
        _replace_arg("serverapp", "--runtime-api-address=",
                     "--runtime-api-address=superlink:9091"),
        "serverapp: dials superlink:9091, but it should dial superlink:8000"),
    "site's ClientApp on the open network": (_set("services/clientapp-1/networks",
                                                  ["site-1", "wan"]),
                                             "clientapp-1: must be on network site-1 only"),
    "duplicate ports": (_replace_arg("supernode-3", "--port=", "--port=9094"),
                        "ports are not distinct"),
    "unpinned image": (_set("services/supernode-1/image", "flwr/supernode:latest"),
                       "supernode-1: must run flwr/supernode:1.41.0"),
    "telemetry on": (_set("services/serverapp/environment", {}),
                     "serverapp: environment FLWR_TELEMETRY_ENABLED must be 0"),
    "undeclared volume": (lambda c: c["volumes"].pop("runs"),
                          "serverapp: volume runs is not declared"),
    "no restart policy": (lambda c: c["services"]["clientapp-3"].pop("restart"),
                          "clientapp-3: no restart policy"),
    "service missing": (lambda c: c["services"].pop("supernode-3"),
                        "service supernode-3 is missing"),
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
    compose = copy.deepcopy(load_compose()[0])
    edit(compose)
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
    text = (ROOT / BUILT[kind]).read_text(encoding="utf-8")
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()]
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    # Flower's SuperExec image, at the pinned version, in the Python mmfed supports
    assert froms == [f"flwr/superexec:{FLOWER}-py3.11-ubuntu24.04"]
    runs = [ln for ln in lines if ln.startswith("RUN ")]
    torch_at = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_at]
    mmfed_at = next(i for i, r in enumerate(runs) if "pip install" in r and "/app/src" in r)
    assert torch_at < mmfed_at
    copies = [ln.split()[1:] for ln in lines if ln.startswith(("COPY ", "ADD "))]
    sources = {s for c in copies for s in c[:-1] if not s.startswith("--")}
    assert sources == {"pyproject.toml", "README.md", "mmfed"}, "copy only the package"
    assert dockerfile_entrypoint(BUILT[kind]) == "flower-superexec"
    # the sed that drops the Ray extra must still match pyproject.toml's flwr pin
    sed = re.search(r"sed -i '(s/.*?/.*?/)'", text)
    assert sed is not None
    pattern, replacement = sed.group(1)[2:-1].split("/")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    patched = re.sub(pattern, replacement, pyproject)
    deps = tomllib.loads(patched)["project"]["dependencies"]
    assert f"flwr=={FLOWER}" in deps and patched != pyproject


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
    # every field is written out (and so documented), none left implicit
    assert set(tomllib.loads(path.read_text(encoding="utf-8"))) == set(FIELDS)


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

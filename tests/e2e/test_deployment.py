"""Deployment end to end: `mmfed server` and `mmfed client` as real processes.

A SuperLink and three site nodes with TLS, SuperNode authentication, site-owned DP
and secure aggregation complete two rounds on loopback and write a valid run
directory. Alongside them, a site whose key was never admitted is refused, and a
site that trusts a different CA never connects. Then the same federation runs again
with every site node in its own network namespace (veth pairs on a bridge), so the
sites really are separate hosts. Every test proves that every process it started
is gone afterwards, and each site's audit trail verifies.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmfed.cli import main
from mmfed.data.synth import SynthSettings, synthesize
from mmfed.deploy.processes import free_port
from tests.e2e.harness import Harness, Started, separate_hosts, wait_for_text

pytestmark = pytest.mark.slow
SITES = ("site-1", "site-2", "site-3")
BUDGET = {"site-1": 8.0, "site-2": 8.0, "site-3": 6.0}  # each site's own policy
ROUNDS = 2
RUN_SETTINGS = ["--rounds", str(ROUNDS), "--set", "train.batch_size=16",
                "--set", "privacy.enabled=true", "--set", "secagg.enabled=true",
                "--set", "federation.round_timeout=120", "--no-progress"]
RUN_TIMEOUT = 420.0  # a hung federation ends the test by itself


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data, site keys (plus a rogue key), site policies; certificates are per test."""
    root = tmp_path_factory.mktemp("e2e")
    synthesize(root / "fed", SynthSettings(sites=3, patients_per_site=60, holdout=60,
                                           genes=50, seed=0, image_size=32))
    for site in (*SITES, "rogue"):
        assert main(["keys", "new", "--site", site, "--out", str(root / "keys")]) == 0
    (root / "admitted").mkdir()
    for site in SITES:
        (root / "admitted" / f"{site}.pub").write_bytes(
            (root / "keys" / f"{site}.pub").read_bytes())
        (root / f"{site}-policy.toml").write_text(
            f"enabled = true\nepsilon = {BUDGET[site]}\ndelta = 1e-5\n", encoding="utf-8")
    return root


def start_federation(h: Harness, kit: Path, certs: Path, host: str, port: int, out: Path,
                     namespaces: tuple[str, ...] | None = None) -> tuple[Started, list[Started]]:
    """The server and one client per site, all at once: clients wait for the server."""
    server = h.mmfed("server", "server", "--data", kit / "fed", "--certs", certs,
                     "--admit", kit / "admitted", "--host", host, "--port", str(port),
                     "--out", out, *RUN_SETTINGS)
    clients = []
    for i, site in enumerate(SITES):
        clients.append(h.mmfed(
            site, "client", "--data", kit / "fed" / site, "--site", site,
            "--server", f"{host}:{port}", "--ca", certs / "ca.pem",
            "--key", kit / "keys" / f"{site}.key", "--policy", kit / f"{site}-policy.toml",
            "--ledger-dir", out.parent / f"ledger-{out.name}-{site}", "--wait-server", "120",
            "--log", out.parent / f"supernode-{out.name}-{site}.log",
            netns=namespaces[i] if namespaces else None))
    return server, clients


def finish(h: Harness, server: Started, clients: list[Started]) -> tuple[int, list[int]]:
    """Wait for the run; then stop each client as an operator would (SIGTERM)."""
    server_code = server.wait(RUN_TIMEOUT)
    client_codes = [h.stop(c) for c in clients]
    return server_code, client_codes


def check_run_directory(run: Path) -> dict[str, object]:
    """The run directory contract, with DP and secure aggregation visibly on."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(1, ROUNDS + 1))
    for line in lines:
        assert set(line["sites"]) == set(SITES)  # only the admitted sites ever took part
        assert line["aggregation"]["secure"] is True
        assert line["aggregation"]["participants"] == len(SITES)
        assert 0.0 <= line["global"]["auroc"] <= 1.0
        for name, site in line["sites"].items():
            assert site["status"] == "trained", (name, site)
            assert site["epsilon_budget"] == BUDGET[name]  # the site's own, stricter budget
            assert 0.0 < site["epsilon"] <= site["epsilon_budget"]
            assert site["delta"] == 1e-5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS and 0.0 <= summary["final"]["auroc"] <= 1.0
    for name in SITES:
        assert 0.0 < summary["sites"][name]["epsilon"] <= BUDGET[name]
    config = (run / "config.toml").read_text()
    assert "[privacy]\nenabled = true" in config and "sites = 3" in config
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "round-0001.pt", "round-0002.pt"]
    assert (run / "model.pt").stat().st_size > 0
    deployment = json.loads((run / "deployment.json").read_text())
    assert deployment["tls"] and deployment["supernode_auth"]
    assert sorted(s["site"] for s in deployment["admitted"]) == list(SITES)
    for site in SITES:  # spending is on record at each site, not only in the run
        assert any((run.parent / f"ledger-{run.name}-{site}").iterdir()), site
        assert "connected as node" in (run.parent / f"supernode-{run.name}-{site}.log").read_text()
    return summary


def assert_no_secrets(kit: Path, certs: Path, texts: list[str]) -> None:
    """No private key material in any output or log (fingerprints are fine)."""
    secrets = [certs / "server.key", certs / "ca.key", *(kit / "keys").glob("*.key")]
    for path in secrets:
        body = [ln for ln in path.read_text().splitlines() if "-----" not in ln]
        for text in texts:
            assert not any(chunk in text for chunk in body if len(chunk) > 20), path


@dataclass
class LoopbackResult:
    server_code: int
    client_codes: list[int]
    rogue_code: int
    wrong_ca_code: int
    logs: dict[str, str]
    run: Path
    leftover: list[int]
    seconds: float


@pytest.fixture(scope="module")
def loopback(kit: Path, tmp_path_factory: pytest.TempPathFactory) -> LoopbackResult:
    root = tmp_path_factory.mktemp("loopback")
    certs = root / "certs"
    assert main(["certs", "init", "--out", str(certs), "--host", "127.0.0.1"]) == 0
    assert main(["certs", "init", "--out", str(root / "other-ca"), "--host", "127.0.0.1"]) == 0
    port = free_port()
    h = Harness(root)
    started = time.perf_counter()
    try:
        server, clients = start_federation(h, kit, certs, "127.0.0.1", port, root / "run")
        wait_for_text(server, "listening on", 120)
        # a key the server never admitted (its data is fine: site-3's folder)
        rogue = h.mmfed("rogue", "client", "--data", kit / "fed" / "site-3",
                        "--server", f"127.0.0.1:{port}", "--ca", certs / "ca.pem",
                        "--key", kit / "keys" / "rogue.key", "--ledger-dir", root / "l-rogue",
                        "--wait-admission", "5")
        # an admitted key, but the site trusts another CA: it must not connect at all
        wrong_ca = h.mmfed("wrong-ca", "client", "--data", kit / "fed" / "site-2",
                           "--server", f"127.0.0.1:{port}", "--ca", root / "other-ca" / "ca.pem",
                           "--key", kit / "keys" / "site-2.key", "--ledger-dir",
                           root / "l-wrong")
        rogue_code = rogue.wait(120)
        wrong_ca_code = wrong_ca.wait(60)
        server_code, client_codes = finish(h, server, clients)
        seconds = time.perf_counter() - started
        time.sleep(1.0)
        leftover = h.marked()
    finally:
        killed = h.cleanup()
    assert not killed, f"processes had to be killed: {killed}"
    logs = {s.name: s.text() for s in h.started}
    for path in [*(root / "run" / "logs").glob("*"), *root.glob("supernode-*.log")]:
        logs[path.name] = path.read_text(errors="replace")
    assert_no_secrets(kit, certs, list(logs.values()))
    return LoopbackResult(server_code, client_codes, rogue_code, wrong_ca_code, logs,
                          root / "run", leftover, seconds)


def test_federation_over_tls_with_authenticated_sites(loopback: LoopbackResult) -> None:
    assert loopback.server_code == 0, loopback.logs["server"][-3000:]
    assert f"done: {ROUNDS} rounds, 3 of 3 sites trained in the last round" in loopback.logs[
        "server"]
    for site in SITES:
        assert f"admitted {site} (SHA256:" in loopback.logs["server"]
        assert "connected to 127.0.0.1:" in loopback.logs[site], loopback.logs[site][-2000:]
    summary = check_run_directory(loopback.run)
    print(f"loopback federation: {loopback.seconds:.1f}s wall, "
          f"server {summary['wall_seconds']}s")


def test_unadmitted_site_is_refused(loopback: LoopbackResult) -> None:
    log = loopback.logs["rogue"]
    assert loopback.rogue_code == 1, log
    assert "refused site site-3: its key (SHA256:" in log and "is not admitted" in log, log
    assert "connected to" not in log
    assert log.strip().splitlines()[-1].startswith("mmfed: error: ")


def test_site_trusting_another_ca_cannot_connect(loopback: LoopbackResult) -> None:
    log = loopback.logs["wrong-ca"]
    assert loopback.wrong_ca_code == 1, log
    assert "is not trusted by" in log and "other-ca/ca.pem" in log, log
    assert "connected to" not in log


def test_every_process_stopped_cleanly(loopback: LoopbackResult) -> None:
    assert loopback.client_codes == [0, 0, 0], loopback.client_codes
    for site in SITES:
        assert "stopped; the site node has exited" in loopback.logs[site]
    assert loopback.leftover == []


def test_sites_as_separate_hosts(kit: Path, tmp_path: Path) -> None:
    """The same federation with each SuperNode in its own network namespace."""
    h = Harness(tmp_path)
    try:
        with separate_hosts(len(SITES)) as hosts:
            certs = tmp_path / "certs"
            assert main(["certs", "init", "--out", str(certs), "--host", hosts.server_ip]) == 0
            port = free_port()
            try:
                server, clients = start_federation(h, kit, certs, hosts.server_ip, port,
                                                   tmp_path / "run", hosts.namespaces)
                server_code, client_codes = finish(h, server, clients)
                time.sleep(1.0)
                leftover = h.marked()
            finally:
                killed = h.cleanup()  # before the namespaces go: nothing may hold them
    except RuntimeError as exc:  # no `ip`, not root, no veth/bridge support
        pytest.fail(f"cannot build separate hosts with ip netns: {exc}")
    assert not killed, f"processes had to be killed: {killed}"
    assert server_code == 0, server.text()[-3000:]
    assert client_codes == [0, 0, 0]
    assert leftover == []
    for client in clients:
        assert f"connected to {hosts.server_ip}:{port}" in client.text(), client.text()
    check_run_directory(tmp_path / "run")


def test_site_audit_logs_verify_and_an_edited_byte_is_reported(loopback: LoopbackResult,
                                                              tmp_path: Path) -> None:
    """Each site's audit trail holds what it served and released, verifies, and one
    edited byte anywhere in it is reported by ``mmfed audit verify``."""
    import shutil
    import subprocess
    import sys

    from mmfed.privacy.audit import verify

    for site in SITES:
        folder = loopback.run.parent / f"ledger-{loopback.run.name}-{site}"
        report = verify(folder)
        assert report.ok, (site, report.problems)
        entries = [json.loads(x) for x in (folder / "audit.jsonl").read_text().splitlines()]
        kinds = {e["kind"] for e in entries}
        assert {"started", "served", "release", "stopped"} <= kinds, kinds
        assert sum(e["kind"] == "release" for e in entries) == ROUNDS
        served = [e for e in entries if e["kind"] == "served"]
        assert {e["request"] for e in served} >= {"train"}
        assert len({e["app_hash"] for e in served}) == 1
        copy = tmp_path / site
        shutil.copytree(folder, copy)
        raw = bytearray((copy / "audit.jsonl").read_bytes())
        at = len(raw) // 2 + SITES.index(site) * 7
        while raw[at] in b'\n"':
            at += 1
        raw[at] = ord("0") if raw[at] != ord("0") else ord("1")
        (copy / "audit.jsonl").write_bytes(bytes(raw))
        done = subprocess.run([sys.executable, "-m", "mmfed.cli", "audit", "verify",
                               str(copy)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "line" in done.stderr or "entry" in done.stderr, done.stderr

"""A curious coordinator against real partner sites: `mmfed client` processes over TLS
with SuperNode authentication, each keeping its own policy file, refuse what the server
asks when it would weaken their protection.

The server here is `mmfed server` told to do what a curious coordinator would: run in
the clear (``secagg.enabled = false``), or ask for DP noise it could replay
(``privacy.debug_seeded_noise``). The sites' policies are mmfed's defaults (secure
aggregation required), and every refusal has to show up in the server's own
``metrics.jsonl`` as ``declined`` with the site's reason, with nothing spent in any
site's ledger. ``tests/test_curious_coordinator.py`` mounts the finer attacks (a
shrunk cohort at unmask, weaker thresholds, reading the statistics messages) in
process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmfed.deploy.processes import free_port
from mmfed.privacy.ledger import PrivacyLedger, ledger_dir, site_fingerprint
from tests.e2e.harness import Harness, small_kit

pytestmark = pytest.mark.slow
SITES = ("site-1", "site-2", "site-3")
RUN_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_kit(tmp_path_factory.mktemp("curious-e2e"), SITES, seed=2)


def curious_run(kit: Path, name: str, *settings: str) -> tuple[int, list[dict[str, object]],
                                                                  str]:
    """One federation whose server asks for ``settings``; the sites keep mmfed's
    default policy (no --policy). Returns the server's exit code, its metrics lines
    and every process's output."""
    h = Harness(kit / name)
    (kit / name).mkdir()
    port = free_port()
    run = kit / name / "run"
    try:
        server = h.mmfed("server", "server", "--data", kit / "fed", "--certs", kit / "certs",
                         "--admit", kit / "keys", "--host", "127.0.0.1", "--port", str(port),
                         "--out", run, "--rounds", "1", "--no-progress",
                         "--set", "train.batch_size=16", "--set", "federation.local_eval=false",
                         "--set", "federation.round_timeout=120", *settings)
        clients = [h.mmfed(site, "client", "--data", kit / "fed" / site, "--site", site,
                           "--server", f"127.0.0.1:{port}", "--ca", kit / "certs" / "ca.pem",
                           "--key", kit / "keys" / f"{site}.key",
                           "--ledger-dir", kit / name / f"ledger-{site}",
                           "--wait-server", "120") for site in SITES]
        code = server.wait(RUN_TIMEOUT)
        for client in clients:
            h.stop(client)
        output = "\n".join(p.text() for p in (server, *clients))
        leftover = h.marked()
    finally:
        killed = h.cleanup()
    assert not killed and leftover == []
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").exists() else []
    return code, lines, output


def spent(kit: Path, name: str, site: str) -> int:
    folder = ledger_dir(str(kit / name / f"ledger-{site}"))
    return len(PrivacyLedger(folder, site_fingerprint(kit / "fed" / site)).entries())


def test_deployed_sites_refuse_a_plaintext_server(kit: Path) -> None:
    """Asked for their statistics in the clear, every site declines, so the run cannot
    even build its schema: it stops with the sites' reasons in one line, before any
    training, and nothing is in any site's ledger."""
    code, lines, output = curious_run(kit, "plaintext", "--set", "secagg.enabled=false")
    assert code == 1, output[-3000:]
    last = [ln for ln in output.splitlines() if ln.startswith("mmfed: error:")][-1]
    assert "no site contributed statistics for the feature schema" in last
    for site in SITES:
        assert f"{site}: declined: this site's policy requires secure aggregation" in last
        assert spent(kit, "plaintext", site) == 0
    assert lines == []  # no round ran


def test_deployed_sites_refuse_replayable_noise(kit: Path) -> None:
    """Asked to train with noise the server could replay, every site declines before it
    trains: the reason is in the server's metrics, and nothing is in any ledger."""
    code, lines, output = curious_run(kit, "seeded", "--set",
                                      "privacy.debug_seeded_noise=true")
    assert code == 0, output[-3000:]
    [line] = lines
    for site in SITES:
        entry = line["sites"][site]
        assert entry["status"] == "declined", entry
        assert "debug_seeded_noise" in entry["reason"]
        assert spent(kit, "seeded", site) == 0
    assert line["aggregation"]["participants"] == 0
    assert line["aggregation"]["declined"] == len(SITES)

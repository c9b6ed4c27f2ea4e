"""A site's machine dies mid-round: the round finishes over the others within its
timeout, and when the site comes back (a new Flower node) it rejoins the next round.

Real processes: `mmfed server` and four `mmfed client`s on loopback. site-4 runs under
its own harness marker, so "its machine dies" can be SIGKILL of every process it had
(the client and its site node), with no chance to say goodbye.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from mmfed.data.synth import SynthSettings, synthesize
from mmfed.deploy.processes import free_port
from tests.e2e.harness import Harness, Started

pytestmark = pytest.mark.slow
TIMEOUT = 150  # federation.round_timeout: the longest a dead site may hold a round
# (generous: round 2 trains four sites with DP while CI runs another test file beside it)


def _lines(run: Path) -> list[dict[str, object]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_killed_site_does_not_hold_the_round_and_rejoins(tmp_path: Path) -> None:
    synthesize(tmp_path / "fed", SynthSettings(sites=4, patients_per_site=40, holdout=60,
                                               genes=30, seed=2, image_size=32))
    port = free_port()
    run = tmp_path / "run"
    h, h4 = Harness(tmp_path), Harness(tmp_path / "site-4")
    (tmp_path / "site-4").mkdir()

    def client(harness: Harness, site: str, name: str) -> Started:
        return harness.mmfed(name, "client", "--data", tmp_path / "fed" / site,
                             "--server", f"127.0.0.1:{port}", "--insecure",
                             "--ledger-dir", tmp_path / f"ledger-{site}",
                             "--wait-server", "120")

    try:
        server = h.mmfed("server", "server", "--data", tmp_path / "fed", "--insecure",
                         "--sites", "4", "--host", "127.0.0.1", "--port", str(port),
                         "--out", run, "--rounds", "2", "--no-progress",
                         "--set", f"federation.round_timeout={TIMEOUT}",
                         "--set", "federation.min_sites=2",
                         "--set", "federation.local_eval=false",
                         "--set", "train.batch_size=16")
        for site in ("site-1", "site-2", "site-3"):
            client(h, site, site)
        client(h4, "site-4", "site-4")
        # site-4 has done the schema's secure sum (its audit trail says so) and is
        # about to train round 1 or training it (DP training takes seconds): kill its
        # whole machine. Not later: the warm site node sends its update milliseconds
        # after the ledger write, and a site killed mid-upload makes Flower's ServerApp
        # retry the missing objects until the push session expires (180 s, a SuperLink
        # constant), which is Flower's stall, not the one this test bounds.
        audit4 = tmp_path / "ledger-site-4" / "audit.jsonl"
        deadline = time.monotonic() + 300
        while not (audit4.exists()
                   and '"request":"query.secagg_unmask"' in audit4.read_text()):
            assert time.monotonic() < deadline, server.text()[-3000:]
            assert server.proc.poll() is None, server.text()[-3000:]
            time.sleep(0.1)
        time.sleep(1.0)
        for pid in h4.marked():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        client(h4, "site-4", "site-4-again")  # the machine comes back (a new node)
        deadline = killed_at + TIMEOUT + 120
        while len(_lines(run)) < 1:
            assert time.monotonic() < deadline, server.text()[-3000:]
            time.sleep(0.2)
        round_1_done = time.monotonic()
        assert server.wait(600) == 0, server.text()[-3000:]
    finally:
        for harness in (h4, h):
            harness.cleanup()
    first, second = _lines(run)
    sites = first["sites"]
    assert isinstance(sites, dict)
    assert sites["site-4"]["status"] == "dropped", sites["site-4"]
    assert first["aggregation"]["participants"] == 3  # type: ignore[index]
    # the dead site held the round no longer than its timeout (plus evaluation after it)
    assert round_1_done - killed_at < TIMEOUT + 30
    assert first["seconds"]["round"] < TIMEOUT + 15  # type: ignore[index]
    again = second["sites"]
    assert isinstance(again, dict)
    assert {s: e["status"] for s, e in again.items()} == dict.fromkeys(
        ("site-1", "site-2", "site-3", "site-4"), "trained")
    assert second["aggregation"]["participants"] == 4  # type: ignore[index]
    assert "site-4 rejoined" in (run / "logs" / "serverapp.log").read_text()

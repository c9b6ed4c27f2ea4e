"""A survival federation deployed as real processes.

`mmfed server` and one `mmfed client` per site, over TLS with authenticated site
nodes, site-owned DP and secure aggregation, exactly as tests/e2e/test_deployment.py
runs classification: the task travels in the schema, each site trains its own kind
and the server reports the task's own figures. Survival is the kind with the most
task-specific machinery on the wire (two summed histograms, the hazard head);
regression differs from it only in its one summed target column, and is simulated with
DP and secure aggregation in tests/test_task_federations.py (a deployed run costs
about two minutes of CI on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmfed.deploy.processes import free_port
from tests.e2e.harness import Harness, small_kit

pytestmark = pytest.mark.slow
SITES = ("site-1", "site-2", "site-3")
KEYS = {"survival": {"c_index", "uno_c_index", "ibs", "td_auc", "loss"},
        "regression": {"mae", "rmse", "r2", "loss"}}


@pytest.mark.parametrize("kind", ["survival"])
def test_deployed_federation_trains_the_sites_task(kind: str, tmp_path: Path) -> None:
    root = small_kit(tmp_path, SITES, seed=4, task=kind)
    (root / "admitted").mkdir()
    for site in SITES:
        (root / "admitted" / f"{site}.pub").write_bytes((root / "keys" / f"{site}.pub")
                                                        .read_bytes())
    port = free_port()
    h = Harness(root)
    run = root / "run"
    try:
        server = h.mmfed("server", "server", "--data", root / "fed", "--certs",
                         root / "certs", "--admit", root / "admitted", "--host", "127.0.0.1",
                         "--port", str(port), "--out", run, "--rounds", "1", "--no-progress",
                         "--set", "train.batch_size=16", "--set", "privacy.enabled=true",
                         "--set", "secagg.enabled=true")
        clients = [h.mmfed(site, "client", "--data", root / "fed" / site, "--site", site,
                           "--server", f"127.0.0.1:{port}", "--ca", root / "certs" / "ca.pem",
                           "--key", root / "keys" / f"{site}.key",
                           "--ledger-dir", root / f"ledger-{site}", "--wait-server", "120")
                   for site in SITES]
        code = server.wait(420.0)
        for client in clients:
            h.stop(client)
    finally:
        killed = h.cleanup()
    assert not killed, f"processes had to be killed: {killed}"
    assert code == 0, server.text()[-3000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1]
    for line in lines:
        assert KEYS[kind] <= set(line["global"]), line["global"]
        assert line["aggregation"]["secure"] is True
        assert line["aggregation"]["participants"] == len(SITES)
        for name, site in line["sites"].items():
            assert site["status"] == "trained", (name, site)
            assert 0.0 < site["epsilon"] <= 8.0
    headline = {"survival": "holdout C-index", "regression": "holdout R²"}[kind]
    assert headline in server.text()

"""Bad updates in real simulated federations: rejected, never aggregated, never a crash.

Three runs over one 4-site cohort, 3 rounds, each round one site turning bad
(``faults.corrupt``: site-1 sends NaN in round 1, site-2 a wrong shape in round 2,
site-3 an update of norm 1e6 in round 3):

- plaintext: the server rejects each bad update with its reason;
- plaintext baseline: the same sites simply dropped at the same rounds;
- secure aggregation: each site's own guard refuses to mask its bad update.

Plaintext with rejections must equal the baseline bit for bit (the aggregate is
unaffected), and the secure run must match it up to fixed-point quantization.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mmfed.secagg import mean_error_bound, site_weight
from tests.helpers import run_mmfed

ROUNDS = 3
BAD = {1: ("site-1", "nan"), 2: ("site-2", "shape"), 3: ("site-3", "huge")}
CORRUPT = "faults.corrupt=[" + ", ".join(f'"{s}:{r}:{k}"' for r, (s, k) in BAD.items()) + "]"
DROP = "faults.drop=[" + ", ".join(f'"{s}:{r}:train"' for r, (s, _) in BAD.items()) + "]"
REASONS = {"nan": "NaN or infinite", "shape": "shape", "huge": "exceeds the bound 100"}
GUARD = {"nan": "NaN or infinite", "shape": "values, the model", "huge": "exceeds the bound 100"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-updates")
    fed = root / "fed"
    proc = run_mmfed("data", "synth", "--out", fed, "--sites", "4", "--patients-per-site",
                     "60", "--holdout", "60", "--genes", "50", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Path] = {}
    for name, mode, fault in (("rejected", "--no-secagg", CORRUPT),
                              ("dropped", "--no-secagg", DROP),
                              ("secure", "--secagg", CORRUPT)):
        out[name] = root / name
        proc = run_mmfed("simulate", "--data", fed, "--rounds", str(ROUNDS), "--seed", "3",
                         "--out", out[name], "--no-progress", mode, "--no-dp",
                         "--set", "federation.local_eval=false", "--set", fault, timeout=500)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stdout + proc.stderr, name
        (out[name] / "stderr.txt").write_text(proc.stderr)
    return out


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def states(run: Path) -> list[dict[str, torch.Tensor]]:
    names = [f"checkpoints/round-{r:04d}.pt" for r in range(1, ROUNDS + 1)] + ["model.pt"]
    return [torch.load(run / n, weights_only=False)["state_dict"] for n in names]


@pytest.mark.slow
def test_plaintext_rejects_each_bad_update_with_its_reason(runs: dict[str, Path]) -> None:
    lines = metrics(runs["rejected"])
    assert [line["round"] for line in lines] == [1, 2, 3]
    log = (runs["rejected"] / "stderr.txt").read_text()
    for line in lines:
        site, kind = BAD[line["round"]]
        entry = line["sites"][site]
        assert entry["status"] == "dropped", entry
        assert entry["reason"].startswith("rejected: ") and REASONS[kind] in entry["reason"]
        assert "\n" not in entry["reason"]
        assert f"update from {site} rejected" in log
        assert line["aggregation"]["participants"] == 3
        others = [s for name, s in line["sites"].items() if name != site]
        assert [s["status"] for s in others] == ["trained"] * 3


@pytest.mark.slow
def test_rejected_updates_leave_the_aggregate_unaffected(runs: dict[str, Path]) -> None:
    """Bit for bit the run in which those sites simply did not answer: every round."""
    rejected, dropped = states(runs["rejected"]), states(runs["dropped"])
    for a, b in zip(rejected, dropped, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    for line in metrics(runs["dropped"]):  # the baseline really dropped them
        assert line["sites"][BAD[line["round"]][0]]["status"] == "dropped"
    assert metrics(runs["rejected"])[-1]["global"] == metrics(runs["dropped"])[-1]["global"]


@pytest.mark.slow
def test_secure_guard_stops_each_bad_update_before_masking(runs: dict[str, Path]) -> None:
    lines = metrics(runs["secure"])
    assert [line["round"] for line in lines] == [1, 2, 3]
    for line in lines:
        site, kind = BAD[line["round"]]
        entry = line["sites"][site]
        assert entry["status"] == "dropped", entry
        assert entry["reason"].startswith("train: update guard: ")
        assert GUARD[kind] in entry["reason"] and "\n" not in entry["reason"]
        assert line["aggregation"]["secure"] is True and "aborted" not in line["aggregation"]
        assert line["aggregation"]["participants"] == 3
    # Without the bad site, the secure aggregate is the baseline's up to quantization.
    secure, dropped = states(runs["secure"]), states(runs["dropped"])
    smallest = min(s["num_examples"] for s in lines[0]["sites"].values() if "num_examples" in s)
    bound = mean_error_bound(1.0, 4, site_weight(int(smallest), 10000))
    first = max(float((secure[0][k] - dropped[0][k]).abs().max()) for k in secure[0])
    assert first <= bound + 1e-7, (first, bound)
    # Later rounds train on top of it, and Adam amplifies the 1e-7 differences: measured
    # 1.7e-3 after 3 rounds at the default lr 0.005 x 4 local epochs.
    final = max(float((secure[-1][k] - dropped[-1][k]).abs().max()) for k in secure[-1])
    assert final < 1e-2

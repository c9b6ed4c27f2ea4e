"""Regression and multi-class federations in simulation, with DP and secure aggregation.

Survival federations run in simulation on the real GSE7390 cohort
(tests/test_real_cohort.py) and deployed (tests/e2e/test_deployed_tasks.py), which
also deploys regression; each run here costs about a minute on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmfed.data.synth import SynthSettings, synthesize
from tests.helpers import run_mmfed

KEYS = {"regression": {"mae", "rmse", "r2", "loss"},
        "multiclass": {"auroc", "accuracy", "f1", "macro_f1", "recall_0", "recall_3", "loss"}}


@pytest.mark.parametrize("kind", ["regression", "multiclass"])
def test_each_kind_federates_with_dp_and_secure_aggregation(
        tmp_path_factory: pytest.TempPathFactory, kind: str, tmp_path: Path) -> None:
    data = tmp_path_factory.mktemp(kind)
    synthesize(data, SynthSettings(sites=3, patients_per_site=40, holdout=40, genes=30,
                                   image_size=16, seed=3, task=kind))
    run = tmp_path / "run"
    done = run_mmfed("simulate", "--data", str(data), "--rounds", "2",
                     "--out", str(run), "--no-progress", "--set", "train.batch_size=16")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert KEYS[kind] <= set(line["global"]), line["global"]
        assert line["aggregation"]["secure"] is True
        assert line["aggregation"]["participants"] == 3
        for site in line["sites"].values():
            assert site["status"] == "trained" and 0 < site["epsilon"] <= 8.0
    summary = json.loads((run / "summary.json").read_text())
    assert KEYS[kind] <= set(summary["final"])
    headline = {"regression": "R²", "multiclass": "AUROC"}[kind]
    assert f"holdout {headline}" in done.stdout

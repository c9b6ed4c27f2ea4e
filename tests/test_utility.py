"""Utility bars of the default synthetic cohort (issue: foundation, 'Done when').

These train real models on the default cohort (3 sites, 400 patients per site on
average, 600 holdout patients) with the default budget of 5 rounds × 4 local epochs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmfed.centralized import run_centralized
from mmfed.config import RunConfig
from mmfed.data.synth import SynthSettings, synthesize
from mmfed.run.rundir import RunDir
from tests.helpers import run_mmfed


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort") / "data"
    synthesize(root, SynthSettings(seed=0))
    return root


def _centralized(cohort: Path, out: Path, modalities: list[str]) -> float:
    cfg = RunConfig({"data.dir": str(cohort), "train.modalities": modalities, "seed": 0})
    summary = run_centralized(cfg, RunDir(out))
    return float(summary["final"]["auroc"])


@pytest.fixture(scope="module")
def aurocs(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    out = tmp_path_factory.mktemp("runs")
    results = {m: _centralized(cohort, out / m, [m]) for m in ("records", "images", "genomics")}
    results["fused"] = _centralized(cohort, out / "fused", ["records", "images", "genomics"])
    print("centralized holdout AUROC:", json.dumps(results))
    return results


@pytest.mark.slow
def test_task_is_neither_trivial_nor_hopeless(aurocs: dict[str, float]) -> None:
    assert 0.80 <= aurocs["fused"] <= 0.95


@pytest.mark.slow
def test_fusion_beats_every_single_modality(aurocs: dict[str, float]) -> None:
    for modality in ("records", "images", "genomics"):
        assert 0.6 < aurocs[modality] < aurocs["fused"] - 0.03, (modality, aurocs)


def _simulate(cohort: Path, out: Path, *args: str) -> dict[str, Any]:
    proc = run_mmfed("simulate", "--data", cohort, "--out", out, "--no-progress", *args,
                     timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


@pytest.fixture(scope="module")
def federated(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The default federation without DP: the reference for both bars below."""
    return _simulate(cohort, tmp_path_factory.mktemp("fed") / "run", "--no-dp")


@pytest.mark.slow
def test_federated_matches_centralized(aurocs: dict[str, float],
                                       federated: dict[str, Any]) -> None:
    auroc = federated["final"]["auroc"]
    print(f"federated {auroc:.4f} vs centralized {aurocs['fused']:.4f}")
    assert abs(auroc - aurocs["fused"]) <= 0.02


@pytest.mark.slow
def test_dp_federation_is_within_005_of_the_same_federation_without_dp(
        cohort: Path, federated: dict[str, Any], tmp_path: Path) -> None:
    """Issue 3's bar: with the default budget (ε = 8, δ = 1e-5 per site; DP is on by
    default) the default federation is within 0.05 holdout AUROC of the same federation
    without DP, and no site's reported ε exceeds its budget in any round. The DP run's
    ledgers start empty (a fresh folder), so nothing spent earlier counts against it."""
    private = _simulate(cohort, tmp_path / "dp", "--set",
                        f"privacy.ledger_dir={tmp_path / 'ledgers'}")
    dp_auroc, plain_auroc = private["final"]["auroc"], federated["final"]["auroc"]
    print(f"holdout AUROC: DP (ε = 8) {dp_auroc:.4f}, without DP {plain_auroc:.4f}")
    assert plain_auroc - dp_auroc <= 0.05
    lines = [json.loads(line) for line in
             (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    for line in lines:
        assert line["aggregation"]["private"] is True
        for site in line["sites"].values():
            assert site["status"] == "trained"
            assert site["epsilon_budget"] == 8.0 and site["delta"] == 1e-5
            assert 0 < site["epsilon"] <= site["epsilon_budget"]
    for site in private["sites"].values():
        assert site["epsilon"] <= site["epsilon_budget"]

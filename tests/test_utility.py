"""Utility bars of the default synthetic cohort (issue: foundation, 'Done when').

These train real models on the default cohort (3 sites, 400 patients per site on
average, 600 holdout patients) with the default budget of 5 rounds × 1 local epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmfed.centralized import run_centralized
from mmfed.config import RunConfig
from mmfed.data.synth import SynthSettings, synthesize
from mmfed.rundir import RunDir
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


@pytest.mark.slow
def test_federated_matches_centralized(cohort: Path, aurocs: dict[str, float],
                                       tmp_path: Path) -> None:
    proc = run_mmfed("simulate", "--data", cohort, "--out", tmp_path / "fed", "--no-progress",
                     timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "fed" / "summary.json").read_text())
    federated = summary["final"]["auroc"]
    print(f"federated {federated:.4f} vs centralized {aurocs['fused']:.4f}")
    assert abs(federated - aurocs["fused"]) <= 0.02

"""The real GSE7390 cohort (shipped in scikit-survival) as an mmfed federation.

``examples/gse7390_sites.py`` is run as a subprocess, exactly as a user would run it;
its folders must check clean, partition the labelled patients, and carry the labels
that the censoring rule gives from the source survival data. The slow test then runs a
short real federation on them with the installed ``mmfed`` executable.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfed.ml.process import quiet_env

pytest.importorskip("sksurv")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "gse7390_sites.py"
SITES = 3
HORIZON_DAYS = 5 * 365.25


def mmfed_exe() -> str:
    """The ``mmfed`` console script of the interpreter running the tests (the venv's)."""
    local = Path(sys.executable).parent / "mmfed"
    found = str(local) if local.exists() else shutil.which("mmfed")
    if found is None:
        pytest.skip("the mmfed executable is not installed")
    return found


def build(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gse7390") / "fed"
    proc = build(out, "--sites", str(SITES), "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    assert "excluded 9 of 198 patients: censored" in proc.stdout  # said aloud, with why
    print(proc.stdout)
    return out


def folders(root: Path) -> list[Path]:
    return [root / f"site-{k + 1}" for k in range(SITES)] + [root / "holdout"]


def test_script_writes_valid_disjoint_sites(federation: Path) -> None:
    names = sorted(p.name for p in federation.iterdir())
    assert names == sorted(["cohort.json", "holdout", *(f"site-{k + 1}" for k in
                                                        range(SITES))])
    cohort = json.loads((federation / "cohort.json").read_text(encoding="utf-8"))
    assert cohort["synthetic"] is False
    assert cohort["source"]["geo_accession"] == "GSE7390"
    assert "REAL" in cohort["note"]

    seen: dict[str, str] = {}
    for folder in folders(federation):
        proc = subprocess.run([mmfed_exe(), "data", "check", str(folder)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.startswith(f"ok: {folder.name}:"), proc.stdout

        records = pd.read_csv(folder / "records.csv", dtype=str, keep_default_na=False)
        genomics = pd.read_csv(folder / "genomics.csv", dtype=str, keep_default_na=False)
        assert list(records.columns[:2]) == ["patient_id", "label"]
        assert {"age", "er", "grade", "size"} <= set(records.columns)
        assert not any(c.endswith("_at") for c in records.columns)
        assert genomics.shape[1] == 1 + 76
        assert list(genomics["patient_id"]) == list(records["patient_id"])
        for pid in records["patient_id"]:
            assert pid.startswith("GSE7390-")
            assert "/" not in pid and "\\" not in pid and ".." not in pid
            assert pid not in seen, f"{pid} is in both {seen[pid]} and {folder.name}"
            seen[pid] = folder.name

        labels = records["label"].astype(int)
        want = cohort["splits"][folder.name]
        assert len(records) == want["patients"]
        assert int((labels == 0).sum()) == want["label_0"]
        assert int((labels == 1).sum()) == want["label_1"]
        assert want["label_0"] > 0 and want["label_1"] > 0

    kept = cohort["kept"]
    assert len(seen) == kept["patients"] == kept["label_0"] + kept["label_1"]
    assert kept["patients"] + cohort["excluded"]["censored_before_horizon"] == 198
    assert sum(s["patients"] for s in cohort["splits"].values()) == kept["patients"]


def test_labels_follow_the_censoring_rule(federation: Path) -> None:
    """Every label is recomputed from the source survival data, independently."""
    from sksurv.datasets import load_breast_cancer

    _, y = load_breast_cancer()
    event = np.asarray(y["e.tdm"], dtype=bool)
    days = np.asarray(y["t.tdm"], dtype=float)
    labels: dict[int, int] = {}
    for folder in folders(federation):
        records = pd.read_csv(folder / "records.csv", dtype=str, keep_default_na=False)
        for pid, label in zip(records["patient_id"], records["label"], strict=True):
            labels[int(pid.removeprefix("GSE7390-")) - 1] = int(label)
    for row in range(len(event)):
        if event[row] and days[row] <= HORIZON_DAYS:
            assert labels.get(row) == 1, row
        elif days[row] > HORIZON_DAYS:
            assert labels.get(row) == 0, row  # event-free at 5 years, even if one came later
        else:
            assert row not in labels, f"row {row} censored at {days[row]} days was kept"
    assert any(event[r] and days[r] > HORIZON_DAYS and lab == 0 for r, lab in labels.items())


def test_split_is_deterministic_and_seeded(federation: Path, tmp_path: Path) -> None:
    again = build(tmp_path / "same", "--sites", str(SITES), "--seed", "0")
    other = build(tmp_path / "other", "--sites", str(SITES), "--seed", "1")
    assert again.returncode == 0 and other.returncode == 0, again.stderr + other.stderr
    for name in ("site-1", "holdout"):
        original = (federation / name / "records.csv").read_bytes()
        assert (tmp_path / "same" / name / "records.csv").read_bytes() == original
        assert (tmp_path / "other" / name / "records.csv").read_bytes() != original


def test_script_refuses_a_non_empty_out(federation: Path) -> None:
    proc = build(federation)
    assert proc.returncode != 0
    assert "not an empty folder" in proc.stderr


@pytest.mark.slow
def test_federation_on_real_cohort(federation: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = quiet_env()
    started = time.perf_counter()
    proc = subprocess.run(
        [mmfed_exe(), "simulate", "--data", str(federation), "--rounds", "2", "--out",
         str(run), "--no-progress", "--set", "data.val_fraction=0.2", "--set",
         "train.batch_size=16"],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    lines = [json.loads(line) for line in
             (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert [m["round"] for m in lines] == [1, 2]
    for m in lines:
        auroc = m["global"]["auroc"]
        assert isinstance(auroc, float) and math.isfinite(auroc)
        assert 0.0 <= auroc <= 1.0
        assert set(m["sites"]) == {f"site-{k + 1}" for k in range(SITES)}
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert summary["rounds"] == 2
    for name in ("config.toml", "model.pt", "checkpoints/round-0002.pt"):
        assert (run / name).is_file(), name
    # 198 real patients: no claim about how good the model is, only that it ran.
    print(f"GSE7390 federation: holdout AUROC by round "
          f"{[round(m['global']['auroc'], 4) for m in lines]} ({elapsed:.1f}s)")

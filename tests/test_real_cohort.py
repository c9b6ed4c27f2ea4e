"""The real GSE7390 cohort (shipped in scikit-survival) as an mmfed federation.

``examples/gse7390_sites.py`` is run as a subprocess, exactly as a user would run it;
its folders must check clean, partition the labelled patients, and carry the labels
that the censoring rule gives from the source survival data. The slow test then runs a
short real federation on them with the installed ``mmfed`` executable.

``--task survival`` keeps every patient with time and event instead; its folders must
read clean as survival sites, hold all 198 patients exactly once, carry the source's
times and events unchanged, and give every folder events to learn from.
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


# --task survival: data level. Times and events are compared with the source, not with
# the script's own cohort.json, so that a bug in the script cannot vouch for itself.
N_PATIENTS = 198


@pytest.fixture(scope="module")
def survival_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gse7390-surv") / "fed"
    proc = build(out, "--task", "survival", "--sites", str(SITES), "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    assert "kept all 198 patients" in proc.stdout
    print(proc.stdout)
    return out


def source_outcomes() -> tuple[np.ndarray, np.ndarray]:
    """(event as 0/1, time in days) per source row, straight from scikit-survival."""
    from sksurv.datasets import load_breast_cancer

    _, y = load_breast_cancer()
    return (np.asarray(y["e.tdm"], dtype=bool).astype(np.int64),
            np.asarray(y["t.tdm"], dtype=np.float64))


def source_row(pid: str) -> int:
    return int(pid.removeprefix("GSE7390-")) - 1


def test_survival_folders_read_as_survival_sites(survival_federation: Path) -> None:
    from mmfed.data.reader import read_site

    names = sorted(p.name for p in survival_federation.iterdir())
    assert names == sorted(["cohort.json", "holdout", *(f"site-{k + 1}" for k in
                                                        range(SITES))])
    cohort = json.loads((survival_federation / "cohort.json").read_text(encoding="utf-8"))
    assert cohort["synthetic"] is False and cohort["task"] == "survival"
    assert cohort["source"]["geo_accession"] == "GSE7390"
    endpoint = cohort["endpoint"]
    assert endpoint["source_columns"] == {"time": "t.tdm", "event": "e.tdm"}
    assert (endpoint["time_column"], endpoint["event_column"], endpoint["unit"]) == \
        ("time", "event", "days")
    for folder in folders(survival_federation):
        result = read_site(folder)
        assert result.ok, result.problems
        assert result.site is not None
        spec = result.site.spec
        assert (spec.kind, spec.time, spec.event, spec.unit) == \
            ("survival", "time", "event", "days")
        assert spec.classes == ()
        records = pd.read_csv(folder / "records.csv", dtype=str, keep_default_na=False)
        assert list(records.columns[:3]) == ["patient_id", "time", "event"]
        assert "label" not in records.columns
        assert {"age", "er", "grade", "size"} <= set(records.columns)
        # the outcome must never reach the model as a feature
        assert not {"time", "event"} & set(result.site.numeric_cols)
        assert not {"time", "event"} & set(result.site.categorical_cols)
        assert len(result.site.genes) == 76
        want = cohort["splits"][folder.name]
        assert len(result.site) == want["patients"]
        assert int(result.site.labels.sum()) == want["events"]
        assert int((result.site.labels == 0).sum()) == want["censored"]


def test_survival_keeps_every_patient_once(survival_federation: Path) -> None:
    seen: dict[str, str] = {}
    for folder in folders(survival_federation):
        records = pd.read_csv(folder / "records.csv", dtype=str, keep_default_na=False)
        genomics = pd.read_csv(folder / "genomics.csv", dtype=str, keep_default_na=False)
        assert list(genomics["patient_id"]) == list(records["patient_id"])
        for pid in records["patient_id"]:
            assert pid not in seen, f"{pid} is in both {seen[pid]} and {folder.name}"
            seen[pid] = folder.name
    assert sorted(seen) == [f"GSE7390-{i + 1:03d}" for i in range(N_PATIENTS)]
    cohort = json.loads((survival_federation / "cohort.json").read_text(encoding="utf-8"))
    assert cohort["patients_total"] == N_PATIENTS
    assert sum(s["patients"] for s in cohort["splits"].values()) == N_PATIENTS


def test_survival_outcomes_equal_the_source(survival_federation: Path) -> None:
    """Every time and event, as the reader parses them, equals scikit-survival's."""
    from mmfed.data.reader import read_site

    event, days = source_outcomes()
    checked = 0
    for folder in folders(survival_federation):
        site = read_site(folder).site
        assert site is not None and site.targets is not None
        rows = np.asarray([source_row(pid) for pid in site.ids])
        np.testing.assert_array_equal(site.targets, days[rows])
        np.testing.assert_array_equal(site.labels, event[rows])
        checked += len(rows)
    assert checked == N_PATIENTS
    # censored patients are kept, including those censored early (binary drops them)
    assert int((event == 0).sum()) == 147 and int(event.sum()) == 51
    cohort = json.loads((survival_federation / "cohort.json").read_text(encoding="utf-8"))
    assert cohort["all"] == {"patients": N_PATIENTS, "events": 51, "censored": 147}


def test_survival_split_is_stratified_and_seeded(survival_federation: Path,
                                                 tmp_path: Path) -> None:
    from mmfed.data.reader import read_site

    events: dict[str, int] = {}
    for folder in folders(survival_federation):
        site = read_site(folder).site
        assert site is not None
        events[folder.name] = int(site.labels.sum())
        assert 0 < events[folder.name] < len(site), folder.name  # events and censored
    per_site = [events[f"site-{k + 1}"] for k in range(SITES)]
    assert max(per_site) - min(per_site) <= 1  # dealt round robin within each stratum
    assert events["holdout"] == round(0.25 * 51)

    again = build(tmp_path / "same", "--task", "survival", "--sites", str(SITES),
                  "--seed", "0")
    other = build(tmp_path / "other", "--task", "survival", "--sites", str(SITES),
                  "--seed", "1")
    assert again.returncode == 0 and other.returncode == 0, again.stderr + other.stderr
    for name in ("site-1", "holdout"):
        original = (survival_federation / name / "records.csv").read_bytes()
        assert (tmp_path / "same" / name / "records.csv").read_bytes() == original
        assert (tmp_path / "other" / name / "records.csv").read_bytes() != original


def test_survival_refuses_a_horizon(tmp_path: Path) -> None:
    """The horizon would be silently ignored by the survival task, so it is an error."""
    proc = build(tmp_path / "fed", "--task", "survival", "--horizon-years", "3")
    assert proc.returncode != 0
    assert "--horizon-years applies to --task binary only" in proc.stderr
    assert not (tmp_path / "fed").exists()


def test_binary_is_the_default_task(federation: Path, tmp_path: Path) -> None:
    """``--task binary`` writes exactly what the default always wrote."""
    proc = build(tmp_path / "binary", "--task", "binary", "--sites", str(SITES),
                 "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    for folder in folders(federation):
        for name in ("site.toml", "records.csv", "genomics.csv"):
            assert (tmp_path / "binary" / folder.name / name).read_bytes() == \
                (folder / name).read_bytes()
    assert (tmp_path / "binary" / "cohort.json").read_bytes() == \
        (federation / "cohort.json").read_bytes()


@pytest.mark.slow
def test_survival_federation_on_real_cohort_with_dp(survival_federation: Path,
                                                   tmp_path: Path) -> None:
    """GSE7390 with its censoring kept trains as a survival federation with DP and
    secure aggregation on: the holdout's C-index and integrated Brier score are
    reported each round. (How good it gets at ε = 8 is measured by
    benchmarks/task_utility.py, not claimed here: 50 holdout patients, 13 events.)"""
    run = tmp_path / "run"
    proc = subprocess.run(
        [mmfed_exe(), "simulate", "--data", str(survival_federation), "--rounds", "1",
         "--out", str(run), "--no-progress", "--set", "data.val_fraction=0.2", "--set",
         "train.batch_size=16"],
        capture_output=True, text=True, timeout=300, env=quiet_env(), check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [json.loads(line) for line in
             (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert [m["round"] for m in lines] == [1]
    for m in lines:
        assert 0.0 <= m["global"]["c_index"] <= 1.0 and 0.0 <= m["global"]["ibs"] <= 1.0
        assert m["global"]["events"] == 13.0
        assert m["aggregation"]["secure"] is True
        for site in m["sites"].values():
            assert site["status"] == "trained" and 0.0 < site["epsilon"] <= 8.0
    assert "holdout C-index" in proc.stdout

"""The synthetic cohort's task kinds: valid folders of each kind, a planted signal per modality.

The multiclass, regression and survival cohorts derive their outcome from a continuous
latent disease that also drives every modality; these tests check that the folders read
clean as their declared kind and that each modality alone predicts the outcome in the
right direction, so a model trained on them has something real to find.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from mmfed.data.reader import SiteData, read_site
from mmfed.data.synth import NUMERIC_VARS, SynthSettings, synthesize
from mmfed.errors import UsageError

NEW_TASKS = ("multiclass", "regression", "survival")
FOLDERS = ("site-1", "site-2", "site-3", "holdout")
KIND = {"binary": "classification", "multiclass": "classification",
        "regression": "regression", "survival": "survival"}
MMFED = Path(sys.executable).with_name("mmfed")


def small(task: str, seed: int = 4, **kw: object) -> SynthSettings:
    return SynthSettings(sites=3, patients_per_site=60, holdout=60, genes=200, image_size=16,
                         seed=seed, task=task, **kw)  # type: ignore[arg-type]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def site_of(folder: Path) -> SiteData:
    result = read_site(folder)
    assert result.problems == [], (folder.name, result.problems)
    assert result.site is not None
    return result.site


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, object]]]:
    base = tmp_path_factory.mktemp("tasks")
    return {task: (base / task, synthesize(base / task, small(task))) for task in NEW_TASKS}


@pytest.fixture(scope="module")
def holdouts(tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, tuple[SiteData, list[str]]]:
    """A large holdout per kind (the signal checks need the statistical power)."""
    base = tmp_path_factory.mktemp("signal")
    out = {}
    for task in NEW_TASKS:
        cohort = synthesize(base / task, SynthSettings(
            sites=1, patients_per_site=20, holdout=400, genes=200, image_size=32, seed=3,
            task=task))
        genes = cohort["disease_module_genes"]
        assert isinstance(genes, list)
        out[task] = (site_of(base / task / "holdout"), genes)
    return out


# --------------------------------------------------------------------------- validity


@pytest.mark.parametrize("task", NEW_TASKS)
def test_every_folder_reads_clean_as_its_kind(
        task: str, cohorts: dict[str, tuple[Path, dict[str, object]]]) -> None:
    root, _ = cohorts[task]
    for name in FOLDERS:
        site = site_of(root / name)
        spec = site.spec
        assert spec.kind == KIND[task] and spec.synthetic
        assert site.images is not None and site.genomics is not None
        if task == "multiclass":
            assert spec.classes == ("0", "1", "2", "3")
            assert site.targets is None
        elif task == "regression":
            assert spec.label == "label" and spec.classes == ()
            assert site.targets is not None and np.isfinite(site.targets).all()
            assert site.targets.std() > 0
        else:
            assert (spec.time, spec.event, spec.unit) == ("time", "event", "days")
            assert site.targets is not None and (site.targets > 0).all()
            assert set(np.unique(site.labels)) == {0, 1}
            header = (root / name / "records.csv").read_text().splitlines()[0].split(",")
            assert header[:3] == ["patient_id", "time", "event"]
            assert "label" not in header


@pytest.mark.parametrize("task", NEW_TASKS)
def test_same_seed_is_byte_identical(task: str, tmp_path: Path,
                                     cohorts: dict[str, tuple[Path, dict[str, object]]]
                                     ) -> None:
    synthesize(tmp_path / "again", small(task))
    a, b = tree(cohorts[task][0]), tree(tmp_path / "again")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_binary_is_the_default_and_unchanged(tmp_path: Path) -> None:
    default = SynthSettings(sites=2, patients_per_site=40, holdout=30, genes=40, image_size=16,
                            seed=9)
    assert default.task == "binary"
    synthesize(tmp_path / "default", default)
    explicit = SynthSettings(sites=2, patients_per_site=40, holdout=30, genes=40,
                             image_size=16, seed=9, task="binary")
    cohort = synthesize(tmp_path / "explicit", explicit)
    assert tree(tmp_path / "default") == tree(tmp_path / "explicit")
    for name in ("site-1", "site-2", "holdout"):
        site = site_of(tmp_path / "explicit" / name)
        assert site.spec.kind == "classification" and site.spec.classes == ("0", "1")
        assert site.targets is None
    assert cohort["task"] == "binary"
    sites = cohort["sites"]
    assert isinstance(sites, list)
    assert {"prevalence", "observed_prevalence"} <= set(sites[0])


def test_multiclass_has_every_class_at_every_site(
        cohorts: dict[str, tuple[Path, dict[str, object]]]) -> None:
    root, cohort = cohorts["multiclass"]
    for name in FOLDERS:
        counts = np.bincount(site_of(root / name).labels, minlength=4)
        assert len(counts) == 4 and (counts > 0).all(), (name, counts)
    sites = cohort["sites"]
    assert isinstance(sites, list)
    assert set(sites[0]["class_fractions"]) == {"0", "1", "2", "3"}


def test_cohort_json_summarises_each_kind(
        cohorts: dict[str, tuple[Path, dict[str, object]]]) -> None:
    expected = {"multiclass": "class_fractions", "regression": "label_mean",
                "survival": "event_rate"}
    for task, (root, cohort) in cohorts.items():
        on_disk = json.loads((root / "cohort.json").read_text(encoding="utf-8"))
        assert on_disk == json.loads(json.dumps(cohort))
        assert on_disk["task"] == task and on_disk["synthetic"] is True
        assert "outcome" in on_disk
        for entry in [*on_disk["sites"], on_disk["holdout"]]:
            assert expected[task] in entry
            assert "prevalence" not in entry  # meaningless outside binary
    survival = json.loads((cohorts["survival"][0] / "cohort.json").read_text())
    holdout = site_of(cohorts["survival"][0] / "holdout")
    assert survival["holdout"]["event_rate"] == pytest.approx(holdout.labels.mean(), abs=1e-3)


def test_unknown_task_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nonsense"):
        synthesize(tmp_path / "fed", small("nonsense"))
    assert not (tmp_path / "fed").exists()


# --------------------------------------------------------------------------- planted signal


def _z(x: np.ndarray) -> np.ndarray:
    return (x - np.nanmean(x)) / np.nanstd(x)


def modality_scores(site: SiteData, disease_genes: list[str]) -> dict[str, np.ndarray]:
    """One plain, higher-is-sicker statistic per modality; NaN where a patient lacks it."""
    records = sum(np.sign(v[3]) * np.nan_to_num(_z(
        site.numeric[:, site.numeric_cols.index(v[0])].astype(np.float64)))
        for v in NUMERIC_VARS if v[3] != 0)  # the informative labs, signed by loading
    assert site.images is not None and site.genomics is not None
    flat = site.images[:, 0].reshape(len(site), -1).astype(np.float64)
    image = np.where(site.image_mask, np.quantile(flat, 0.95, axis=1), np.nan)  # lesion
    idx = [site.genes.index(g) for g in disease_genes]
    expr = site.genomics[:, idx].astype(np.float64)
    with np.errstate(invalid="ignore"):
        module = ((expr - np.nanmean(expr, axis=0)) / np.nanstd(expr, axis=0)).mean(axis=1)
    genomics = np.where(site.genomics_mask, module, np.nan)
    return {"records": np.asarray(records), "images": image, "genomics": genomics}


def concordance(score: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C: among comparable pairs, how often the earlier event scored higher."""
    ok = np.isfinite(score)
    s, t, e = score[ok], time[ok], event[ok].astype(bool)
    comparable = e[:, None] & (t[:, None] < t[None, :])
    agree = (s[:, None] > s[None, :]) + 0.5 * (s[:, None] == s[None, :])
    return float((agree * comparable).sum() / comparable.sum())


def spearman(score: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(score)
    return float(spearmanr(score[ok], y[ok])[0])


@pytest.mark.parametrize("task", ("multiclass", "regression"))
def test_each_modality_tracks_the_outcome(
        task: str, holdouts: dict[str, tuple[SiteData, list[str]]]) -> None:
    site, genes = holdouts[task]
    y = site.targets if task == "regression" else site.labels.astype(np.float64)
    assert y is not None
    scores = modality_scores(site, genes)
    rho = {m: spearman(s, y) for m, s in scores.items()}
    assert all(r > 0.2 for r in rho.values()), rho
    if task == "regression":  # the noises average out: fusion beats any single modality
        both = np.isfinite(scores["images"]) & np.isfinite(scores["genomics"])
        fused = sum(_z(s[both]) for s in scores.values())
        assert spearman(np.asarray(fused), y[both]) > max(
            spearman(s[both], y[both]) for s in scores.values()), rho


def test_survival_sicker_patients_fail_sooner(
        holdouts: dict[str, tuple[SiteData, list[str]]]) -> None:
    site, genes = holdouts["survival"]
    assert site.targets is not None
    censored = 1.0 - site.labels.mean()
    assert 0.2 <= censored <= 0.5, censored
    assert 500 < float(np.median(site.targets)) < 2000
    scores = modality_scores(site, genes)
    c = {m: concordance(s, site.targets, site.labels) for m, s in scores.items()}
    assert all(v > 0.55 for v in c.values()), c
    events = site.labels == 1  # among events, a higher score means a shorter time
    rho = {m: spearman(s[events], site.targets[events]) for m, s in scores.items()}
    assert all(r < 0 for r in rho.values()), rho


# --------------------------------------------------------------------------- command line


def test_cli_synth_survival(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    done = subprocess.run([str(MMFED), "data", "synth", "--out", str(out), "--task",
                           "survival", "--sites", "2", "--patients-per-site", "30",
                           "--holdout", "30", "--genes", "50"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("site-1", "site-2", "holdout"):
        assert site_of(out / name).spec.kind == "survival"
    assert json.loads((out / "cohort.json").read_text())["task"] == "survival"


def test_cli_synth_unknown_task_is_one_line_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    done = subprocess.run([str(MMFED), "data", "synth", "--out", str(out), "--task",
                           "nonsense"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("mmfed: error: ") and "nonsense" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not out.exists()

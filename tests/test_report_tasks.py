"""The run report for every task kind: regression, survival and multi-class runs.

Each kind is judged by its own figures (R² and MAE, C-index and Brier score, macro F1),
so a report that spoke of AUROC or drew a ROC curve for a survival model would mislead.
The runs are real but tiny: ``mmfed data synth --task KIND`` cohorts of two sites and
one-epoch centralized runs, all three trained at once to keep the module's set-up short.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import MMFED, QUIET
from tests.test_report import copy_run, parse, png_size

pytestmark = pytest.mark.slow

KINDS = ("regression", "survival", "multiclass")
# What each kind's page must name, and what it must not (classification-only wording).
NAMES = {"regression": ("R²", "MAE (a.u.)", "RMSE (a.u.)", "Huber loss"),
         "survival": ("C-index", "Uno's C-index", "integrated Brier score", "AUC at t =",
                      "events", "censored", "hazard negative log-likelihood"),
         "multiclass": ("AUROC", "macro F1", "recall of class '3'", "cross-entropy")}
HOLDOUT_FIGURES = {"regression": {"holdout_scatter.png", "holdout_residuals.png"},
                   "survival": {"holdout_km.png", "holdout_km_tertiles.png",
                                "holdout_td_auc.png"},
                   "multiclass": {"holdout_roc.png", "holdout_confusion.png",
                                  "holdout_calibration.png"}}
CLASSIFICATION_ONLY = {"holdout_roc.png", "holdout_confusion.png", "holdout_calibration.png",
                       "global_auroc.png"}
HEADLINE = {"regression": "r2", "survival": "c_index", "multiclass": "auroc"}


def _wait_all(procs: dict[str, subprocess.Popen[str]], timeout: float) -> None:
    try:
        for kind, proc in procs.items():
            _, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"{kind}: {err[-3000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _build(root: Path) -> None:
    """Synthesize, train and report the three runs under ``root`` (from scratch)."""
    from mmfed.report import render_report

    env = {**os.environ, **QUIET}

    def start(*args: str | Path) -> subprocess.Popen[str]:
        return subprocess.Popen([*MMFED, *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

    for kind in KINDS:
        shutil.rmtree(root / kind, ignore_errors=True)
        shutil.rmtree(root / f"data-{kind}", ignore_errors=True)
    _wait_all({k: start("data", "synth", "--task", k, "--out", root / f"data-{k}", "--sites",
                        "2", "--patients-per-site", "40", "--holdout", "40", "--genes", "30")
               for k in KINDS}, timeout=120)
    _wait_all({k: start("centralized", "--data", root / f"data-{k}", "--out", root / k,
                        "--set", "rounds=1", "--set", "train.local_epochs=1",
                        "--set", "privacy.min_cohort=2")
               for k in KINDS}, timeout=300)
    for kind in KINDS:
        render_report(root / kind)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three runs, each with its report; built once per session even under xdist.

    Under ``-n`` every worker would otherwise train all three runs again: the workers
    share the session's temporary folder, and the first to take the lock builds there
    while the others wait and then only read (tests that edit a run edit a copy).
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        root = tmp_path_factory.mktemp("report-task-runs")
        _build(root)
    else:
        root = tmp_path_factory.getbasetemp().parent / "report-task-runs"
        root.mkdir(exist_ok=True)
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / ".built").is_file():
                _build(root)
                (root / ".built").touch()
    return {k: root / k for k in KINDS}


@pytest.fixture(scope="module")
def reports(runs: dict[str, Path]) -> dict[str, Path]:
    from mmfed.report import INDEX, REPORT_DIR

    return {k: run / REPORT_DIR / INDEX for k, run in runs.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_page_names_the_tasks_own_metrics(reports: dict[str, Path], runs: dict[str, Path],
                                          kind: str) -> None:
    page = parse(reports[kind])
    text = " ".join(page.text.values())
    for name in NAMES[kind]:
        assert name in text, f"{kind} report does not name {name!r}"
    if kind != "multiclass":
        assert "AUROC" not in text and "cross-entropy" not in text
        assert "patients per class" not in text
    # The final headline figure, as the run recorded it, is in the summary table.
    final = json.loads((runs[kind] / "summary.json").read_text())["final"]
    assert f"{final[HEADLINE[kind]]:.3f}" in page.text["summary"]


@pytest.mark.parametrize("kind", KINDS)
def test_holdout_figures_fit_the_task(reports: dict[str, Path], kind: str) -> None:
    index = reports[kind]
    page = parse(index)
    assert {src for s, src in page.images if s == "holdout"} == HOLDOUT_FIGURES[kind]
    for _, src in page.images:
        width, height = png_size(index.parent / src)
        assert 200 <= width <= 3000 and 200 <= height <= 3000, (src, width, height)
    on_disk = {p.name for p in index.parent.glob("*.png")}
    assert on_disk == {src for _, src in page.images}  # nothing stale, nothing orphaned
    if kind != "multiclass":
        assert not on_disk & CLASSIFICATION_ONLY, on_disk & CLASSIFICATION_ONLY
        assert f"global_{HEADLINE[kind]}.png" in on_disk
    for src in HOLDOUT_FIGURES[kind]:
        assert page.alts[src].strip(), f"{src} has no alt text"


@pytest.mark.parametrize("kind", KINDS)
def test_holdout_recomputes_the_recorded_figures(runs: dict[str, Path], kind: str) -> None:
    from mmfed.report.holdout import evaluate_holdout

    result = evaluate_holdout(runs[kind])
    final = json.loads((runs[kind] / "summary.json").read_text())["final"]
    key = HEADLINE[kind]
    assert result.metrics[key] == pytest.approx(final[key], abs=1e-6)
    assert len(result.labels) == len(result.targets) == 40
    if kind == "regression":
        assert result.outputs.shape == (40,) and result.task.unit == "a.u."
    elif kind == "survival":
        assert result.outputs.shape == (40, len(result.task.cuts))
        assert set(np.unique(result.labels)) <= {0, 1} and result.task.horizons
    else:
        assert result.outputs.shape == (40, 4) and not result.binary


def test_risk_tertiles_split_the_holdout_by_predicted_risk(runs: dict[str, Path]) -> None:
    from mmfed.ml.task import risk_of
    from mmfed.report.holdout import evaluate_holdout, risk_tertiles

    result = evaluate_holdout(runs["survival"])
    groups = risk_tertiles(result)
    assert len(groups) == 3 and sorted(len(g) for g in groups) == [13, 13, 14]
    assert sorted(np.concatenate(groups).tolist()) == list(range(40))
    risk = risk_of(result.task, result.outputs)
    assert risk[groups[0]].max() <= risk[groups[1]].min()
    assert risk[groups[1]].max() <= risk[groups[2]].min()


def test_kind_is_read_off_the_metrics_without_a_summary_task(runs: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """Federated summaries name no task: the figures' own keys tell the kind."""
    from mmfed.report.rundata import load_run
    from mmfed.report.sections import metric_labels

    for kind, expected in (("regression", "regression"), ("survival", "survival"),
                           ("multiclass", "classification")):
        run = copy_run(runs[kind], tmp_path / kind)
        summary = json.loads((run / "summary.json").read_text())
        summary.pop("task")
        (run / "summary.json").write_text(json.dumps(summary))
        data = load_run(run)
        assert data.kind == expected
        labels = dict(metric_labels(data.kind, None, data.final))
        if expected == "survival":  # without the task, horizons are numbered
            assert labels["auc_1"] == "AUC at horizon 1" and "c_index" in labels


def test_site_local_plot_and_baseline_follow_the_task(runs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """A survival run (edited to look federated) against a regression baseline."""
    from mmfed.report import render_report

    run = copy_run(runs["survival"], tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    summary["mode"] = "federated"
    (run / "summary.json").write_text(json.dumps(summary))
    path = run / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for line in lines:
        line["sites"] = {f"site-{i}": {"status": "trained", "local": {"c_index": 0.5 + i / 10}}
                         for i in (1, 2)}
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    page = parse(render_report(run, runs["regression"]))
    performance = {src for s, src in page.images if s == "performance"}
    assert "site_local_c_index.png" in performance and "site_local_auroc.png" not in performance
    assert "Each site's C-index" in page.text["performance"]
    assert [s for s, src in page.images if src == "baseline_c_index.png"] == ["baseline"]
    text = page.text["baseline"]
    assert "trained a regression task" in text and "cannot be compared" in text
    assert "Integrated Brier score and loss: lower is better" in text

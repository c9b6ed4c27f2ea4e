"""Task kinds: classification, regression and survival, declared by the site.

The losses must be per-patient sums (DP-SGD clips per patient), the task must be
agreed from secure sums only, and a site must refuse to train or encode under a task
that is not its own, whoever asks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfed.config import TrainSpec
from mmfed.data.reader import load_site, read_site
from mmfed.data.sitespec import SiteSpec, parse_site_spec, write_site_spec
from mmfed.data.synth import SynthSettings, synthesize
from mmfed.errors import DataError
from mmfed.ml.features import (
    column_moments,
    column_names,
    encode,
    merge_names,
    pool_moments,
    pooled_schema,
    schema_from_moments,
)
from mmfed.ml.model import build_model
from mmfed.ml.task import (
    HazardLoss,
    Task,
    cuts_from_histogram,
    make_task_loss,
    target_tensor,
)
from mmfed.ml.training import predict, tensor_dataset, train_local
from tests.helpers import run_mmfed


def _hazard_by_hand(logits: np.ndarray, time: float, event: int,
                    cuts: list[float]) -> float:
    """The discrete-time likelihood written out interval by interval."""
    h = 1 / (1 + np.exp(-logits))
    nll, left = 0.0, 0.0
    for k, right in enumerate(cuts):
        if time > right:
            nll -= math.log(1 - h[k])
        else:
            if event:
                nll -= math.log(h[k])
            elif time >= (left + right) / 2:
                nll -= math.log(1 - h[k])
            return nll
        left = right
    return nll


def test_hazard_loss_equals_the_likelihood_written_out() -> None:
    cuts = [10.0, 20.0, 40.0]
    rng = np.random.default_rng(0)
    cases = [(5.0, 1), (5.0, 0), (12.0, 0), (17.0, 0), (20.0, 1), (39.0, 1), (100.0, 1),
             (100.0, 0), (40.0, 0)]
    logits = rng.normal(size=(len(cases), 3)).astype(np.float32)
    y = torch.tensor([[t, e] for t, e in cases], dtype=torch.float32)
    loss = HazardLoss(tuple(cuts))
    loss.reduction = "none"
    got = loss(torch.from_numpy(logits), y).numpy()
    want = [_hazard_by_hand(logits[i].astype(np.float64), t, e, cuts)
            for i, (t, e) in enumerate(cases)]
    assert np.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kind", ["survival", "regression"])
def test_per_patient_gradients_are_exactly_each_patients_own(kind: str) -> None:
    """What DP-SGD clips: Opacus's per-sample gradients of the task loss equal the
    gradient of each patient's loss computed alone. A loss coupling patients (Cox's
    partial likelihood) would fail this."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    task = Task(kind="survival", cuts=(1.0, 2.0, 4.0)) if kind == "survival" \
        else Task(kind="regression", target_mean=3.0, target_std=2.0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, task.outputs))
    x = torch.randn(6, 5)
    targets = np.array([0.5, 1.5, 3.0, 9.0, 1.9, 2.2])
    labels = np.array([1, 0, 1, 0, 0, 1])
    y = torch.from_numpy(target_tensor(task, labels, targets))
    loss_fn = make_task_loss(task, labels, "none")
    gsm = GradSampleModule(net)
    loss_fn(gsm(x), y).backward()
    per_sample = [p.grad_sample.clone() for p in net.parameters()]  # type: ignore[attr-defined]
    gsm._close()
    for i in range(len(x)):
        net.zero_grad()
        loss_fn(net(x[i:i + 1]), y[i:i + 1]).backward()
        for p, g in zip(net.parameters(), per_sample, strict=True):
            assert torch.allclose(g[i], p.grad, atol=1e-5), (kind, i)


def test_cuts_sit_at_event_time_quantiles() -> None:
    rng = np.random.default_rng(1)
    times = rng.exponential(100.0, 5000)
    edges = list(np.geomspace(0.01, 5000, 200))
    hist = np.histogram(times, bins=edges)[0] / len(times)
    cuts, horizons = cuts_from_histogram(edges, hist, intervals=4)
    want = np.quantile(times, [0.25, 0.5, 0.75, 1.0])
    assert np.allclose(cuts[:3], want[:3], rtol=0.08)
    assert np.allclose(horizons, np.quantile(times, [0.25, 0.5, 0.75]), rtol=0.08)
    assert bool(np.all(np.diff(cuts) > 0))


# ------------------------------------------------------------------ site folders
def _survival_site(tmp: Path, rows: list[str], name: str = "s") -> Path:
    folder = tmp / name
    folder.mkdir()
    (folder / "site.toml").write_text(
        f'name = "{name}"\n[task]\nkind = "survival"\ntime = "months"\nevent = "relapse"\n'
        'unit = "months"\n', encoding="utf-8")
    (folder / "records.csv").write_text("patient_id,months,relapse,age\n" + "\n".join(rows)
                                        + "\n", encoding="utf-8")
    return folder


def test_survival_site_reads_time_and_event_and_keeps_them_out_of_the_features(
        tmp_path: Path) -> None:
    site = load_site(_survival_site(tmp_path, ["a,12.5,1,60", "b,30,0,55", "c,7,1,71"]))
    assert site.spec.kind == "survival" and site.spec.unit == "months"
    assert site.targets is not None and site.targets.tolist() == [12.5, 30.0, 7.0]
    assert site.labels.tolist() == [1, 0, 1]
    assert site.numeric_cols == ["age"]


@pytest.mark.parametrize(("rows", "needle"), [
    (["a,0,1,60", "b,5,0,50"], "survival time in 'months' must be a time > 0 at line 2 '0'"),
    (["a,-3,1,60", "b,5,0,50"], "a time > 0 at line 2 '-3'"),
    (["a,4,2,60", "b,5,0,50"], "event indicator in 'relapse' must be 1 (event) or 0"),
    (["a,4,,60", "b,5,0,50"], "event indicator in 'relapse'"),
    (["a,soon,1,60", "b,5,0,50"], "line 2 'soon'"),
])
def test_data_check_rejects_bad_survival_outcomes(tmp_path: Path, rows: list[str],
                                                  needle: str) -> None:
    folder = _survival_site(tmp_path, rows)
    result = read_site(folder)
    assert not result.ok and any(needle in p for p in result.problems), result.problems
    done = run_mmfed("data", "check", str(folder))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert needle in done.stdout + done.stderr


def test_regression_label_must_be_numeric(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "site.toml").write_text('name = "r"\n[task]\nkind = "regression"\n'
                                      'label = "hba1c"\n', encoding="utf-8")
    (folder / "records.csv").write_text("patient_id,hba1c,age\na,6.1,50\nb,high,60\n"
                                        "c,,40\n", encoding="utf-8")
    result = read_site(folder)
    assert not result.ok
    assert any("regression label in 'hba1c' must be a finite number at line 3 'high', "
               "line 4 ''" in p for p in result.problems), result.problems


@pytest.mark.parametrize(("task", "needle"), [
    ('kind = "regression"\nlabel = "y"\nclasses = [0, 1]',
     "task.classes does not apply to kind = 'regression'"),
    ('kind = "survival"\ntime = "t"', "task.event must name a records column"),
    ('kind = "survival"\ntime = "t"\nevent = "t"', "task.time and task.event name the same"),
    ('kind = "ranking"\nlabel = "y"', "task.kind must be one of classification, regression, "
                                       "survival"),
    ('kind = "survival"\ntime = "t"\nevent = "e"\nlabel = "y"',
     "task.label does not apply to kind = 'survival'"),
])
def test_site_toml_task_declarations_are_checked(tmp_path: Path, task: str,
                                                 needle: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(f'name = "s"\n[task]\n{task}\n', encoding="utf-8")
    spec, problems = parse_site_spec(path)
    assert spec is None and any(needle in p for p in problems), problems


def test_site_toml_round_trips_every_kind(tmp_path: Path) -> None:
    mods = {"records": True, "images": False, "genomics": False}
    for spec in (SiteSpec("a", "label", ("0", "1", "2"), mods, None),
                 SiteSpec("b", "hba1c", (), mods, None, kind="regression", unit="%"),
                 SiteSpec("c", "", (), mods, None, kind="survival", time="t", event="e",
                          unit="days")):
        write_site_spec(tmp_path / "site.toml", spec)
        again, problems = parse_site_spec(tmp_path / "site.toml")
        assert not problems and again == spec


# ------------------------------------------------------------------ federations
@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    out = {}
    for task in ("survival", "regression", "multiclass"):
        synthesize(root / task, SynthSettings(sites=3, patients_per_site=60, holdout=80,
                                              genes=40, image_size=16, seed=3, task=task))
        out[task] = root / task
    return out


def _sites(root: Path) -> list:
    return [load_site(root / f"site-{k}") for k in (1, 2, 3)]


def test_a_federation_of_mixed_tasks_is_refused(cohorts: dict[str, Path]) -> None:
    names = [column_names(load_site(cohorts["survival"] / "site-1")),
             column_names(load_site(cohorts["regression"] / "site-1"))]
    with pytest.raises(DataError, match=r"sites disagree on task\.kind: survival vs regression"):
        merge_names(names)


def test_mixed_task_simulation_stops_before_round_one(cohorts: dict[str, Path],
                                                      tmp_path: Path) -> None:
    import shutil

    fed = tmp_path / "mixed"
    shutil.copytree(cohorts["survival"], fed)
    shutil.rmtree(fed / "site-3")
    shutil.copytree(cohorts["regression"] / "site-3", fed / "site-3")
    done = run_mmfed("simulate", "--data", str(fed), "--rounds", "1",
                     "--out", str(tmp_path / "run"), "--no-progress")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "sites disagree on the task: site-1 declares survival in days, site-3 " \
        "regression" in done.stderr
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # no round ran


def test_the_schema_of_another_task_is_refused_by_the_site(cohorts: dict[str, Path]) -> None:
    """A coordinator that sends a survival site a classification (or regression) schema
    gets a refusal, not a model trained on misread labels."""
    surv = load_site(cohorts["survival"] / "site-1")
    reg_schema = pooled_schema(_sites(cohorts["regression"]))
    with pytest.raises(DataError, match="the federation's task is regression, this site's "
                                        "is survival"):
        encode(surv, reg_schema)
    multi = load_site(cohorts["multiclass"] / "site-1")
    schema = pooled_schema(_sites(cohorts["multiclass"]))
    schema.classes = ["3", "2", "1", "0"]
    with pytest.raises(DataError, match="classes"):
        encode(multi, schema)


def test_the_task_is_agreed_from_summed_moments_only(cohorts: dict[str, Path]) -> None:
    """The regression target's standardisation and the survival cuts come out of the
    same per-site moments that secure aggregation sums: the schema from the sum of the
    parts equals the one from the pooled data."""
    for kind in ("survival", "regression"):
        sites = _sites(cohorts[kind])
        holdout = load_site(cohorts[kind] / "holdout")
        layout = merge_names([column_names(s) for s in sites]).with_scales([holdout])
        parts = [column_moments(s, layout) for s in sites]
        schema = schema_from_moments(layout, *pool_moments(parts))
        task = schema.task
        assert task.kind == kind
        if kind == "regression":
            y = np.concatenate([s.targets for s in sites if s.targets is not None])
            assert task.target_mean == pytest.approx(y.mean(), rel=1e-3)
            assert task.target_std == pytest.approx(y.std(), rel=1e-2)
        else:
            events = np.concatenate([s.targets[s.labels == 1] for s in sites
                                     if s.targets is not None])
            assert len(task.cuts) >= 5 and task.unit == "days"
            assert task.cuts[len(task.cuts) // 2 - 1] == pytest.approx(
                np.quantile(events, 0.5), rel=0.2)


@pytest.mark.parametrize("kind", ["survival", "regression", "multiclass"])
def test_each_kind_learns_locally(cohorts: dict[str, Path], kind: str) -> None:
    """A few epochs on pooled data beat the untrained model on the holdout."""
    sites = _sites(cohorts[kind])
    schema = pooled_schema(sites)
    from mmfed.ml.features import EncodedSite

    train = EncodedSite.concat([encode(s, schema) for s in sites])
    holdout = encode(load_site(cohorts[kind] / "holdout"), schema)
    model = build_model(schema, seed=0)
    _, before = predict(model, holdout)
    train_local(model, train, TrainSpec(epochs=8, lr=3e-3), schema.task, seed=0)
    _, after = predict(model, holdout)
    assert after < before, (kind, before, after)
    assert len(tensor_dataset(train, schema.task)) == len(train)


def test_a_site_refuses_a_histogram_request_of_absurd_resolution(
        cohorts: dict[str, Path]) -> None:
    """The coordinator picks the event-time bins; a site caps how many it will fill,
    so a request cannot turn the summed histogram into a per-patient listing."""
    from mmfed.ml.features import StatsLayout

    sites = _sites(cohorts["survival"])
    layout = merge_names([column_names(s) for s in sites]).with_scales(sites)
    cfg = layout.to_config()
    cfg["edges"] = [float(e) for e in np.geomspace(1.0, 1e4, 5001)]
    cfg["scales"] = cfg["scales"][:layout.columns - layout.outcome_columns] + [1.0] * 10000
    cfg["centres"] = [0.0] * len(cfg["scales"])
    with pytest.raises(DataError, match="5000 histogram bins asked, at most 192"):
        StatsLayout.from_config(cfg)
    assert StatsLayout.from_config(layout.to_config()).edges == layout.edges

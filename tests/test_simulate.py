"""`mmfed simulate` end to end: real Ray simulation, real run directory on disk."""

from __future__ import annotations

import json
import math
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from tests.helpers import run_mmfed

SMALL = ["--set", "data.patients_per_site=60", "--set", "data.holdout=60",
         "--set", "data.genes=100"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sim") / "run"
    proc = run_mmfed("simulate", "--sites", "3", "--rounds", "2", "--seed", "7", "--out", out,
                     "--no-progress", *SMALL, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_run_directory_contract(small_run: tuple[Path, str]) -> None:
    out, stdout = small_run
    assert "done: 2 rounds over 3 sites" in stdout
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["seed"] == 7 and cfg["rounds"] == 2
    assert Path(cfg["data"]["dir"]) == out / "data"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        for key in ("auroc", "accuracy", "f1", "loss", "precision", "recall", "ece"):
            assert math.isfinite(line["global"][key])
        assert 0.0 <= line["global"]["auroc"] <= 1.0
        assert set(line["sites"]) == {"site-1", "site-2", "site-3"}
        for site in line["sites"].values():
            assert site["status"] == "trained"
            assert site["num_examples"] > 0 and math.isfinite(site["train_loss"])
            assert 0.0 <= site["local"]["auroc"] <= 1.0
        assert line["aggregation"]["participants"] == 3
        assert line["aggregation"]["dropped"] == 0
        assert line["bytes"]["up"] > 0 and line["bytes"]["down"] > 0
        assert line["seconds"]["round"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert summary["final"] == lines[-1]["global"]
    assert set(summary["sites"]) == {"site-1", "site-2", "site-3"}
    assert summary["wall_seconds"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "round-0001.pt", "round-0002.pt"]
    model = torch.load(out / "model.pt", weights_only=False)
    assert model["round"] == 2 and model["format"] == "mmfed-model/1"
    last = torch.load(out / "checkpoints" / "round-0002.pt", weights_only=False)
    for key, value in model["state_dict"].items():
        assert torch.equal(value, last["state_dict"][key])


@pytest.mark.slow
def test_model_file_rebuilds_and_reproduces_holdout_auroc(small_run: tuple[Path, str]) -> None:
    from mmfed.config import RunConfig
    from mmfed.data import load_site
    from mmfed.ml.features import FeatureSchema, encode
    from mmfed.ml.model import build_model
    from mmfed.ml.training import evaluate

    out, _ = small_run
    saved = torch.load(out / "model.pt", weights_only=False)
    schema = FeatureSchema.from_config(saved["schema"])
    cfg = RunConfig(saved["config"])
    model = build_model(schema, cfg.model_spec())
    model.load_state_dict(saved["state_dict"])
    figures = evaluate(model, encode(load_site(out / "data" / "holdout"), schema))
    summary = json.loads((out / "summary.json").read_text())
    assert figures["auroc"] == pytest.approx(summary["final"]["auroc"], abs=1e-9)


def test_refuses_bad_site_before_starting(tmp_path: Path) -> None:
    data = tmp_path / "fed"
    proc = run_mmfed("data", "synth", "--out", data, "--sites", "2", "--patients-per-site",
                     "30", "--holdout", "30", "--genes", "20")
    assert proc.returncode == 0, proc.stderr
    (data / "site-2" / "records.csv").write_text("patient_id,label\n1,0\n1,1\n")
    proc = run_mmfed("simulate", "--data", data, "--out", tmp_path / "run", "--rounds", "1",
                     "--no-progress", timeout=60)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "site-2" in err[0] and "duplicate patient_id" in err[0]
    assert "Traceback" not in proc.stderr


def test_refuses_existing_run_and_bad_arguments(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    proc = run_mmfed("simulate", "--out", run, "--no-progress", timeout=60)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    proc = run_mmfed("simulate", "--rounds", "zero", timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    proc = run_mmfed("simulate", "--set", "model.fusion=transformer", "--out",
                     tmp_path / "r2", timeout=60)
    assert proc.returncode == 1 and "model.fusion" in proc.stderr
    missing = tmp_path / "nowhere"
    proc = run_mmfed("simulate", "--data", missing, "--out", tmp_path / "r3", timeout=60)
    assert proc.returncode == 1 and "federation folder not found" in proc.stderr
    shutil.rmtree(run)


@pytest.mark.slow
def test_tensorboard_mirrors_every_round(small_run: tuple[Path, str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = small_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("global/auroc", "global/loss", "sites/site-1/train_loss",
                "sites/site-2/local/auroc", "aggregation/participants", "bytes/up",
                "seconds/round", "sites/site-3/is_trained"):
        assert tag in tags, tag
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [(e.step, e.value) for e in events.Scalars("global/auroc")]
    assert logged == [(x["round"], pytest.approx(x["global"]["auroc"], abs=1e-6))
                      for x in lines]

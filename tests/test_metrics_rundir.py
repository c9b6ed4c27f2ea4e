"""Round metrics (discrimination, thresholds, calibration) and the run-directory contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfed.config import RunConfig
from mmfed.errors import UsageError
from mmfed.ml.features import FeatureSchema
from mmfed.ml.metrics import classification_metrics, expected_calibration_error
from mmfed.ml.model import ModelSpec, build_model
from mmfed.run.rundir import RunDir, atomic_write_bytes, dumps, read_metrics

SCHEMA = FeatureSchema(classes=["0", "1"], numeric=["age", "crp"], numeric_mean=[60.0, 5.0],
                       numeric_std=[10.0, 3.0], categorical=["smoking"], genes=["G1", "G2"],
                       gene_mean=[6.0, 7.0], gene_std=[1.0, 0.5], image_size=(8, 8))

# --------------------------------------------------------------------------- metrics


def one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k)[labels]


@pytest.mark.parametrize("k", [2, 3])
def test_perfect_predictor(k: int) -> None:
    labels = np.array([i % k for i in range(30)])
    out = classification_metrics(one_hot(labels, k), labels, loss=0.0)
    assert out["auroc"] == 1.0
    assert out["accuracy"] == 1.0
    assert out["f1"] == 1.0
    assert out["precision"] == 1.0
    assert out["recall"] == 1.0
    assert out["ece"] is not None and out["ece"] < 1e-9
    assert out["n"] == 30.0
    assert out["loss"] == 0.0


def test_perfect_ranking_but_uncalibrated() -> None:
    labels = np.array([0, 0, 1, 1])
    p1 = np.array([0.55, 0.56, 0.57, 0.58])  # ranks perfectly, all predicted positive
    out = classification_metrics(np.stack([1 - p1, p1], axis=1), labels)
    assert out["auroc"] == 1.0
    assert out["accuracy"] == 0.5
    assert out["ece"] == pytest.approx(abs(p1.mean() - 0.5))  # all in one bin
    assert out["loss"] is None


def test_inverted_predictor() -> None:
    labels = np.array([0, 1] * 10)
    out = classification_metrics(one_hot(1 - labels, 2), labels)
    assert out["auroc"] == 0.0
    assert out["accuracy"] == 0.0
    assert out["f1"] == 0.0


@pytest.mark.parametrize("k", [2, 3])
def test_single_class_labels_auroc_is_none(k: int) -> None:
    labels = np.ones(10, dtype=np.int64)
    probs = np.full((10, k), 1.0 / k)
    out = classification_metrics(probs, labels)
    assert out["auroc"] is None
    assert out["accuracy"] is not None
    json.loads(dumps(out))  # None stays JSON-serializable


def test_ece_known_value() -> None:
    # bins of width 0.1: 0.05 -> bin 0; 0.25, 0.25 -> bin 2; 0.75 -> bin 7; 0.95 -> bin 9
    prob = np.array([0.05, 0.25, 0.25, 0.75, 0.95])
    y = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
    expected = (1 * 0.05 + 2 * 0.25 + 1 * 0.25 + 1 * 0.05) / 5
    assert expected_calibration_error(prob, y) == pytest.approx(0.17)
    assert expected_calibration_error(prob, y) == pytest.approx(expected)
    out = classification_metrics(np.stack([1 - prob, prob], axis=1), y.astype(np.int64))
    assert out["ece"] == pytest.approx(0.17)


def test_ece_extremes_land_in_end_bins() -> None:
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == 0.0
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([0.0, 0.0])) == 1.0
    # With two bins the two halves are judged separately: |0.2-0| and |0.9-1|.
    got = expected_calibration_error(np.array([0.2, 0.9]), np.array([0.0, 1.0]), bins=2)
    assert got == pytest.approx(0.5 * 0.2 + 0.5 * 0.1)


def test_multiclass_ece_uses_top_class_confidence() -> None:
    probs = np.array([[0.62, 0.28, 0.10],  # right, confidence 0.62
                      [0.15, 0.64, 0.21],  # right, 0.64
                      [0.33, 0.05, 0.62],  # wrong, 0.62
                      [0.90, 0.05, 0.05]])  # wrong, 0.90
    labels = np.array([0, 1, 0, 2])
    out = classification_metrics(probs, labels)
    # bin 6: confidences .62, .64, .62 with 2/3 right; bin 9: .90 with 0 right
    expected = 0.75 * abs(np.mean([0.62, 0.64, 0.62]) - 2 / 3) + 0.25 * 0.90
    assert out["ece"] == pytest.approx(expected)
    assert out["accuracy"] == 0.5
    assert out["auroc"] is not None


def test_non_finite_loss_becomes_none() -> None:
    labels = np.array([0, 1])
    out = classification_metrics(one_hot(labels, 2), labels, loss=float("nan"))
    assert out["loss"] is None
    json.loads(dumps(out))


# --------------------------------------------------------------------------- JSON


def test_dumps_writes_non_finite_as_null_and_converts_numpy() -> None:
    # A diverged loss must not make metrics.jsonl invalid JSON (JSON has no NaN).
    for bad in (float("nan"), float("inf"), np.float32("nan"), np.float64("inf")):
        assert json.loads(dumps({"x": bad, "y": [bad]})) == {"x": None, "y": [None]}
    line = dumps({"a": np.float32(0.5), "b": np.int64(3), "c": None, "d": [np.bool_(True)]})
    assert json.loads(line) == {"a": 0.5, "b": 3, "c": None, "d": [True]}
    with pytest.raises(TypeError):
        dumps({"x": object()})


# --------------------------------------------------------------------------- run directory


def test_rundir_layout_and_refuses_existing_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""
    run.append_metrics({"round": 1})
    with pytest.raises(UsageError, match="already holds a run"):
        RunDir(tmp_path / "run")
    # The refused attempt did not truncate the existing run.
    assert read_metrics(tmp_path / "run") == [{"round": 1}]
    # Resuming explicitly keeps it.
    RunDir(tmp_path / "run", fresh=False)
    assert read_metrics(tmp_path / "run") == [{"round": 1}]


def test_metrics_lines_are_valid_json(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    labels = np.array([0, 1, 1, 0])
    figures = classification_metrics(np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4],
                                               [0.9, 0.1]]), labels, loss=0.4)
    lines = [{"round": 1, "global": figures, "sites": {"site-1": {"n": np.int64(4)}}},
             {"round": 2, "global": {**figures, "auroc": None}, "note": "ünïcode \n line"}]
    for line in lines:
        run.append_metrics(line)
    text = (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8")
    raw = text.splitlines()
    assert len(raw) == 2 and text.endswith("\n")
    parsed = [json.loads(x) for x in raw]
    assert parsed[0]["global"]["auroc"] == pytest.approx(1.0)
    assert parsed[0]["sites"]["site-1"]["n"] == 4
    assert parsed[1]["global"]["auroc"] is None
    assert parsed[1]["note"] == "ünïcode \n line"
    assert read_metrics(tmp_path / "run") == parsed


def test_nan_metric_is_written_as_null_and_file_stays_valid(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.append_metrics({"round": 1, "loss": 0.5})
    run.append_metrics({"round": 2, "loss": float("nan")})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"round": 1, "loss": 0.5},
                                              {"round": 2, "loss": None}]


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "dir" / "file.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]
    assert list((tmp_path / "deep").iterdir()) == [target.parent]


def test_atomic_write_failure_keeps_old_file(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"


def test_config_written_to_run_reloads(tmp_path: Path) -> None:
    cfg = RunConfig({"seed": 4, "model.fusion": "concat", "train.modalities": ["images"],
                     "out": str(tmp_path / "run")})
    run = RunDir(tmp_path / "run")
    run.write_config(cfg)
    assert RunConfig.load(tmp_path / "run" / "config.toml").values == cfg.values


def test_checkpoint_is_self_describing(tmp_path: Path) -> None:
    cfg = RunConfig({"model.embed_dim": 8, "model.hidden": 16, "seed": 2})
    model = build_model(SCHEMA, cfg.model_spec(), seed=2)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    run = RunDir(tmp_path / "run")
    path = run.save_checkpoint(3, state, SCHEMA, cfg)
    assert path == tmp_path / "run" / "checkpoints" / "round-0003.pt"
    assert [p.name for p in path.parent.iterdir()] == ["round-0003.pt"]
    payload = torch.load(path, weights_only=False)
    assert set(payload) == {"format", "round", "state_dict", "schema", "config", "state_hash"}
    assert payload["format"] == "mmfed-model/1"
    assert payload["round"] == 3
    assert payload["config"] == cfg.values
    schema = FeatureSchema.from_config(payload["schema"])
    assert schema == SCHEMA
    # Everything needed to rebuild the model is in the file.
    rebuilt = build_model(schema, ModelSpec(fusion=payload["config"]["model.fusion"],
                                            embed_dim=payload["config"]["model.embed_dim"],
                                            hidden=payload["config"]["model.hidden"]))
    rebuilt.load_state_dict(payload["state_dict"])
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key

    run.save_model(state, SCHEMA, cfg, round_num=5)
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert final["round"] == 5
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


def test_summary_is_json(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.write_summary({"rounds": 2, "final": {"auroc": np.float64(0.75)},
                       "wall_seconds": np.float32(1.5)})
    data = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert data["final"]["auroc"] == 0.75
    assert math.isclose(data["wall_seconds"], 1.5)


def test_rundir_reuses_a_folder_whose_start_failed(tmp_path: Path) -> None:
    RunDir(tmp_path / "run")  # e.g. refused settings after the folder was made
    RunDir(tmp_path / "run")  # no round was written: the folder may be used again


def test_late_local_figures_are_read_by_the_model_they_evaluate() -> None:
    """Round r's line carries the sites' figures of round r - 1's model (``local_model``)
    and the last line the final model's (``local_final``): TensorBoard and the report
    both put each at the round of its model; older lines hold their own round's."""
    from mmfed.report.rundata import RunData
    from mmfed.run.tracking import local_scalars, scalars

    lines = [{"round": r, "local_model": r - 1, "global": {"auroc": 0.5},
              "sites": {"site-1": {"status": "trained", "local": {"auroc": r / 10}}}}
             for r in (1, 2, 3)]
    lines[-1]["sites"]["site-1"]["local_final"] = {"auroc": 0.4}
    got = [(tag, at, value) for line in lines for tag, value, at in local_scalars(line)]
    assert got == [("sites/site-1/local/auroc", 0, 0.1), ("sites/site-1/local/auroc", 1, 0.2),
                   ("sites/site-1/local/auroc", 2, 0.3), ("sites/site-1/local/auroc", 3, 0.4)]
    assert "local_model" not in dict(scalars(lines[0]))
    data = RunData(path=Path("."), rounds=lines, summary={}, config={})
    assert data.site_series("site-1", "auroc", local=True) == [0.2, 0.3, 0.4]
    old = [{"round": r, "sites": {"site-1": {"local": {"auroc": r / 10}}}} for r in (1, 2)]
    assert RunData(path=Path("."), rounds=old, summary={}, config={}).site_series(
        "site-1", "auroc", local=True) == [0.1, 0.2]

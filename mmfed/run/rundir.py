"""The run directory contract: config, per-round metrics, checkpoints, final model.

Everything is written so that a crash at any instant leaves either the old or the
new file, never a torn one: temporary file, fsync, atomic rename, fsync of the folder.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mmfed.config import RunConfig
from mmfed.errors import UsageError
from mmfed.files import atomic_write_bytes, state_hash
from mmfed.ml.features import FeatureSchema


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def finite(obj: Any) -> Any:
    """JSON has no NaN: a diverged loss is written as null rather than invalid JSON."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, float | np.floating) and not np.isfinite(obj):
        return None
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(finite(obj), default=_json_default, allow_nan=False)


def model_payload(state: dict[str, np.ndarray], schema: FeatureSchema, cfg: RunConfig,
                  round_num: int) -> bytes:
    """A self-describing model file: weights plus what is needed to rebuild the model."""
    import torch

    buf = io.BytesIO()
    torch.save({"format": "mmfed-model/1", "round": round_num,
                "state_hash": state_hash(state),
                "state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                "schema": schema.to_config(), "config": dict(cfg.values)}, buf)
    return buf.getvalue()


class RunDir:
    """Writer for one run directory (see the design contract, section 3)."""

    def __init__(self, path: Path | str, *, fresh: bool = True) -> None:
        self.path = Path(path)
        metrics = self.path / "metrics.jsonl"
        if fresh and metrics.exists() and metrics.stat().st_size > 0:  # a start that failed
            # before its first round left an empty file: that folder may be reused
            raise UsageError(f"{self.path}: already holds a run (choose a new --out)")
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        if fresh:
            (self.path / "metrics.jsonl").write_text("", encoding="utf-8")

    def write_config(self, cfg: RunConfig) -> None:
        atomic_write_bytes(self.path / "config.toml", cfg.to_toml().encode())

    def append_metrics(self, line: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def save_checkpoint(self, round_num: int, state: dict[str, np.ndarray],
                        schema: FeatureSchema, cfg: RunConfig) -> Path:
        path = self.path / "checkpoints" / f"round-{round_num:04d}.pt"
        atomic_write_bytes(path, model_payload(state, schema, cfg, round_num))
        return path

    def save_model(self, state: dict[str, np.ndarray], schema: FeatureSchema, cfg: RunConfig,
                   round_num: int) -> None:
        atomic_write_bytes(self.path / "model.pt", model_payload(state, schema, cfg, round_num))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_bytes(self.path / "summary.json",
                           (json.dumps(finite(summary), indent=2, default=_json_default,
                                       allow_nan=False) + "\n").encode())


def read_metrics(run: Path | str) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]

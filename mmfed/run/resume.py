"""Resuming a crashed run from its last complete round.

A round is complete when its checkpoint is on disk (written atomically, with a hash
of its weights inside) *and* its line is in ``metrics.jsonl``. Resuming keeps rounds
1..k exactly as they were, drops any partial trace of round k+1 and continues from
there with the same run id, so sites recognise the run: their privacy ledgers and
release copies make a repeated round cost nothing extra (see privacy/releases.py).

The server keeps no strategy or optimiser state beyond the global model (FedAvg with
server learning rate 1) and draws its per-round randomness from (seed, round), so the
checkpoint's weights, round and metrics are everything a resumed run needs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmfed.config import RunConfig
from mmfed.errors import DataError, UsageError
from mmfed.files import atomic_write_bytes, state_hash
from mmfed.ml.features import FeatureSchema

CHECKPOINT = re.compile(r"^round-(\d{4,})\.pt$")


@dataclass
class ResumePoint:
    round: int
    state: dict[str, np.ndarray]
    schema: FeatureSchema
    lines: list[dict[str, Any]] = field(default_factory=list)  # metrics of rounds 1..k


def _load_checkpoint(path: Path, cfg: RunConfig) -> tuple[int, dict[str, np.ndarray],
                                                         FeatureSchema]:
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for torn or foreign files
        raise DataError(f"{path}: corrupt checkpoint ({type(exc).__name__}); delete it to "
                        "resume from the round before") from None
    if not isinstance(saved, dict) or not {"state_dict", "schema", "config",
                                           "round"} <= set(saved):
        raise DataError(f"{path}: not an mmfed checkpoint")
    state = {str(k): v.numpy() for k, v in saved["state_dict"].items()}
    expected = saved.get("state_hash")
    if expected is not None and expected != state_hash(state):
        raise DataError(f"{path}: checkpoint weights do not match their hash (corrupt); "
                        "delete it to resume from the round before")
    ran = saved["config"]
    if not isinstance(ran, dict) or ran.get("run_id") != cfg["run_id"]:
        raise DataError(f"{path}: checkpoint belongs to another run (run id "
                        f"{ran.get('run_id') if isinstance(ran, dict) else '?'}, config.toml "
                        f"says {cfg['run_id']})")
    for key in ("seed", "model.fusion", "model.embed_dim", "model.hidden"):
        if ran.get(key) != cfg[key]:
            raise DataError(f"{path}: checkpoint was made with {key} = {ran.get(key)!r}, "
                            f"config.toml says {cfg[key]!r}")
    try:
        schema = FeatureSchema.from_config(saved["schema"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: checkpoint has an unusable feature schema ({exc})") from None
    return int(saved["round"]), state, schema


def _metrics_lines(run: Path) -> list[dict[str, Any]]:
    """Every complete JSON line; a torn last line (crash mid-write) is dropped."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    lines: list[dict[str, Any]] = []
    raw = path.read_text(encoding="utf-8").splitlines()
    for number, text in enumerate(raw, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            if number == len(raw):
                break
            raise DataError(f"{path}: line {number} is not JSON; cannot resume") from None
        if not isinstance(line, dict) or line.get("round") != len(lines) + 1:
            raise DataError(f"{path}: line {number} is not round {len(lines) + 1}; "
                            "cannot resume")
        lines.append(line)
    return lines


def find_resume_point(run: Path, cfg: RunConfig) -> ResumePoint | None:
    """The last complete round of ``run`` (None: nothing completed, start afresh)."""
    rounds = sorted(int(m.group(1)) for p in (run / "checkpoints").glob("round-*.pt")
                    if (m := CHECKPOINT.match(p.name)))
    lines = _metrics_lines(run)
    usable = [r for r in rounds if r <= len(lines)]
    if not usable:
        return None
    k = usable[-1]
    got, state, schema = _load_checkpoint(run / "checkpoints" / f"round-{k:04d}.pt", cfg)
    if got != k:
        raise DataError(f"{run}/checkpoints/round-{k:04d}.pt holds round {got}")
    return ResumePoint(round=k, state=state, schema=schema, lines=lines[:k])


def truncate_metrics(run: Path, point: ResumePoint | None) -> None:
    """Rewrite metrics.jsonl with rounds 1..k only, atomically; drop later checkpoints."""
    lines = point.lines if point else []
    text = "".join(json.dumps(line) + "\n" for line in lines)
    atomic_write_bytes(run / "metrics.jsonl", text.encode())
    k = point.round if point else 0
    for path in (run / "checkpoints").glob("round-*.pt"):
        match = CHECKPOINT.match(path.name)
        if match and int(match.group(1)) > k:
            path.unlink()


def refuse_run_flags(flags: tuple[tuple[str, object], ...]) -> None:
    """A resumed run takes everything from its own config.toml, so any flag that would
    shape a run (given as ``(flag, value)``; unset values are falsy) contradicts it."""
    given = [flag for flag, value in flags if value]
    if given:
        raise UsageError(f"--resume continues a run with its own config.toml; drop "
                         f"{', '.join(given)}")


def load_run_config(run: Path) -> RunConfig:
    """The configuration the crashed run was started with."""
    if not (run / "config.toml").is_file():
        raise DataError(f"{run}: no config.toml; not a run directory that can be resumed")
    cfg = RunConfig.load(run / "config.toml")
    if not cfg["run_id"]:
        raise DataError(f"{run}/config.toml has no run_id; cannot resume")
    if (run / "summary.json").exists():
        raise DataError(f"{run}: this run already finished (summary.json exists)")
    return cfg

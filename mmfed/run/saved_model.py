"""Reading a run's saved model back: the one loader for explain, report and tests.

``model.pt`` is written by ``mmfed.run.rundir.model_payload``. It is loaded with
``weights_only=True`` because a model file handed over from elsewhere must not be able
to run code, and every defect becomes a one-line ``DataError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmfed.config import RunConfig
from mmfed.errors import ConfigError, DataError
from mmfed.ml.features import FeatureSchema
from mmfed.ml.model import MultimodalNet, build_model


@dataclass
class SavedModel:
    model: MultimodalNet
    schema: FeatureSchema
    cfg: RunConfig
    round: int | None


def state_mismatch(model: nn.Module, state: Any) -> str:
    """What keeps ``state`` from loading into ``model``, in one line ("" when it fits).

    torch's own message spans many lines; a user needs the first few names only.
    """
    if not isinstance(state, dict):
        return "state_dict is not a mapping"
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shape = [k for k in own if k in state and (not isinstance(state[k], torch.Tensor)
                                               or tuple(state[k].shape) != tuple(own[k].shape))]
    parts = [f"{what} {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
             for what, keys in (("missing", missing), ("unexpected", extra),
                                ("wrong shape", shape)) if keys]
    return "; ".join(parts)


def load_saved_model(run: Path) -> SavedModel:
    """Rebuild the final model of ``run`` (in eval mode) from ``RUN/model.pt``."""
    if not run.is_dir():
        raise DataError(f"{run}: no such run directory")
    path = run / "model.pt"
    if not path.is_file():
        raise DataError(f"{run}: no model.pt (the run did not finish, or this is not a run "
                        "directory)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for torn or foreign files
        raise DataError(f"{path}: cannot be loaded as an mmfed model ({type(exc).__name__})"
                        ) from None
    if not isinstance(saved, dict) or not {"state_dict", "schema", "config"} <= set(saved):
        raise DataError(f"{path}: not an mmfed model file (missing state_dict/schema/config)")
    try:
        schema = FeatureSchema.from_config(saved["schema"])
        cfg = RunConfig(saved["config"])
        model = build_model(schema, cfg.model_spec())
    except (ConfigError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(f"{path}: unusable schema/config in the model file ({exc})") from None
    problem = state_mismatch(model, saved["state_dict"])
    if problem:
        raise DataError(f"{path}: weights do not fit this version of the model ({problem}); "
                        "was it written by an older mmfed?")
    model.load_state_dict(saved["state_dict"])
    model.eval()
    rnd = saved.get("round")
    return SavedModel(model, schema, cfg, rnd if isinstance(rnd, int) else None)


def holdout_folder(run: Path, cfg: RunConfig, data: Path | None = None) -> Path:
    """The holdout the server evaluated on; a moved run falls back to its own data copy."""
    candidates = [Path(data) / "holdout"] if data is not None else []
    if cfg["data.dir"]:
        candidates.append(Path(cfg["data.dir"]) / "holdout")
    candidates.append(run / "data" / "holdout")
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise DataError(f"{run}: holdout folder not found (looked in "
                    f"{', '.join(str(c) for c in candidates)}; pass the federation folder)")

"""How mmfed's payloads ride in Flower messages (both ends use these helpers).

Names of records and message types are defined once here so the server and the
client cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from mmfed.config import RunConfig
from mmfed.ml.features import FeatureSchema

STATS = "query.stats"
TRAIN = "train"
EVALUATE = "evaluate"
SECAGG_SHARE = "query.secagg_share"
SECAGG_MASK = "query.secagg_mask"
SECAGG_UNMASK = "query.secagg_unmask"
ERR_SITE = 1001  # a site-side failure with a one-line reason


def request(cfg: RunConfig, round_num: int, schema: FeatureSchema | None = None,
            state: dict[str, np.ndarray] | None = None) -> RecordDict:
    content = RecordDict()
    content["config"] = ConfigRecord({**cfg.to_flower(), "round": round_num})
    if schema is not None:
        content["schema"] = ConfigRecord(schema.to_config())
    if state is not None:
        content["model"] = to_array_record(state)
    return content


def read_request(content: RecordDict) -> tuple[RunConfig, int, FeatureSchema | None,
                                               dict[str, np.ndarray] | None]:
    raw = dict(content.config_records["config"])
    round_num = scalar(raw.pop("round"))
    cfg = RunConfig.from_flower(raw)
    schema = (FeatureSchema.from_config(dict(content.config_records["schema"]))
              if "schema" in content.config_records else None)
    state = (arrays_to_numpy(content.array_records["model"])
             if "model" in content.array_records else None)
    return cfg, round_num, schema, state


def to_array_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: arr.numpy() for k, arr in record.items()}


def reply_content(site: str, *, state: dict[str, np.ndarray] | None = None,
                  metrics: dict[str, float] | None = None,
                  config: dict[str, Any] | None = None) -> RecordDict:
    content = RecordDict()
    content["site"] = ConfigRecord({"name": site, **(config or {})})
    if state is not None:
        content["model"] = to_array_record(state)
    if metrics is not None:
        content["metrics"] = MetricRecord({k: float(v) for k, v in metrics.items()})
    return content


def scalar(value: Any) -> int:
    """Record values are typed as unions with lists; a round number is a plain int."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return int(value)


def metrics_of(reply_content: RecordDict) -> dict[str, float]:
    """A reply's MetricRecord as plain floats (lists are not used by mmfed)."""
    record = reply_content.metric_records["metrics"]
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


def state_bytes(state: dict[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in state.values()))

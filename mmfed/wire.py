"""The wire contract between a site and the server: message names, record keys, codecs.

Site code (``mmfed.site``) and server code (``mmfed.server``) never import each other;
this module is where they meet. Every message name, every record key and every
encoding of a payload is written here once, with its decoder next to it, so the two
ends cannot drift apart. Decoders treat their input as untrusted: a malformed record
is a one-line ``WireError``, never a ``KeyError`` deep in a handler.

Nothing here imports torch: the secure-aggregation stage handlers that use it run in a
fresh process per message in deployment, where torch's import alone costs seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from mmfed.config import RunConfig
from mmfed.errors import MmfedError
from mmfed.ml.features import FeatureSchema, StatsLayout
from mmfed.secagg import SecAggParams

# A site reports the expected signal-to-noise ratio of its DP training over the run
# (``snr``, mmfed.privacy.accounting.expected_snr); below this the server warns that
# noise swamps the site's gradient. Runs that scored under 1 (ε = 1 with local epochs,
# 3 sites of 40 patients at ε = 8 with the default plan) lost 0.1 to 0.25 holdout AUROC
# to DP; the default federation at ε = 8 scores about 8 (benchmarks/dp_utility.py).
SNR_WARNING = 1.0


class WireError(MmfedError):
    """A message that does not follow this contract (a bug, or a peer to distrust)."""


# ------------------------------------------------------------------ message names
# Flower's ClientApp registers a query handler under its action ("stats") and routes
# messages of type "query.<action>" to it; both spellings derive from one constant.
QUERY = "query"
TRAIN = "train"
EVALUATE = "evaluate"
ACTION_STATS = "stats"
ACTION_MOMENTS = "moments"
ACTION_SHARE = "secagg_share"
ACTION_MASK = "secagg_mask"
ACTION_UNMASK = "secagg_unmask"
STATS = f"{QUERY}.{ACTION_STATS}"
MOMENTS = f"{QUERY}.{ACTION_MOMENTS}"
SECAGG_SHARE = f"{QUERY}.{ACTION_SHARE}"
SECAGG_MASK = f"{QUERY}.{ACTION_MASK}"
SECAGG_UNMASK = f"{QUERY}.{ACTION_UNMASK}"
MESSAGE_TYPES = (STATS, MOMENTS, TRAIN, EVALUATE, SECAGG_SHARE, SECAGG_MASK, SECAGG_UNMASK)
ERR_SITE = 1001  # a site-side failure with a one-line reason
ERR_APP_REFUSED = 1002  # the site does not serve this app: its hash is not approved there

# ------------------------------------------------------------------ record keys
CONFIG = "config"  # the run configuration (+ round) of a request
SCHEMA = "schema"  # the federation's feature schema
MODEL = "model"  # model weights: the global model down, a plaintext update up
SITE = "site"  # a reply's sender (and, for stats, its column names)
LAYOUT = "layout"  # the federation's columns and their clipping scales
METRICS = "metrics"  # a reply's figures (examples, loss, ε, ...)
SECAGG = "secagg"  # secure-aggregation parameters (train request) or stage payload
STAGE = "stage"  # which round and site a secure-aggregation stage belongs to
MASKED = "masked"  # a site's masked update vector
MOMENT_ARRAYS = "moments"  # a plaintext moments reply: per-column moments and counts
ROUND = "round"  # inside CONFIG: the round number
NAME = "name"  # inside SITE: the site's name
SEGMENT_GROUPS = "segment_groups"  # inside SECAGG: weight group name of each segment
MY_ID = "my_id"  # inside SECAGG: this site's id in the protocol
COHORT = "cohort"  # inside CONFIG: how many sites a plaintext round asks
DECLINED = "declined"  # a site's refusal under its own policy, with its reason
LOCAL = "local"  # a train reply's figures of the model its request carried, on the
# site's own validation split (federation.local_eval): the previous round's model
PEERS = "secagg_peers"  # a train request's public keys of the site's share group, when
# every site advertised keys for the round ahead (the share trip rides on training)
NEXT_KEYS = "secagg_next"  # an unmask reply's public keys for the next round
NEXT_ROUND = "next_round"  # inside an unmask request: the round to make keys for


# ------------------------------------------------------------------ requests and replies
def request(cfg: RunConfig, round_num: int, schema: FeatureSchema | None = None,
            state: dict[str, np.ndarray] | None = None, *,
            cohort: int | None = None) -> RecordDict:
    """A request to sites; ``cohort`` announces how many sites a plaintext round asks
    (a site whose policy allows plaintext still wants enough company)."""
    content = RecordDict()
    header: dict[str, Any] = {ROUND: round_num}
    if cohort is not None:
        header[COHORT] = cohort
    content[CONFIG] = ConfigRecord({**cfg.to_flower(), **header})
    if schema is not None:
        content[SCHEMA] = ConfigRecord(schema.to_config())
    if state is not None:
        content[MODEL] = to_array_record(state)
    return content


def read_request(content: RecordDict) -> tuple[RunConfig, int, FeatureSchema | None,
                                               dict[str, np.ndarray] | None]:
    if CONFIG not in content.config_records:
        raise WireError("request without a run configuration")
    raw = dict(content.config_records[CONFIG])
    round_num = scalar(raw.pop(ROUND, None))
    raw.pop(COHORT, None)
    cfg = RunConfig.from_flower(raw)
    schema = (FeatureSchema.from_config(dict(content.config_records[SCHEMA]))
              if SCHEMA in content.config_records else None)
    state = (arrays_to_numpy(content.array_records[MODEL])
             if MODEL in content.array_records else None)
    return cfg, round_num, schema, state


def cohort_of(content: RecordDict) -> int | None:
    """The number of sites a plaintext request says the round asks, if it says."""
    if CONFIG not in content.config_records:
        return None
    value = content.config_records[CONFIG].get(COHORT)
    return None if value is None else scalar(value)


def declined(reason: str, site: str | None = None,
             local: Mapping[str, float] | None = None) -> RecordDict:
    """A site's refusal: a normal reply (not an error), so the server can tell a
    site's choice from a failure, and it carries nothing but the reason and, when a
    site declines training after evaluating the global model, that local evaluation
    (``LOCAL``: figures about the global model, never about the refused update)."""
    content = RecordDict()
    if site is not None:
        content[SITE] = ConfigRecord({NAME: site})
    content[DECLINED] = ConfigRecord({"reason": reason})
    if local is not None:
        content[LOCAL] = local_figures(local)
    return content


def declined_of(content: RecordDict) -> str | None:
    """The reason of a refusal, or None for any other reply."""
    if DECLINED not in content.config_records:
        return None
    reason = content.config_records[DECLINED].get("reason")
    return str(reason) if isinstance(reason, str) and reason else "declined"


def moments_request(cfg: RunConfig, layout: StatsLayout, *,
                    cohort: int | None = None) -> RecordDict:
    """Ask for each site's per-column moments under ``layout`` (before round 1)."""
    content = request(cfg, 0, cohort=cohort)
    content[LAYOUT] = ConfigRecord(layout.to_config())
    return content


def layout_of(content: RecordDict) -> StatsLayout:
    if LAYOUT not in content.config_records:
        raise WireError("moments request without its layout")
    try:
        return StatsLayout.from_config(dict(content.config_records[LAYOUT]))
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed statistics layout ({exc})") from None


def moments_reply(site: str, moments: np.ndarray, counts: np.ndarray) -> RecordDict:
    """A plaintext moments reply (only where the site's policy allows plaintext)."""
    content = reply_content(site)
    content[MOMENT_ARRAYS] = ArrayRecord({
        "moments": Array(np.ascontiguousarray(moments, dtype=np.float64)),
        "counts": Array(np.ascontiguousarray(counts, dtype=np.int64))})
    return content


def moments_of(content: RecordDict, columns: int) -> tuple[np.ndarray, np.ndarray]:
    if MOMENT_ARRAYS not in content.array_records:
        raise WireError("moments reply without its moments")
    record = content.array_records[MOMENT_ARRAYS]
    if "moments" not in record or "counts" not in record:
        raise WireError("moments reply without its moments")
    moments, counts = record["moments"].numpy(), record["counts"].numpy()
    if moments.shape != (2 * columns,) or counts.shape != (columns,):
        raise WireError(f"moments of shape {moments.shape}, counts {counts.shape}; the "
                        f"layout has {columns} columns")
    if not np.all(np.isfinite(moments)) or np.abs(moments).max(initial=0) > 1.0 \
            or (counts < 0).any():
        raise WireError("moments out of range")
    return moments.astype(np.float64), counts.astype(np.int64)


def to_array_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: arr.numpy() for k, arr in record.items()}


def reply_content(site: str, *, state: dict[str, np.ndarray] | None = None,
                  metrics: dict[str, float] | None = None,
                  config: dict[str, Any] | None = None) -> RecordDict:
    content = RecordDict()
    content[SITE] = ConfigRecord({NAME: site, **(config or {})})
    if state is not None:
        content[MODEL] = to_array_record(state)
    if metrics is not None:
        content[METRICS] = MetricRecord({k: float(v) for k, v in metrics.items()})
    return content


def site_of(content: RecordDict) -> tuple[str, dict[str, Any]]:
    """A reply's sender name and the rest of its site record (the site's statistics)."""
    if SITE not in content.config_records:
        raise WireError("reply without a site record")
    record = dict(content.config_records[SITE])
    name = record.pop(NAME, None)
    if not isinstance(name, str) or not name:
        raise WireError("reply without a site name")
    return name, record


def scalar(value: Any) -> int:
    """Record values are typed as unions with lists; a round number is a plain int."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(f"expected a number, got {value!r}")
    return int(value)


def metrics_of(content: RecordDict) -> dict[str, float]:
    """A reply's MetricRecord as plain floats (lists are not used by mmfed)."""
    if METRICS not in content.metric_records:
        return {}
    record = content.metric_records[METRICS]
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


def local_figures(figures: Mapping[str, float]) -> MetricRecord:
    """A site's local evaluation (the ``evaluate`` reply's figures), as a train reply's
    ``LOCAL`` record."""
    return MetricRecord({k: float(v) for k, v in figures.items()})


def local_of(content: RecordDict) -> dict[str, float] | None:
    """A reply's local evaluation: None when it carries none (the run does not ask for
    one, or the site failed before evaluating)."""
    if LOCAL not in content.metric_records:
        return None
    record = content.metric_records[LOCAL]
    return {k: float(v) for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def model_of(content: RecordDict) -> dict[str, np.ndarray] | None:
    """A reply's plaintext model, or None when it carries none."""
    if MODEL not in content.array_records:
        return None
    return arrays_to_numpy(content.array_records[MODEL])


def state_bytes(state: dict[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in state.values()))


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message, for the round's byte counts."""
    total = 0
    for arrays in content.array_records.values():
        total += sum(len(arr.data) for arr in arrays.values())
    for config in content.config_records.values():
        for value in config.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) if isinstance(v, bytes) else 8 for v in value)
            else:
                total += 8
    return total


# ------------------------------------------------------------------ secure aggregation
def ints(value: object) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise WireError("malformed secure aggregation message (expected integers)")
    return [int(v) for v in value]


def blobs(value: object) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise WireError("malformed secure aggregation message (expected bytes)")
    return [bytes(v) for v in value]


def _field(record: Mapping[str, Any], key: str) -> Any:
    if key not in record:
        raise WireError(f"malformed secure aggregation message (no {key!r})")
    return record[key]


def _pairs(record: Mapping[str, Any], ids: str, values: str) -> dict[int, bytes]:
    keys, data = ints(_field(record, ids)), blobs(_field(record, values))
    if len(keys) != len(data) or len(set(keys)) != len(keys):
        raise WireError(f"malformed secure aggregation message ({ids!r} and {values!r} "
                        "do not pair up)")
    return dict(zip(keys, data, strict=True))


@dataclass(frozen=True)
class SecAggRequest:
    """What a train request adds under secure aggregation: the round's protocol
    parameters, this site's id in it, and the weight group of each segment."""

    params: SecAggParams
    my_id: int
    segment_groups: tuple[str, ...] = ()

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({**self.params.to_record(), MY_ID: self.my_id,
                             SEGMENT_GROUPS: list(self.segment_groups)})

    @staticmethod
    def from_record(record: Mapping[str, Any]) -> SecAggRequest:
        raw = dict(record)
        my_id = raw.pop(MY_ID, None)
        groups = raw.pop(SEGMENT_GROUPS, [])
        if isinstance(my_id, bool) or not isinstance(my_id, int):
            raise WireError("malformed secure aggregation request (no site id)")
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise WireError("malformed secure aggregation request (segment groups)")
        params = SecAggParams.from_record(raw)
        if my_id not in params.site_ids:
            raise WireError(f"secure aggregation request for site id {my_id}, which is "
                            "not in the round")
        return SecAggRequest(params, int(my_id), tuple(groups))


def secagg_request_of(content: RecordDict) -> SecAggRequest | None:
    """The secure-aggregation part of a train request, or None for a plaintext one."""
    if SECAGG not in content.config_records:
        return None
    return SecAggRequest.from_record(content.config_records[SECAGG])


def with_secagg(base: RecordDict, secagg: SecAggRequest,
                peers: Mapping[int, Mapping[str, bytes]] | None = None) -> RecordDict:
    """A copy of a train request for one site, with that site's protocol parameters
    and, when the round's keys were advertised ahead, its share group's public keys
    (``PEERS``: the site then sends its encrypted shares with its train reply)."""
    content = RecordDict()
    for key, config in base.config_records.items():
        content[key] = config
    for key, arrays in base.array_records.items():
        content[key] = arrays
    content[SECAGG] = secagg.to_record()
    if peers is not None:
        content[PEERS] = peer_keys(peers)
    return content


def peers_of(content: RecordDict) -> dict[int, dict[str, bytes]] | None:
    """A train request's share-group public keys, or None on the classic path."""
    if PEERS not in content.config_records:
        return None
    return peer_keys_of(content.config_records[PEERS])


def secagg_of(content: RecordDict) -> ConfigRecord:
    """A stage reply's secure-aggregation record; its absence is a malformed reply."""
    if SECAGG not in content.config_records:
        raise WireError("reply without its secure aggregation record")
    return content.config_records[SECAGG]


def public_keys(keys: Mapping[str, bytes]) -> ConfigRecord:
    return ConfigRecord({"c_pk": keys["c_pk"], "s_pk": keys["s_pk"]})


def public_keys_of(content: RecordDict) -> dict[str, bytes]:
    """A secure train reply's advertised public keys."""
    if SECAGG not in content.config_records:
        raise WireError("reply without public keys")
    record = content.config_records[SECAGG]
    c_pk, s_pk = record.get("c_pk"), record.get("s_pk")
    if not isinstance(c_pk, bytes) or not isinstance(s_pk, bytes):
        raise WireError("malformed public keys")
    return {"c_pk": c_pk, "s_pk": s_pk}


@dataclass(frozen=True)
class Stage:
    """The header of a share, mask or unmask message: which round, which site, and the
    drills (``faults.drop``) the site must act out."""

    round: int
    site: str
    faults: tuple[str, ...] = ()


def stage_content(stage: Stage, payload: ConfigRecord) -> RecordDict:
    content = RecordDict()
    content[STAGE] = ConfigRecord({ROUND: stage.round, "site": stage.site,
                                   "faults": list(stage.faults)})
    content[SECAGG] = payload
    return content


def read_stage(content: RecordDict) -> tuple[Stage, ConfigRecord]:
    if STAGE not in content.config_records or SECAGG not in content.config_records:
        raise WireError("secure aggregation stage without its header or payload")
    raw = content.config_records[STAGE]
    faults = raw.get("faults", [])
    if not isinstance(faults, list) or not all(isinstance(f, str) for f in faults):
        raise WireError("malformed secure aggregation stage header")
    stage = Stage(scalar(raw.get(ROUND)), str(raw.get("site", "")),
                  tuple(str(f) for f in faults))
    return stage, content.config_records[SECAGG]


def peer_keys(pks: Mapping[int, Mapping[str, bytes]]) -> ConfigRecord:
    """Share stage, server → site: the public keys of the site's neighbours."""
    return ConfigRecord({"ids": list(pks), "c_pk": [v["c_pk"] for v in pks.values()],
                         "s_pk": [v["s_pk"] for v in pks.values()]})


def peer_keys_of(record: Mapping[str, Any]) -> dict[int, dict[str, bytes]]:
    ids = ints(_field(record, "ids"))
    c_pk, s_pk = blobs(_field(record, "c_pk")), blobs(_field(record, "s_pk"))
    if not len(ids) == len(c_pk) == len(s_pk) or len(set(ids)) != len(ids):
        raise WireError("malformed secure aggregation message (public keys do not pair up)")
    return {i: {"c_pk": c, "s_pk": s} for i, c, s in zip(ids, c_pk, s_pk, strict=True)}


def shares(out: Mapping[int, bytes]) -> ConfigRecord:
    """Share stage, site → server: one encrypted share bundle per recipient."""
    return ConfigRecord({"to": list(out), "ct": list(out.values())})


def shares_of(record: Mapping[str, Any]) -> dict[int, bytes]:
    return _pairs(record, "to", "ct")


def routed(mine: Mapping[int, bytes]) -> ConfigRecord:
    """Mask stage, server → site: the ciphertexts other sites addressed to this one."""
    return ConfigRecord({"from": list(mine), "ct": list(mine.values())})


def routed_of(record: Mapping[str, Any]) -> dict[int, bytes]:
    return _pairs(record, "from", "ct")


def masked(vector: np.ndarray) -> ArrayRecord:
    """Mask stage, site → server: the masked update (uint32 field elements)."""
    return ArrayRecord({"y": Array(np.ascontiguousarray(vector))})


def masked_of(content: RecordDict) -> np.ndarray:
    if MASKED not in content.array_records or "y" not in content.array_records[MASKED]:
        raise WireError("mask reply without a masked vector")
    return content.array_records[MASKED]["y"].numpy()


def unmask_request(survivors: list[int], dropped: list[int],
                   next_round: int | None = None) -> ConfigRecord:
    """Unmask stage, server → site: who sent a masked vector and who did not, and, when
    another round follows, the round to make fresh keys for (``NEXT_ROUND``)."""
    record: dict[str, Any] = {"survivors": list(survivors), "dropped": list(dropped)}
    if next_round is not None:
        record[NEXT_ROUND] = int(next_round)
    return ConfigRecord(record)


def unmask_request_of(record: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    return ints(_field(record, "survivors")), ints(_field(record, "dropped"))


def next_round_of(record: Mapping[str, Any]) -> int | None:
    """The round an unmask request asks keys for, or None when it asks none."""
    value = record.get(NEXT_ROUND)
    return None if value is None else scalar(value)


def next_keys(round_num: int, keys: Mapping[str, bytes]) -> ConfigRecord:
    """Unmask stage, site → server: public keys made for round ``round_num`` only."""
    return ConfigRecord({ROUND: int(round_num), "c_pk": keys["c_pk"], "s_pk": keys["s_pk"]})


def next_keys_of(content: RecordDict) -> tuple[int, dict[str, bytes]] | None:
    """An unmask reply's keys for the next round and that round, or None if it has
    none; malformed keys are a WireError."""
    if NEXT_KEYS not in content.config_records:
        return None
    record = content.config_records[NEXT_KEYS]
    c_pk, s_pk = record.get("c_pk"), record.get("s_pk")
    if not isinstance(c_pk, bytes) or not isinstance(s_pk, bytes):
        raise WireError("malformed next-round public keys")
    return scalar(record.get(ROUND)), {"c_pk": c_pk, "s_pk": s_pk}


def reveals(out: Mapping[int, bytes]) -> ConfigRecord:
    """Unmask stage, site → server: the shares that remove the survivors' masks."""
    return ConfigRecord({"of": list(out), "share": list(out.values())})


def reveals_of(record: Mapping[str, Any]) -> dict[int, bytes]:
    return _pairs(record, "of", "share")

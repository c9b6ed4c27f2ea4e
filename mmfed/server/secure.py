"""One federated round under secure aggregation, as Flower message stages on the Grid.

train (+ public keys) → share (relay encrypted Shamir shares) → mask (masked update
vectors) → unmask (shares that remove the masks) → weighted mean. The server only
ever holds masked vectors and ciphertext; if fewer than the threshold of sites
survive, the round is aborted and the previous global model is kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmfed import wire
from mmfed.config import RunConfig
from mmfed.errors import MmfedError
from mmfed.ml.features import FeatureSchema
from mmfed.ml.updates import apply_delta, segment_layout, vector_length
from mmfed.secagg import SecAggAborted, SecAggError, SecAggParams, SecAggServer
from mmfed.secagg.quantize import levels

log = logging.getLogger("mmfed")


TRAIN_SHARE = 0.55  # of the round timeout; the rest is kept for share, mask and unmask


def default_threshold(group: int) -> int:
    """More than half of each share group: the least that keeps a curious server from
    collecting both kinds of share for one site, and the most dropout it tolerates."""
    return max(2, group // 2 + 1)


def secagg_params(cfg: RunConfig, round_num: int, n_sites: int, d: int,
                  segments: tuple[int, ...] = ()) -> SecAggParams:
    neighbours = int(cfg["secagg.neighbours"]) or None
    if neighbours is not None and neighbours >= n_sites - 1:
        neighbours = None
    group = n_sites if neighbours is None else min(n_sites, neighbours + 1 + neighbours % 2)
    threshold = int(cfg["secagg.threshold"]) or default_threshold(group)
    return SecAggParams(run_id=cfg["run_id"] or "unnamed-run", round=round_num,
                        site_ids=list(range(n_sites)), threshold=threshold,
                        neighbours=neighbours, clip_range=float(cfg["secagg.clip_range"]),
                        max_sites=max(n_sites, 2), count_cap=int(cfg["secagg.count_cap"]),
                        vector_length=d, segments=segments)


@dataclass
class StageLog:
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0

    def timed(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def secure_train_round(fed: Any, round_num: int, schema: FeatureSchema,
                       state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                              dict[str, Any]]:
    """Run one securely aggregated round for ``fed`` (a ``Federation``)."""
    from mmfed.server.loop import declined_entry, exchange, round_info, trained_entry

    cfg: RunConfig = fed.cfg
    nodes = fed.sample(round_num)
    if len(nodes) < 2:
        raise MmfedError("secure aggregation needs at least 2 sites in a round")
    d = vector_length(state)
    # Modality-aware: one weight per module, so each encoder is averaged over the
    # patients who had its modality; the counts travel only inside the masked sum.
    layout = segment_layout(state) if cfg["aggregation.modality_aware"] else []
    params = secagg_params(cfg, round_num, len(nodes), d, tuple(n for _, n in layout))
    params.validate()
    sid_of = {node: i for i, node in enumerate(nodes)}
    node_of = dict(enumerate(nodes))
    name_of = {i: fed.sites[node].name for i, node in node_of.items()}
    log_ = StageLog()
    sites: dict[str, dict[str, Any]] = {}

    def stage_of(sid: int) -> wire.Stage:
        return wire.Stage(round_num, name_of[sid], tuple(cfg["faults.drop"]))

    def fail(sid: int, stage: str, reason: str) -> None:
        if name_of[sid] not in sites or sites[name_of[sid]]["status"] == "trained":
            log.warning("round %d: %s dropped at %s: %s", round_num, name_of[sid], stage,
                        reason)
            entry = sites.get(name_of[sid], {})
            entry.update({"status": "dropped", "reason": f"{stage}: {reason}"})
            sites[name_of[sid]] = entry

    # Stage 1: train; replies carry metrics and public keys, never the update.
    start = time.perf_counter()
    base = wire.request(cfg, round_num, schema, state)
    groups = tuple(g for g, _ in layout)
    contents = {}
    for node in nodes:
        contents[node] = wire.with_secagg(base, wire.SecAggRequest(params, sid_of[node], groups))
        log_.bytes_down += wire.record_bytes(contents[node])
    ok, failed = exchange(fed.grid, contents, wire.TRAIN, round_num,
                          fed.remaining(TRAIN_SHARE))
    advertised: dict[int, dict[str, bytes]] = {}
    for node, reason in failed.items():
        fail(sid_of[node], "train", reason)
    for node, reply in ok.items():
        sid = sid_of[node]
        metrics = wire.metrics_of(reply.content)
        log_.bytes_up += wire.record_bytes(reply.content)
        if metrics.get("declined"):
            sites[name_of[sid]] = declined_entry(round_num, name_of[sid], metrics)
            continue
        try:
            advertised[sid] = wire.public_keys_of(reply.content)
        except wire.WireError as exc:
            fail(sid, "train", str(exc))
            continue
        sites[name_of[sid]] = trained_entry(metrics)
    log_.timed("train", start)

    def summary(participants: int, aborted: str | None) -> dict[str, Any]:
        extra: dict[str, Any] = {"aborted": aborted} if aborted else {}
        return round_info(sites, participants, log_.bytes_up, log_.bytes_down,
                          log_.seconds.get("train", 0.0), stage_seconds=log_.seconds,
                          secure=True, threshold=params.threshold,
                          neighbours=params.neighbours or 0, **extra)

    server = SecAggServer(params)
    try:
        # Stage 2: keys out, encrypted shares back.
        start = time.perf_counter()
        server.collect_keys(advertised)
        contents = {}
        for sid in advertised:
            payload = wire.peer_keys(server.keys_for(sid))
            contents[node_of[sid]] = wire.stage_content(stage_of(sid), payload)
            log_.bytes_down += wire.record_bytes(contents[node_of[sid]])
        ok, failed = exchange(fed.grid, contents, wire.SECAGG_SHARE, round_num,
                              fed.remaining())
        for node, reason in failed.items():
            fail(sid_of[node], "share", reason)
        shares: dict[int, dict[int, bytes]] = {}
        for node, reply in ok.items():
            shares[sid_of[node]] = wire.shares_of(reply.content.config_records[wire.SECAGG])
            log_.bytes_up += wire.record_bytes(reply.content)
        routed = server.route(shares)
        log_.timed("share", start)

        # Stage 3: masked update vectors.
        start = time.perf_counter()
        contents = {}
        for sid in shares:
            payload = wire.routed(routed.get(sid, {}))
            contents[node_of[sid]] = wire.stage_content(stage_of(sid), payload)
            log_.bytes_down += wire.record_bytes(contents[node_of[sid]])
        ok, failed = exchange(fed.grid, contents, wire.SECAGG_MASK, round_num,
                              fed.remaining())
        for node, reason in failed.items():
            fail(sid_of[node], "mask", reason)
        masked: dict[int, np.ndarray] = {}
        for node, reply in ok.items():
            vec = wire.masked_of(reply.content)
            if vec.dtype != np.uint32 or vec.shape != (d + params.n_weights,):
                fail(sid_of[node], "mask", f"masked vector of {vec.dtype} {vec.shape}")
                continue
            masked[sid_of[node]] = vec
            log_.bytes_up += vec.nbytes
        survivors, dropped = server.unmask_request(list(masked))
        log_.timed("mask", start)

        # Stage 4: reveal the shares that remove the masks.
        start = time.perf_counter()
        payload = wire.unmask_request(survivors, dropped)
        contents = {node_of[sid]: wire.stage_content(stage_of(sid), payload)
                    for sid in survivors}
        log_.bytes_down += sum(wire.record_bytes(c) for c in contents.values())
        ok, failed = exchange(fed.grid, contents, wire.SECAGG_UNMASK, round_num,
                              fed.remaining())
        for node, reason in failed.items():
            log.warning("round %d: %s failed to unmask: %s", round_num,
                        name_of[sid_of[node]], reason)
        reveals: dict[int, dict[int, bytes]] = {}
        for node, reply in ok.items():
            reveals[sid_of[node]] = wire.reveals_of(reply.content.config_records[wire.SECAGG])
            log_.bytes_up += wire.record_bytes(reply.content)
        mean, _total, used = server.aggregate(masked, reveals)
        log_.timed("unmask", start)
    except SecAggAborted as exc:
        log.warning("round %d: secure aggregation aborted (%s); keeping the previous global "
                    "model", round_num, exc)
        return state, summary(0, str(exc))
    except SecAggError as exc:
        log.warning("round %d: secure aggregation failed (%s); keeping the previous global "
                    "model", round_num, exc)
        return state, summary(0, str(exc))
    for sid in dropped:
        fail(sid, "mask", "did not send its masked update")
    delta = mean.astype(np.float64)  # a segment nobody trained decodes to 0: kept as is
    problem = aggregate_problem(delta, params, server.segment_weights, len(used),
                                float(cfg["aggregation.max_update_norm"]))
    if problem:
        log.warning("round %d: aggregate rejected (%s); keeping the previous model",
                    round_num, problem)
        return state, summary(0, f"aggregate failed the server's check: {problem}")
    return apply_delta(state, delta), summary(len(used), None)


def aggregate_problem(delta: np.ndarray, params: SecAggParams, weights: list[float],
                      contributors: int, max_norm: float) -> str | None:
    """The server's check of an unmasked aggregate, segment by segment.

    Each segment is a weighted mean of the sites' (guarded) segments, so its norm is
    within the per-site bound; the whole vector is not, because different sites can
    dominate different segments. The margin covers fixed-point rounding, which is
    absolute: at most ~2·n·R/L per coordinate, divided by the segment's total weight.
    """
    if not np.all(np.isfinite(delta)):
        return "NaN or infinite values"
    sizes = list(params.segments) or [params.vector_length]
    top = levels(params.max_sites)
    offset = 0
    for size, weight in zip(sizes, weights or [1.0] * len(sizes), strict=True):
        part = delta[offset:offset + size]
        offset += size
        if weight <= 0:
            continue
        bound = params.clip_range * np.sqrt(size)
        if max_norm > 0:
            bound = min(bound, max_norm)
        margin = np.sqrt(size) * 2.0 * contributors * params.clip_range / (top * weight)
        norm = float(np.linalg.norm(part))
        if norm > bound + margin:
            return f"segment norm {norm:.4g} exceeds the bound {bound:.4g}"
    return None

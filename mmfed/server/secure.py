"""One federated round under secure aggregation, as Flower message stages on the Grid.

train (+ public keys) → share (relay encrypted Shamir shares) → mask (masked update
vectors) → unmask (shares that remove the masks) → weighted mean. The server only
ever holds masked vectors and ciphertext; if fewer than the threshold of sites
survive, the round is aborted and the previous global model is kept.

Each message trip costs a deployed round seconds of polling, so a round asks at
unmask for the next round's keys (``wire.NEXT_ROUND``); when every site of the next
round's cohort sent them (``KeysAhead``), that round's train requests carry the keys
and its train replies the encrypted shares: train + share → mask → unmask (+ keys),
three trips. Any site without keys for the round (first round, new or rejoined node,
one that dropped or declined) sends the round down the classic path, four trips.

A site that does not answer a stage, answers with an error, or answers with a
malformed reply (``wire.WireError``) is treated the same way: it dropped out at that
stage, which the protocol is built to survive. A site that refuses a stage under its
own policy (``declined: ...``, e.g. too few survivors to hide its update) is recorded
as declined with that reason. ``SecureSum`` holds the stages every secure sum shares;
training rounds (``SecureSession``) and the schema's moments
(``mmfed.server.schema``) each open one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from mmfed import wire
from mmfed.errors import MmfedError
from mmfed.ml.features import FeatureSchema
from mmfed.ml.updates import apply_delta, segment_layout, vector_length
from mmfed.secagg import SecAggAborted, SecAggError, SecAggParams, SecAggServer
from mmfed.secagg.quantize import levels
from mmfed.server.records import (
    RoundInfo,
    SiteEntry,
    declined_entry,
    refused_entry,
    round_info,
    trained_entry,
)
from mmfed.server.rounds import ModelState, RoundContext
from mmfed.server.secure_settings import distributed_noise, secagg_params
from mmfed.server.transport import exchange

log = logging.getLogger("mmfed")

TRAIN_SHARE = 0.55  # of the round timeout; the rest is kept for share, mask and unmask
Shares = dict[int, dict[int, bytes]]  # site id -> (site id -> ciphertext or share)
T = TypeVar("T")


@dataclass
class StageLog:
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0

    def timed(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class SecureSum:
    """The stages every secure sum shares, one method each: the first stage (opened by
    a subclass: training, or the schema's moments) returns public keys, then share →
    mask → unmask give the weighted mean of what the survivors contributed. With keys
    collected ahead, the first stage returns the shares instead (``masked_sum_of``).
    ``next_round``: the round whose keys the unmask stage asks for (None: none).

    Sites are addressed by their protocol id (``sid``, 0..n-1 in node order) inside
    the protocol and by Flower node id on the wire.
    """

    def __init__(self, ctx: RoundContext, round_num: int, nodes: list[int],
                 params: SecAggParams, next_round: int | None = None) -> None:
        self.ctx, self.round_num, self.params = ctx, round_num, params
        self.next_round = next_round  # asked at unmask for keys for this round, if any
        self.trips = 0  # exchanges with the sites so far
        self.node_of = dict(enumerate(nodes))
        self.sid_of = {node: sid for sid, node in self.node_of.items()}
        self.name_of = {sid: ctx.name(node) for sid, node in self.node_of.items()}
        self.d = params.vector_length
        self.params.validate()
        self.server = SecAggServer(self.params)
        self.stages = StageLog()
        self.sites: dict[str, SiteEntry] = {}

    def open(self, contents: Mapping[int, RecordDict], message_type: str, stage: str,
             timeout: float, accept: Callable[[int, RecordDict], SiteEntry | None]
             ) -> dict[int, dict[str, bytes]]:
        """The first stage: each site does its part and advertises its public keys.

        ``accept`` reads a reply's own figures into the site's entry (None: the site
        declined under its budget and is out of this sum).
        """
        return self.first_stage(contents, message_type, stage, timeout, accept,
                                wire.public_keys_of)

    def first_stage(self, contents: Mapping[int, RecordDict], message_type: str,
                    stage: str, timeout: float,
                    accept: Callable[[int, RecordDict], SiteEntry | None],
                    payload: Callable[[RecordDict], T]) -> dict[int, T]:
        """The first stage, whatever its replies carry for the protocol: ``payload``
        decodes it (public keys, or encrypted shares when keys were advertised ahead).

        A reply's local evaluation (``wire.LOCAL``) joins the site's entry, whether the
        site took part or declined: it is about the global model, not this sum.
        """
        start = time.perf_counter()
        ok = self.send(contents, message_type, stage, timeout)
        out: dict[int, T] = {}
        for sid, reply in ok.items():
            self.stages.bytes_up += wire.record_bytes(reply.content)
            name = self.name_of[sid]
            try:
                entry = accept(sid, reply.content)
                if entry is not None:
                    out[sid] = payload(reply.content)
            except wire.WireError as exc:
                self.fail(sid, stage, str(exc))
                continue
            if entry is not None:
                self.sites[name] = entry
            local = wire.local_of(reply.content)
            if local is not None and name in self.sites:
                self.sites[name]["local"] = local
        self.stages.timed(stage, start)
        return out

    def masked_sum(self, advertised: dict[int, dict[str, bytes]]
                   ) -> tuple[np.ndarray, list[int], list[int]]:
        """share → mask → unmask: (weighted mean, the sites in it, the sites that shared
        keys but sent no masked vector). Raises SecAggError (SecAggAborted included)."""
        return self.masked_sum_of(self.share(advertised))

    def masked_sum_of(self, routed: Shares) -> tuple[np.ndarray, list[int], list[int]]:
        """mask → unmask, once the shares are routed (``masked_sum`` less the share
        stage, for a round whose shares came with its first stage)."""
        masked = self.mask(routed)
        mean, used, dropped = self.unmask(masked)
        for sid in dropped:
            self.fail(sid, "mask", "did not send its masked update")
        return mean, used, dropped

    # ------------------------------------------------------------------ stages
    def share(self, advertised: dict[int, dict[str, bytes]]) -> Shares:
        """Stage 2: keys out, encrypted shares back, regrouped by recipient."""
        start = time.perf_counter()
        self.server.collect_keys(advertised)
        contents = {sid: self.stage(sid, wire.peer_keys(self.server.keys_for(sid)))
                    for sid in advertised}
        ok = self.send(contents, wire.SECAGG_SHARE, "share", self.ctx.remaining())
        shares = self.read(ok, "share", lambda c: wire.shares_of(wire.secagg_of(c)))
        self.received(ok, shares)
        routed = self.server.route(shares)
        self.stages.timed("share", start)
        return routed

    def mask(self, routed: Shares) -> dict[int, np.ndarray]:
        """Stage 3: each site's masked update vector."""
        start = time.perf_counter()
        contents = {sid: self.stage(sid, wire.routed(mine)) for sid, mine in routed.items()}
        ok = self.send(contents, wire.SECAGG_MASK, "mask", self.ctx.remaining())
        masked = self.read(ok, "mask", self.masked_vector)
        self.stages.bytes_up += sum(vec.nbytes for vec in masked.values())
        self.stages.timed("mask", start)
        return masked

    def unmask(self, masked: dict[int, np.ndarray]
               ) -> tuple[np.ndarray, list[int], list[int]]:
        """Stage 4: reveal the shares that remove the masks, then remove them.

        Returns (weighted mean update, the sites in it, the sites that shared keys but
        sent no masked vector). A survivor that fails here is only logged: its vector
        is in the sum, and the others' shares can still remove its masks.
        """
        start = time.perf_counter()
        survivors, dropped = self.server.unmask_request(list(masked))
        payload = wire.unmask_request(survivors, dropped, self.next_round)
        ok = self.send({sid: self.stage(sid, payload) for sid in survivors},
                       wire.SECAGG_UNMASK, "unmask", self.ctx.remaining())
        reveals = self.read(ok, "unmask", lambda c: wire.reveals_of(wire.secagg_of(c)))
        self.received(ok, reveals)
        self.keep_keys_ahead(ok, reveals)
        mean, _total, used = self.server.aggregate(masked, reveals)
        self.stages.timed("unmask", start)
        return mean, used, dropped

    def keep_keys_ahead(self, ok: dict[int, Message], used: Mapping[int, object]) -> None:
        """The next round's public keys from the unmask replies that were used.

        Keys for any round but the one asked for, or malformed ones, are not kept: that
        site then has none, and the next round takes the classic path.
        """
        if self.next_round is None:
            return
        for sid in used:
            try:
                ahead = wire.next_keys_of(ok[sid].content)
            except wire.WireError as exc:
                log.warning("round %d: %s sent unusable keys for round %d: %s",
                            self.round_num, self.name_of[sid], self.next_round, exc)
                continue
            if ahead is not None and ahead[0] == self.next_round:
                self.ctx.keys_ahead.add(self.node_of[sid], ahead[0], ahead[1])

    # ------------------------------------------------------------------ helpers
    def stage(self, sid: int, payload: ConfigRecord) -> RecordDict:
        header = wire.Stage(self.round_num, self.name_of[sid],
                            tuple(self.ctx.cfg["faults.drop"]))
        return wire.stage_content(header, payload)

    def send(self, contents: Mapping[int, RecordDict], message_type: str, stage: str,
             timeout: float) -> dict[int, Message]:
        """One exchange with the given sites; a site that fails it dropped at ``stage``."""
        self.stages.bytes_down += sum(wire.record_bytes(c) for c in contents.values())
        self.trips += 1
        ok, failed = exchange(self.ctx.grid,
                              {self.node_of[sid]: c for sid, c in contents.items()},
                              message_type, self.round_num, timeout)
        for node, reason in failed.items():
            self.lost(self.sid_of[node], stage, reason)
        return {self.sid_of[node]: reply for node, reply in ok.items()}

    def read(self, ok: dict[int, Message], stage: str, decode: Callable[[RecordDict], T]
             ) -> dict[int, T]:
        """Each reply decoded; a malformed one is that site's failure at ``stage``."""
        out: dict[int, T] = {}
        for sid, reply in ok.items():
            refusal = wire.declined_of(reply.content)
            if refusal is not None:
                self.refused(sid, stage, refusal)
                continue
            try:
                out[sid] = decode(reply.content)
            except wire.WireError as exc:
                self.lost(sid, stage, str(exc))
        return out

    def received(self, ok: dict[int, Message], used: Mapping[int, object]) -> None:
        """Count the bytes of the replies that were used."""
        self.stages.bytes_up += sum(wire.record_bytes(ok[sid].content) for sid in used)

    def masked_vector(self, content: RecordDict) -> np.ndarray:
        vec = wire.masked_of(content)
        if vec.dtype != np.uint32 or vec.shape != (self.d + self.params.n_weights,):
            raise wire.WireError(f"masked vector of {vec.dtype} {vec.shape}")
        return vec

    def lost(self, sid: int, stage: str, reason: str) -> None:
        """A site that failed a stage; after masking it no longer counts as dropped."""
        if stage == "unmask":
            log.warning("round %d: %s failed to unmask: %s", self.round_num,
                        self.name_of[sid], reason)
        else:
            self.fail(sid, stage, reason)

    def refused(self, sid: int, stage: str, reason: str) -> None:
        """A site that declined a stage under its own policy (its terms were not met)."""
        name = self.name_of[sid]
        entry = self.sites.get(name, {})
        entry.update(refused_entry(self.round_num, name, f"{reason} (at {stage})"))
        self.sites[name] = entry

    def fail(self, sid: int, stage: str, reason: str) -> None:
        name = self.name_of[sid]
        if name not in self.sites or self.sites[name]["status"] == "trained":
            log.warning("round %d: %s dropped at %s: %s", self.round_num, name, stage, reason)
            entry = self.sites.get(name, {})
            entry.update({"status": "dropped", "reason": f"{stage}: {reason}"})
            self.sites[name] = entry

class SecureRound:
    """Runs each round as a fresh ``SecureSession``: every round has its own keys."""

    def run(self, ctx: RoundContext, round_num: int, schema: FeatureSchema,
            state: ModelState) -> tuple[ModelState, RoundInfo]:
        nodes = ctx.sample(round_num)
        if len(nodes) < 2:
            raise MmfedError("secure aggregation needs at least 2 sites in a round")
        return SecureSession(ctx, round_num, nodes, state).run(schema)


class SecureSession(SecureSum):
    """One securely aggregated training round: every round has its own keys, made at
    the start of the round or, sent with the previous round's unmask reply, ahead."""

    def __init__(self, ctx: RoundContext, round_num: int, nodes: list[int],
                 state: ModelState) -> None:
        self.state = state
        # Modality-aware: one weight per module, so each encoder is averaged over the
        # patients who had its modality; the counts travel only inside the masked sum.
        self.layout = segment_layout(state) if ctx.cfg["aggregation.modality_aware"] else []
        super().__init__(ctx, round_num, nodes, secagg_params(
            ctx.cfg, round_num, len(nodes), vector_length(state),
            tuple(n for _, n in self.layout), noisy=distributed_noise(ctx.cfg)),
            next_round=round_num + 1 if round_num < int(ctx.cfg["rounds"]) else None)

    def run(self, schema: FeatureSchema) -> tuple[ModelState, RoundInfo]:
        ahead = self.keys_ahead()
        try:
            if ahead:
                mean, used, _ = self.masked_sum_of(self.train_and_share(schema))
            else:
                mean, used, _ = self.masked_sum(self.train(schema))
        except SecAggError as exc:  # SecAggAborted included: too few survivors
            kind = "aborted" if isinstance(exc, SecAggAborted) else "failed"
            log.warning("round %d: secure aggregation %s (%s); keeping the previous global "
                        "model", self.round_num, kind, exc)
            return self.state, self.summary(0, str(exc))
        return self.finish(mean, used)

    def keys_ahead(self) -> bool:
        """Whether every site of the round advertised keys for it at the previous unmask
        and the protocol accepts them (then collected: the round starts at share)."""
        found = self.ctx.keys_ahead.take(self.round_num, list(self.node_of.values()))
        if found is None:
            return False
        try:
            self.server.collect_keys({self.sid_of[node]: keys for node, keys in found.items()})
        except SecAggError as exc:
            log.warning("round %d: keys advertised ahead are unusable (%s); the sites "
                        "advertise new ones", self.round_num, exc)
            return False
        return True

    def requests(self, schema: FeatureSchema, ahead: bool) -> dict[int, RecordDict]:
        """Each site's train request: the model, its protocol parameters and, with keys
        advertised ahead, its share group's public keys."""
        base = wire.request(self.ctx.cfg, self.round_num, schema, self.state)
        groups = tuple(g for g, _ in self.layout)
        return {sid: wire.with_secagg(base, wire.SecAggRequest(self.params, sid, groups),
                                      self.server.keys_for(sid) if ahead else None)
                for sid in self.node_of}

    def train(self, schema: FeatureSchema) -> dict[int, dict[str, bytes]]:
        """Stage 1: train; replies carry metrics and public keys, never the update."""
        return self.open(self.requests(schema, False), wire.TRAIN, "train",
                         self.ctx.remaining(TRAIN_SHARE), self.accept)

    def train_and_share(self, schema: FeatureSchema) -> Shares:
        """Stages 1 and 2 in one trip, with the keys advertised ahead: train; replies
        carry metrics and encrypted shares, never the update. Returns the shares routed
        to their recipients."""
        shares = self.first_stage(self.requests(schema, True), wire.TRAIN, "train",
                                  self.ctx.remaining(TRAIN_SHARE), self.accept,
                                  lambda c: wire.shares_of(wire.secagg_of(c)))
        return self.server.route(shares)

    def accept(self, sid: int, content: RecordDict) -> SiteEntry | None:
        """A train reply's figures; None when the site declined under its budget."""
        refusal = wire.declined_of(content)
        if refusal is not None:
            self.refused(sid, "train", refusal)
            return None
        metrics = wire.metrics_of(content)
        if metrics.get("declined"):
            self.sites[self.name_of[sid]] = declined_entry(self.round_num, self.name_of[sid],
                                                           metrics)
            return None
        return trained_entry(metrics)

    def finish(self, mean: np.ndarray, used: list[int]) -> tuple[ModelState, RoundInfo]:
        """The server's check of the aggregate, then the new global model."""
        delta = mean.astype(np.float64)  # a segment nobody trained decodes to 0: kept as is
        problem = aggregate_problem(delta, self.params, self.server.segment_weights,
                                    len(used), float(self.ctx.cfg["aggregation.max_update_norm"]))
        if problem:
            log.warning("round %d: aggregate rejected (%s); keeping the previous model",
                        self.round_num, problem)
            return self.state, self.summary(0, f"aggregate failed the server's check: "
                                               f"{problem}")
        return apply_delta(self.state, delta), self.summary(len(used), None)

    def summary(self, participants: int, aborted: str | None) -> RoundInfo:
        return round_info(self.sites, participants, self.stages.bytes_up, self.stages.bytes_down,
                          self.stages.seconds.get("train", 0.0),
                          stage_seconds=self.stages.seconds, secure=True,
                          threshold=self.params.threshold,
                          neighbours=self.params.neighbours or 0, aborted=aborted,
                          trips=self.trips)


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

"""A plaintext round (``--no-secagg``): every site's new weights reach the server.

Because the server sees each update, it checks each one before use (names, shapes,
dtypes, finite values, the norm bound) and can aggregate with a robust rule; a site
whose update fails is ``dropped`` with ``rejected: <reason>``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flwr.app import Message

from mmfed import wire
from mmfed.config import MODALITY_NAMES
from mmfed.ml.features import FeatureSchema
from mmfed.ml.updates import group_weights, grouped_average, weight_group
from mmfed.server.records import (
    RoundInfo,
    SiteEntry,
    declined_entry,
    dropped_entry,
    refused_entry,
    round_info,
    trained_entry,
)
from mmfed.server.robust import aggregate_robust, validate_update
from mmfed.server.rounds import ModelState, RoundContext
from mmfed.server.transport import exchange

log = logging.getLogger("mmfed")
Weighted = tuple[ModelState, dict[str, int]]  # an update and its weight per group


@dataclass
class _Collected:
    sites: dict[str, SiteEntry] = field(default_factory=dict)
    updates: list[Weighted] = field(default_factory=list)
    bytes_up: int = 0


class PlainRound:
    """Train → validate each update → aggregate by ``aggregation.rule``: one trip, whose
    replies also carry the sites' local evaluation of the model they started from."""

    def run(self, ctx: RoundContext, round_num: int, schema: FeatureSchema,
            state: ModelState) -> tuple[ModelState, RoundInfo]:
        nodes = ctx.sample(round_num)
        # the cohort is announced: a site whose policy allows plaintext still wants
        # enough company (it cannot check the number, see mmfed.site.consent)
        request = wire.request(ctx.cfg, round_num, schema, state, cohort=len(nodes))
        start = time.perf_counter()
        ok, failed = exchange(ctx.grid, dict.fromkeys(nodes, request), wire.TRAIN,
                              round_num, ctx.remaining())
        got = _Collected()
        for node, reason in failed.items():
            log.warning("round %d: %s dropped: %s", round_num, ctx.name(node), reason)
            got.sites[ctx.name(node)] = dropped_entry(reason)
        # by site name, not arrival order: float sums then do not depend on timing
        for node, reply in sorted(ok.items(), key=lambda item: ctx.name(item[0])):
            name = ctx.name(node)
            try:
                got.sites[name] = self._read(ctx, round_num, name, reply, state, got)
            except wire.WireError as exc:
                log.warning("round %d: %s dropped: %s", round_num, name, exc)
                got.sites[name] = dropped_entry(str(exc))
                continue
            # the previous round's model on the site's own validation split
            local = wire.local_of(reply.content)
            if local is not None:
                got.sites[name]["local"] = local
        train_seconds = time.perf_counter() - start
        minimum = ctx.cfg["federation.min_sites"]
        if len(got.updates) < minimum:
            log.warning("round %d: only %d update(s), need %d; keeping the previous model",
                        round_num, len(got.updates), minimum)
            new_state = state
        else:
            new_state = self.aggregate(ctx, got.updates, state)
        return new_state, round_info(got.sites, len(got.updates), got.bytes_up,
                                     wire.state_bytes(state) * len(nodes), train_seconds,
                                     trips=1)

    def _read(self, ctx: RoundContext, round_num: int, name: str, reply: Message,
              state: ModelState, got: _Collected) -> SiteEntry:
        """One site's train reply as its entry; a usable update is added to ``got``."""
        refusal = wire.declined_of(reply.content)
        if refusal is not None:
            return refused_entry(round_num, name, refusal)
        metrics = wire.metrics_of(reply.content)
        if metrics.get("declined"):
            return declined_entry(round_num, name, metrics)
        update = wire.model_of(reply.content)
        if update is None:
            return dropped_entry("reply without a model")
        problem = validate_update(update, state,
                                  float(ctx.cfg["aggregation.max_update_norm"]))
        if problem is None and metrics.get("num_examples", 0) <= 0:
            problem = "reported no training examples"
        if problem is not None:
            log.warning("round %d: update from %s rejected: %s", round_num, name, problem)
            return dropped_entry(f"rejected: {problem}")
        entry = trained_entry(metrics)
        counts = {m: int(metrics.get(f"count_{m}", 0)) for m in MODALITY_NAMES}
        got.updates.append((update, group_weights(int(metrics["num_examples"]), counts,
                                                  ctx.cfg["aggregation.modality_aware"])))
        got.bytes_up += wire.state_bytes(update)
        return entry

    def aggregate(self, ctx: RoundContext, updates: list[Weighted],
                  reference: ModelState) -> ModelState:
        """Validated plaintext updates → the new global model, by ``aggregation.rule``.

        Robust rules (one vote per site) are applied group by group, so that with
        modality-aware aggregation an encoder's median is taken only over the sites
        that trained it; a group nobody trained keeps its previous weights.
        """
        rule = ctx.cfg["aggregation.rule"]
        if rule == "fedavg":
            return grouped_average(updates, reference)
        out = {k: v.copy() for k, v in reference.items()}
        for group in sorted({weight_group(k) for k in reference}):
            voters = [(s, float(w.get(group, 0))) for s, w in updates if w.get(group, 0) > 0]
            if not voters:
                continue
            merged = aggregate_robust(rule, voters, ctx.cfg["aggregation.trim_fraction"])
            out.update({k: v for k, v in merged.items() if weight_group(k) == group})
        return out

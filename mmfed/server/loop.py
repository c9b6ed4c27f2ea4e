"""The server's round loop on Flower's Grid: schema, then train → aggregate → evaluate.

Written directly on the Message API (not a stock Strategy) because later stages
(secure aggregation, privacy declines, resume) need control over each message
exchange. Each round's result is durable before the next one starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from mmfed import wire
from mmfed.config import RunConfig
from mmfed.data.reader import load_site
from mmfed.errors import DataError, MmfedError
from mmfed.ml.features import FeatureSchema, LocalStats, encode, merge_stats
from mmfed.ml.specs import MODALITY_NAMES
from mmfed.ml.updates import group_weights, grouped_average, weight_group
from mmfed.run.resume import ResumePoint
from mmfed.run.rundir import RunDir
from mmfed.server.robust import aggregate_robust, validate_update

log = logging.getLogger("mmfed")
RoundCallback = Callable[[dict[str, Any]], None]
PRIVACY_FIGURES = ("epsilon", "delta", "epsilon_budget", "epsilon_projected", "sigma",
                   "sample_rate")


@dataclass
class SiteRef:
    node_id: int
    name: str


@dataclass
class FederationResult:
    rounds: int
    final: dict[str, Any]
    patterns: dict[str, dict[str, Any]] = field(default_factory=dict)  # by modality pattern


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise MmfedError(f"only {len(nodes)} of {minimum} required sites connected "
                             f"within {timeout:.0f}s")
        time.sleep(0.5)


def _send_and_receive(grid: Grid, out: list[Message], timeout: float) -> list[Message]:
    """Push, then pull replies until all are in or the timeout passes.

    Flower's deployed grid sleeps 3 s between pulls, which a secure round (four
    exchanges) pays up to four times; here the first pulls come after 20 ms and the
    interval backs off to 0.5 s, so a quick stage costs what its sites take.
    """
    pending = set(grid.push_messages(out))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    wait = 0.02
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(wait, left))
        wait = min(wait * 1.5, 0.5)
    return replies


def exchange(grid: Grid, contents: dict[int, Any], message_type: str, round_num: int,
             timeout: float) -> tuple[dict[int, Message], dict[int, str]]:
    """Send one message per node; returns (replies with content, node -> failure reason)."""
    out = [Message(content, node, message_type, group_id=str(round_num))
           for node, content in contents.items()]
    replies = {m.metadata.src_node_id: m for m in _send_and_receive(grid, out, timeout)}
    ok: dict[int, Message] = {}
    failed: dict[int, str] = {}
    for node in contents:
        reply = replies.get(node)
        if reply is None:
            failed[node] = f"no reply within {timeout:.0f}s"
        elif reply.has_error():
            failed[node] = reply.error.reason or f"error code {reply.error.code}"
        else:
            ok[node] = reply
    return ok, failed


def declined_entry(round_num: int, name: str, metrics: dict[str, float]) -> dict[str, Any]:
    """A site that declined because its privacy budget would be exceeded (a normal reply)."""
    log.warning("round %d: %s declined: its privacy budget would be exceeded (ε %.3f spent, "
                "%.3f after this round, budget %.3f)", round_num, name,
                metrics.get("epsilon", float("nan")),
                metrics.get("epsilon_projected", float("nan")),
                metrics.get("epsilon_budget", float("nan")))
    return {"status": "declined", **privacy_figures(metrics)}


def trained_entry(metrics: dict[str, float]) -> dict[str, Any]:
    return {"num_examples": int(metrics["num_examples"]),
            "train_loss": float(metrics["train_loss"]),
            "seconds": float(metrics.get("seconds", 0.0)), "status": "trained",
            **privacy_figures(metrics)}


def privacy_figures(metrics: dict[str, float]) -> dict[str, float | None]:
    """A site's privacy figures; ε and δ are null (not absent) when it trained without DP."""
    figures: dict[str, float | None] = {"epsilon": None, "delta": None}
    figures.update({k: metrics[k] for k in PRIVACY_FIGURES if k in metrics})
    return figures


def round_info(sites: dict[str, dict[str, Any]], participants: int, bytes_up: int,
               bytes_down: int, train_seconds: float, **extra: Any) -> dict[str, Any]:
    """What a round reports, whichever way its updates were aggregated."""
    return {"sites": sites, "participants": participants,
            "dropped": sum(1 for s in sites.values() if s["status"] == "dropped"),
            "declined": sum(1 for s in sites.values() if s["status"] == "declined"),
            "bytes": {"up": bytes_up, "down": bytes_down}, "train_seconds": train_seconds,
            **extra}


class Federation:
    """One federated run: holds the global model and writes the run directory."""

    def __init__(self, grid: Grid, cfg: RunConfig, run: RunDir,
                 on_round: RoundCallback | None = None, expected_sites: int | None = None,
                 ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.run = run
        self.on_round = on_round
        self.expected = expected_sites or cfg["federation.min_sites"]
        self.timeout = float(cfg["federation.round_timeout"])
        self.sites: dict[int, SiteRef] = {}
        self.site_totals: dict[str, dict[str, Any]] = {}
        self.resume_point: ResumePoint | None = None
        self.ignored: set[int] = set()  # nodes that are not sites of this federation
        self.deadline = time.monotonic() + self.timeout

    def remaining(self, share: float = 1.0) -> float:
        """Seconds this stage may wait, so that a dead or slow site never holds a round
        past ``federation.round_timeout``.

        A secure round reserves time after training for its three short stages: the
        train stage may use ``share`` (0.55) of the timeout, and every later stage at
        least 15% of it, however long training took (in deployment each message starts
        a ClientApp process, seconds each).
        """
        start = self.deadline - self.timeout
        if share < 1.0:
            return max(1.0, start + share * self.timeout - time.monotonic())
        return max(0.15 * self.timeout, self.deadline - time.monotonic(), 1.0)

    def setup(self) -> tuple[FeatureSchema, dict[str, np.ndarray]]:
        """Learn the federation's feature schema and build the initial global model."""
        from mmfed.ml.model import build_model

        nodes = wait_for_nodes(self.grid, self.expected, min(self.timeout, 300.0))
        request = wire.request(self.cfg, 0)
        ok, failed = exchange(self.grid, dict.fromkeys(nodes, request), wire.STATS, 0,
                              self.timeout)
        for node, reason in failed.items():
            log.warning("node %s left out: %s", node, reason)
        if len(ok) < self.cfg["federation.min_sites"]:
            reasons = "; ".join(failed.values()) or "no replies"
            raise MmfedError(f"only {len(ok)} site(s) could start (need "
                             f"{self.cfg['federation.min_sites']}): {reasons}")
        stats = []
        for node, reply in sorted(ok.items()):
            name, record = wire.site_of(reply.content)
            if name in {s.name for s in self.sites.values()}:
                raise MmfedError(f"two nodes report the same site name {name!r}")
            self.sites[node] = SiteRef(node, name)
            stats.append(LocalStats.from_config(record))
        schema = merge_stats(stats)
        model = build_model(schema, self.cfg.model_spec(), seed=self.cfg["seed"])
        state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        return schema, state

    def _holdout(self, schema: FeatureSchema) -> Any:
        root = self.cfg["data.dir"]
        folder = Path(root) / "holdout" if root else None
        if folder is None or not folder.is_dir():
            raise DataError(f"no holdout folder at {folder} (the server's evaluation set)")
        return encode(load_site(folder), schema)

    def train_round(self, round_num: int, schema: FeatureSchema,
                    state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                           dict[str, Any]]:
        request = wire.request(self.cfg, round_num, schema, state)
        nodes = self.sample(round_num)
        start = time.perf_counter()
        ok, failed = exchange(self.grid, dict.fromkeys(nodes, request), wire.TRAIN,
                              round_num, self.remaining())
        sites: dict[str, dict[str, Any]] = {}
        updates: list[tuple[dict[str, np.ndarray], dict[str, int]]] = []
        bytes_up = 0
        for node, reason in failed.items():
            name = self.sites[node].name
            log.warning("round %d: %s dropped: %s", round_num, name, reason)
            sites[name] = {"status": "dropped", "reason": reason}
        # by site name, not arrival order: float sums then do not depend on timing
        for node, reply in sorted(ok.items(), key=lambda item: self.sites[item[0]].name):
            name = self.sites[node].name
            metrics = wire.metrics_of(reply.content)
            if metrics.get("declined"):
                sites[name] = declined_entry(round_num, name, metrics)
                continue
            update = wire.model_of(reply.content)
            if update is None:
                sites[name] = {"status": "dropped", "reason": "reply without a model"}
                continue
            problem = validate_update(update, state,
                                      float(self.cfg["aggregation.max_update_norm"]))
            if problem is not None or metrics.get("num_examples", 0) <= 0:
                reason = problem or "reported no training examples"
                log.warning("round %d: update from %s rejected: %s", round_num, name, reason)
                sites[name] = {"status": "dropped", "reason": f"rejected: {reason}"}
                continue
            bytes_up += wire.state_bytes(update)
            counts = {m: int(metrics.get(f"count_{m}", 0)) for m in MODALITY_NAMES}
            updates.append((update, group_weights(int(metrics["num_examples"]), counts,
                                                  self.cfg["aggregation.modality_aware"])))
            sites[name] = trained_entry(metrics)
        train_seconds = time.perf_counter() - start
        if len(updates) < self.cfg["federation.min_sites"]:
            log.warning("round %d: only %d update(s), need %d; keeping the previous model",
                        round_num, len(updates), self.cfg["federation.min_sites"])
            new_state = state
        else:
            new_state = self.aggregate(updates, state)
        return new_state, round_info(sites, len(updates), bytes_up,
                                     wire.state_bytes(state) * len(nodes), train_seconds)

    def aggregate(self, updates: list[tuple[dict[str, np.ndarray], dict[str, int]]],
                  reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validated plaintext updates → the new global model, by ``aggregation.rule``.

        Robust rules (one vote per site) are applied group by group, so that with
        modality-aware aggregation an encoder's median is taken only over the sites
        that trained it; a group nobody trained keeps its previous weights.
        """
        rule = self.cfg["aggregation.rule"]
        if rule == "fedavg":
            return grouped_average(updates, reference)
        out = {k: v.copy() for k, v in reference.items()}
        groups = {weight_group(k) for k in reference}
        for group in sorted(groups):
            voters = [(s, float(w.get(group, 0))) for s, w in updates if w.get(group, 0) > 0]
            if not voters:
                continue
            merged = aggregate_robust(rule, voters, self.cfg["aggregation.trim_fraction"])
            out.update({k: v for k, v in merged.items() if weight_group(k) == group})
        return out

    def sample(self, round_num: int) -> list[int]:
        nodes = sorted(self.sites)
        fraction = self.cfg["federation.fraction_train"]
        k = max(self.cfg["federation.min_sites"], round(fraction * len(nodes)))
        if k >= len(nodes):
            return nodes
        rng = np.random.default_rng([self.cfg["seed"], round_num])
        return sorted(int(n) for n in rng.choice(nodes, size=k, replace=False))

    def local_eval(self, round_num: int, schema: FeatureSchema, state: dict[str, np.ndarray],
                   sites: dict[str, dict[str, Any]]) -> None:
        request = wire.request(self.cfg, round_num, schema, state)
        ok, failed = exchange(self.grid, dict.fromkeys(sorted(self.sites), request),
                              wire.EVALUATE, round_num, self.timeout)
        for node, reply in ok.items():
            figures = wire.metrics_of(reply.content)
            entry = sites.setdefault(self.sites[node].name, {"status": "dropped"})
            entry["local"] = {k: float(v) for k, v in figures.items()}
        for node, reason in failed.items():
            log.warning("round %d: local evaluation at %s failed: %s", round_num,
                        self.sites[node].name, reason)

    def run_rounds(self) -> FederationResult:
        import torch

        from mmfed.ml.metrics import classification_metrics
        from mmfed.ml.model import build_model
        from mmfed.ml.patterns import metrics_by_pattern
        from mmfed.ml.training import predict

        schema, state = self.setup()
        first = 1
        point = self.resume_point
        if point is not None:  # the checkpoint's schema and weights are authoritative
            if point.schema.to_config() != schema.to_config():
                log.warning("the sites' feature statistics differ from the checkpoint's; "
                            "continuing with the checkpoint's feature schema")
            schema, state, first = point.schema, point.state, point.round + 1
            for done in point.lines:
                self._count(done["sites"])
            log.info("resuming after round %d of %d", point.round, self.cfg["rounds"])
        holdout = self._holdout(schema)
        model = build_model(schema, self.cfg.model_spec())
        modalities = tuple(self.cfg["train.modalities"])
        rounds = self.cfg["rounds"]
        final: dict[str, Any] = dict(point.lines[-1]["global"]) if point and point.lines else {}
        patterns: dict[str, dict[str, Any]] = (
            dict(point.lines[-1].get("patterns", {})) if point and point.lines else {})
        for round_num in range(first, rounds + 1):
            t0 = time.perf_counter()
            self.deadline = time.monotonic() + self.timeout
            self.admit_new_nodes(round_num)
            if not self.cfg["secagg.enabled"]:
                log.warning("round %d: secure aggregation is OFF (--no-secagg): the server "
                            "sees each site's update", round_num)
            if not self.cfg["privacy.enabled"]:
                log.warning("round %d: differential privacy is OFF (enable it with --dp or "
                            "privacy.enabled = true)", round_num)
            if self.cfg["secagg.enabled"]:
                from mmfed.server.secure import secure_train_round

                state, info = secure_train_round(self, round_num, schema, state)
            else:
                state, info = self.train_round(round_num, schema, state)
            t_eval = time.perf_counter()
            model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
            probs, loss = predict(model, holdout, modalities)
            final = classification_metrics(probs, holdout.labels, loss)
            patterns = metrics_by_pattern(probs, holdout.labels, holdout.mask, modalities)
            eval_seconds = time.perf_counter() - t_eval
            sites = info["sites"]
            if self.cfg["federation.local_eval"]:
                self.local_eval(round_num, schema, state, sites)
            self.run.save_checkpoint(round_num, state, schema, self.cfg)
            line: dict[str, Any] = {"round": round_num,
                    "global": {k: v for k, v in final.items() if k != "n"},
                    "patterns": patterns,
                    "sites": sites,
                    "aggregation": {"participants": info["participants"],
                                    "dropped": info["dropped"],
                                    "declined": info["declined"],
                                    "secure": bool(info.get("secure", False)),
                                    "private": self.cfg["privacy.enabled"],
                                    **{k: info[k] for k in ("threshold", "neighbours",
                                                            "aborted") if k in info}},
                    "bytes": info["bytes"],
                    "seconds": {"round": time.perf_counter() - t0,
                                "train": info["train_seconds"], "evaluate": eval_seconds,
                                **{f"secagg_{k}": v for k, v in
                                   info.get("stage_seconds", {}).items() if k != "train"}}}
            self.run.append_metrics(line)
            self._count(sites)
            if self.on_round:
                self.on_round(line)
        self.run.save_model(state, schema, self.cfg, rounds)
        return FederationResult(rounds=rounds, final={k: v for k, v in final.items()
                                                      if k != "n"}, patterns=patterns)

    def _count(self, sites: dict[str, dict[str, Any]]) -> None:
        for name, entry in sites.items():
            totals = self.site_totals.setdefault(name, {})
            key = f"rounds_{entry['status']}"
            totals[key] = totals.get(key, 0) + 1
            totals.update({k: entry[k] for k in ("epsilon", "delta", "epsilon_budget")
                           if k in entry})

    def admit_new_nodes(self, round_num: int) -> None:
        """Let a site that restarted (a new node id) rejoin at the start of a round.

        A new node is asked who it is; it is admitted only under the name of a site
        that was part of the federation from the start (its old node is retired),
        so an unknown client can never join a running federation.
        """
        known = set(self.sites) | self.ignored
        fresh = [n for n in self.grid.get_node_ids() if n not in known]
        if not fresh:
            return
        request = wire.request(self.cfg, round_num)
        ok, failed = exchange(self.grid, dict.fromkeys(fresh, request), wire.STATS,
                              round_num, min(self.remaining(), 60.0))
        names = {ref.name: node for node, ref in self.sites.items()}
        for node, reply in ok.items():
            try:
                name, _ = wire.site_of(reply.content)
            except wire.WireError:
                name = ""
            if name not in names:
                log.warning("round %d: node %s (site %r) is not part of this federation; "
                            "ignored", round_num, node, name)
                self.ignored.add(node)
                continue
            del self.sites[names[name]]
            self.sites[node] = SiteRef(node, name)
            log.info("round %d: %s rejoined (node %s)", round_num, name, node)
        for node, reason in failed.items():
            log.warning("round %d: new node %s did not identify itself: %s", round_num,
                        node, reason)
            self.ignored.add(node)  # a restarted site comes back under yet another id

    def site_summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for ref in self.sites.values():
            totals = self.site_totals.get(ref.name, {})
            out[ref.name] = {"epsilon": totals.get("epsilon"), "delta": totals.get("delta"),
                             "epsilon_budget": totals.get("epsilon_budget"),
                             **{f"rounds_{s}": totals.get(f"rounds_{s}", 0)
                                for s in ("trained", "declined", "dropped")}}
        return out

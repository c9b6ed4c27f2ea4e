"""The server's round loop on Flower's Grid: schema, then train → aggregate → evaluate.

Written directly on the Message API (not a stock Strategy) because secure
aggregation, privacy declines and resume need control over each message exchange.
Each round is run by a round kind (``PlainRound`` or ``SecureRound``); the loop around
it admits restarted sites, evaluates on the holdout and makes the round durable before
the next one starts.

Local evaluation (``federation.local_eval``) costs no trip of its own: each train
request carries the global model, which the site evaluates on its own validation split
before training on it, so round r's train replies carry the local figures of the
model round r - 1 made (the initial model in round 1). Round r's metrics line holds
them as ``sites.<name>.local`` and says which model they are of (``local_model``:
r - 1). Only the final model needs a trip of its own: after the last round the sites
evaluate it, and its figures join the last line as ``sites.<name>.local_final``.
``trips`` counts a round's message exchanges with its sites.

Time: each round has one deadline, ``federation.round_timeout`` from its start, which
bounds every stage of it, local evaluation included (see ``Deadline.remaining``). The
one-off setup before round 1 has its own bound, ``setup_timeout``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message
from flwr.serverapp import Grid
from torch import nn

from mmfed import wire
from mmfed.config import RunConfig
from mmfed.data.reader import SiteData, load_site
from mmfed.errors import DataError, MmfedError
from mmfed.ml.encoders import check_private
from mmfed.ml.features import ColumnNames, EncodedSite, FeatureSchema, encode, merge_names
from mmfed.ml.model import build_model
from mmfed.ml.patterns import metrics_by_pattern
from mmfed.ml.task import task_metrics
from mmfed.ml.training import model_task, predict
from mmfed.run.resume import ResumePoint
from mmfed.run.rundir import RunDir
from mmfed.run.tracking import RoundCallback
from mmfed.server.plain import PlainRound
from mmfed.server.records import SiteEntry, SiteRef
from mmfed.server.rounds import Deadline, KeysAhead, ModelState, Round, RoundContext
from mmfed.server.schema import learn_schema, read_names
from mmfed.server.secure import SecureRound
from mmfed.server.transport import exchange, wait_for_nodes

log = logging.getLogger("mmfed")

SETUP_TIMEOUT = 300.0
"""The longest the one-off setup may take, at most ``federation.round_timeout`` too:
every expected site connecting, then answering the statistics query. A deployment's
sites connect when their operators start them, and a site's first answer reads and
summarizes its whole folder, so setup is bounded by a fixed allowance for that, not by
a round timeout that may be set to an hour for slow training. A site still silent at
the end is left out of the federation (or the run stops, if too few are left)."""
SETUP_PER_SITE = 1.5
"""Seconds of setup allowance per expected site, where that exceeds ``SETUP_TIMEOUT``.
A site's own work is parallel in a deployment, but the server still exchanges three
messages with every site, one after another, and a simulation on one machine runs
each site's folder summary in turn: 1,000 simulated sites on 2 cores (loaded) took
over 500 s to connect and state their columns, before the moments, which a fixed 300 s
and then 0.6 s per site cut off."""
ADMIT_TIMEOUT = 60.0  # a new node's answer to "which site are you?" at a round's start
Metrics = dict[str, Any]


@dataclass
class FederationResult:
    rounds: int
    final: dict[str, Any]
    patterns: dict[str, dict[str, Any]] = field(default_factory=dict)  # by modality pattern


@dataclass
class _Progress:
    """Where the loop stands: the schema, the global model and its last holdout figures."""

    schema: FeatureSchema
    state: ModelState
    first: int = 1  # the next round to run
    final: Metrics = field(default_factory=dict)
    patterns: dict[str, Metrics] = field(default_factory=dict)


class Federation:
    """One federated run: holds the global model and writes the run directory."""

    def __init__(self, grid: Grid, cfg: RunConfig, run: RunDir,
                 on_round: RoundCallback | None = None, expected_sites: int | None = None,
                 setup_timeout: float | None = None,
                 admitted: dict[int, str] | None = None) -> None:
        self.grid = grid
        # node id -> the site its authentication key was admitted as; None when sites
        # are not authenticated (simulation, --insecure), where a node's word is all
        self.admitted = admitted
        self.cfg = cfg
        self.run = run
        self.on_round = on_round
        self.expected = expected_sites or cfg["federation.min_sites"]
        self.timeout = float(cfg["federation.round_timeout"])
        if setup_timeout is None:
            setup_timeout = max(SETUP_TIMEOUT, SETUP_PER_SITE * self.expected)
        self.setup_timeout = min(self.timeout, setup_timeout)
        self.sites: dict[int, SiteRef] = {}
        self.site_totals: dict[str, dict[str, Any]] = {}
        self.resume_point: ResumePoint | None = None
        self.ignored: set[int] = set()  # nodes that are not sites of this federation
        self._holdout_data: SiteData | None = None
        # the sites' keys for the next secure round, sent at unmask (memory only: a
        # restarted server holds none, so no key from before a restart is ever used)
        self.keys_ahead = KeysAhead()
        self.noise_warned: set[str] = set()  # sites already warned that noise swamps them

    # ------------------------------------------------------------------ setup
    def setup(self) -> tuple[FeatureSchema, ModelState]:
        """Learn the federation's feature schema and build the initial global model.

        Waits at most ``setup_timeout`` in all: for the expected sites to connect, to
        state their column names, and to sum their moments (``mmfed.server.schema``).
        """
        deadline = Deadline(self.setup_timeout)
        nodes = wait_for_nodes(self.grid, self.expected, self.setup_timeout)
        ok, failed = exchange(self.grid, dict.fromkeys(nodes, wire.request(self.cfg, 0)),
                              wire.STATS, 0, deadline.remaining())
        names = self._read_names(ok, failed)
        for node in list(names):
            refusal = self.impersonation(node, names[node][0])
            if refusal is not None:
                del names[node]
                failed[node] = refusal
                self.ignored.add(node)
        for node, reason in failed.items():
            log.warning("node %s left out: %s", node, reason)
        if len(names) < self.cfg["federation.min_sites"]:
            reasons = "; ".join(failed.values()) or "no replies"
            raise MmfedError(f"only {len(names)} site(s) could start (need "
                             f"{self.cfg['federation.min_sites']}): {reasons}")
        for node, (name, _) in sorted(names.items()):
            if name in {s.name for s in self.sites.values()}:
                raise MmfedError(f"two nodes report the same site name {name!r}")
            self.sites[node] = SiteRef(node, name)
        layout = merge_names([cols for _, (_, cols) in sorted(names.items())])
        ctx = RoundContext(self.grid, self.cfg, dict(self.sites), deadline)
        schema = learn_schema(ctx, layout, self._holdout_site())
        model = build_model(schema, self.cfg.model_spec(), seed=self.cfg["seed"])
        if self.cfg["privacy.enabled"]:  # each site checks again under its own policy
            check_private(model)
        state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        return schema, state

    @staticmethod
    def _read_names(ok: dict[int, Message], failed: dict[int, str]
                    ) -> dict[int, tuple[str, ColumnNames]]:
        """Each node's (site name, column names); a malformed reply joins ``failed``."""
        out: dict[int, tuple[str, ColumnNames]] = {}
        for node, reply in ok.items():
            try:
                out[node] = read_names(reply.content)
            except wire.WireError as exc:
                failed[node] = str(exc)
        return out

    def _holdout_site(self) -> SiteData:
        """The server's own evaluation set, read once."""
        if self._holdout_data is None:
            root = self.cfg["data.dir"]
            folder = Path(root) / "holdout" if root else None
            if folder is None or not folder.is_dir():
                raise DataError(f"no holdout folder at {folder} (the server's evaluation "
                                "set)")
            self._holdout_data = load_site(folder)
        return self._holdout_data

    def _holdout(self, schema: FeatureSchema) -> EncodedSite:
        return encode(self._holdout_site(), schema)

    def _start(self) -> _Progress:
        """Setup, then, when resuming, the checkpoint's schema and weights (authoritative)
        and the figures of the rounds already done."""
        schema, state = self.setup()
        point = self.resume_point
        if point is None:
            return _Progress(schema, state)
        if point.schema.to_config() != schema.to_config():
            log.warning("the sites' feature statistics differ from the checkpoint's; "
                        "continuing with the checkpoint's feature schema")
        for done in point.lines:
            self._count(done["sites"])
        log.info("resuming after round %d of %d", point.round, self.cfg["rounds"])
        last = point.lines[-1] if point.lines else {}
        return _Progress(point.schema, point.state, point.round + 1,
                         dict(last.get("global", {})), dict(last.get("patterns", {})))

    # ------------------------------------------------------------------ rounds
    def run_rounds(self) -> FederationResult:
        at = self._start()
        holdout = self._holdout(at.schema)
        model = build_model(at.schema, self.cfg.model_spec())
        rounds = self.cfg["rounds"]
        for round_num in range(at.first, rounds + 1):
            self.run_round(round_num, at, model, holdout)
        self.run.save_model(at.state, at.schema, self.cfg, rounds)
        return FederationResult(rounds=rounds, final=_without_n(at.final),
                                patterns=at.patterns)

    def run_round(self, round_num: int, at: _Progress, model: nn.Module,
                  holdout: EncodedSite) -> None:
        """One round, start to durable: ``at`` moves on to its result."""
        t0 = time.perf_counter()
        deadline = Deadline(self.timeout)
        self.admit_new_nodes(round_num, deadline)
        self._warn_unprotected(round_num)
        ctx = RoundContext(self.grid, self.cfg, dict(self.sites), deadline, self.keys_ahead)
        at.state, info = self.round_kind().run(ctx, round_num, at.schema, at.state)
        t_eval = time.perf_counter()
        at.final, at.patterns = self.evaluate(model, at.state, holdout)
        eval_seconds = time.perf_counter() - t_eval
        local_eval = bool(self.cfg["federation.local_eval"])
        final_trip = local_eval and round_num == self.cfg["rounds"]
        seconds: dict[str, float] = {}
        if final_trip:  # the final model: no later train request carries it
            t_local = time.perf_counter()
            self.local_eval(ctx, round_num, at.schema, at.state, info.sites)
            seconds["local_final"] = time.perf_counter() - t_local
        self.run.save_checkpoint(round_num, at.state, at.schema, self.cfg)
        line = {"round": round_num, "global": _without_n(at.final), "patterns": at.patterns,
                "sites": info.sites,
                "aggregation": info.aggregation(self.cfg["privacy.enabled"]),
                "bytes": {"up": info.bytes_up, "down": info.bytes_down},
                "seconds": {"round": time.perf_counter() - t0, "train": info.train_seconds,
                            "evaluate": eval_seconds, **info.stage_figures(), **seconds},
                "trips": info.trips + int(final_trip)}
        if local_eval:
            line["local_model"] = round_num - 1
        self.run.append_metrics(line)
        self._count(info.sites)
        self._warn_noise(info.sites)
        if self.on_round:
            self.on_round(line)

    def _warn_noise(self, sites: dict[str, SiteEntry]) -> None:
        """Once per site: a one-line warning when its DP noise will swamp its gradient
        over the run (the expected signal-to-noise figure it reports with its first
        update, :func:`mmfed.privacy.accounting.expected_snr`)."""
        for name, entry in sites.items():
            snr = entry.get("snr")
            if not isinstance(snr, float) or snr >= wire.SNR_WARNING or name in self.noise_warned:
                continue
            self.noise_warned.add(name)
            log.warning("%s: DP noise will swamp its gradient (expected signal-to-noise "
                        "%.2f over the run, noise multiplier %.2f, below %g): expect little "
                        "learning; train.full_batch with train.optimizer = sgd "
                        "(configs/fedsgd.toml) or a smaller model helps", name, snr,
                        entry.get("sigma", float("nan")), wire.SNR_WARNING)

    def round_kind(self) -> Round:
        return SecureRound() if self.cfg["secagg.enabled"] else PlainRound()

    def _warn_unprotected(self, round_num: int) -> None:
        if not self.cfg["secagg.enabled"]:
            log.warning("round %d: secure aggregation is OFF (--no-secagg): the server "
                        "sees each site's update", round_num)
        if not self.cfg["privacy.enabled"]:
            log.warning("round %d: differential privacy is OFF (enable it with --dp or "
                        "privacy.enabled = true)", round_num)

    def evaluate(self, model: nn.Module, state: ModelState, holdout: EncodedSite
                 ) -> tuple[Metrics, dict[str, Metrics]]:
        """The global model's figures on the server's holdout, overall and by pattern."""
        modalities = tuple(self.cfg["train.modalities"])
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        task = model_task(model)
        outputs, loss = predict(model, holdout, modalities, task=task)
        return (task_metrics(task, outputs, holdout.labels, holdout.outcome, loss),
                metrics_by_pattern(outputs, holdout.labels, holdout.mask, modalities, task,
                                   holdout.outcome))

    def local_eval(self, ctx: RoundContext, round_num: int, schema: FeatureSchema,
                   state: ModelState, sites: dict[str, SiteEntry]) -> None:
        """Every site evaluates the final model on its own validation split, within what
        is left of the round (at least ``MIN_SHARE`` of the timeout, as for any stage):
        ``local_final`` in the site's entry."""
        request = wire.request(self.cfg, round_num, schema, state)
        ok, failed = exchange(ctx.grid, dict.fromkeys(sorted(ctx.sites), request),
                              wire.EVALUATE, round_num, ctx.remaining())
        for node, reply in ok.items():
            figures = wire.metrics_of(reply.content)
            entry = sites.setdefault(ctx.name(node), {"status": "dropped"})
            entry["local_final"] = {k: float(v) for k, v in figures.items()}
        for node, reason in failed.items():
            log.warning("round %d: local evaluation at %s failed: %s", round_num,
                        ctx.name(node), reason)

    # ------------------------------------------------------------------ sites
    def admit_new_nodes(self, round_num: int, deadline: Deadline) -> None:
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
                              round_num, min(deadline.remaining(), ADMIT_TIMEOUT))
        names = {ref.name: node for node, ref in self.sites.items()}
        for node, reply in ok.items():
            try:
                name, _ = wire.site_of(reply.content)
            except wire.WireError:
                name = ""
            refusal = self.impersonation(node, name)
            if refusal is not None:
                log.warning("round %d: %s", round_num, refusal)
                self.ignored.add(node)
                continue
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

    def impersonation(self, node: int, name: str) -> str | None:
        """Why ``node`` may not act as site ``name``, or None if it may: under SuperNode
        authentication a node is the site its key was admitted for, whatever it says."""
        if self.admitted is None:
            return None
        admitted_as = self.admitted.get(node)
        if admitted_as is None:
            return f"node {node} claims to be site {name!r} but no admitted key has its id"
        if admitted_as != name:
            return (f"node {node} claims to be site {name!r} but its key was admitted for "
                    f"{admitted_as!r}: refused as an impersonation attempt")
        return None

    def _count(self, sites: dict[str, SiteEntry]) -> None:
        for name, entry in sites.items():
            totals = self.site_totals.setdefault(name, {})
            key = f"rounds_{entry['status']}"
            totals[key] = totals.get(key, 0) + 1
            totals.update({k: entry[k] for k in ("epsilon", "delta", "epsilon_budget")
                           if k in entry})

    def site_summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for ref in self.sites.values():
            totals = self.site_totals.get(ref.name, {})
            out[ref.name] = {"epsilon": totals.get("epsilon"), "delta": totals.get("delta"),
                             "epsilon_budget": totals.get("epsilon_budget"),
                             **{f"rounds_{s}": totals.get(f"rounds_{s}", 0)
                                for s in ("trained", "declined", "dropped")}}
        return out


def _without_n(figures: Metrics) -> Metrics:
    """Holdout figures as reported: the patient count ``n`` is not a metric."""
    return {k: v for k, v in figures.items() if k != "n"}


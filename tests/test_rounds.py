"""The server's rounds in process: the real ClientApp behind a fake Grid, no Ray.

``FakeGrid`` implements the part of Flower's ``Grid`` the server uses
(``get_node_ids``, ``push_messages``, ``pull_messages``). It delivers each message by
calling the site's real ClientApp with one ``Context`` per node, whose node state is
kept across messages as a SuperNode keeps it, so secure aggregation's stages run
exactly as deployed. It can also act out what real networks do: a node that never
answers a stage (``silent``), a late reply (``delay``), a reply that does not follow
the wire contract (``corrupt``). It counts every message it is given by (node, type,
round), so a test can see how many trips a round took. Each test runs a whole
``Federation`` (setup, rounds, checkpoints, metrics) on a tiny synthetic cohort, so the
round logic is tested in seconds, without paying for Ray or real processes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from mmfed import wire
from mmfed.config import MODALITY_NAMES, RunConfig
from mmfed.data.reader import list_sites
from mmfed.data.synth import SynthSettings, synthesize
from mmfed.errors import MmfedError
from mmfed.ml.features import FeatureSchema
from mmfed.ml.model import build_model
from mmfed.ml.updates import group_weights, grouped_average
from mmfed.report.rundata import RunData
from mmfed.run.prepare import PreparedRun, freeze_config, relax_simulated_policies
from mmfed.run.resume import find_resume_point, truncate_metrics
from mmfed.run.rundir import RunDir, read_metrics
from mmfed.server import transport
from mmfed.server.app import deployed_app, prepared, server_app
from mmfed.server.loop import Federation
from mmfed.server.rounds import KeysAhead
from mmfed.server.transport import PacedGrid
from mmfed.site.app import app as client_app
from mmfed.site.runtime import evaluate_round

SITES = 3
FIRST_NODE = 101  # node FIRST_NODE + i - 1 speaks for site-i
Key = tuple[int, str] | tuple[int, str, int]  # (node, message type[, round])
Corruption = Callable[[RecordDict], RecordDict]


def node(site: int) -> int:
    return FIRST_NODE + site - 1


class FakeGrid(Grid):
    """Flower's Grid, in process: each message goes straight to the ClientApp."""

    def __init__(self, fed: Path, app: ClientApp = client_app) -> None:
        self.app = app
        self.contexts = {
            node(i): Context(run_id=1, node_id=node(i), node_config={"data-dir": str(folder)},
                             state=RecordDict(), run_config={})
            for i, folder in enumerate(list_sites(fed), start=1)}
        self.silent: set[Key] = set()  # never answered: a dead or hung node
        self.delay: dict[Key, float] = {}  # seconds before the reply can be pulled
        self.corrupt: dict[Key, Corruption] = {}  # the reply's content, rewritten
        self.replies: dict[Key, list[Message]] = {}  # every reply delivered, by key
        self.sent: Counter[tuple[int, str, int]] = Counter()  # (node, type, round)
        self._ready: dict[str, tuple[float, Message]] = {}  # message id -> (when, reply)
        self._run = Run.create_empty(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as the SuperLink does
            ids.append(msg.metadata.message_id)
            key = (msg.metadata.dst_node_id, msg.metadata.message_type)
            # (node, type) acts on every such message; (node, type, round) on one round's
            # (the schema's secure sum before round 1 uses the same stage types)
            keyed = (*key, int(msg.metadata.group_id or 0))
            self.sent[keyed] += 1
            if key in self.silent or keyed in self.silent:
                continue
            reply = self.app(msg, self.contexts[key[0]])
            corrupt = self.corrupt.get(keyed) or self.corrupt.get(key)
            if corrupt is not None and reply.has_content():
                reply = Message(corrupt(reply.content), reply_to=msg)
            self.replies.setdefault(key, []).append(reply)
            self._ready[msg.metadata.message_id] = (time.monotonic() + self.delay.get(key, 0),
                                                    reply)
        return ids

    def trips(self, round_num: int) -> list[str]:
        """The message types sent in a round, one per exchange (a trip), sorted."""
        return sorted({t for (_, t, r) in self.sent if r == round_num})

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = time.monotonic()
        due = [mid for mid in message_ids if mid in self._ready and self._ready[mid][0] <= now]
        return [self._ready.pop(mid)[1] for mid in due]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError("the server uses push_messages and pull_messages")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rounds") / "fed"
    synthesize(root, SynthSettings(sites=SITES, patients_per_site=24, holdout=24, genes=8,
                                   image_size=16, seed=1))
    return root


@pytest.fixture(autouse=True)
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new message takes its run and sender from the process's task identity, which
    Flower's runtime sets before it starts a ServerApp."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(autouse=True)
def mmfed_log_handlers() -> Iterator[None]:
    """A standalone ServerApp adds its own handler to the mmfed logger: not for long."""
    logger = logging.getLogger("mmfed")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def config(fed: Path, **values: Any) -> RunConfig:
    """A quick run: one round, no DP, no local evaluation; ``values`` by dotted key,
    spelled with ``__`` for the dot (``federation__round_timeout=3``)."""
    base: dict[str, Any] = {
        "data.dir": str(fed), "data.sites": SITES, "rounds": 1, "seed": 0,
        "run_id": "rounds-test", "privacy.enabled": False, "secagg.enabled": False,
        "federation.local_eval": False, "federation.round_timeout": 20.0,
        "train.batch_size": 16, "train.local_epochs": 1,
        # near the largest site, as the fixed-point encoding wants (mmfed.secagg.quantize)
        "secagg.count_cap": 64}
    base.update({k.replace("__", "."): v for k, v in values.items()})
    cfg = RunConfig.load(None, None, base)
    if not cfg["secagg.enabled"]:  # as `mmfed simulate --no-secagg` relaxes its sites
        relax_simulated_policies(cfg, SITES)
    return cfg


def federate(grid: FakeGrid, cfg: RunConfig, out: Path, **options: Any
             ) -> tuple[list[dict[str, Any]], Federation]:
    """Every round of a run; its metrics lines and the finished federation."""
    federation = Federation(grid, cfg, RunDir(out), expected_sites=SITES, **options)
    federation.run_rounds()
    return read_metrics(out), federation


def model(out: Path, name: str = "model.pt") -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(out / name, weights_only=False)["state_dict"]
    return state


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def statuses(line: dict[str, Any]) -> dict[str, str]:
    return {name: entry["status"] for name, entry in line["sites"].items()}


# --------------------------------------------------------------------------- plain rounds


def test_plain_round_all_sites_train_and_evaluate(fed: Path, tmp_path: Path) -> None:
    grid = FakeGrid(fed)
    cfg = config(fed, federation__local_eval=True)
    lines, federation = federate(grid, cfg, tmp_path / "run")
    [line] = lines
    assert statuses(line) == {f"site-{i}": "trained" for i in range(1, SITES + 1)}
    assert line["aggregation"] == {"participants": 3, "dropped": 0, "declined": 0,
                                   "secure": False, "private": False}
    # the train replies evaluate the model they started from (here the initial one),
    # and one trip after the last round evaluates the final model
    assert line["local_model"] == 0
    for entry in line["sites"].values():
        for key in ("local", "local_final"):
            assert entry[key]["num_examples"] > 0 and "auroc" in entry[key]
    assert grid.trips(1) == [wire.EVALUATE, wire.TRAIN] and line["trips"] == 2
    assert line["bytes"]["up"] > 0 and line["bytes"]["down"] > 0
    assert federation.site_summary()["site-1"]["rounds_trained"] == 1
    # The new model is FedAvg as production computes it, from the updates the sites sent.
    updates = []
    for i in range(1, SITES + 1):
        [reply] = grid.replies[(node(i), wire.TRAIN)]
        metrics = wire.metrics_of(reply.content)
        update = wire.model_of(reply.content)
        assert update is not None
        counts = {m: int(metrics[f"count_{m}"]) for m in MODALITY_NAMES}
        updates.append((update, group_weights(int(metrics["num_examples"]), counts,
                                              cfg["aggregation.modality_aware"])))
    start = {k: v.numpy() for k, v in model(tmp_path / "run").items()}  # for the shapes
    expected = grouped_average(updates, start)
    final = model(tmp_path / "run")
    for key, value in expected.items():
        np.testing.assert_array_equal(final[key].numpy(), value, err_msg=key)


def test_plain_round_silent_site_is_dropped_within_the_deadline(fed: Path,
                                                                  tmp_path: Path) -> None:
    grid = FakeGrid(fed)
    grid.silent.add((node(2), wire.TRAIN))
    started = time.monotonic()
    [line], _ = federate(grid, config(fed, federation__round_timeout=2.0), tmp_path / "run")
    assert time.monotonic() - started < 2.0 + 5.0  # setup and evaluation included
    assert line["sites"]["site-2"] == {"status": "dropped", "reason": "no reply within 2s"}
    assert line["aggregation"]["participants"] == 2 and line["aggregation"]["dropped"] == 1


def test_plain_round_rejects_a_bad_update_exactly_as_if_it_dropped(fed: Path,
                                                                    tmp_path: Path) -> None:
    bad, _ = federate(FakeGrid(fed), config(fed, faults__corrupt=["site-2:1:nan"]),
                      tmp_path / "bad")
    gone, _ = federate(FakeGrid(fed), config(fed, faults__drop=["site-2:1:train"]),
                       tmp_path / "gone")
    entry = bad[0]["sites"]["site-2"]
    assert entry["status"] == "dropped"
    assert entry["reason"].startswith("rejected: ") and "NaN or infinite" in entry["reason"]
    assert gone[0]["sites"]["site-2"]["status"] == "dropped"
    assert bad[0]["aggregation"]["participants"] == gone[0]["aggregation"]["participants"] == 2
    assert worst(model(tmp_path / "bad"), model(tmp_path / "gone")) == 0.0  # bit for bit


def test_plain_round_counts_a_budget_decline(fed: Path, tmp_path: Path) -> None:
    cfg = config(fed, privacy__enabled=True, **{"privacy__site__site-2__epsilon": 0.01})
    [line], federation = federate(FakeGrid(fed), cfg, tmp_path / "run")
    entry = line["sites"]["site-2"]
    assert entry["status"] == "declined" and entry["epsilon_budget"] == 0.01
    assert line["aggregation"]["declined"] == 1 and line["aggregation"]["participants"] == 2
    assert all(line["sites"][s]["status"] == "trained" for s in ("site-1", "site-3"))
    assert federation.site_summary()["site-2"]["rounds_declined"] == 1


def _without(figure: str) -> Corruption:
    def drop(content: RecordDict) -> RecordDict:
        out = RecordDict()
        for key, record in content.items():
            if isinstance(record, MetricRecord):
                record = MetricRecord({k: v for k, v in record.items() if k != figure})
            out[key] = record
        return out
    return drop


def test_plain_round_malformed_reply_is_that_sites_failure(fed: Path, tmp_path: Path) -> None:
    grid = FakeGrid(fed)
    grid.corrupt[(node(3), wire.TRAIN)] = _without("train_loss")
    [line], _ = federate(grid, config(fed), tmp_path / "run")
    assert line["sites"]["site-3"] == {"status": "dropped",
                                       "reason": "train reply without train_loss"}
    assert line["aggregation"]["participants"] == 2


# --------------------------------------------------------------------------- secure rounds


def test_secure_round_matches_the_plaintext_aggregate(fed: Path, tmp_path: Path) -> None:
    [secure], _ = federate(FakeGrid(fed), config(fed, secagg__enabled=True),
                           tmp_path / "secure")
    federate(FakeGrid(fed), config(fed), tmp_path / "plain")
    assert statuses(secure) == {f"site-{i}": "trained" for i in range(1, SITES + 1)}
    aggregation = secure["aggregation"]
    assert aggregation["secure"] is True and "aborted" not in aggregation
    assert aggregation["participants"] == 3 and aggregation["threshold"] == 2
    assert set(secure["seconds"]) >= {"secagg_share", "secagg_mask", "secagg_unmask"}
    # the schema's statistics are decoded from the same fixed point either way
    assert torch.load(tmp_path / "secure" / "model.pt", weights_only=False)["schema"] == \
        torch.load(tmp_path / "plain" / "model.pt", weights_only=False)["schema"]
    # the same model up to the fixed-point quantization of the masked sum
    assert worst(model(tmp_path / "secure"), model(tmp_path / "plain")) < 1e-4


def test_secure_round_survives_a_site_that_dies_before_sharing(fed: Path,
                                                               tmp_path: Path) -> None:
    grid = FakeGrid(fed)
    grid.silent.add((node(2), wire.SECAGG_SHARE, 1))
    started = time.monotonic()
    # two survivors: the sites' policies must accept a sum of two (min_cohort = 2)
    [line], _ = federate(grid, config(fed, secagg__enabled=True, federation__round_timeout=3.0,
                                      privacy__min_cohort=2), tmp_path / "run")
    assert time.monotonic() - started < 3.0 + 5.0
    entry = line["sites"]["site-2"]
    assert entry["status"] == "dropped" and entry["reason"].startswith("share: no reply")
    assert line["aggregation"]["participants"] == 2 and "aborted" not in line["aggregation"]


def test_secure_round_removes_the_mask_of_a_site_that_drops_before_masking(
        fed: Path, tmp_path: Path) -> None:
    [secure], _ = federate(FakeGrid(fed), config(fed, secagg__enabled=True,
                                                 faults__drop=["site-2:1:mask"],
                                                 privacy__min_cohort=2),
                           tmp_path / "secure")
    federate(FakeGrid(fed), config(fed, faults__drop=["site-2:1:train"]), tmp_path / "plain")
    entry = secure["sites"]["site-2"]
    assert entry["status"] == "dropped" and entry["reason"].startswith("mask: ")
    assert "injected failure" in entry["reason"]
    assert secure["aggregation"]["participants"] == 2 and secure["aggregation"]["dropped"] == 1
    assert worst(model(tmp_path / "secure"), model(tmp_path / "plain")) < 1e-4


def test_secure_round_completes_when_a_survivor_fails_to_unmask(
        fed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(fed, secagg__enabled=True, faults__drop=["site-2:1:unmask"])
    with caplog.at_level(logging.WARNING, logger="mmfed"):
        [line], _ = federate(FakeGrid(fed), cfg, tmp_path / "run")
    assert "site-2 failed to unmask" in caplog.text
    # its masked vector is in the sum; the others' shares remove its masks
    assert line["aggregation"]["participants"] == 3 and "aborted" not in line["aggregation"]
    assert line["sites"]["site-2"]["status"] == "trained"


def test_secure_round_aborts_below_the_threshold_and_keeps_the_model(
        fed: Path, tmp_path: Path) -> None:
    cfg = config(fed, secagg__enabled=True, rounds=2,
                 faults__drop=["site-1:2:mask", "site-3:2:mask"])
    lines, _ = federate(FakeGrid(fed), cfg, tmp_path / "run")
    assert "aborted" not in lines[0]["aggregation"]
    aborted = lines[1]["aggregation"]
    assert "threshold is 2" in aborted["aborted"] and aborted["participants"] == 0
    one = model(tmp_path / "run", "checkpoints/round-0001.pt")
    two = model(tmp_path / "run", "checkpoints/round-0002.pt")
    assert worst(one, two) == 0.0


def _no_vector(content: RecordDict) -> RecordDict:
    return RecordDict()


def _unpaired(content: RecordDict) -> RecordDict:
    record = content.config_records[wire.SECAGG]
    ciphertexts = wire.blobs(record["ct"])
    out = RecordDict()
    out[wire.SECAGG] = ConfigRecord({"to": wire.ints(record["to"]), "ct": ciphertexts[:-1]})
    return out


@pytest.mark.parametrize(("message_type", "corruption", "reason"), [
    (wire.SECAGG_SHARE, _unpaired, "share: malformed secure aggregation message ('to' and "
                                   "'ct' do not pair up)"),
    (wire.SECAGG_MASK, _no_vector, "mask: mask reply without a masked vector"),
], ids=["share", "mask"])
def test_secure_round_malformed_reply_is_that_sites_drop_out(
        fed: Path, tmp_path: Path, message_type: str, corruption: Corruption,
        reason: str) -> None:
    grid = FakeGrid(fed)
    grid.corrupt[(node(3), message_type, 1)] = corruption
    # two survivors: the sites' policies must accept a sum of two (min_cohort = 2)
    [line], _ = federate(grid, config(fed, secagg__enabled=True, privacy__min_cohort=2),
                         tmp_path / "run")
    assert line["sites"]["site-3"]["status"] == "dropped"
    assert line["sites"]["site-3"]["reason"] == reason
    assert line["aggregation"]["participants"] == 2 and "aborted" not in line["aggregation"]


def test_secure_round_malformed_unmask_reply_is_a_failed_unmask(
        fed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    grid = FakeGrid(fed)
    grid.corrupt[(node(1), wire.SECAGG_UNMASK, 1)] = _no_vector
    with caplog.at_level(logging.WARNING, logger="mmfed"):
        [line], _ = federate(grid, config(fed, secagg__enabled=True), tmp_path / "run")
    assert "site-1 failed to unmask: reply without its secure aggregation record" in caplog.text
    assert line["aggregation"]["participants"] == 3 and "aborted" not in line["aggregation"]


# --------------------------------------------------------------------------- paced stages


class CountingGrid(FakeGrid):
    """A FakeGrid that records, per message type, the most messages outstanding at once
    (pushed, reply not yet pulled)."""

    def __init__(self, fed: Path) -> None:
        super().__init__(fed)
        self.outstanding: dict[str, str] = {}  # message id -> its type
        self.most: Counter[str] = Counter()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        self.outstanding.update(zip(ids, (m.metadata.message_type for m in messages),
                                    strict=True))
        for kind in set(self.outstanding.values()):
            self.most[kind] = max(self.most[kind],
                                  sum(t == kind for t in self.outstanding.values()))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        got = list(super().pull_messages(message_ids))
        for reply in got:
            self.outstanding.pop(reply.metadata.reply_to_message_id, None)
        return got


def test_paced_secure_round_keeps_its_window_and_the_same_model(fed: Path,
                                                                tmp_path: Path) -> None:
    counting = CountingGrid(fed)
    for i in range(1, SITES + 1):
        counting.delay[(node(i), wire.TRAIN)] = transport.QUICK_REPLY + 0.1  # slow stage
    cfg = config(fed, secagg__enabled=True)
    [paced], _ = federate(PacedGrid(counting, slow=1, wide=2), cfg, tmp_path / "paced")
    federate(FakeGrid(fed), cfg, tmp_path / "all")
    assert statuses(paced) == {f"site-{i}": "trained" for i in range(1, SITES + 1)}
    # training replies take long: one at a time; the quick secure-aggregation stages
    # (replies at once) open to the wide window, and never beyond it
    assert counting.most[wire.TRAIN] == 1
    assert max(counting.most.values()) == 2
    assert counting.most[wire.SECAGG_UNMASK] == 2
    # the same model up to floating-point summation order (masks cancel exactly)
    assert worst(model(tmp_path / "paced"), model(tmp_path / "all")) < 1e-6


def test_paced_stage_goes_past_a_stalled_site(fed: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung site holds its place only until it counts as stalled; the sites queued
    behind it still train in time, and the hung one is dropped at the deadline."""
    monkeypatch.setattr(transport, "STALLED_AFTER", 0.5)
    grid = FakeGrid(fed)
    grid.silent.add((node(1), wire.TRAIN))  # the first in the queue never answers
    started = time.monotonic()
    [line], _ = federate(PacedGrid(grid, slow=1, wide=1),
                         config(fed, federation__round_timeout=4.0, privacy__min_cohort=2),
                         tmp_path / "run")
    assert time.monotonic() - started < 4.0 + 5.0
    assert statuses(line) == {"site-1": "dropped", "site-2": "trained", "site-3": "trained"}
    assert line["sites"]["site-1"]["reason"] == "no reply within 4s"


def test_paced_grid_refuses_a_window_that_cannot_move() -> None:
    with pytest.raises(ValueError, match="slow <= wide"):
        PacedGrid(FakeGrid.__new__(FakeGrid), slow=0, wide=4)


# --------------------------------------------------------------------------- trips per round


def _evaluated(cfg: RunConfig, fed: Path, state: dict[str, np.ndarray], schema: FeatureSchema
               ) -> dict[str, dict[str, float]]:
    """Each site's own evaluation of ``state``, as its ``evaluate`` handler computes it."""
    return {f"site-{i}": evaluate_round(folder, cfg, schema, state)
            for i, folder in enumerate(list_sites(fed), start=1)}


def _saved(path: Path) -> tuple[dict[str, np.ndarray], FeatureSchema]:
    saved = torch.load(path, weights_only=False)
    return ({k: v.numpy() for k, v in saved["state_dict"].items()},
            FeatureSchema.from_config(saved["schema"]))


def test_plain_rounds_take_one_trip_and_report_every_models_local_figures(
        fed: Path, tmp_path: Path) -> None:
    """Local evaluation rides on the next train trip: one trip per plain round, plus
    one for the final model; each round's model's figures reach metrics.jsonl."""
    grid = FakeGrid(fed)
    cfg = config(fed, rounds=3, federation__local_eval=True)
    out = tmp_path / "run"
    lines, _ = federate(grid, cfg, out)
    assert [grid.trips(r) for r in (1, 2, 3)] == [[wire.TRAIN], [wire.TRAIN],
                                                  [wire.EVALUATE, wire.TRAIN]]
    assert all(grid.sent[(node(i), wire.TRAIN, r)] == 1
               for i in range(1, SITES + 1) for r in (1, 2, 3))
    assert [line["trips"] for line in lines] == [1, 1, 2]
    assert [line["local_model"] for line in lines] == [0, 1, 2]
    # round r's line: the sites' figures of the model of round r - 1, as they compute
    # them; the last line also holds the final model's
    state, schema = _saved(out / "model.pt")
    initial = build_model(schema, cfg.model_spec(), seed=cfg["seed"])
    models = [{k: v.detach().numpy() for k, v in initial.state_dict().items()}]
    models += [_saved(out / "checkpoints" / f"round-{r:04d}.pt")[0] for r in (1, 2)]
    for line, model_state in zip(lines, models, strict=True):
        expected = _evaluated(cfg, fed, model_state, schema)
        for site, entry in line["sites"].items():
            assert entry["local"] == pytest.approx(expected[site], rel=1e-6), site
    final = _evaluated(cfg, fed, state, schema)
    for site, entry in lines[-1]["sites"].items():
        assert entry["local_final"] == pytest.approx(final[site], rel=1e-6), site
    # the report reads them as one series by model: round r's model at round r
    data = RunData(path=out, rounds=lines, summary={}, config={})
    expected_auroc = [_evaluated(cfg, fed, m, schema)["site-2"]["auroc"]
                      for m in (*models[1:], state)]
    assert data.site_series("site-2", "auroc", local=True) == pytest.approx(expected_auroc)


def test_secure_rounds_after_the_first_take_three_trips(fed: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Round 1 advertises keys in its train replies (train, share, mask, unmask); its
    unmask replies carry the keys for round 2, whose train trip then carries the
    shares: train+share, mask, unmask+keys. The model is bit for bit the one the
    classic path gives."""
    grid = FakeGrid(fed)
    cfg = config(fed, secagg__enabled=True, rounds=3, federation__local_eval=True)
    lines, _ = federate(grid, cfg, tmp_path / "ahead")
    classic = [wire.SECAGG_MASK, wire.SECAGG_SHARE, wire.SECAGG_UNMASK, wire.TRAIN]
    assert grid.trips(1) == classic
    assert grid.trips(2) == [wire.SECAGG_MASK, wire.SECAGG_UNMASK, wire.TRAIN]
    assert grid.trips(3) == [wire.EVALUATE, wire.SECAGG_MASK, wire.SECAGG_UNMASK, wire.TRAIN]
    assert [line["trips"] for line in lines] == [4, 3, 4]  # round 3: + the final model
    for i in range(1, SITES + 1):
        assert [grid.sent[(node(i), wire.SECAGG_SHARE, r)] for r in (1, 2, 3)] == [1, 0, 0]
    for line in lines:
        assert statuses(line) == {f"site-{i}": "trained" for i in range(1, SITES + 1)}
        assert line["aggregation"]["participants"] == 3 and "aborted" not in line["aggregation"]
        assert all("auroc" in entry["local"] for entry in line["sites"].values())
    assert "secagg_share" in lines[0]["seconds"] and "secagg_share" not in lines[1]["seconds"]
    assert all(lines[r]["bytes"]["up"] > 0 for r in range(3))
    # rounds 1 and 2 ask for the next round's keys; the schema's sum (round 0) and the
    # last round ask none
    for i in range(1, SITES + 1):
        unmasks = grid.replies[(node(i), wire.SECAGG_UNMASK)]
        assert [wire.NEXT_KEYS in reply.content.config_records
                for reply in unmasks] == [False, True, True, False]

    with monkeypatch.context() as patched:  # the same run without keys ahead
        patched.setattr(KeysAhead, "take", lambda self, round_num, nodes: None)
        slow = FakeGrid(fed)
        federate(slow, cfg, tmp_path / "classic")
    assert [slow.trips(r) for r in (1, 2)] == [classic, classic]
    for r in (1, 2, 3):
        assert worst(model(tmp_path / "ahead", f"checkpoints/round-{r:04d}.pt"),
                     model(tmp_path / "classic", f"checkpoints/round-{r:04d}.pt")) == 0.0


def test_every_secure_round_has_fresh_keys_bound_to_it(fed: Path, tmp_path: Path) -> None:
    grid = FakeGrid(fed)
    federate(grid, config(fed, secagg__enabled=True, rounds=4), tmp_path / "run")
    seen: list[bytes] = []
    for i in range(1, SITES + 1):
        # round 0 (the schema's moments) and round 1 advertise in their first reply
        moments, first = (wire.public_keys_of(r.content)
                          for r in (*grid.replies[(node(i), wire.MOMENTS)],
                                    *grid.replies[(node(i), wire.TRAIN)][:1]))
        seen += [moments["c_pk"], moments["s_pk"], first["c_pk"], first["s_pk"]]
        unmasks = grid.replies[(node(i), wire.SECAGG_UNMASK)][1:]  # after the moments'
        ahead = [wire.next_keys_of(reply.content) for reply in unmasks]
        assert [a[0] if a else None for a in ahead] == [2, 3, 4, None]
        seen += [key for a in ahead if a for key in a[1].values()]
    assert len(seen) == len(set(seen)) == SITES * (4 + 2 * 3)  # never one key twice


def test_secure_round_with_keys_ahead_recovers_a_site_that_drops_before_masking(
        fed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """site-2 sends its shares with its train reply in round 2, then dies before
    masking: the others' shares of its mask key remove its masks, and the model is
    the classic path's, in which it dropped at the same point."""
    cfg = config(fed, secagg__enabled=True, rounds=2, faults__drop=["site-2:2:mask"],
                 privacy__min_cohort=2)
    grid = FakeGrid(fed)
    lines, _ = federate(grid, cfg, tmp_path / "ahead")
    assert grid.trips(2) == [wire.SECAGG_MASK, wire.SECAGG_UNMASK, wire.TRAIN]
    entry = lines[1]["sites"]["site-2"]
    assert entry["status"] == "dropped" and entry["reason"].startswith("mask: ")
    assert lines[1]["aggregation"]["participants"] == 2
    assert "aborted" not in lines[1]["aggregation"]
    with monkeypatch.context() as patched:
        patched.setattr(KeysAhead, "take", lambda self, round_num, nodes: None)
        federate(FakeGrid(fed), cfg, tmp_path / "classic")
    assert worst(model(tmp_path / "ahead"), model(tmp_path / "classic")) == 0.0


def test_a_site_that_drops_at_train_sends_the_next_round_down_the_classic_path(
        fed: Path, tmp_path: Path) -> None:
    """site-3 dies in round 2's train trip, after the others shared with it: round 2
    still aggregates the other two; round 3 finds no keys of site-3 for it and runs
    the classic path, and site-3 is back."""
    cfg = config(fed, secagg__enabled=True, rounds=3, faults__drop=["site-3:2:train"],
                 privacy__min_cohort=2)
    grid = FakeGrid(fed)
    lines, _ = federate(grid, cfg, tmp_path / "run")
    assert wire.SECAGG_SHARE not in grid.trips(2) and wire.SECAGG_SHARE in grid.trips(3)
    assert lines[1]["sites"]["site-3"]["status"] == "dropped"
    assert lines[1]["aggregation"]["participants"] == 2
    assert lines[2]["aggregation"]["participants"] == 3
    assert [line["trips"] for line in lines] == [4, 3, 4]


def test_a_resumed_run_never_uses_keys_advertised_before_the_restart(
        fed: Path, tmp_path: Path) -> None:
    """The server dies after round 1, when every site holds keys it made for round 2.
    The resumed server knows none of them: round 2 runs the classic path with new
    keys, and the run ends on the uninterrupted run's model."""
    cfg = config(fed, secagg__enabled=True, rounds=3)
    out = tmp_path / "run"
    grid = FakeGrid(fed)

    def crash(line: dict[str, Any]) -> None:
        raise RuntimeError("server killed")

    with pytest.raises(RuntimeError, match="server killed"):
        federate(grid, cfg, out, on_round=crash)
    stale = {}
    for i in range(1, SITES + 1):
        [reply] = grid.replies[(node(i), wire.SECAGG_UNMASK)][1:]
        ahead = wire.next_keys_of(reply.content)
        assert ahead is not None and ahead[0] == 2
        stale[i] = ahead[1]
    point = find_resume_point(out, cfg)
    assert point is not None and point.round == 1
    truncate_metrics(out, point)
    before = {key: len(replies) for key, replies in grid.replies.items()}
    resumed = Federation(grid, cfg, RunDir(out, fresh=False), expected_sites=SITES)
    resumed.resume_point = point
    resumed.run_rounds()
    assert SITES * [1] == [grid.sent[(node(i), wire.SECAGG_SHARE, 2)] for i in
                           range(1, SITES + 1)]
    assert wire.SECAGG_SHARE not in grid.trips(3)  # keys made after the restart: used
    for i in range(1, SITES + 1):
        train = grid.replies[(node(i), wire.TRAIN)][before[(node(i), wire.TRAIN)]]
        fresh = wire.public_keys_of(train.content)
        assert not set(fresh.values()) & set(stale[i].values())
    lines = read_metrics(out)
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert [line["trips"] for line in lines] == [4, 4, 3]
    federate(FakeGrid(fed), cfg, tmp_path / "straight")
    assert worst(model(out), model(tmp_path / "straight")) == 0.0


# --------------------------------------------------------------------------- deadlines


def test_local_evaluation_ends_with_the_round(fed: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A site that never answers local evaluation does not hold the round past its
    deadline: local evaluation waits only for what is left of the round.

    The train trip also evaluates the model it carries at every site, so the timeout
    leaves room for that on a loaded machine (the sites run one after another here)."""
    timeout = 6.0
    grid = FakeGrid(fed)
    for i in range(1, SITES + 1):
        grid.delay[(node(i), wire.TRAIN)] = 1.0  # training takes a second of the round
    grid.silent.add((node(3), wire.EVALUATE))
    cfg = config(fed, federation__local_eval=True, federation__round_timeout=timeout)
    with caplog.at_level(logging.WARNING, logger="mmfed"):
        [line], _ = federate(grid, cfg, tmp_path / "run")
    # A full timeout of its own for local evaluation would make this 1 s + 6 s.
    assert line["seconds"]["round"] < timeout + 0.75, line["seconds"]
    assert "local_final" not in line["sites"]["site-3"]
    assert all("local_final" in line["sites"][s] for s in ("site-1", "site-2"))
    assert all("local" in entry for entry in line["sites"].values())  # with training
    assert "local evaluation at site-3 failed: no reply within" in caplog.text


def test_setup_has_its_own_bound(fed: Path, tmp_path: Path) -> None:
    """A node silent at the statistics query is left out after the setup bound, not
    after a round timeout."""
    grid = FakeGrid(fed)
    grid.silent.add((node(3), wire.STATS))
    federation = Federation(grid, config(fed, federation__round_timeout=600.0,
                                         privacy__min_cohort=2),
                            RunDir(tmp_path / "run"), expected_sites=SITES, setup_timeout=1.5)
    started = time.monotonic()
    federation.setup()
    assert time.monotonic() - started < 1.5 + 1.0
    assert sorted(ref.name for ref in federation.sites.values()) == ["site-1", "site-2"]

    waiting = Federation(FakeGrid(fed), config(fed, federation__round_timeout=600.0),
                         RunDir(tmp_path / "run2"), expected_sites=SITES + 1,
                         setup_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(MmfedError, match="only 3 of 4 required sites connected within 1s"):
        waiting.setup()
    assert time.monotonic() - started < 1.0 + 1.5


# --------------------------------------------------------------------------- ServerApps


def _server_context(run_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                   run_config=run_config)  # type: ignore[arg-type]


def test_server_app_runs_a_prepared_run_and_writes_its_summary(fed: Path,
                                                               tmp_path: Path) -> None:
    cfg = config(fed)
    run = RunDir(tmp_path / "run")
    freeze_config(cfg, run)
    server_app(prepared(cfg, run))(FakeGrid(fed), _server_context({}))
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"mode": "federated"' in summary and '"rounds": 1' in summary


def test_deployed_app_continues_the_run_mmfed_server_made(fed: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    cfg = config(fed)
    freeze_config(cfg, RunDir(tmp_path / "run"))  # what `mmfed server` does first
    deployed_app(FakeGrid(fed), _server_context(dict(cfg.to_flower())))
    assert len(read_metrics(tmp_path / "run")) == 1
    assert (tmp_path / "run" / "summary.json").exists()
    cfg.set("out", "")
    with pytest.raises(MmfedError, match="no 'out'"):
        deployed_app(FakeGrid(fed), _server_context(dict(cfg.to_flower())))
    assert "mmfed: ERROR: run config has no 'out'" in capsys.readouterr().err


def test_prepared_runs_share_one_path(fed: Path, tmp_path: Path) -> None:
    """The simulate preparation hands the ServerApp exactly what it prepared."""
    cfg = config(fed)
    run = RunDir(tmp_path / "run")
    ready = prepared(cfg, run)(_server_context({}))
    assert ready == PreparedRun(cfg, run)

"""A curious coordinator, played for real: each test is a server that tries to learn
one site's data through a hole the site must have closed itself.

The sites are mmfed's own ClientApp, each with its own policy file in its node
config (as ``mmfed client`` gives it), driven in process through the FakeGrid of
``tests/test_rounds.py``. Nothing the server sends is trusted: the server here
chooses the seed, leaves secure aggregation out, weakens the threshold and the
neighbourhood, lies about who survived, asks for replayable noise and reads every
reply. ``tests/e2e/test_curious_deployment.py`` mounts the same refusals against
real ``mmfed client`` processes over TLS.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from mmfed import wire
from mmfed.config import RunConfig
from mmfed.data.reader import list_sites, load_site
from mmfed.data.synth import SynthSettings, synthesize
from mmfed.files import state_hash
from mmfed.ml.features import column_moments, column_names, merge_names, pooled_schema
from mmfed.ml.model import build_model
from mmfed.privacy.dp_sgd import NoiseSource, train_private
from mmfed.privacy.ledger import PrivacyLedger, ledger_dir, site_fingerprint
from mmfed.run.rundir import RunDir, read_metrics
from mmfed.secagg import RoundKeys, SecAggParams
from mmfed.server.loop import Federation
from mmfed.server.rounds import RoundContext
from mmfed.server.secure import SecureRound, SecureSession
from mmfed.site import runtime
from mmfed.site import secagg as site_secagg
from mmfed.site.state import site_state
from tests.test_rounds import FakeGrid, mmfed_log_handlers, node, server_identity

__all__ = ["mmfed_log_handlers", "server_identity"]  # autouse fixtures, used by import

SITES = 3


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("curious") / "fed"
    synthesize(root, SynthSettings(sites=SITES, patients_per_site=40, holdout=30, genes=8,
                                   image_size=16, seed=4))
    return root


def policy_file(folder: Path, **terms: Any) -> Path:
    """A site's own policy file: the defaults (secure aggregation required, a cohort of
    three) unless ``terms`` say otherwise."""
    path = folder / "policy.toml"
    path.write_text("".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in terms.items()))
    return path


def site_grid(fed: Path, tmp_path: Path, **terms: Any) -> FakeGrid:
    """The federation with each site's own policy file and ledger in its node config."""
    grid = FakeGrid(fed)
    for i in range(1, SITES + 1):
        own = tmp_path / f"site-{i}"
        own.mkdir(exist_ok=True)
        config = grid.contexts[node(i)].node_config
        config["policy"] = str(policy_file(own, **terms))
        config["ledger-dir"] = str(own / "ledger")
    return grid


def server_config(fed: Path, **values: Any) -> RunConfig:
    """What the coordinator asks for; the sites' policies are in their own files. Its
    privacy request asks for no more than a site's own terms (``min_cohort`` 1,
    secure aggregation optional), so that every refusal here is the site's own."""
    base: dict[str, Any] = {
        "privacy.secure_aggregation": "optional", "privacy.min_cohort": 1,
        "data.dir": str(fed), "data.sites": SITES, "rounds": 1, "seed": 0,
        "run_id": "curious", "federation.local_eval": False,
        "federation.round_timeout": 30.0, "train.batch_size": 16, "train.local_epochs": 1,
        "secagg.count_cap": 64}
    base.update({k.replace("__", "."): v for k, v in values.items()})
    return RunConfig.load(None, None, base)


def ledger_entries(tmp_path: Path, fed: Path, site: int) -> int:
    folder = list_sites(fed)[site - 1]
    return len(PrivacyLedger(ledger_dir(str(tmp_path / f"site-{site}" / "ledger")),
                             site_fingerprint(folder)).entries())


def ask(grid: FakeGrid, site: int, content: RecordDict, message_type: str,
        round_num: int = 1) -> Message:
    """One message from the coordinator straight to a site, and its reply."""
    msg = Message(content, node(site), message_type, group_id=str(round_num))
    return grid.app(msg, grid.contexts[node(site)])


def schema_state(fed: Path) -> tuple[Any, dict[str, np.ndarray]]:
    schema = pooled_schema([load_site(f) for f in list_sites(fed)])
    model = build_model(schema, RunConfig().model_spec(), seed=0)
    return schema, {k: v.detach().numpy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- 1. noise


def test_the_seed_does_not_give_the_server_the_noise(fed: Path, tmp_path: Path) -> None:
    """The server knows the seed, the round, the site's name and the global model. It
    replays the noise the old seed scheme drew (even granting it the site's data) and
    still cannot reproduce the released update; and two releases of the same request
    differ, so the noise is not a function of anything the server sent."""
    grid = site_grid(fed, tmp_path, secure_aggregation="optional", min_cohort=1)
    schema, state = schema_state(fed)
    cfg = server_config(fed)
    released = []
    for run_id in ("curious-a", "curious-b"):  # a new run: the site trains (and pays) again
        cfg.set("run_id", run_id)
        reply = ask(grid, 1, wire.request(cfg, 1, schema, state, cohort=1), wire.TRAIN)
        update = wire.model_of(reply.content)
        assert update is not None, wire.declined_of(reply.content)
        released.append(update)
    assert any(not np.array_equal(released[0][k], released[1][k]) for k in state)
    # the server's best replay: same data, same model, same seed, seed-derived noise
    site = site_state().open(list_sites(fed)[0])
    train, _ = site_state().splits(site, schema, cfg["data.val_fraction"], cfg["seed"])
    policy = runtime.site_policy(dict(grid.contexts[node(1)].node_config), cfg, site.name)
    metrics = wire.metrics_of(reply.content)
    replay = build_model(schema, cfg.model_spec())
    replay.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    seed = runtime.site_seed(cfg["seed"], 1, site.name)
    train_private(replay, train, cfg.train_spec(), len(schema.classes), metrics["sigma"],
                  policy.max_grad_norm, seed,
                  source=NoiseSource.seeded(torch.device("cpu"), seed))
    guess = {k: v.detach().numpy() for k, v in replay.state_dict().items()}
    for update in released:
        assert max(float(np.abs(guess[k] - update[k]).max()) for k in state) > 1e-3


def test_replayable_noise_is_refused_by_a_site_that_is_not_simulated(
        fed: Path, tmp_path: Path) -> None:
    grid = site_grid(fed, tmp_path, secure_aggregation="optional", min_cohort=1)
    schema, state = schema_state(fed)
    cfg = server_config(fed, privacy__debug_seeded_noise=True)
    reply = ask(grid, 1, wire.request(cfg, 1, schema, state, cohort=3), wire.TRAIN)
    assert "debug_seeded_noise" in (wire.declined_of(reply.content) or "")
    assert wire.model_of(reply.content) is None
    assert ledger_entries(tmp_path, fed, 1) == 0  # refused before anything was spent


# --------------------------------------------------------------------------- 2. secure aggregation


def test_a_plaintext_request_is_refused(fed: Path, tmp_path: Path) -> None:
    """Leaving secure aggregation out would show the server each update: refused,
    before training, with nothing spent and no model in the reply."""
    grid = site_grid(fed, tmp_path)
    schema, state = schema_state(fed)
    reply = ask(grid, 2, wire.request(server_config(fed), 1, schema, state, cohort=3),
                wire.TRAIN)
    assert "requires secure aggregation" in (wire.declined_of(reply.content) or "")
    assert wire.model_of(reply.content) is None and not reply.has_error()
    assert ledger_entries(tmp_path, fed, 2) == 0


def test_a_whole_plaintext_run_learns_nothing(fed: Path, tmp_path: Path) -> None:
    """The same as a run: every site declines, with its reason in metrics.jsonl."""
    grid = site_grid(fed, tmp_path, secure_aggregation="optional")
    cfg = server_config(fed, secagg__enabled=False)
    federation = Federation(grid, cfg, RunDir(tmp_path / "run"), expected_sites=SITES)
    grid.contexts[node(1)].node_config["policy"] = str(
        policy_file(tmp_path / "site-1"))  # site-1 requires secure aggregation
    federation.run_rounds()
    [line] = read_metrics(tmp_path / "run")
    entry = line["sites"]["site-1"]
    assert entry["status"] == "declined" and "requires secure aggregation" in entry["reason"]
    assert line["aggregation"]["declined"] >= 1
    assert ledger_entries(tmp_path, fed, 1) == 0


def _secure_request(fed: Path, state: dict[str, np.ndarray], schema: Any, n_sites: int,
                    threshold: int, neighbours: int | None, my_id: int = 0,
                    round_num: int = 1,
                    peers: dict[int, dict[str, bytes]] | None = None) -> RecordDict:
    from mmfed.ml.updates import vector_length

    params = SecAggParams(run_id="curious", round=round_num, site_ids=list(range(n_sites)),
                          threshold=threshold, neighbours=neighbours, clip_range=1.0,
                          max_sites=n_sites, count_cap=64, vector_length=vector_length(state))
    base = wire.request(server_config(fed), round_num, schema, state)
    return wire.with_secagg(base, wire.SecAggRequest(params, my_id), peers)


@pytest.mark.parametrize(("terms", "n_sites", "threshold", "neighbours", "reason"), [
    ({"min_threshold": 4}, 5, 3, None, "threshold 3 is below this site's minimum of 4"),
    ({"min_cohort": 4}, 6, 2, 2, "would mask with 2 neighbour(s)"),
    ({"min_cohort": 5}, 4, 3, None, "the round has 4 site(s)"),
], ids=["threshold", "neighbourhood", "cohort"])
def test_a_weaker_secure_request_is_refused(fed: Path, tmp_path: Path, terms: dict[str, int],
                                            n_sites: int, threshold: int,
                                            neighbours: int | None, reason: str) -> None:
    grid = site_grid(fed, tmp_path, **terms)
    schema, state = schema_state(fed)
    reply = ask(grid, 1, _secure_request(fed, state, schema, n_sites, threshold, neighbours),
                wire.TRAIN)
    assert reason in (wire.declined_of(reply.content) or ""), reply.content
    assert wire.SECAGG not in reply.content.config_records  # no keys, no round
    assert ledger_entries(tmp_path, fed, 1) == 0


def test_keys_advertised_for_another_round_are_refused(fed: Path, tmp_path: Path) -> None:
    """A coordinator that kept a site's keys made for round 2 tries them in round 3,
    or passes off a key of its own as the site's, or claims keys the site never made:
    each is refused before training (nothing spent), and keys made ahead serve one
    train request only, whatever becomes of it."""
    grid = site_grid(fed, tmp_path)
    schema, state = schema_state(fed)
    context = grid.contexts[node(1)]
    others = {j: RoundKeys.generate("curious", 3).public() for j in (1, 2)}

    def plant(round_num: int) -> dict[str, bytes]:
        keys = RoundKeys.generate("curious", round_num)
        context.state[site_secagg.NEXT] = ConfigRecord({"keys": keys.to_state()})
        return keys.public()

    def train(own: dict[str, bytes]) -> Message:
        content = _secure_request(fed, state, schema, 3, 2, None, round_num=3,
                                  peers={0: own, **others})
        return ask(grid, 1, content, wire.TRAIN, round_num=3)

    refusals = [train(plant(2))]  # made for round 2, offered in round 3
    plant(3)
    refusals.append(train(RoundKeys.generate("curious", 3).public()))  # not the site's
    refusals.append(train(others[1]))  # keys it never made (it holds none now)
    reasons = [reply.error.reason for reply in refusals if reply.has_error()]
    assert len(reasons) == 3, [r.content for r in refusals]
    assert "advertised for round 2" in reasons[0] and "not for round 3" in reasons[0]
    assert "does not carry this site's advertised keys" in reasons[1]
    assert "never advertised" in reasons[2]
    assert ledger_entries(tmp_path, fed, 1) == 0  # nothing trained, nothing spent
    assert site_secagg.NEXT not in context.state.config_records

    reply = train(plant(3))  # the keys it made for this round: it trains and shares
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(wire.shares_of(wire.secagg_of(reply.content))) == {1, 2}
    assert ledger_entries(tmp_path, fed, 1) == 1
    again = train(RoundKeys.generate("curious", 3).public())
    assert again.has_error() and "never advertised" in again.error.reason


class ShrinkingSession(SecureSession):
    """A server that, after every site sent its masked update, tells two of them that
    only they survived: the "sum" it then unmasks would be two sites' updates."""

    def unmask(self, masked: dict[int, np.ndarray]) -> tuple[np.ndarray, list[int],
                                                            list[int]]:
        return super().unmask({sid: masked[sid] for sid in sorted(masked)[:2]})


class ShrinkingRound(SecureRound):
    def run(self, ctx: RoundContext, round_num: int, schema: Any,
            state: dict[str, np.ndarray]) -> Any:
        return ShrinkingSession(ctx, round_num, ctx.sample(round_num), state).run(schema)


def test_shrinking_the_cohort_at_unmask_is_refused(fed: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    grid = site_grid(fed, tmp_path)
    monkeypatch.setattr(Federation, "round_kind", lambda self: ShrinkingRound())
    federation = Federation(grid, server_config(fed), RunDir(tmp_path / "run"),
                            expected_sites=SITES)
    federation.run_rounds()
    [line] = read_metrics(tmp_path / "run")
    aggregation = line["aggregation"]
    assert aggregation["participants"] == 0 and "aborted" in aggregation
    for name in ("site-1", "site-2"):  # the two told they were the only survivors
        entry = line["sites"][name]
        assert entry["status"] == "declined"
        assert "only 2 site(s) survived" in entry["reason"] and "unmask" in entry["reason"]
    # nothing was unmasked: the global model is the initial one
    start = torch.load(tmp_path / "run" / "checkpoints" / "round-0001.pt",
                       weights_only=False)["state_dict"]
    schema, _ = schema_state(fed)
    initial = build_model(schema, RunConfig().model_spec(), seed=0).state_dict()
    assert state_hash({k: v.numpy() for k, v in start.items()}) == state_hash(
        {k: v.detach().numpy() for k, v in initial.items()})


# --------------------------------------------------------------------------- 3. statistics


def test_statistics_messages_hold_no_per_site_values(fed: Path, tmp_path: Path) -> None:
    """Every reply the server gets while learning the schema is read: names in the
    clear, public keys, ciphertext and masked vectors, and none of a site's counts,
    sums or moments. The schema it learns is still the pooled one."""
    grid = site_grid(fed, tmp_path)
    federation = Federation(grid, server_config(fed), RunDir(tmp_path / "run"),
                            expected_sites=SITES)
    schema, _ = federation.setup()
    sites = [load_site(f) for f in list_sites(fed)]
    layout = merge_names([column_names(s) for s in sites]).with_scales(
        [load_site(fed / "holdout")])
    secrets = []
    for s in sites:
        moments, counts = column_moments(s, layout, 64)
        secrets.append((moments, counts))
    for (_, message_type), replies in grid.replies.items():
        for reply in replies:
            content = reply.content
            assert not content.metric_records, message_type  # no figures at all
            if message_type == wire.STATS:
                _, record = wire.site_of(content)
                for key, value in record.items():
                    values = value if isinstance(value, list) else [value]
                    assert key == "image_size" or all(isinstance(v, str) for v in values)
            for record in content.config_records.values():
                for value in record.values():
                    values = value if isinstance(value, list) else [value]
                    assert not any(isinstance(v, float) for v in values), message_type
            for arrays in content.array_records.values():
                for array in arrays.values():
                    vec = array.numpy()
                    assert vec.dtype == np.uint32, message_type  # masked field elements only
                    for moments, counts in secrets:
                        assert not np.isin(counts[counts > 1], vec).all()
                        assert abs(np.corrcoef(vec[:moments.size].astype(np.float64),
                                               moments)[0, 1]) < 0.5
    pooled = pooled_schema(sites)
    assert np.allclose(schema.numeric_mean, pooled.numeric_mean, rtol=1e-5, atol=1e-6)
    assert np.allclose(schema.gene_std, pooled.gene_std, rtol=1e-4, atol=1e-6)
    assert {t for _, t in grid.replies} == {wire.STATS, wire.MOMENTS, wire.SECAGG_SHARE,
                                            wire.SECAGG_MASK, wire.SECAGG_UNMASK}


def test_statistics_honour_the_cohort(fed: Path, tmp_path: Path) -> None:
    """Two sites cannot give their statistics to a sum a policy of three forbids."""
    grid = site_grid(fed, tmp_path)
    grid.silent.add((node(3), wire.STATS))
    federation = Federation(grid, server_config(fed), RunDir(tmp_path / "run"),
                            expected_sites=SITES, setup_timeout=2.0)
    with pytest.raises(Exception, match="the round has 2 site"):
        federation.setup()


# --------------------------------------------------------------------------- 4. files


def test_privacy_files_are_private(fed: Path, tmp_path: Path) -> None:
    grid = site_grid(fed, tmp_path, secure_aggregation="optional", min_cohort=1)
    schema, state = schema_state(fed)
    reply = ask(grid, 3, wire.request(server_config(fed), 1, schema, state, cohort=3),
                wire.TRAIN)
    assert wire.model_of(reply.content) is not None
    folder = ledger_dir(str(tmp_path / "site-3" / "ledger"))
    assert os.stat(folder).st_mode & 0o777 == 0o700
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.suffix == ".jsonl" for p in files) and any(p.suffix == ".npz" for p in files)
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600, path
    for path in (p for p in folder.rglob("*") if p.is_dir()):
        assert path.stat().st_mode & 0o777 == 0o700, path

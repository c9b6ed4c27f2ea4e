"""The wire contract: every message type round-trips through its encoder and decoder,
and a malformed record is a one-line WireError (a peer to distrust), never a KeyError."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from mmfed import wire
from mmfed.config import RunConfig
from mmfed.errors import MmfedError
from mmfed.ml.features import FeatureSchema
from mmfed.secagg import SecAggError, SecAggParams
from mmfed.site import app as site_app


def params(**changes: object) -> SecAggParams:
    base = {"run_id": "run-7", "round": 3, "site_ids": [0, 1, 2, 3], "threshold": 3,
            "neighbours": None, "clip_range": 0.5, "max_sites": 4, "count_cap": 1000,
            "vector_length": 10, "segments": (4, 6)}
    base.update(changes)
    return SecAggParams(**base)  # type: ignore[arg-type]


def schema() -> FeatureSchema:
    return FeatureSchema(classes=["0", "1"], numeric=["age", "bp"],
                         numeric_mean=[50.0, 120.0], numeric_std=[10.0, 15.0],
                         categorical=["sex"], genes=["g1", "g2"], gene_mean=[0.0, 1.0],
                         gene_std=[1.0, 2.0], image_size=(8, 8))


def test_message_names_match_the_client_app_registrations() -> None:
    """Each query type the server sends is one the ClientApp registered, spelled once."""
    assert wire.STATS == f"query.{wire.ACTION_STATS}"
    registered = {name for name in site_app.app._registered_funcs if name.startswith("query.")}
    assert registered == {wire.STATS, wire.MOMENTS, wire.SECAGG_SHARE, wire.SECAGG_MASK,
                          wire.SECAGG_UNMASK}
    assert len(set(wire.MESSAGE_TYPES)) == len(wire.MESSAGE_TYPES) == 7


def test_request_round_trips_config_round_schema_and_model() -> None:
    cfg = RunConfig({"seed": 5, "train.lr": 0.01, "train.modalities": ["records", "images"],
                     "privacy.site.site-2.epsilon": 1.0})
    state = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
             "b.bias": np.zeros(3, dtype=np.float32)}
    got_cfg, round_num, got_schema, got_state = wire.read_request(
        wire.request(cfg, 4, schema(), state))
    assert round_num == 4
    assert got_cfg.values == cfg.values
    assert got_schema is not None and got_schema.to_config() == schema().to_config()
    assert got_state is not None and set(got_state) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(got_state[key], value)
    bare = wire.read_request(wire.request(cfg, 0))
    assert bare[2] is None and bare[3] is None


def test_reply_round_trips_name_metrics_model_and_statistics() -> None:
    state = {"w": np.ones((2, 2), dtype=np.float32)}
    content = wire.reply_content("site-3", state=state, metrics={"num_examples": 12,
                                                                 "train_loss": 0.25},
                                 config={"n": 12})
    assert wire.site_of(content) == ("site-3", {"n": 12})
    assert wire.metrics_of(content) == {"num_examples": 12.0, "train_loss": 0.25}
    model = wire.model_of(content)
    assert model is not None
    np.testing.assert_array_equal(model["w"], state["w"])
    empty = wire.reply_content("site-1")
    assert wire.model_of(empty) is None and wire.metrics_of(empty) == {}
    assert wire.record_bytes(content) > state["w"].nbytes


def test_secagg_request_round_trips_and_rides_on_a_train_request() -> None:
    request = wire.SecAggRequest(params(), 2, ("fusion", "genomics"))
    assert wire.SecAggRequest.from_record(request.to_record()) == request
    plain = wire.request(RunConfig(), 3, schema(), {"w": np.zeros(2, dtype=np.float32)})
    assert wire.secagg_request_of(plain) is None
    secure = wire.with_secagg(plain, request)
    assert wire.secagg_request_of(secure) == request
    assert wire.read_request(secure)[1] == 3  # the rest of the request is intact
    sparse = wire.SecAggRequest(params(neighbours=2, threshold=2, segments=()), 0)
    assert wire.SecAggRequest.from_record(sparse.to_record()) == sparse


def test_stage_messages_round_trip() -> None:
    stage = wire.Stage(5, "site-2", ("site-2:5:mask",))
    header, payload = wire.read_stage(wire.stage_content(stage, wire.unmask_request([0, 2],
                                                                                    [1])))
    assert header == stage
    assert wire.unmask_request_of(payload) == ([0, 2], [1])
    keys = {0: {"c_pk": b"c0", "s_pk": b"s0"}, 3: {"c_pk": b"c3", "s_pk": b"s3"}}
    assert wire.peer_keys_of(wire.peer_keys(keys)) == keys
    assert wire.public_keys_of(RecordDict({wire.SECAGG: wire.public_keys(keys[0])})) == keys[0]
    cts = {1: b"\x00\x01", 2: b"\xff"}
    assert wire.shares_of(wire.shares(cts)) == cts
    assert wire.routed_of(wire.routed(cts)) == cts
    assert wire.reveals_of(wire.reveals(cts)) == cts
    vec = np.arange(7, dtype=np.uint32)
    np.testing.assert_array_equal(wire.masked_of(RecordDict({wire.MASKED: wire.masked(vec)})),
                                  vec)


@pytest.mark.parametrize("record", [
    {},
    {"to": [1, 2], "ct": [b"a"]},  # do not pair up
    {"to": [1, 1], "ct": [b"a", b"b"]},  # duplicate recipient
    {"to": ["1"], "ct": [b"a"]},
    {"to": [True], "ct": [b"a"]},
    {"to": [1], "ct": ["text"]},
])
def test_malformed_stage_payloads_are_refused_in_one_line(record: dict[str, object]) -> None:
    with pytest.raises(wire.WireError) as err:
        wire.shares_of(ConfigRecord(record) if record else {})  # type: ignore[arg-type]
    assert "\n" not in str(err.value) and isinstance(err.value, MmfedError)


@pytest.mark.parametrize("change", [
    {"round": "3"}, {"site_ids": [0, "1"]}, {"threshold": 1}, {"clip_range": "big"},
    {"run_id": 7}, {"segments": [4, 5]}, {"vector_length": None},
])
def test_malformed_secagg_parameters_are_refused(change: dict[str, object]) -> None:
    record = dict(wire.SecAggRequest(params(), 1).to_record())
    record.update(change)
    with pytest.raises(SecAggError):
        wire.SecAggRequest.from_record(record)


def test_secagg_request_for_a_site_outside_the_round_is_refused() -> None:
    record = dict(wire.SecAggRequest(params(), 1).to_record())
    record[wire.MY_ID] = 9
    with pytest.raises(wire.WireError, match="not in the round"):
        wire.SecAggRequest.from_record(record)


def test_cohort_and_refusals_round_trip() -> None:
    plain = wire.request(RunConfig(), 2, cohort=4)
    assert wire.cohort_of(plain) == 4
    assert wire.read_request(plain)[0].values == RunConfig().values  # not a config key
    assert wire.cohort_of(wire.request(RunConfig(), 2)) is None
    refusal = wire.declined("declined: too few sites", site="site-2")
    assert wire.declined_of(refusal) == "declined: too few sites"
    assert wire.site_of(refusal) == ("site-2", {})
    assert wire.declined_of(wire.reply_content("site-2")) is None


def test_keys_ahead_and_local_figures_round_trip() -> None:
    payload = wire.unmask_request([0, 2], [1], next_round=6)
    assert wire.unmask_request_of(payload) == ([0, 2], [1])
    assert wire.next_round_of(payload) == 6
    assert wire.next_round_of(wire.unmask_request([0, 2], [1])) is None
    keys = {"c_pk": b"c" * 32, "s_pk": b"s" * 32}
    reply = RecordDict({wire.NEXT_KEYS: wire.next_keys(6, keys)})
    assert wire.next_keys_of(reply) == (6, keys)
    assert wire.next_keys_of(RecordDict()) is None
    bad = RecordDict({wire.NEXT_KEYS: ConfigRecord({"round": 6, "c_pk": "text", "s_pk": b""})})
    with pytest.raises(wire.WireError, match="next-round public keys"):
        wire.next_keys_of(bad)
    peers = {0: keys, 3: {"c_pk": b"C" * 32, "s_pk": b"S" * 32}}
    plain = wire.request(RunConfig(), 3, schema(), {"w": np.zeros(2, dtype=np.float32)})
    request = wire.SecAggRequest(params(), 0)
    assert wire.peers_of(wire.with_secagg(plain, request, peers)) == peers
    assert wire.peers_of(wire.with_secagg(plain, request)) is None
    assert wire.secagg_request_of(wire.with_secagg(plain, request, peers)) == request
    content = wire.reply_content("site-1", metrics={"num_examples": 4, "train_loss": 0.5})
    content[wire.LOCAL] = wire.local_figures({"auroc": 0.75, "num_examples": 5})
    assert wire.local_of(content) == {"auroc": 0.75, "num_examples": 5.0}
    assert wire.metrics_of(content) == {"num_examples": 4.0, "train_loss": 0.5}
    assert wire.local_of(wire.reply_content("site-1")) is None
    refusal = wire.declined("declined: too few sites", local={"auroc": 0.5})
    assert wire.declined_of(refusal) == "declined: too few sites"
    assert wire.local_of(refusal) == {"auroc": 0.5}

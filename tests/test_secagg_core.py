"""Secure aggregation core (``mmfed.secagg``): exact weighted FedAvg under dropouts, privacy
properties of what the server sees, and refusal of tampered or inconsistent messages.

No Flower here: ``run_round`` plays the part of the Flower round loop (it only moves the
dicts and arrays between ``SecAggClient`` and ``SecAggServer``), with each site dropping out
after a chosen stage. A site whose client raises ``SecAggAborted`` is treated as dropping
out at that stage, which is what a real site does.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mmfed.errors import MmfedError
from mmfed.secagg import (
    RoundKeys,
    SecAggAborted,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    decode_share,
    decode_sum,
    default_threshold,
    effective_degree,
    encode,
    encode_share,
    expand,
    levels,
    mean_error_bound,
    neighbourhood,
    pack,
    reconstruct,
    share_group_size,
    site_weight,
    split,
    unpack_mean,
)
from mmfed.secagg import keys as seckeys
from mmfed.secagg.shamir import PRIME, interpolate

COUNT_CAP = 100_000
MAX_SITES = 20
MIN_COUNT = 100  # smallest site in the property tests: keeps the 1e-5·R precision bound

# Stage a site completes before dropping out: 0 = never advertises, 4 = finishes the round.
ADVERTISE, SHARE_KEYS, MASKED_INPUT, UNMASK = 1, 2, 3, 4

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def make_params(ids: list[int], *, t: int | None = None, k: int | None = None,
                d: int = 64, clip: float = 1.0, run_id: str = "run-a",
                round_: int = 1) -> SecAggParams:
    if t is None:
        t = default_threshold(share_group_size(len(ids), k))
    return SecAggParams(run_id=run_id, round=round_, site_ids=ids, threshold=t, neighbours=k,
                        clip_range=clip, max_sites=MAX_SITES, count_cap=COUNT_CAP,
                        vector_length=d)


def make_data(ids: list[int], d: int, clip: float, seed: int
              ) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    rng = np.random.default_rng(seed)
    # 1.5·R spread so a good share of coordinates is actually clipped.
    updates = {i: (rng.normal(size=d) * 1.5 * clip).astype(np.float32) for i in ids}
    counts = {i: int(rng.integers(MIN_COUNT, COUNT_CAP + 1)) for i in ids}
    return updates, counts


def plaintext_fedavg(updates: dict[int, np.ndarray], counts: dict[int, int], clip: float,
                     sites: list[int]) -> np.ndarray:
    num = sum(counts[i] * np.clip(updates[i].astype(np.float64), -clip, clip) for i in sites)
    return num / sum(counts[i] for i in sites)


def run_round(params: SecAggParams, updates: dict[int, np.ndarray], counts: dict[int, int],
              completes: dict[int, int] | None = None
              ) -> tuple[np.ndarray, float, list[int]]:
    """One full round; ``completes[i]`` = the last stage site i finishes (default: all)."""
    completes = completes or {}

    def goes_on(i: int, stage: int) -> bool:
        return completes.get(i, UNMASK) >= stage

    clients = {i: SecAggClient(params, i) for i in params.site_ids}
    server = SecAggServer(params)
    adverts = {i: c.advertise() for i, c in clients.items() if goes_on(i, ADVERTISE)}
    pks = server.collect_keys(adverts)
    shares = {}
    for i in adverts:
        if goes_on(i, SHARE_KEYS):
            try:
                shares[i] = clients[i].share_keys(pks)
            except SecAggAborted:
                pass
    routed = server.route(shares)
    masked = {}
    for i in shares:
        if goes_on(i, MASKED_INPUT):
            try:
                masked[i] = clients[i].masked_input(routed[i], updates[i], counts[i])
            except SecAggAborted:
                pass
    survivors, dropped = server.unmask_request(masked)
    reveals = {}
    for i in survivors:
        if goes_on(i, UNMASK):
            try:
                reveals[i] = clients[i].unmask(survivors, dropped)
            except SecAggAborted:
                pass
    return server.aggregate(masked, reveals)


def expected_survivors(params: SecAggParams, completes: dict[int, int]) -> list[int] | None:
    """Sites whose updates should be in the sum, or None if the round must abort.

    The rule, stated independently of the implementation: at every stage a site needs at
    least t members of its share group (itself + neighbours) still alive, and in the end
    every secret the server must rebuild needs t of its holders to have revealed.
    """
    t = params.threshold
    group = {i: {*neighbourhood(i, params), i} for i in params.site_ids}

    def ok(i: int, alive: set[int]) -> bool:
        return len(group[i] & alive) >= t

    u1 = {i for i in params.site_ids if completes.get(i, UNMASK) >= ADVERTISE}
    u2 = {i for i in u1 if completes.get(i, UNMASK) >= SHARE_KEYS and ok(i, u1)}
    u3 = {i for i in u2 if completes.get(i, UNMASK) >= MASKED_INPUT and ok(i, u2)}
    u4 = {i for i in u3 if completes.get(i, UNMASK) >= UNMASK and ok(i, u3)}
    if min(len(u1), len(u2), len(u3)) < t:
        return None
    if any(not ok(i, u4) for i in u3):
        return None
    for j in u2 - u3:
        if (group[j] - {j}) & u3 and len((group[j] - {j}) & u4) < t:
            return None
    return sorted(u3)


@st.composite
def scenarios(draw: st.DrawFn, sparse: bool) -> tuple[SecAggParams, dict[int, int], int]:
    n = draw(st.integers(5 if sparse else 3, MAX_SITES))
    ids = draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    k = draw(st.integers(2, n - 3)) if sparse else None
    group = share_group_size(n, k)
    # Favour the smallest threshold: it is the one that lets sparse rounds survive dropouts.
    t = draw(st.one_of(st.just(group // 2 + 1), st.integers(group // 2 + 1, group)))
    d = draw(st.integers(50, 500))
    clip = draw(st.sampled_from([0.01, 1.0, 50.0]))
    completes = draw(st.dictionaries(st.sampled_from(ids), st.integers(0, MASKED_INPUT),
                                     max_size=n))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_params(ids, t=t, k=k, d=d, clip=clip, round_=draw(st.integers(0, 10**6))), \
        completes, seed


def record_coverage(completes: dict[int, int], expected: list[int] | None) -> None:
    """Hypothesis statistics (--hypothesis-show-statistics): which dropout kinds were hit."""
    event("aborted" if expected is None else "aggregated")
    if expected is not None:
        for stage in sorted(set(completes.values())):
            event(f"aggregated although a site stopped after stage {stage}")


def check_round(params: SecAggParams, completes: dict[int, int], seed: int,
                expected: list[int] | None) -> None:
    updates, counts = make_data(list(params.site_ids), params.vector_length,
                                params.clip_range, seed)
    if expected is None:
        with pytest.raises(SecAggAborted):
            run_round(params, updates, counts, completes)
        return
    mean, weight, survivors = run_round(params, updates, counts, completes)
    assert survivors == expected
    want = plaintext_fedavg(updates, counts, params.clip_range, expected)
    assert mean.shape == (params.vector_length,)
    assert np.abs(mean - want).max() <= 1e-5 * params.clip_range
    assert weight == pytest.approx(sum(counts[i] for i in expected) / COUNT_CAP, rel=1e-6)


# --------------------------------------------------------------------------- full rounds


@PROPERTY
@given(scenarios(sparse=False))
def test_complete_graph_round_is_exact_fedavg_or_aborts(case):
    params, completes, seed = case
    # With every site in every share group the rule is simply: t sites finish the round.
    finishers = [i for i in params.site_ids if completes.get(i, UNMASK) == UNMASK]
    expected = expected_survivors(params, completes)
    assert (expected is None) == (len(finishers) < params.threshold)
    record_coverage(completes, expected)
    check_round(params, completes, seed, expected)


@PROPERTY
@given(scenarios(sparse=True))
def test_secagg_plus_round_is_exact_fedavg_or_aborts(case):
    params, completes, seed = case
    expected = expected_survivors(params, completes)
    record_coverage(completes, expected)
    check_round(params, completes, seed, expected)


@pytest.mark.parametrize("k", [None, 4])
def test_exactly_threshold_finishers_succeed_and_one_fewer_aborts(k):
    ids = list(range(10, 22))
    params = make_params(ids, k=k, d=80)
    t = params.threshold
    group = sorted({*neighbourhood(ids[0], params), ids[0]})  # ids[0] comes first
    # Drop sites of the first share group after share_keys until exactly t are left in it.
    enough = {i: SHARE_KEYS for i in group[t:]}
    assert expected_survivors(params, enough) == [i for i in ids if i not in enough]
    check_round(params, enough, 1, expected_survivors(params, enough))
    short = {i: SHARE_KEYS for i in group[t - 1:]}
    assert expected_survivors(params, short) is None
    check_round(params, short, 2, None)


def test_every_site_dropping_at_each_stage_kinds():
    ids = [7, 3, 99, 1000, 42, 5, 61]
    params = make_params(ids, t=4)
    completes = {7: 0, 3: ADVERTISE, 99: SHARE_KEYS}  # 4 finish: 1000, 42, 5, 61
    check_round(params, completes, 3, [5, 42, 61, 1000])
    completes[1000] = MASKED_INPUT  # in the sum but reveals nothing: only 3 revealers
    check_round(params, completes, 3, None)


# --------------------------------------------------------------------------- what the server sees


def test_server_view_of_one_site_is_independent_of_its_update():
    d = 1_000_000
    ids = [11, 22, 33]
    params = make_params(ids, t=2, d=d, clip=1.0)
    x = np.linspace(-1.0, 1.0, d, dtype=np.float32)  # large, structured signal
    updates = {11: x, 22: -x, 33: x**2}
    counts = {11: 5_000, 22: 2_000, 33: 900}
    clients = {i: SecAggClient(params, i) for i in ids}
    spy = clients[11]
    secrets_of_spy = [spy._b, seckeys.private_bytes(spy._s_sk), seckeys.private_bytes(spy._c_sk)]
    server = SecAggServer(params)
    adverts = {i: c.advertise() for i, c in clients.items()}
    pks = server.collect_keys(adverts)
    shares = {i: c.share_keys(pks) for i, c in clients.items()}
    routed = server.route(shares)
    masked = {i: c.masked_input(routed[i], updates[i], counts[i]) for i, c in clients.items()}
    survivors, dropped = server.unmask_request(masked)
    reveals = {i: c.unmask(survivors, dropped) for i, c in clients.items()}

    y = masked[11]
    assert y.dtype == np.uint32 and y.nbytes == 4 * (d + 1)
    truth = pack(x, site_weight(counts[11], COUNT_CAP), 1.0, MAX_SITES)
    corr = np.corrcoef(y.astype(np.float64), truth.astype(np.float64))[0, 1]
    assert abs(corr) < 0.01
    assert abs(np.corrcoef(y[:-1].astype(np.float64), x)[0, 1]) < 0.01
    # Nothing the server receives from the site contains one of its secrets.
    seen = [*adverts[11].values(), *shares[11].values(), y.tobytes(), *reveals[11].values()]
    assert not any(s in blob for s in secrets_of_spy for blob in seen)
    # Sanity: the same round still aggregates correctly at this size.
    mean, _, _ = server.aggregate(masked, reveals)
    want = plaintext_fedavg(updates, counts, 1.0, ids)
    assert np.abs(mean - want).max() <= 1e-5


@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(2, 12), data=st.data())
@settings(max_examples=60, deadline=None)
def test_shamir_any_t_shares_rebuild_and_fewer_reveal_nothing(secret, n, data):
    t = data.draw(st.integers(2, n))
    shares = split(secret, t, n)
    assert [x for x, _ in shares] == list(range(1, n + 1))
    chosen = data.draw(st.permutations(shares))
    assert reconstruct(chosen[:t], t) == secret
    assert reconstruct(chosen, t) == secret  # extra shares are checked, not ignored
    few = chosen[: t - 1]
    with pytest.raises(SecAggError, match="threshold"):
        reconstruct(few, t)
    assert interpolate(few, 0) != int.from_bytes(secret, "big")
    # t - 1 shares are consistent with *any* other secret: there is a degree t - 1
    # polynomial through them and (0, other), so they carry no information about secret.
    other = bytes(b ^ 0xFF for b in secret)
    free_x = n + 1
    point = (free_x, interpolate([*few, (0, int.from_bytes(other, "big"))], free_x))
    assert reconstruct([*few, point], t) == other


def test_shamir_rejects_corrupt_and_malformed_shares():
    secret = bytes(range(32))
    shares = split(secret, 3, 5)
    bad = [shares[0], (shares[1][0], (shares[1][1] + 1) % PRIME), *shares[2:]]
    with pytest.raises(SecAggError, match="inconsistent"):
        reconstruct(bad, 3)
    with pytest.raises(SecAggError, match="different shares"):
        reconstruct([*shares, (shares[0][0], shares[0][1] + 1)], 3)
    assert decode_share(encode_share(shares[4])) == shares[4]
    with pytest.raises(SecAggError):
        decode_share(encode_share(shares[4])[:-1])
    with pytest.raises(SecAggError):
        decode_share(bytes(4) + bytes(66))  # x = 0 would be the secret itself
    with pytest.raises(SecAggError):
        split(b"short", 2, 3)
    with pytest.raises(SecAggError):
        split(secret, 4, 3)


# --------------------------------------------------------------------------- tampering and misuse


def _three_sites_to_stage_two(params: SecAggParams):
    clients = {i: SecAggClient(params, i) for i in params.site_ids}
    server = SecAggServer(params)
    pks = server.collect_keys({i: c.advertise() for i, c in clients.items()})
    shares = {i: c.share_keys(pks) for i, c in clients.items()}
    return clients, server, shares, server.route(shares)


def test_tampered_ciphertext_is_rejected():
    params = make_params([1, 2, 3], t=2, d=10)
    clients, _, _, routed = _three_sites_to_stage_two(params)
    ct = routed[1][2]
    for pos in (0, 12, len(ct) // 2, len(ct) - 1):  # nonce, body, tag
        flipped = bytearray(ct)
        flipped[pos] ^= 0x01
        with pytest.raises(SecAggError, match="authentication"):
            clients[1].masked_input({**routed[1], 2: bytes(flipped)}, np.zeros(10), 500)
    with pytest.raises(SecAggError, match="truncated"):
        clients[1].masked_input({**routed[1], 2: ct[:20]}, np.zeros(10), 500)
    # Rejections change nothing: the genuine messages still work afterwards.
    assert clients[1].masked_input(routed[1], np.zeros(10), 500).shape == (11,)


def test_ciphertext_replayed_to_another_receiver_or_round_is_rejected():
    params = make_params([1, 2, 3], t=2, d=10)
    clients, _, _, routed = _three_sites_to_stage_two(params)
    # Site 2's share meant for site 1, replayed to site 3 as if 2 had sent it to 3.
    with pytest.raises(SecAggError, match="authentication"):
        clients[3].masked_input({**routed[3], 2: routed[1][2]}, np.zeros(10), 500)
    # Site 1's share for site 2, presented to 3 as coming from 2 (swapped sender).
    with pytest.raises(SecAggError, match="authentication"):
        clients[3].masked_input({**routed[3], 2: routed[2][1]}, np.zeros(10), 500)
    # Replayed into the next round (fresh clients, fresh keys).
    nxt = replace(params, round=params.round + 1)
    clients2, _, _, routed2 = _three_sites_to_stage_two(nxt)
    with pytest.raises(SecAggError, match="authentication"):
        clients2[1].masked_input({**routed2[1], 2: routed[1][2]}, np.zeros(10), 500)


def test_share_encryption_binds_run_round_and_direction_even_with_one_key():
    key = bytes(range(32))
    ct = seckeys.encrypt_share(key, b"payload", "run", 5, 1, 2)
    assert seckeys.decrypt_share(key, ct, "run", 5, 1, 2) == b"payload"
    for ctx in [("run", 6, 1, 2), ("other", 5, 1, 2), ("run", 5, 2, 1), ("run", 5, 1, 3)]:
        with pytest.raises(SecAggError, match="authentication"):
            seckeys.decrypt_share(key, ct, *ctx)


def test_pairwise_masks_agree_and_differ_across_rounds_and_runs():
    sk_a, pk_a = seckeys.generate_keypair()
    sk_b, pk_b = seckeys.generate_keypair()
    seeds = set()
    for run_id in ("run-a", "run-b"):
        for rnd in (1, 2, 3):
            ab = seckeys.derive_key(sk_a, pk_b, "pair-mask", run_id, rnd, 4, 9)
            ba = seckeys.derive_key(sk_b, pk_a, "pair-mask", run_id, rnd, 9, 4)
            assert ab == ba
            seeds.add(ab)
    assert len(seeds) == 6
    masks = {expand(s, 1000, "pair-mask").tobytes() for s in seeds}
    assert len(masks) == 6
    share_key = seckeys.derive_key(sk_a, pk_b, "share-key", "run-a", 1, 4, 9)
    assert share_key not in seeds  # purposes are separated too


def test_masked_inputs_differ_across_rounds_for_the_same_update():
    outputs = []
    for rnd in (1, 2):
        params = make_params([1, 2, 3], t=2, d=50, round_=rnd)
        clients, _, _, routed = _three_sites_to_stage_two(params)
        outputs.append(clients[1].masked_input(routed[1], np.ones(50, np.float32), 100))
    assert (outputs[0] != outputs[1]).mean() > 0.99


def test_client_refuses_to_reveal_both_shares_of_a_peer():
    params = make_params([1, 2, 3, 4], t=3, d=10)
    clients, server, _, routed = _three_sites_to_stage_two(params)
    masked = {i: c.masked_input(routed[i], np.zeros(10), 100) for i, c in clients.items()}
    with pytest.raises(SecAggError, match="both"):
        clients[1].unmask([1, 2, 3, 4], [4])
    with pytest.raises(SecAggError, match="not listed as a survivor"):
        clients[1].unmask([2, 3, 4], [1])
    with pytest.raises(SecAggAborted, match="refusing to unmask"):
        clients[1].unmask([1, 2], [3, 4])
    survivors, dropped = server.unmask_request(masked)
    reveals = clients[1].unmask(survivors, dropped)
    assert sorted(reveals) == [1, 2, 3, 4] and all(r[:1] == b"\x01" for r in reveals.values())
    with pytest.raises(SecAggError, match="stage"):
        clients[1].unmask([1, 2, 3], [4])  # a second call could reveal the s-share of 4


def test_client_stages_run_once_and_in_order():
    params = make_params([1, 2, 3], t=2, d=10)
    client = SecAggClient(params, 1)
    with pytest.raises(SecAggError, match="stage"):
        client.masked_input({}, np.zeros(10), 10)
    keys_msg = client.advertise()
    with pytest.raises(SecAggError, match="stage"):
        client.advertise()
    other = {i: SecAggClient(params, i).advertise() for i in (2, 3)}
    _, fresh_pk = seckeys.generate_keypair()
    forged = {**other, 1: {"c_pk": fresh_pk, "s_pk": keys_msg["s_pk"]}}
    with pytest.raises(SecAggError, match="altered"):
        client.share_keys(forged)
    with pytest.raises(SecAggError, match="unknown site"):
        client.share_keys({**other, 1: keys_msg, 8: other[2]})
    assert sorted(client.share_keys({**other, 1: keys_msg})) == [2, 3]
    with pytest.raises(SecAggError):
        SecAggClient(params, 4)


def test_corrupted_share_of_a_dropped_sites_key_is_detected():
    ids = [1, 2, 3, 4]
    params = make_params(ids, t=3, d=20)
    updates, counts = make_data(ids, 20, 1.0, 0)
    clients, server, _, routed = _three_sites_to_stage_two(params)
    masked = {i: clients[i].masked_input(routed[i], updates[i], counts[i]) for i in (1, 2, 3)}
    survivors, dropped = server.unmask_request(masked)
    assert (survivors, dropped) == ([1, 2, 3], [4])
    reveals = {i: clients[i].unmask(survivors, dropped) for i in survivors}
    blob = bytearray(reveals[2][4])
    blob[-1] ^= 0x01
    reveals[2] = {**reveals[2], 4: bytes(blob)}
    with pytest.raises(SecAggError, match="does not match its s_pk"):
        server.aggregate(masked, reveals)


def test_server_rejects_inconsistent_routing_and_stray_inputs():
    params = make_params([1, 2, 3, 4], t=3, d=10)
    clients = {i: SecAggClient(params, i) for i in params.site_ids}
    server = SecAggServer(params)
    pks = server.collect_keys({i: c.advertise() for i, c in clients.items() if i != 4})
    shares = {i: clients[i].share_keys(pks) for i in (1, 2, 3)}
    assert sorted(shares[1]) == [2, 3]  # 4 never advertised: no share for it
    with pytest.raises(SecAggError, match="expected its live neighbours"):
        server.route({**shares, 1: {2: shares[1][2]}})
    routed = server.route(shares)
    with pytest.raises(SecAggError, match="without sharing keys"):
        server.unmask_request([1, 2, 4])
    with pytest.raises(SecAggAborted, match="threshold"):
        server.unmask_request([1, 2])
    assert sorted(routed) == [1, 2, 3]


def test_server_aborts_early_when_too_few_sites_advertise():
    params = make_params([1, 2, 3, 4, 5], t=4)
    server = SecAggServer(params)
    adverts = {i: SecAggClient(params, i).advertise() for i in (1, 2, 3)}
    with pytest.raises(SecAggAborted, match="advertised"):
        server.collect_keys(adverts)
    assert issubclass(SecAggAborted, SecAggError) and issubclass(SecAggError, MmfedError)


# --------------------------------------------------------------------------- parameters and graph


@pytest.mark.parametrize(("change", "message"), [
    ({"site_ids": [1]}, "at least 2 sites"),
    ({"site_ids": [1, 1, 2]}, "duplicates"),
    ({"threshold": 2}, "more than half"),  # 5 sites: 2 is not > 5/2
    ({"threshold": 6}, "more than half"),
    ({"neighbours": 1}, "neighbours"),
    ({"clip_range": 0.0}, "clip_range"),
    ({"clip_range": float("nan")}, "clip_range"),
    ({"max_sites": 4}, "max_sites"),
    ({"count_cap": 0}, "count_cap"),
    ({"count_cap": 10**9}, "count_cap"),  # finer than the code range can carry
    ({"vector_length": 0}, "vector_length"),
    ({"run_id": ""}, "run_id"),
    ({"round": -1}, "round"),
])
def test_invalid_parameters_give_one_clear_line(change, message):
    params = replace(make_params([1, 2, 3, 4, 5]), **change)
    with pytest.raises(SecAggError, match=message) as err:
        params.validate()
    assert "\n" not in str(err.value)


def test_default_threshold_and_group_sizes():
    # more than half of each share group, the least SecAggParams.validate accepts
    assert [default_threshold(n) for n in (2, 3, 4, 5, 20)] == [2, 2, 3, 3, 11]
    for n in (2, 3, 4, 5, 20):
        replace(make_params(list(range(n))), threshold=default_threshold(n)).validate()
    with pytest.raises(SecAggError, match="at least 2 sites"):
        default_threshold(1)
    assert share_group_size(20, None) == 20
    assert share_group_size(20, 19) == 20
    assert effective_degree(20, 5) == 5  # odd k, even n: the antipode makes it regular
    assert effective_degree(21, 5) == 6  # odd k, odd n: no 5-regular graph exists
    make_params(list(range(20)), k=5).validate()


@given(n=st.integers(5, 40), data=st.data())
@settings(max_examples=40, deadline=None)
def test_secagg_plus_graph_is_symmetric_regular_and_deterministic(n, data):
    k = data.draw(st.integers(2, n - 2))
    ids = data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    params = replace(make_params(ids[:2]), site_ids=ids, neighbours=k, max_sites=64,
                     threshold=effective_degree(n, k) + 1)
    params.validate()
    graph = {i: neighbourhood(i, params) for i in ids}
    degree = effective_degree(n, k)
    for i, nbrs in graph.items():
        assert i not in nbrs and nbrs == sorted(nbrs) and len(nbrs) == degree
        assert all(i in graph[j] for j in nbrs)
    shuffled = replace(params, site_ids=list(reversed(ids)))
    assert all(neighbourhood(i, shuffled) == graph[i] for i in ids)


def test_graph_changes_with_round_and_is_complete_without_neighbours():
    ids = list(range(30))
    graphs = [
        {i: neighbourhood(i, make_params(ids, k=4, round_=r)) for i in ids} for r in (1, 2)
    ]
    assert graphs[0] != graphs[1]
    complete = make_params(ids)
    assert neighbourhood(7, complete) == [i for i in ids if i != 7]


# --------------------------------------------------------------------------- quantization and PRG


@given(n=st.integers(1, MAX_SITES), d=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       clip=st.sampled_from([1e-3, 1.0, 1e3]))
@settings(max_examples=60, deadline=None)
def test_encoded_sums_never_wrap_and_decode_within_half_steps(n, d, seed, clip):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(n, d)) * 2 * clip
    ws = rng.uniform(1e-3, 1.0, size=n)
    total = np.zeros(d, np.uint32)
    for x, w in zip(xs, ws, strict=True):
        total += encode(x.astype(np.float32), float(w), clip, MAX_SITES)
    want = sum(w * np.clip(x.astype(np.float32).astype(np.float64), -clip, clip)
               for x, w in zip(xs, ws, strict=True))
    got = decode_sum(total, n, clip, MAX_SITES)
    assert np.abs(got - want).max() <= n * clip / levels(MAX_SITES) * (1 + 1e-9)


def test_extreme_values_at_max_sites_do_not_wrap():
    top = np.full(7, 10.0)
    codes = encode(top, 1.0, 2.0, MAX_SITES)
    total = sum((codes for _ in range(MAX_SITES)), np.zeros(7, np.uint32))
    assert int(total[0]) == MAX_SITES * levels(MAX_SITES) <= 2**32 - 1
    assert np.allclose(decode_sum(total, MAX_SITES, 2.0, MAX_SITES), MAX_SITES * 2.0)
    low = sum((encode(-top, 1.0, 2.0, MAX_SITES) for _ in range(MAX_SITES)), np.zeros(7, np.uint32))
    assert np.allclose(decode_sum(low, MAX_SITES, 2.0, MAX_SITES), -MAX_SITES * 2.0)


@given(n=st.integers(1, MAX_SITES), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_packed_weighted_mean_within_1e5_of_clip_range(n, seed):
    rng = np.random.default_rng(seed)
    clip = 3.0
    counts = rng.integers(70, COUNT_CAP + 1, size=n)
    xs = rng.normal(size=(n, 200)).astype(np.float32) * 4
    total = np.zeros(201, np.uint32)
    for x, c in zip(xs, counts, strict=True):
        packed = pack(x, site_weight(int(c), COUNT_CAP), clip, MAX_SITES)
        assert packed.nbytes == 4 * (200 + 1)
        total += packed
    mean, weight = unpack_mean(total, n, clip, MAX_SITES)
    want = (counts[:, None] * np.clip(xs.astype(np.float64), -clip, clip)).sum(0) / counts.sum()
    bound = mean_error_bound(clip, MAX_SITES, 70 / COUNT_CAP)
    assert bound <= 1e-5 * clip
    assert np.abs(mean - want).max() <= bound
    assert weight == pytest.approx(counts.sum() / COUNT_CAP, rel=1e-6)


def test_quantization_rejects_bad_inputs():
    with pytest.raises(SecAggError, match="count_cap"):
        site_weight(100_001, COUNT_CAP)
    with pytest.raises(SecAggError, match="at least 1"):
        site_weight(0, COUNT_CAP)
    with pytest.raises(SecAggError, match="weight"):
        encode(np.zeros(3), 0.0, 1.0, 4)
    with pytest.raises(SecAggError, match="weight"):
        encode(np.zeros(3), 1.5, 1.0, 4)
    with pytest.raises(SecAggError, match="NaN"):
        encode(np.array([0.0, np.nan]), 0.5, 1.0, 4)
    with pytest.raises(SecAggError, match="n_contributors"):
        decode_sum(np.zeros(3, np.uint32), 5, 1.0, 4)
    with pytest.raises(SecAggError, match="did not cancel"):
        decode_sum(np.full(3, 2**32 - 1, np.uint32), 1, 1.0, 4)


def test_prg_is_deterministic_uniform_and_purpose_separated():
    seed = bytes(range(32))
    a = expand(seed, 200_000, "pair-mask")
    assert a.dtype == np.uint32 and a.shape == (200_000,)
    assert np.array_equal(a, expand(seed, 200_000, "pair-mask"))
    assert np.array_equal(a[:10], expand(seed, 10, "pair-mask"))  # prefix-stable
    assert (a != expand(seed, 200_000, "self-mask")).mean() > 0.99
    assert abs(a.astype(np.float64).mean() / 2**32 - 0.5) < 0.005
    assert expand(seed, 0, "self-mask").shape == (0,)
    with pytest.raises(SecAggError):
        expand(b"x" * 31, 10, "pair-mask")
    with pytest.raises(SecAggError):
        expand(seed, 10, "unknown")


def test_masking_50k_coordinates_for_20_neighbours_is_fast():
    ids = list(range(1, 21))
    params = make_params(ids, d=50_000)
    clients, _, _, routed = _three_sites_to_stage_two(params)
    update = np.random.default_rng(0).normal(size=50_000).astype(np.float32)
    times = []
    for i in (1, 10, 20):
        start = time.perf_counter()
        clients[i].masked_input(routed[i], update, 1000)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.1


def test_keys_made_ahead_serve_exactly_their_round():
    """Key pairs made before the round's parameters (sent with the previous round's
    last reply) run the round as a client's own would, survive the site's state, and
    are refused for any other round or run."""
    ids = [1, 2, 3, 4]
    params = make_params(ids, d=16)
    updates, counts = make_data(ids, 16, 1.0, 3)
    ahead = {i: RoundKeys.from_state(RoundKeys.generate("run-a", 1).to_state()) for i in ids}
    clients = {i: SecAggClient(params, i, ahead[i]) for i in ids}
    server = SecAggServer(params)
    pks = server.collect_keys({i: ahead[i].public() for i in ids})
    assert all(clients[i].advertise() == ahead[i].public() for i in ids)
    routed = server.route({i: c.share_keys(pks) for i, c in clients.items()})
    masked = {i: clients[i].masked_input(routed[i], updates[i], counts[i]) for i in (1, 2, 3)}
    survivors, dropped = server.unmask_request(masked)
    reveals = {i: clients[i].unmask(survivors, dropped) for i in survivors}
    mean, _, used = server.aggregate(masked, reveals)
    assert used == [1, 2, 3]  # 4 dropped after sharing: its masks are removed
    total = sum(counts[i] for i in used)
    expected = sum(np.clip(updates[i], -1, 1) * counts[i] for i in used) / total
    assert np.abs(mean - expected).max() < 1e-4
    keys = [k for r in ahead.values() for k in r.public().values()]
    assert len(set(keys)) == len(keys)  # fresh pairs for every site
    with pytest.raises(SecAggError, match="not round 2"):
        SecAggClient(make_params(ids, round_=2), 1, ahead[1])
    with pytest.raises(SecAggError, match="run 'run-b'"):
        SecAggClient(make_params(ids, run_id="run-b"), 1, ahead[1])
    with pytest.raises(SecAggError, match="corrupt"):
        RoundKeys.from_state(b'{"run_id": "run-a", "round": 1, "c_sk": "00", "s_sk": "00"}')

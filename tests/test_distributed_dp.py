"""Distributed DP inside secure aggregation: noise shares in the integer domain, the
site's terms for them, and a whole federation whose ledgers recompute exactly.

The attacks a curious coordinator can mount on distributed noise are mounted here: a
plaintext request, a round not laid out for noise, a layout with no room for it, and
an unmask request for fewer survivors than the noise was calibrated for.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mmfed.errors import Declined
from mmfed.privacy import distributed, skellam
from mmfed.privacy.accounting import expected_snr
from mmfed.privacy.policy import PrivacyPolicy
from mmfed.secagg import SecAggClient, SecAggError, SecAggParams, SecAggServer
from mmfed.secagg.quantize import decode_sum, encode, levels, noise_headroom
from mmfed.site import consent
from mmfed.wire import SNR_WARNING
from tests.helpers import run_mmfed

FEDSGD = ["--config", str(Path(__file__).resolve().parent.parent / "configs" / "fedsgd.toml")]


def params(n: int = 3, max_sites: int | None = None, noisy: bool = True, d: int = 50,
           threshold: int = 2) -> SecAggParams:
    return SecAggParams(run_id="run-dp", round=1, site_ids=list(range(n)), threshold=threshold,
                        neighbours=None, clip_range=1.0, max_sites=max_sites or n + 1,
                        count_cap=1000, vector_length=d, noisy=noisy)


def policy(**kw: object) -> PrivacyPolicy:
    return PrivacyPolicy.model_validate({"noise": "distributed", **kw})


def test_noisy_sum_decodes_signed_values_below_zero_and_above_the_top() -> None:
    """Codes at both ends of the range plus noise that pushes them past either end
    decode to the true sum plus the noise, not to a wrapped value."""
    n, max_sites = 3, 4
    top = levels(max_sites)
    x = np.array([-1.0, 1.0, 0.0, 0.25])
    codes = sum(encode(x, 1.0, 1.0, max_sites).astype(np.int64) for _ in range(n))
    noise = np.array([-5000, 7000, 3, -2])
    total = np.mod(codes + noise, 2**32).astype(np.uint32)
    got = decode_sum(total, n, 1.0, max_sites, noisy=True)
    step = 2.0 / top
    assert np.allclose(got, n * x + noise * step, atol=n * step)
    with pytest.raises(SecAggError, match="exceeds"):  # the plain decoder refuses it
        decode_sum(total, n, 1.0, max_sites)
    assert noise_headroom(n, max_sites) > 10 ** 8


def test_protocol_round_carries_every_share_of_noise_into_the_sum() -> None:
    """Three sites mask noisy codes; the unmasked mean is the plain mean plus the sum
    of the three noise vectors, in value units."""
    p = params(d=2000)
    rng = np.random.default_rng(3)
    updates = {i: rng.normal(scale=0.1, size=p.vector_length).astype(np.float32)
               for i in p.site_ids}
    counts = {0: 100, 1: 200, 2: 300}
    noises = {i: distributed.draw_noise(400.0, p.vector_length) for i in p.site_ids}
    clients = {i: SecAggClient(p, i) for i in p.site_ids}
    server = SecAggServer(p)
    pks = server.collect_keys({i: c.advertise() for i, c in clients.items()})
    routed = server.route({i: c.share_keys(pks) for i, c in clients.items()})
    masked = {i: c.masked_input(routed[i], updates[i], counts[i], noise=noises[i])
              for i, c in clients.items()}
    survivors, dropped = server.unmask_request(masked)
    reveals = {i: clients[i].unmask(survivors, dropped) for i in survivors}
    mean, weight, used = server.aggregate(masked, reveals)
    scale = levels(p.max_sites) / 2.0
    total_w = sum(counts.values()) / p.count_cap
    plain = sum(counts[i] * updates[i].astype(np.float64) for i in p.site_ids) / 600
    noise_mean = sum(noises.values()) / scale / total_w
    assert used == [0, 1, 2] and weight == pytest.approx(total_w)
    assert np.allclose(mean, plain + noise_mean, atol=1e-5)
    # and the noise is really there: about sqrt(3 * 2 * 400) codes per coordinate
    assert np.std(sum(noises.values())) == pytest.approx(np.sqrt(2400), rel=0.1)


def _shared(p: SecAggParams) -> tuple[dict[int, SecAggClient], dict[int, dict[int, bytes]]]:
    clients = {i: SecAggClient(p, i) for i in p.site_ids}
    server = SecAggServer(p)
    pks = server.collect_keys({i: c.advertise() for i, c in clients.items()})
    return clients, server.route({i: c.share_keys(pks) for i, c in clients.items()})


@pytest.mark.parametrize("noisy", [False, True])
def test_noise_only_with_a_round_laid_out_for_it(noisy: bool) -> None:
    """Noise into a round decoded as plain would corrupt it; a noisy round without
    noise would release an update with none of this site's share."""
    p = params(noisy=noisy)
    clients, routed = _shared(p)
    noise = None if noisy else np.zeros(p.vector_length, dtype=np.int64)
    with pytest.raises(SecAggError, match="noisy"):
        clients[0].masked_input(routed[0], np.zeros(p.vector_length), 10, noise=noise)


def test_params_carry_the_noisy_flag_and_refuse_a_malformed_one() -> None:
    p = params()
    assert SecAggParams.from_record(p.to_record()) == p
    with pytest.raises(SecAggError, match="noisy"):
        SecAggParams.from_record({**p.to_record(), "noisy": 2})
    old = {k: v for k, v in params(noisy=False).to_record().items() if k != "noisy"}
    assert SecAggParams.from_record(old).noisy is False  # a pre-noise layout still loads


@pytest.mark.parametrize(("request_params", "full_batch", "epochs", "optimizer", "message"), [
    (None, True, 1, "sgd", "plaintext"),
    (params(noisy=False), True, 1, "sgd", "not laid out"),
    (params(), False, 1, "sgd", "full-batch"),
    (params(), True, 4, "sgd", "full-batch"),
    (params(), True, 1, "adamw", "full-batch"),
])
def test_site_declines_what_its_noise_share_would_not_protect(
        request_params: SecAggParams | None, full_batch: bool, epochs: int, optimizer: str,
        message: str) -> None:
    with pytest.raises(Declined, match=message):
        distributed.check_request(policy(), request_params, full_batch, epochs, optimizer)


def test_a_layout_without_room_for_the_noise_is_declined() -> None:
    """A curious server that packs the ring full (max_sites = sites) would make noisy
    sums wrap; the site refuses before it spends anything."""
    p = params(max_sites=3)
    l2, l1, scale, inflation = distributed.sensitivity(p, 0.3, 1.0)
    with pytest.raises(Declined, match="wrap"):
        distributed.noise_share(policy(), p, 0.3, (20 * l2) ** 2 / 2, l2, l1, scale, inflation)
    share = distributed.noise_share(policy(), params(), 0.3, (20 * l2) ** 2 / 2, l2, l1, scale,
                                    inflation)
    assert share.wrap_probability < distributed.MAX_WRAP


def test_share_is_calibrated_to_the_smallest_sum_net_of_colluders() -> None:
    p = params(n=5, threshold=3)
    l2, l1, scale, inflation = distributed.sensitivity(p, 0.3, 1.0)
    mu = (10 * l2) ** 2 / 2
    plain = distributed.noise_share(policy(min_cohort=3), p, 0.3, mu, l2, l1, scale, inflation)
    bigger = distributed.noise_share(policy(min_cohort=4), p, 0.3, mu, l2, l1, scale, inflation)
    wary = distributed.noise_share(policy(min_cohort=4, colluders=2), p, 0.3, mu, l2, l1, scale,
                                   inflation)
    assert plain.survivors == 3 and plain.mu_share == pytest.approx(mu / 3)
    assert bigger.survivors == 4 and bigger.mu_share == pytest.approx(mu / 4)
    assert wary.mu_share == pytest.approx(mu / 2)
    with pytest.raises(Declined, match="no honest noise"):
        distributed.noise_share(policy(min_cohort=3, colluders=3), p, 0.3, mu, l2, l1, scale,
                                inflation)
    assert 0 < plain.rounding_inflation < 0.05  # rounding adds little to the sensitivity


def test_unmask_below_the_assumed_survivors_is_refused() -> None:
    """The server claims the others dropped after masking, to unmask a sum with fewer
    noise shares than the site counted on: the site will not reveal."""
    with pytest.raises(Declined, match="survived"):
        consent.check_unmask(3, [0, 1], 0)
    consent.check_unmask(3, [0, 1, 2], 0)


def test_noise_comes_from_the_os_and_has_the_skellam_variance() -> None:
    a, b = distributed.draw_noise(50.0, 200_000), distributed.draw_noise(50.0, 200_000)
    assert not np.array_equal(a, b)
    assert abs(a.mean()) < 0.1 and a.var() == pytest.approx(100.0, rel=0.03)
    with pytest.raises(ValueError):
        distributed.draw_noise(0.0, 3)


def test_server_can_ask_for_local_noise_never_for_distributed() -> None:
    site_distributed, site_local = policy(), PrivacyPolicy()
    assert site_distributed.tightened(PrivacyPolicy()).noise == "local"
    assert site_local.tightened(policy()).noise == "local"
    assert site_distributed.tightened(policy(colluders=2)).colluders == 2
    assert site_distributed.tightened(policy()).noise == "distributed"


def test_run_refuses_distributed_noise_without_its_training_plan(tmp_path: Path) -> None:
    data = tmp_path / "fed"
    assert run_mmfed("data", "synth", "--out", data, "--sites", "3", "--patients-per-site",
                     "20").returncode == 0
    proc = run_mmfed("simulate", "--data", data, "--out", tmp_path / "run", "--rounds", "2",
                     "--set", "privacy.noise=distributed")
    assert proc.returncode != 0
    assert "privacy.noise = distributed needs train.full_batch = true" in proc.stderr
    assert "Traceback" not in proc.stderr


def simulate_distributed(tmp_path: Path, patients: int, rounds: int, *extra: str
                         ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A 3-site federation run with the full-batch plan and distributed noise; returns
    the finished process and the ledger folder."""
    data = tmp_path / "fed"
    assert run_mmfed("data", "synth", "--out", data, "--sites", "3", "--patients-per-site",
                     str(patients)).returncode == 0
    ledger = tmp_path / "ledger"
    proc = run_mmfed("simulate", "--data", data, "--out", tmp_path / "run", *FEDSGD,
                     "--rounds", str(rounds), "--no-progress", "--set",
                     "privacy.noise=distributed", "--set", f"privacy.ledger_dir={ledger}", *extra)
    assert proc.returncode == 0, proc.stderr
    return proc, ledger


def test_federation_with_distributed_noise_learns_and_its_ledgers_recompute(
        tmp_path: Path) -> None:
    """A real simulation: every site's ledger holds Skellam releases whose ε the
    accountant module recomputes alone; the metrics carry the share and survivors."""
    proc, ledger = simulate_distributed(tmp_path, 40, 4, "--set", "privacy.epsilon=3")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()]
    assert len(lines) == 4
    for line in lines:
        assert line["aggregation"]["participants"] == 3
    files = sorted(p for p in ledger.glob("*.jsonl") if p.name != "audit.jsonl")
    assert len(files) == 3
    for path in files:
        records = [json.loads(x) for x in path.read_text().splitlines()]
        assert [r["round"] for r in records] == [1, 2, 3, 4]
        for k, r in enumerate(records, 1):
            assert r["mechanism"] == "skellam" and r["survivors"] == 3
            assert r["mu_share"] == pytest.approx(r["mu_total"] / 3)
            assert r["modulus_bits"] == 32 and r["wrap_probability"] < 2.0 ** -30
            events = [(x["rounds"], x["mu_total"], x["l1"], x["l2"]) for x in records[:k]]
            assert r["epsilon"] == pytest.approx(skellam.skellam_epsilon_of(events, r["delta"]),
                                                 rel=1e-9)
        assert records[-1]["epsilon"] <= 3.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["auroc"] > 0.5
    # four rounds on 40-patient sites: each site's figure says its noise swamps it, and
    # the server says so once per site, in one line
    snrs = [e["snr"] for e in lines[0]["sites"].values()]
    assert all(0 < x < SNR_WARNING for x in snrs)
    warned = [x for x in proc.stderr.splitlines() if "DP noise will swamp" in x]
    assert len(warned) == 3 and all(x.count("\n") == 0 for x in warned)


def test_expected_snr_grows_with_patients_and_steps_and_falls_with_parameters() -> None:
    base = expected_snr(100, 2.0, 10_000, 16)
    assert base == pytest.approx(100 * 4 / (2.0 * 100))
    assert expected_snr(400, 2.0, 10_000, 16) == pytest.approx(4 * base)
    assert expected_snr(100, 2.0, 10_000, 64) == pytest.approx(2 * base)
    assert expected_snr(100, 2.0, 40_000, 16) == pytest.approx(base / 2)
    assert expected_snr(100, 0.0, 10_000, 16) == float("inf")


def test_a_site_keeping_local_noise_declines_a_distributed_round(tmp_path: Path) -> None:
    """A site whose policy keeps local noise (the server cannot change that) would add
    no share, so the sum would carry less noise than the other sites counted on: it
    declines, and with two sites left below their min_cohort of 3 nothing is released."""
    simulate_distributed(tmp_path, 30, 1, "--set", "privacy.site.site-3.noise=local")
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["aggregation"]["participants"] == 0
    assert line["sites"]["site-3"]["status"] == "declined"
    assert "keeps local noise" in line["sites"]["site-3"]["reason"]

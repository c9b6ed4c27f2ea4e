"""Site-owned differential privacy: accounting, the durable ledger, policy, declines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import create_accountant

from mmfed.errors import ConfigError, DataError
from mmfed.privacy.accounting import calibrate_sigma, epsilon_of
from mmfed.privacy.ledger import PrivacyLedger, site_fingerprint
from mmfed.privacy.policy import PrivacyPolicy, load_policy
from tests.helpers import run_mmfed


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    acc = create_accountant("rdp")
    for sigma, q, steps in history:  # one event per step, as Opacus's optimizer hook does
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


def test_epsilon_matches_opacus_step_by_step_accounting() -> None:
    history = [(1.1, 0.08, 12), (1.1, 0.08, 12), (0.9, 0.1, 10)]
    assert epsilon_of(history, 1e-5) == pytest.approx(opacus_epsilon(history, 1e-5), abs=1e-6)
    assert epsilon_of([], 1e-5) == 0.0


def test_calibration_fits_the_plan_on_top_of_history() -> None:
    history = [(1.0, 0.1, 50)]
    sigma = calibrate_sigma(history, 0.1, 100, 8.0, 1e-5)
    assert sigma is not None
    total = epsilon_of([*history, (sigma, 0.1, 100)], 1e-5)
    assert 7.5 < total <= 8.0
    assert calibrate_sigma(history, 0.1, 100, 0.01, 1e-5, max_sigma=5.0) is None


@settings(max_examples=60, deadline=None)
@given(site=st.fixed_dictionaries({
    "epsilon": st.floats(0.1, 50), "delta": st.floats(1e-9, 1e-3),
    "max_grad_norm": st.floats(0.01, 10), "enabled": st.booleans()}),
    server=st.fixed_dictionaries({
        "epsilon": st.floats(0.1, 50), "delta": st.floats(1e-9, 1e-3),
        "max_grad_norm": st.floats(0.01, 10), "enabled": st.booleans()}))
def test_server_request_only_tightens(site: dict[str, float], server: dict[str, float]) -> None:
    own, request = PrivacyPolicy(**site), PrivacyPolicy(**server)
    effective = own.tightened(request)
    assert effective.epsilon <= own.epsilon and effective.delta <= own.delta
    assert effective.max_grad_norm <= own.max_grad_norm
    assert effective.enabled >= own.enabled  # a server can switch DP on, never off
    assert effective.accountant == own.accountant


def test_policy_file_errors(tmp_path: Path) -> None:
    good = tmp_path / "policy.toml"
    good.write_text("[privacy]\nepsilon = 3\ndelta = 1e-6\naccountant = 'prv'\n")
    assert load_policy(good) == PrivacyPolicy(epsilon=3.0, delta=1e-6, accountant="prv")
    for text, needle in [("epsilon = 'lots'\n", "epsilon"), ("epsilon = -1\n", "epsilon"),
                         ("budget = 3\n", "unknown"), ("epsilon = \n", "TOML"),
                         ("accountant = 'gdp'\n", "accountant")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            load_policy(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_policy(tmp_path / "missing.toml")


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "records.csv").write_text("patient_id,label\n1,0\n")
    return site


def test_ledger_records_durably_and_recomputes(tmp_path: Path) -> None:
    site = _site(tmp_path)
    ledger = PrivacyLedger(tmp_path / "ledger", site_fingerprint(site))
    e1 = ledger.record(run_id="r", round_num=1, event=(1.2, 0.1, 10), delta=1e-5,
                       accountant="rdp", site="s")
    e2 = ledger.record(run_id="r", round_num=2, event=(1.2, 0.1, 10), delta=1e-5,
                       accountant="rdp", site="s")
    assert e2.epsilon > e1.epsilon
    again = PrivacyLedger(tmp_path / "ledger", site_fingerprint(site))
    assert [e.round for e in again.entries()] == [1, 2]
    assert again.spent(1e-5, "rdp") == pytest.approx(
        opacus_epsilon(again.history(), 1e-5), abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "ledger").iterdir()
                  if not p.name.startswith(".")) == sorted([ledger.path.name, "audit.head",
                                                            "audit.jsonl"])
    (site / "records.csv").write_text("patient_id,label\n1,0\n2,1\n")
    assert site_fingerprint(site) != ledger.fingerprint  # changed data: a new ledger


def test_corrupt_or_foreign_ledger_refuses(tmp_path: Path) -> None:
    site = _site(tmp_path)
    ledger = PrivacyLedger(tmp_path / "ledger", site_fingerprint(site))
    ledger.record(run_id="r", round_num=1, event=(1.0, 0.1, 5), delta=1e-5,
                  accountant="rdp", site="s")
    text = ledger.path.read_text()
    ledger.path.write_text(text + '{"broken": \n')
    with pytest.raises(DataError, match="corrupt"):
        ledger.entries()
    ledger.path.write_text(text.replace(ledger.fingerprint, "0" * 64))
    with pytest.raises(DataError, match="another dataset"):
        ledger.entries()


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import numpy as np, torch
    from mmfed.config import RunConfig
    from mmfed.data import load_site
    from mmfed.ml.features import pooled_schema
    from mmfed.ml.model import build_model
    from mmfed.site import runtime as site_runtime

    site_dir, ledger, first, last, kill = Path(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:])
    cfg = RunConfig({"privacy.enabled": True, "privacy.ledger_dir": ledger, "rounds": 6,
                     "run_id": "run-A", "train.batch_size": 16})
    schema = pooled_schema([load_site(site_dir)])
    state = {k: v.numpy() for k, v in build_model(schema, seed=0).state_dict().items()}
    for rnd in range(first, last + 1):
        out = site_runtime.train_round(site_dir, cfg, schema, state, rnd)
        print(rnd, out.metrics["epsilon"], out.metrics["sigma"], flush=True)
        state = out.state
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.slow
def test_killed_site_process_continues_its_ledger(tmp_path: Path) -> None:
    from mmfed.data.synth import SynthSettings, synthesize

    synthesize(tmp_path / "fed", SynthSettings(sites=1, patients_per_site=48, holdout=20,
                                               genes=40, image_size=32, seed=3))
    site, ledger_dir = tmp_path / "fed" / "site-1", tmp_path / "ledger"
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(first: int, last: int, kill: int) -> list[list[float]]:
        proc = subprocess.run([sys.executable, str(script), str(site), str(ledger_dir),
                               str(first), str(last), str(kill)], capture_output=True,
                              text=True, env=env, timeout=300,
                              cwd=Path(__file__).resolve().parents[1])
        assert proc.returncode == (-9 if kill else 0), proc.stderr[-2000:]
        return [list(map(float, line.split())) for line in proc.stdout.splitlines()]

    first = run(1, 2, kill=1)  # SIGKILLed right after round 2
    second = run(3, 4, kill=0)  # a new process continues the same run
    ledger = PrivacyLedger(ledger_dir, site_fingerprint(site))
    entries = ledger.entries()
    assert [e.round for e in entries] == [1, 2, 3, 4]  # nothing lost, nothing doubled
    assert len({e.sigma for e in entries}) == 1  # the run keeps its calibration
    reported = [row[1] for row in first + second]
    assert reported == sorted(reported)  # ε never resets
    for i, entry in enumerate(entries):
        recomputed = opacus_epsilon([e.event for e in entries[:i + 1]], 1e-5)
        assert reported[i] == pytest.approx(recomputed, abs=1e-6)
        assert entry.epsilon == pytest.approx(recomputed, abs=1e-6)
    assert reported[-1] <= 8.0


@pytest.mark.slow
def test_dp_federation_budget_rerun_and_tiny_budget_decline(tmp_path: Path) -> None:
    ledger_dir = tmp_path / "ledger"
    # two sites under secure aggregation: each accepts a sum of two (min_cohort = 2)
    common = ["--no-progress", "--dp", "--set", f"privacy.ledger_dir={ledger_dir}",
              "--set", "train.batch_size=16", "--set", "train.local_epochs=1",
              "--set", "privacy.min_cohort=2"]
    proc = run_mmfed("data", "synth", "--out", tmp_path / "fed", "--sites", "2",
                     "--patients-per-site", "48", "--holdout", "30", "--genes", "40")
    assert proc.returncode == 0, proc.stderr
    proc = run_mmfed("simulate", "--data", tmp_path / "fed", "--rounds", "4", "--out",
                     tmp_path / "run1", *common, "--set", "privacy.site.site-2.epsilon=1.8",
                     "--set", "privacy.site.site-2.max_noise_multiplier=3",
                     timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run1" / "metrics.jsonl").read_text().split(
        "\n") if x]
    statuses = [line["sites"]["site-2"]["status"] for line in lines]
    assert statuses[0] == "trained" and statuses[-1] == "declined", statuses
    assert all(line["sites"]["site-1"]["status"] == "trained" for line in lines)
    assert lines[-1]["aggregation"]["declined"] == 1
    for line in lines:
        for name, budget in (("site-1", 8.0), ("site-2", 1.8)):
            assert line["sites"][name]["epsilon"] <= budget
    ledger = PrivacyLedger(ledger_dir, site_fingerprint(tmp_path / "fed" / "site-1"))
    assert len(ledger.entries()) == 4
    eps = [line["sites"]["site-1"]["epsilon"] for line in lines]
    for i, value in enumerate(eps):
        assert value == pytest.approx(opacus_epsilon(ledger.history()[:i + 1], 1e-5),
                                      abs=1e-6)
    summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert summary["sites"]["site-1"]["epsilon"] == pytest.approx(eps[-1])
    assert summary["sites"]["site-2"]["rounds_declined"] >= 1

    # A rerun on the same data starts from what the first run spent.
    proc = run_mmfed("simulate", "--data", tmp_path / "fed", "--rounds", "1", "--out",
                     tmp_path / "run2", *common, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rerun = json.loads((tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()[0])
    site1 = rerun["sites"]["site-1"]
    assert site1["status"] in ("trained", "declined")
    assert site1["epsilon"] >= eps[-1]
    shown = run_mmfed("privacy", "show", tmp_path / "fed" / "site-1", "--ledger-dir",
                      ledger_dir)
    assert shown.returncode == 0 and "total: epsilon" in shown.stdout


def test_an_old_policy_file_loads_with_the_secure_aggregation_defaults(tmp_path: Path) -> None:
    """A policy written before the secure-aggregation keys existed keeps working and
    takes the protective defaults: secure aggregation required, a cohort of 3."""
    old = tmp_path / "old-policy.toml"
    old.write_text("enabled = true\nepsilon = 4.0\ndelta = 1e-06\nmax_grad_norm = 1.0\n"
                   "accountant = \"rdp\"\nmax_noise_multiplier = 10.0\n")
    policy = load_policy(old)
    assert (policy.epsilon, policy.secure_aggregation, policy.min_threshold,
            policy.min_cohort) == (4.0, "required", 0, 3)
    template = load_policy(Path(__file__).resolve().parents[1] / "configs" / "site-policy.toml")
    assert template == PrivacyPolicy()


def test_a_request_cannot_weaken_the_secure_aggregation_terms() -> None:
    own = PrivacyPolicy(secure_aggregation="required", min_threshold=3, min_cohort=4)
    lax = PrivacyPolicy(secure_aggregation="optional", min_threshold=0, min_cohort=2)
    assert own.tightened(lax) == own
    strict = PrivacyPolicy(secure_aggregation="optional", min_threshold=5, min_cohort=6)
    assert PrivacyPolicy(secure_aggregation="optional").tightened(own).secure_aggregation == \
        "required"
    both = own.tightened(strict)
    assert (both.min_threshold, both.min_cohort) == (5, 6)

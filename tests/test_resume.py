"""Crash and resume: SIGKILL a running federation in round 3 of 5, then --resume it.

Real processes throughout: the simulation (driver, Ray, site workers) is killed as a
process group while round 3 is in flight. With DP, after at least one site has already
trained and paid for round 3: the resumed run must keep rounds 1-2 untouched, finish,
and count each site's rounds exactly once in its privacy ledger. DP noise is fresh OS
entropy in every run, so two DP runs never land on the same model, and where a resumed
run lands is checked without DP: there it must be the very model an uninterrupted run
with the same seed gives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import MMFED, QUIET, run_mmfed

ARGS = ["--sites", "3", "--rounds", "5", "--seed", "11", "--no-progress",
        "--set", "data.patients_per_site=60", "--set", "data.genes=50",
        "--set", "data.holdout=120", "--set", "federation.local_eval=false",
        "--set", "train.batch_size=16"]


def _ledger_rounds(ledgers: Path) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for path in sorted(p for p in ledgers.glob("*.jsonl") if p.name != "audit.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                out.setdefault(entry["site"], []).append((entry["run_id"], entry["round"]))
    return out


def _kill_in_round_3(out: Path, ledgers: Path, *extra: str) -> None:
    """Kill the run once round 3 is in flight: a site has paid for it (DP), or, without
    DP, rounds 1-2 are on disk."""
    env = {**os.environ, **QUIET}
    proc = subprocess.Popen([*MMFED, "simulate", "--out", str(out), *ARGS, *extra,
                             "--set", f"privacy.ledger_dir={ledgers}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    private = "--no-dp" not in extra
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed in round 3")
            if private:
                in_round_3 = any(r == 3 for rounds in _ledger_rounds(ledgers).values()
                                 for _, r in rounds) if ledgers.exists() else False
            else:
                metrics = out / "metrics.jsonl"
                in_round_3 = metrics.exists() and len(
                    metrics.read_text().splitlines()) >= 2
            if in_round_3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("round 3 never started")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _model_hash(run: Path) -> str:
    import torch

    from mmfed.files import state_hash

    payload = torch.load(run / "model.pt", weights_only=False)
    return state_hash({k: v.numpy() for k, v in payload["state_dict"].items()})


@pytest.mark.slow
def test_sigkill_in_round_3_then_resume(tmp_path: Path) -> None:
    crashed, ledgers = tmp_path / "crashed", tmp_path / "ledgers"
    _kill_in_round_3(crashed, ledgers, "--dp")
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2, "killed while round 3 was in flight"
    assert not (crashed / "summary.json").exists()

    proc = run_mmfed("simulate", "--resume", crashed, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "after round 2 of 5" in proc.stdout
    after = (crashed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in after] == [1, 2, 3, 4, 5]
    assert after[:2] == lines  # rounds 1-2 were not redone
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["resumed_after_round"] == 2
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == [
        f"round-{r:04d}.pt" for r in range(1, 6)]

    run_id = next(line.split('"')[1] for line in (crashed / "config.toml").read_text()
                  .splitlines() if line.startswith("run_id"))
    ledger = _ledger_rounds(ledgers)
    assert sorted(ledger) == ["site-1", "site-2", "site-3"]
    for site, rounds in ledger.items():
        assert sorted(rounds) == [(run_id, r) for r in range(1, 6)], site  # each once
    for site, entry in summary["sites"].items():
        assert entry["rounds_trained"] == 5, site
        assert entry["epsilon"] <= entry["epsilon_budget"] + 1e-9



@pytest.mark.slow
def test_resumed_run_without_dp_is_the_uninterrupted_run(tmp_path: Path) -> None:
    crashed = tmp_path / "crashed"
    _kill_in_round_3(crashed, tmp_path / "ledgers", "--no-dp")
    assert len((crashed / "metrics.jsonl").read_text().splitlines()) == 2
    proc = run_mmfed("simulate", "--resume", crashed, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight = tmp_path / "straight"
    proc = run_mmfed("simulate", "--out", straight, *ARGS, "--no-dp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((crashed / "summary.json").read_text())["final"]
    reference = json.loads((straight / "summary.json").read_text())["final"]
    assert resumed == reference
    assert _model_hash(crashed) == _model_hash(straight)


def test_resume_refuses_what_it_cannot_continue(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_mmfed("simulate", "--resume", run)
    assert proc.returncode == 1 and "no config.toml" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_mmfed("simulate", "--resume", run, "--rounds", "3")
    assert proc.returncode == 2 and "drop --rounds" in proc.stderr
    # a finished run, then a corrupt checkpoint in an unfinished one
    proc = run_mmfed("simulate", "--out", run, "--sites", "2", "--rounds", "2", "--no-dp",
                     "--no-progress", "--set", "privacy.min_cohort=2",
                     "--set", "data.patients_per_site=40",
                     "--set", "data.genes=20", "--set", "data.holdout=40",
                     "--set", "federation.local_eval=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_mmfed("simulate", "--resume", run)
    assert proc.returncode == 1 and "already finished" in proc.stderr
    (run / "summary.json").unlink()
    checkpoint = run / "checkpoints" / "round-0002.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    proc = run_mmfed("simulate", "--resume", run)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "round-0002.pt: corrupt checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr

"""Where a round's time goes: deployment (real processes) vs simulation, same data.

Runs the same federation twice on one synthetic cohort (default model, 3 sites, DP and
secure aggregation on, as a site's default policy has DP on): once with
``mmfed simulate`` (Ray, one long-lived worker per site) and once as ``mmfed server``
plus three ``mmfed client`` processes on loopback (plain-text transport to keep TLS out
of the timing; TLS is exercised in tests/e2e). The figures are the medians over rounds
2..R of each stage from ``metrics.jsonl``, plus the cold-start cost of a ClientApp
process, which Flower pays for every message in deployment: importing the handler
module (``mmfed.site.app``: no torch, no pandas) and, for training, torch + opacus.

Last line: one JSON object with both breakdowns and the deployment/simulation ratios.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_env import ENV, MMFED  # same folder

STAGES = ("round", "train", "secagg_share", "secagg_mask", "secagg_unmask", "evaluate")


def import_seconds(code: str, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=ENV, check=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def stage_medians(run: Path) -> dict[str, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    later = lines[1:] or lines
    return {k: round(statistics.median(line["seconds"].get(k, 0.0) for line in later), 3)
            for k in STAGES}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deployed(data: Path, out: Path, rounds: int, common: list[str]) -> None:
    port = free_port()
    procs = [subprocess.Popen([*MMFED, "server", "--data", str(data), "--insecure",
                               "--sites", "3", "--host", "127.0.0.1", "--port", str(port),
                               "--out", str(out), "--rounds", str(rounds), "--no-progress",
                               *common], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)]
    for site in ("site-1", "site-2", "site-3"):
        procs.append(subprocess.Popen(
            [*MMFED, "client", "--data", str(data / site), "--server", f"127.0.0.1:{port}",
             "--insecure", "--ledger-dir", str(out.parent / f"ledger-{site}"),
             "--wait-server", "120"], env=ENV, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True))
    try:
        _, err = procs[0].communicate(timeout=3600)
        if procs[0].returncode != 0:
            sys.exit(f"mmfed server failed: {err.strip()[-800:]}")
    finally:
        for proc in procs[1:]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs[1:]:
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients-per-site", type=int, default=200)
    args = parser.parse_args()
    common = ["--set", "privacy.enabled=true", "--set", "federation.local_eval=false",
              "--set", "federation.round_timeout=600"]
    result: dict[str, object] = {
        "import_seconds": {"mmfed.site.app": import_seconds("import mmfed.site.app"),
                           "torch+opacus": import_seconds("import torch, opacus")}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "fed"
        subprocess.run([*MMFED, "data", "synth", "--out", str(data), "--sites", "3",
                        "--patients-per-site", str(args.patients_per_site), "--holdout",
                        "300"], env=ENV, check=True, capture_output=True)
        sim = Path(tmp) / "sim"
        proc = subprocess.run([*MMFED, "simulate", "--data", str(data), "--out", str(sim),
                               "--rounds", str(args.rounds), "--no-progress", *common,
                               "--set", f"privacy.ledger_dir={Path(tmp) / 'ledger-sim'}"],
                              env=ENV, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"mmfed simulate failed: {proc.stderr.strip()[-800:]}")
        dep = Path(tmp) / "deployed"
        deployed(data, dep, args.rounds, common)
        result["simulation"] = stage_medians(sim)
        result["deployment"] = stage_medians(dep)
    sim_s, dep_s = result["simulation"], result["deployment"]
    assert isinstance(sim_s, dict) and isinstance(dep_s, dict)
    result["ratio"] = {k: round(dep_s[k] / sim_s[k], 2) for k in STAGES if sim_s[k] > 0}
    for key in STAGES:
        print(f"{key:14s} simulation {sim_s[key]:7.2f} s   deployment {dep_s[key]:7.2f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Round time with and without secure aggregation, in one run, at 5, 20 and 100 sites.

Each configuration runs a real simulated federation (Ray, Flower messages, the default
model, no DP so that only secure aggregation differs) on the same synthetic cohort.
The figures per configuration are the median round time over rounds 2..R (round 1
pays Ray and import warm-up) and the CPU seconds the run's whole process tree used
per round (median of the same rounds), which other jobs on a shared machine do not
inflate as they do wall time. A size written ``N:K`` runs SecAgg+ with K neighbours
per site instead of all-to-all SecAgg (the default is ``5 20 100:8``: a 100-site
federation would not run all-to-all). Prints one JSON object
as its last line: {"5": {"time_ratio": ..., "bytes_per_site": ..., "model_bytes": ...}, ...}
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_env import ENV, mmfed  # same folder
from sim_scaling import TreeSampler  # same folder: the process-tree CPU and memory sampler


def run(data: Path, out: Path, rounds: int, secure: bool, neighbours: int
        ) -> tuple[list[dict], float]:
    """(metrics lines, median CPU seconds per round over rounds 2..R of the whole run)."""
    proc = subprocess.Popen([sys.executable, "-m", "mmfed.cli", "simulate", "--data", str(data),
                             "--out", str(out), "--rounds", str(rounds), "--no-progress",
                             "--secagg" if secure else "--no-secagg", "--no-dp",
                             "--set", f"secagg.neighbours={neighbours}"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid, out / "metrics.jsonl", interval=0.1, memory=False)
    _, err = proc.communicate()
    sampler.stop()
    if proc.returncode != 0:
        sys.exit(f"mmfed simulate failed: {err.strip()[-500:]}")
    cpu = statistics.median(b - a for a, b in itertools.pairwise(sampler.round_cpu))
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", nargs="+", default=["5", "20", "100:8"],
                        help="site counts; N:K for SecAgg+ with K neighbours per site")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--patients-per-site", type=int, default=60)
    args = parser.parse_args()
    import torch

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sites:
            count, _, k_text = size.partition(":")
            n, neighbours = int(count), int(k_text or 0)
            data = Path(tmp) / f"fed-{n}"
            mmfed("data", "synth", "--out", str(data), "--sites", str(n),
                  "--patients-per-site", str(args.patients_per_site), "--holdout", "200")
            plain, cpu_plain = run(data, Path(tmp) / f"plain-{n}", args.rounds, False,
                                   neighbours)
            secure, cpu_secure = run(data, Path(tmp) / f"secure-{n}", args.rounds, True,
                                     neighbours)
            model = torch.load(Path(tmp) / f"plain-{n}" / "model.pt", weights_only=False)
            model_bytes = sum(v.numel() * 4 for v in model["state_dict"].values())
            t_plain = statistics.median(x["seconds"]["round"] for x in plain[1:])
            t_secure = statistics.median(x["seconds"]["round"] for x in secure[1:])
            per_site = statistics.median(x["bytes"]["up"] / x["aggregation"]["participants"]
                                         for x in secure[1:])
            stages = {k: round(statistics.median(x["seconds"].get(k, 0.0) for x in secure[1:]),
                               3) for k in ("secagg_share", "secagg_mask", "secagg_unmask")}
            results[str(n)] = {"time_ratio": round(t_secure / t_plain, 3),
                               "round_seconds": {"plain": round(t_plain, 2),
                                                 "secure": round(t_secure, 2)},
                               "cpu_ratio": round(cpu_secure / cpu_plain, 3),
                               "round_cpu_seconds": {"plain": round(cpu_plain, 2),
                                                     "secure": round(cpu_secure, 2)},
                               "secagg_stage_seconds": stages,
                               "bytes_per_site": int(per_site), "model_bytes": model_bytes,
                               "bytes_ratio": round(per_site / model_bytes, 4),
                               "neighbours": secure[-1]["aggregation"].get("neighbours", 0),
                               "threshold": secure[-1]["aggregation"].get("threshold")}
            print(f"{n} sites: {results[str(n)]}", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

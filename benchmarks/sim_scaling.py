"""Simulation round time and peak memory against the number of sites (default 10, 30, 100).

Each size is one real ``mmfed simulate`` run (Ray, Flower messages, the default model)
on a synthetic cohort of small sites, with site-owned DP and SecAgg+ neighbourhoods
on, as a large federation would run. Per size it reports the median round time over
rounds 2..R (round 1 also pays for loading every site and calibrating every site's
noise), round 1 on its own, and the peak memory of the whole run: the proportional
set size (PSS, so shared pages count once) summed over the driver and every process
it starts (Ray's GCS, raylet, agents and workers), sampled every 0.5 s. It also
reports the CPU time the same process tree used per round (median of rounds 2..R),
which other jobs on a shared machine do not inflate the way they inflate wall time.
Least-squares lines through (sites, round time) and (sites, round CPU time) give the
slopes in seconds per site. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench_env import ENV, MMFED, mmfed  # same folder


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    kids, out = _children(), [root]
    for pid in out:  # grows while iterating: breadth-first over descendants
        out.extend(kids.get(pid, []))
    return out


def pss_bytes(pid: int) -> int:
    """Proportional set size: private pages plus a fair share of shared ones."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TreeSampler:
    """Samples a process tree in a thread: peak summed PSS, and the tree's total CPU
    time each time ``metrics`` gains a line (a round finished).

    CPU time is the contention-proof half of the picture: on a shared machine a
    round's wall time also counts other people's jobs, its CPU time only this run's.
    """

    def __init__(self, pid: int, metrics: Path, interval: float = 0.5,
                 memory: bool = True) -> None:
        self.pid, self.metrics, self.interval, self.memory = pid, metrics, interval, memory
        self.peak, self.peak_processes = 0, 0
        self.cpu: dict[int, float] = {}  # last seen CPU seconds of every process
        self.round_cpu: list[float] = []  # tree CPU seconds when each round was written
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rounds_written(self) -> int:
        try:
            return self.metrics.read_text().count("\n")
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = process_tree(self.pid)
            total = sum(pss_bytes(p) for p in pids) if self.memory else 0
            if total > self.peak:
                self.peak, self.peak_processes = total, len(pids)
            for p in pids:
                self.cpu[p] = max(self.cpu.get(p, 0.0), cpu_seconds(p))
            while self._rounds_written() > len(self.round_cpu):
                self.round_cpu.append(sum(self.cpu.values()))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()




def simulate(args: list[str], metrics: Path) -> TreeSampler:
    """Run ``mmfed simulate`` under a ``TreeSampler`` watching ``metrics``."""
    proc = subprocess.Popen([*MMFED, "simulate", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid, metrics)
    _, err = proc.communicate()
    sampler.stop()
    if proc.returncode != 0:
        sys.exit(f"mmfed simulate failed: {err.strip()[-800:]}")
    return sampler


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares (slope, intercept, r²)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, intercept, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--patients-per-site", type=int, default=40)
    parser.add_argument("--neighbours", type=int, default=8,
                        help="SecAgg+ neighbours per site (secagg.neighbours)")
    parser.add_argument("--no-dp", action="store_true", help="train without DP")
    parser.add_argument("--round-timeout", type=float, default=3600.0,
                        help="federation.round_timeout: a round of 1,000 simulated sites "
                             "on 2 cores takes minutes")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the cohorts and run directories here and keep them "
                             "(per-stage seconds are in each run's metrics.jsonl)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is warm-up)")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        for n in args.sites:
            data, out = Path(tmp) / f"fed-{n}", Path(tmp) / f"run-{n}"
            mmfed("data", "synth", "--out", str(data), "--sites", str(n),
                  "--patients-per-site", str(args.patients_per_site), "--holdout", "200")
            start = time.perf_counter()
            sampler = simulate([
                "--data", str(data), "--out", str(out), "--rounds", str(args.rounds),
                "--no-progress", "--no-dp" if args.no_dp else "--dp",
                "--set", f"secagg.neighbours={args.neighbours}",
                "--set", f"federation.round_timeout={args.round_timeout}",
                "--set", f"privacy.ledger_dir={Path(tmp) / f'ledger-{n}'}"],
                out / "metrics.jsonl")
            wall = time.perf_counter() - start
            lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            trained = [x["aggregation"]["participants"] for x in lines]
            round_wall = statistics.median(x["seconds"]["round"] for x in lines[1:])
            marks = sampler.round_cpu
            round_cpu = statistics.median(b - a for a, b in itertools.pairwise(marks))
            results[str(n)] = {
                "round_seconds_median": round(round_wall, 2),
                "round_cpu_seconds_median": round(round_cpu, 2),
                "round1_seconds": round(lines[0]["seconds"]["round"], 2),
                "stage_seconds_median": {
                    k: round(statistics.median(x["seconds"].get(k, 0.0) for x in lines[1:]), 2)
                    for k in lines[-1]["seconds"] if k != "round"},
                "seconds_per_site": round(round_wall / n, 3),
                "cpu_seconds_per_site": round(round_cpu / n, 3),
                "peak_memory_gib": round(sampler.peak / 2**30, 3),
                "processes_at_peak": sampler.peak_processes,
                "wall_seconds": round(wall, 1),
                "min_sites_aggregated": min(trained),
                "load_average": round(os.getloadavg()[0], 2),
            }
            print(f"{n} sites: {results[str(n)]}", file=sys.stderr, flush=True)
    xs = [float(n) for n in args.sites]
    summary: dict[str, object] = {"sites": results, "rounds": args.rounds,
                                  "patients_per_site": args.patients_per_site,
                                  "neighbours": args.neighbours, "dp": not args.no_dp,
                                  "cpus": os.cpu_count()}
    if len(xs) >= 2:
        slope, intercept, r2 = fit_line(
            xs, [float(results[str(n)]["round_seconds_median"]) for n in args.sites])
        cpu_slope, cpu_intercept, cpu_r2 = fit_line(
            xs, [float(results[str(n)]["round_cpu_seconds_median"]) for n in args.sites])
        mem_slope, mem_intercept, _ = fit_line(
            xs, [float(results[str(n)]["peak_memory_gib"]) for n in args.sites])
        summary.update({"slope_seconds_per_site": round(slope, 3),
                        "intercept_seconds": round(intercept, 2), "r2": round(r2, 4),
                        "cpu_slope_seconds_per_site": round(cpu_slope, 3),
                        "cpu_intercept_seconds": round(cpu_intercept, 2),
                        "cpu_r2": round(cpu_r2, 4),
                        "memory_slope_mib_per_site": round(mem_slope * 1024, 2),
                        "memory_intercept_gib": round(mem_intercept, 3)})
    summary["peak_memory_gib_max"] = max(float(r["peak_memory_gib"]) for r in results.values())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

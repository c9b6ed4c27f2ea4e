"""Run every benchmark, keep their figures in results.json, and regenerate the table.

Each benchmark is a script in this folder that prints one JSON object as its last
line. This runs each one as its own process, in order, and records that object with
the exact command, the wall time, the machine and the date in
``benchmarks/results.json``. The table between the ``results`` markers in
``benchmarks/README.md`` is then rewritten from results.json, so every figure in it
can be traced to the command that produced it.

    python benchmarks/run_all.py                  # everything (about 3 hours on 2 cores)
    python benchmarks/run_all.py --only utility   # one benchmark; the others keep theirs
    python benchmarks/run_all.py --table-only     # just re-render the table

Benchmarks that need CUDA run only where torch sees a GPU; elsewhere their rows say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_env import ENV  # same folder

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results.json"
README = HERE / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Bench:
    name: str
    args: tuple[str, ...]  # script (relative to the repository) and its arguments
    cuda: bool = False  # needs a CUDA GPU
    optional: bool = False  # skipped (not failed) when the script does not exist

    @property
    def command(self) -> str:
        return "python " + " ".join(self.args)


BENCHES = (
    Bench("dp_overhead_cpu", ("benchmarks/dp_overhead.py", "--device", "cpu")),
    Bench("dp_overhead_gpu", ("benchmarks/dp_overhead.py", "--device", "cuda"), cuda=True),
    Bench("secagg_overhead", ("benchmarks/secagg_overhead.py", "--sites", "5", "20", "100:8")),
    Bench("sim_scaling", ("benchmarks/sim_scaling.py", "--sites", "100", "300", "1000",
                          "--rounds", "3")),
    Bench("deployment_round", ("benchmarks/deployment_round.py",), optional=True),
    Bench("utility", ("benchmarks/utility.py",)),
    Bench("import_speed", ("benchmarks/import_speed.py",)),
    Bench("dp_utility", ("benchmarks/dp_utility.py", "--seeds", "0", "1", "2")),
    Bench("task_utility", ("benchmarks/task_utility.py",)),
    Bench("gpu_check", ("benchmarks/gpu_check.py",), cuda=True),
)


def machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "gpu": gpu}


def code_version() -> str:
    """The commit measured, with "+changes" when the working tree differed from it."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no")
                     else "")


def run_bench(bench: Bench, timeout: float) -> dict[str, Any]:
    """One benchmark as a subprocess; its last stdout line must be a JSON object."""
    started = time.perf_counter()
    print(f"run_all: {bench.command}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run([sys.executable, *bench.args], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": bench.command, "error": f"timed out after {timeout:.0f}s"}
    seconds = round(time.perf_counter() - started, 1)
    entry: dict[str, Any] = {"command": bench.command, "wall_seconds": seconds,
                             "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                             "code": code_version()}
    lines = proc.stdout.strip().splitlines()
    try:
        if proc.returncode != 0 or not lines:
            raise ValueError
        result = json.loads(lines[-1])
        if not isinstance(result, dict):
            raise ValueError
    except ValueError:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-600:]
        entry["error"] = f"exit {proc.returncode}: {tail}"
        print(f"run_all: {bench.name} failed: {tail}", file=sys.stderr)
        return entry
    entry["result"] = result
    print(f"run_all: {bench.name} done in {seconds}s", file=sys.stderr, flush=True)
    return entry


# ----------------------------------------------------------------------------- table


def _get(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    entry = results.get(name)
    return entry.get("result") if isinstance(entry, dict) else None


def _missing(results: dict[str, Any], bench: Bench) -> str:
    entry = results.get(bench.name)
    if isinstance(entry, dict) and entry.get("error"):
        return f"failed: {entry['error'][:120]}"
    if isinstance(entry, dict) and entry.get("skipped"):
        return f"not run: {entry['skipped']}"
    return "not run yet"


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, value, command) for every row of the table."""
    by_name = {b.name: b for b in BENCHES}
    rows: list[tuple[str, str, str]] = []

    for label, name in (("CPU", "dp_overhead_cpu"), ("GPU", "dp_overhead_gpu")):
        bench, r = by_name[name], _get(results, name)
        figure = f"DP / non-DP training step time, {label} (median step, batch 64)"
        if r:
            ms = r["median_step_ms"]
            value = (f"**{r['time_ratio']}×** ({ms['plain']} → {ms['dp']} ms; "
                     f"step memory {r['memory_ratio']}×)")
        else:
            value = _missing(results, bench)
        rows.append((figure, value, bench.command))

    bench, r = by_name["secagg_overhead"], _get(results, "secagg_overhead")
    for n in ("5", "20", "100"):
        cell = (r or {}).get(n)
        kind = "SecAgg" if not cell or not cell.get("neighbours") else \
            f"SecAgg+, {cell['neighbours']} neighbours"
        if cell:
            rs = cell["round_seconds"]
            value = f"**{cell['time_ratio']}×** ({rs['plain']} s → {rs['secure']} s)"
            if "cpu_ratio" in cell:
                cs = cell["round_cpu_seconds"]
                value += (f"; CPU time **{cell['cpu_ratio']}×** ({cs['plain']} → "
                          f"{cs['secure']} CPU-s)")
            rows.append((f"secure / plaintext round time, {n} sites ({kind})", value,
                         bench.command))
        else:
            rows.append((f"secure / plaintext round time, {n} sites", _missing(results, bench),
                         bench.command))
    for n in ("5", "20", "100"):
        cell = (r or {}).get(n)
        rows.append((f"bytes up per site per round / fp32 model, {n} sites (secure)",
                     f"**{cell['bytes_ratio']}×** ({cell['bytes_per_site']:,} B vs "
                     f"{cell['model_bytes']:,} B)" if cell else _missing(results, bench),
                     bench.command))

    bench, r = by_name["sim_scaling"], _get(results, "sim_scaling")
    sites = (r or {}).get("sites", {})
    for n in ("100", "300", "1000"):
        cell = sites.get(n)
        if cell:
            cpu = cell.get("round_cpu_seconds_median")
            value = (f"**{cell['round_seconds_median']} s** per round"
                     + (f" ({cpu} CPU-s)" if cpu is not None else "")
                     + f", peak **{cell['peak_memory_gib']} GiB** "
                     f"(round 1: {cell['round1_seconds']} s)")
        else:
            value = _missing(results, bench)
        rows.append((f"simulation round time (median) and peak memory, {n} sites "
                     f"(DP + SecAgg+)", value, bench.command))
    if r and "slope_seconds_per_site" in r:
        value = (f"**{r['slope_seconds_per_site']} s per site** (intercept "
                 f"{r['intercept_seconds']} s, r² {r['r2']})")
        if "cpu_slope_seconds_per_site" in r:
            value += (f"; CPU time **{r['cpu_slope_seconds_per_site']} CPU-s per site** "
                      f"(intercept {r['cpu_intercept_seconds']}, r² {r['cpu_r2']})")
        value += f"; memory {r['memory_slope_mib_per_site']} MiB per site"
    else:
        value = _missing(results, bench)
    rows.append(("simulation round time vs sites: least-squares slope", value, bench.command))

    bench, r = by_name["deployment_round"], _get(results, "deployment_round")
    if r and {"simulation", "deployment"} <= set(r):
        sim, dep = r["simulation"], r["deployment"]
        # the stages are whatever the run timed (they change with the protocol)
        stages = [k for k in {**sim, **dep} if k.startswith("secagg_")]
        sim_sa, dep_sa = (round(sum(x.get(k, 0.0) for k in stages), 2) for x in (sim, dep))
        value = (f"round **{dep['round']} s** deployed vs {sim['round']} s simulated "
                 f"(**+{round(dep['round'] - sim['round'], 2)} s per round**, "
                 f"{r.get('ratio', {}).get('round', '?')}×); train {dep.get('train', '?')} vs "
                 f"{sim.get('train', '?')} s; secure-aggregation stages "
                 f"({', '.join(k.removeprefix('secagg_') for k in stages)}) {dep_sa} vs "
                 f"{sim_sa} s")
        first = r.get("time_to_first_round")
        if isinstance(first, dict):
            value += (f"; first round after {first['deployment']} s deployed vs "
                      f"{first['simulation']} s simulated")
        site_max = r.get("memory_mib", {}).get("site_max")
        if isinstance(site_max, dict):
            value += (f"; peak memory per site {site_max['peak_sum_mib']} MiB (process tree, "
                      f"largest process {site_max['peak_process_mib']} MiB)")
        value += (f" ({r.get('sites', 3)} sites, DP + secure aggregation"
                  + (", TLS + SuperNode authentication, local evaluation on)"
                     if r.get("deployment_tls") else ")"))
    elif r:
        value = json.dumps(r)[:200]
    else:
        value = _missing(results, bench)
    rows.append(("deployment per-round overhead (real server and client processes on "
                 "loopback, as sites run them, vs simulation)", value, bench.command))

    bench, r = by_name["utility"], _get(results, "utility")
    if r:
        a = r["auroc"]
        value = (f"federated + DP **{a['federated_dp']}**, federated **{a['federated']}**, "
                 f"centralized **{a['centralized']}** (ε ≤ {r['epsilon_max']})")
        bytes_value = (f"**{r['bytes_ratio']}×** ({r['bytes_per_site']:,} B vs "
                       f"{r['model_bytes']:,} B)")
    else:
        value = bytes_value = _missing(results, bench)
    rows.append(("holdout AUROC, default cohort (3 sites, 5 rounds)", value, bench.command))
    rows.append(("bytes up per site per round / fp32 model, default cohort (secure)",
                 bytes_value, bench.command))

    bench, r = by_name["import_speed"], _get(results, "import_speed")
    for syntax, cell in ((r or {}).get("syntaxes") or {"explicit VR little endian": None,
                                                        "JPEG 2000": None}).items():
        value = (f"**{cell['images_per_s_workers_1']} images/s** (1 process), "
                 f"{cell['images_per_s_workers_2']} (2 processes, "
                 f"{cell['speedup_2_workers']}×)" if cell else _missing(results, bench))
        rows.append((f"`mmfed data import` speed, {syntax}, 512×512 → 64×64 "
                     f"({(r or {}).get('patients', 300)} patients, whole import)", value,
                     bench.command))

    bench, r = by_name["gpu_check"], _get(results, "gpu_check")
    if r:
        sim, cen = r["simulate_accelerator"], r["centralized_accelerator"]
        value = (f"{r['gpu']}: DP simulation all sites trained = {sim['all_sites_trained']}, "
                 f"{sim['processes_on_gpu']} processes on the GPU, round time "
                 f"{r['round_time_ratio_accelerator_vs_cpu']}× CPU; centralized on "
                 f"{cen['device']}, epoch time {r['epoch_time_ratio_accelerator_vs_cpu']}× CPU")
    else:
        value = _missing(results, bench)
    rows.append(("CUDA path end to end (DP simulation + centralized)", value, bench.command))
    return rows


def render_table(results: dict[str, Any]) -> str:
    lines = ["| figure | value | command |", "|---|---|---|"]
    lines += [f"| {f} | {v.replace('|', '/')} | `{c}` |" for f, v, c in table_rows(results)]
    when = sorted({str(e.get("date")) for e in results.values()
                   if isinstance(e, dict) and e.get("date")})
    machines = {json.dumps(e["machine"], sort_keys=True) for e in results.values()
                if isinstance(e, dict) and e.get("machine")}
    codes = sorted({str(e["code"]) for e in results.values()
                    if isinstance(e, dict) and e.get("code")})
    note = ""
    if when:
        note += f"\n\nRun {when[0]}" + (f" to {when[-1]}" if len(when) > 1 else "")
    if codes:
        note += f" on commit {', '.join(codes)}"
    for m in sorted(machines):
        spec = json.loads(m)
        note += (f"; {spec['cpus']} CPUs, {spec['platform']}, Python {spec['python']}, "
                 f"torch {spec['torch']}, GPU: {spec['gpu'] or 'none'}")
    return "\n".join(lines) + (note + ".\n" if note else "\n")


def write_readme(results: dict[str, Any]) -> None:
    text = README.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{README}: no {START} … {END} markers to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{render_table(results)}{END}{tail}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [b.name for b in BENCHES]
    parser.add_argument("--only", nargs="+", choices=names, help="run just these")
    parser.add_argument("--skip", nargs="+", choices=names, default=[], help="leave these out")
    parser.add_argument("--table-only", action="store_true",
                        help="re-render the README table from results.json")
    parser.add_argument("--timeout", type=float, default=5400.0,
                        help="seconds allowed per benchmark")
    args = parser.parse_args()
    results: dict[str, Any] = (json.loads(RESULTS.read_text()) if RESULTS.exists() else {})
    if not args.table_only:
        import torch

        has_cuda = torch.cuda.is_available()
        for bench in BENCHES:
            if (args.only and bench.name not in args.only) or bench.name in args.skip:
                continue
            if bench.cuda and not has_cuda:
                results[bench.name] = {"command": bench.command,
                                       "skipped": "no CUDA GPU on this machine"}
                continue
            if bench.optional and not (ROOT / bench.args[0]).exists():
                results[bench.name] = {"command": bench.command,
                                       "skipped": f"{bench.args[0]} does not exist yet"}
                continue
            results[bench.name] = run_bench(bench, args.timeout)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")  # keep what is done
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    write_readme(results)
    summary = {name: ("ok" if isinstance(e, dict) and "result" in e else
                      "skipped" if isinstance(e, dict) and "skipped" in e else "failed")
               for name, e in results.items()}
    print(json.dumps(summary))
    if any(v == "failed" for v in summary.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

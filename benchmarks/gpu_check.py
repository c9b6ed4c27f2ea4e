"""The CUDA path end to end: a DP + secure-aggregation simulation and the centralized
reference, each trained on the GPU and on the CPU, on the same small cohort.

It proves three things on a CUDA machine: every simulated site trained with DP on the
GPU (a Ray worker that cannot use CUDA fails its site with a one-line error, which
would show up as ``dropped``); the Ray workers really held the GPU (``nvidia-smi`` is
sampled during the run and the processes on the GPU are counted); and the centralized
run resolved ``train.device`` to CUDA (its ``summary.json`` says which device). Round
times are medians over rounds 2..R of one run per device. ``--device cpu`` runs the same
script without a GPU (a dry run of the script itself). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench_env import mmfed  # same folder


class GpuProcesses:
    """Distinct process ids seen on the GPU (``nvidia-smi``), sampled every second."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.available:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            proc = subprocess.run(["nvidia-smi", "--query-compute-apps=pid",
                                   "--format=csv,noheader"], capture_output=True, text=True)
            self.pids.update(int(x) for x in proc.stdout.split() if x.isdigit())
            self._stop.wait(1.0)

    def stop(self) -> int | None:
        if not self.available:
            return None
        self._stop.set()
        self._thread.join()
        return len(self.pids)




def simulate(data: Path, out: Path, device: str, rounds: int, ledger: Path) -> dict:
    gpu = GpuProcesses() if device != "cpu" else None
    mmfed("simulate", "--data", str(data), "--out", str(out), "--rounds", str(rounds),
          "--no-progress", "--dp", "--set", f"train.device={device}",
          "--set", f"privacy.ledger_dir={ledger}")
    on_gpu = gpu.stop() if gpu else None
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    statuses = [s["status"] for line in lines for s in line["sites"].values()]
    return {"round_seconds_median": round(statistics.median(
                x["seconds"]["round"] for x in lines[1:]), 2),
            "all_sites_trained": all(s == "trained" for s in statuses),
            "site_train_seconds_median": round(statistics.median(
                s["seconds"] for line in lines[1:] for s in line["sites"].values()), 3),
            "auroc": round(lines[-1]["global"]["auroc"], 4),
            "processes_on_gpu": on_gpu}


def centralized(data: Path, out: Path, device: str, rounds: int) -> dict:
    mmfed("centralized", "--data", str(data), "--out", str(out), "--set",
          f"train.device={device}", "--set", f"rounds={rounds}")
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"device": summary.get("device"), "auroc": round(summary["final"]["auroc"], 4),
            "epoch_seconds_median": round(statistics.median(
                x["seconds"]["round"] for x in lines[1:]), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the accelerator to check")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients-per-site", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU here; run it on a CUDA machine "
                 "(or --device cpu for a dry run)")
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    result: dict[str, object] = {"device": args.device, "gpu": name}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "fed"
        mmfed("data", "synth", "--out", str(data), "--sites", str(args.sites),
              "--patients-per-site", str(args.patients_per_site))
        for label, device in (("accelerator", args.device), ("cpu", "cpu")):
            result[f"simulate_{label}"] = simulate(data, root / f"sim-{label}", device,
                                                   args.rounds, root / f"ledger-{label}")
            result[f"centralized_{label}"] = centralized(data, root / f"central-{label}",
                                                         device, args.rounds)
    sim_acc, sim_cpu = result["simulate_accelerator"], result["simulate_cpu"]
    cen_acc, cen_cpu = result["centralized_accelerator"], result["centralized_cpu"]
    assert isinstance(sim_acc, dict) and isinstance(sim_cpu, dict)
    assert isinstance(cen_acc, dict) and isinstance(cen_cpu, dict)
    result["round_time_ratio_accelerator_vs_cpu"] = round(
        sim_acc["round_seconds_median"] / sim_cpu["round_seconds_median"], 3)
    result["epoch_time_ratio_accelerator_vs_cpu"] = round(
        cen_acc["epoch_seconds_median"] / cen_cpu["epoch_seconds_median"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

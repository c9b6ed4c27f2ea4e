"""Utility on the default cohort: federated + DP vs federated vs centralized holdout AUROC.

One synthetic cohort (3 sites, seed 0, the ``make demo`` data) and three real runs with
the default configuration: ``mmfed simulate`` (secure aggregation, no DP),
``mmfed simulate --dp`` (site-owned DP-SGD, ε = 8 per site, fresh ledgers) and
``mmfed centralized`` (pooled, same number of passes). Each AUROC is the final round's
holdout figure of its run. From the federated run it also takes the bytes each site
sends per round (median over rounds) against the fp32 size of the model. The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench_env import mmfed  # same folder


def final(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="train.device for all three runs")
    args = parser.parse_args()
    import torch

    device = ["--set", f"train.device={args.device}"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "fed"
        mmfed("data", "synth", "--out", str(data), "--sites", "3", "--seed", str(args.seed))
        common = ["--data", str(data), "--seed", str(args.seed), *device]
        mmfed("simulate", *common, "--out", str(root / "fed-run"), "--no-progress", "--no-dp")
        mmfed("simulate", *common, "--out", str(root / "fed-dp-run"), "--no-progress", "--dp",
              "--set", f"privacy.ledger_dir={root / 'ledger'}")
        mmfed("centralized", *common, "--out", str(root / "central-run"))
        fed, fed_dp, central = (final(root / name) for name in
                                ("fed-run", "fed-dp-run", "central-run"))
        lines = [json.loads(x) for x in
                 (root / "fed-run" / "metrics.jsonl").read_text().splitlines()]
        model = torch.load(root / "fed-run" / "model.pt", weights_only=False)
    model_bytes = sum(v.numel() * 4 for v in model["state_dict"].values())
    per_site = statistics.median(x["bytes"]["up"] / x["aggregation"]["participants"]
                                 for x in lines)
    auroc = {"federated_dp": round(fed_dp["final"]["auroc"], 4),
             "federated": round(fed["final"]["auroc"], 4),
             "centralized": round(central["final"]["auroc"], 4)}
    epsilons = [s["epsilon"] for s in fed_dp["sites"].values() if s.get("epsilon") is not None]
    print(json.dumps({
        "auroc": auroc,
        "gap_federated_vs_centralized": round(auroc["federated"] - auroc["centralized"], 4),
        "gap_dp_vs_federated": round(auroc["federated_dp"] - auroc["federated"], 4),
        "epsilon_max": round(max(epsilons), 3) if epsilons else None,
        "rounds": fed["rounds"],
        "bytes_per_site": int(per_site), "model_bytes": model_bytes,
        "bytes_ratio": round(per_site / model_bytes, 4),
        "seconds": {"federated": fed["wall_seconds"], "federated_dp": fed_dp["wall_seconds"],
                    "centralized": central["wall_seconds"]},
        "device": args.device,
    }))


if __name__ == "__main__":
    main()

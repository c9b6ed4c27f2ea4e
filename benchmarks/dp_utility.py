"""Holdout AUROC against the privacy budget: which training plan still learns under DP.

Real ``mmfed simulate`` runs (secure aggregation on, fresh ledgers per run) of three
training plans on three federations, for ε per site in {1, 3, 8} and without DP:

* plans: ``default`` (the shipped configuration: 5 rounds of 4 local AdamW epochs,
  batches of 128, local DP-SGD), ``fedsgd`` (``configs/fedsgd.toml``: 40 rounds, each
  one full-batch DP-SGD step per site, plain SGD, local noise) and ``distributed``
  (the same plan with ``privacy.noise = distributed``: each site adds only its share
  of the noise inside secure aggregation);
* federations: ``default`` (``mmfed data synth --sites 3``), ``small`` (3 sites of
  about 40 synthetic patients) and ``gse7390`` (the real 198-patient cohort of
  ``examples/gse7390_sites.py``, 3 sites; needs scikit-survival).

Each cell is mean ± sd over the seeds (cohort, split and model initialisation all
take the seed; DP noise is fresh OS entropy in every run). The last line is one JSON
object; without DP, ``fedsgd`` and ``distributed`` are the same run, so only
``fedsgd`` has a no-DP cell.

    python benchmarks/dp_utility.py --seeds 0 1 2          # about 1.5 h on 2 cores
    python benchmarks/dp_utility.py --seeds 0 --federations small --epsilons 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_env import ENV, mmfed  # same folder

ROOT = Path(__file__).resolve().parent.parent
FEDSGD = ["--config", str(ROOT / "configs" / "fedsgd.toml")]
PLANS = {"default": [], "fedsgd": FEDSGD,
         "distributed": [*FEDSGD, "--set", "privacy.noise=distributed"]}
# GSE7390's sites hold about 50 training patients: the default plan's batches of 128
# would be whole sites anyway, so its figures use batches of 16 as the example says.
GSE_DEFAULT = ["--set", "data.val_fraction=0.2", "--set", "train.batch_size=16"]


def make_federation(kind: str, seed: int, out: Path) -> list[str]:
    """Create the federation folder; returns the extra simulate arguments it needs."""
    if kind == "default":
        mmfed("data", "synth", "--out", str(out), "--sites", "3", "--seed", str(seed))
        return []
    if kind == "small":
        mmfed("data", "synth", "--out", str(out), "--sites", "3", "--patients-per-site",
              "40", "--seed", str(seed))
        return []
    subprocess.run([sys.executable, str(ROOT / "examples" / "gse7390_sites.py"), "--out",
                    str(out), "--sites", "3", "--seed", str(seed)], check=True, env=ENV,
                   stdout=subprocess.DEVNULL)
    return ["--set", "data.val_fraction=0.2"]


def run_one(data: Path, extra: list[str], plan: str, federation: str, epsilon: float | None,
            seed: int, root: Path) -> float:
    name = f"{federation}-{plan}-{epsilon}-{seed}"
    args = ["simulate", "--data", str(data), "--seed", str(seed), "--out", str(root / name),
            "--no-progress", *PLANS[plan], *extra]
    if federation == "gse7390" and plan == "default":
        args += GSE_DEFAULT
    if epsilon is None:
        args.append("--no-dp")
    else:
        args += ["--dp", "--set", f"privacy.epsilon={epsilon}",
                 "--set", f"privacy.ledger_dir={root / ('ledger-' + name)}"]
    mmfed(*args)
    summary = json.loads((root / name / "summary.json").read_text())
    return float(summary["final"]["auroc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--federations", nargs="+", default=["default", "small", "gse7390"],
                        choices=["default", "small", "gse7390"])
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--epsilons", nargs="+", default=["1", "3", "8", "none"])
    args = parser.parse_args()
    epsilons = [None if e == "none" else float(e) for e in args.epsilons]
    cells: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for federation in args.federations:
            for seed in args.seeds:
                data = root / f"data-{federation}-{seed}"
                extra = make_federation(federation, seed, data)
                for plan in args.plans:
                    for eps in epsilons:
                        if eps is None and plan == "distributed":
                            continue  # the fedsgd run without DP
                        auroc = run_one(data, extra, plan, federation, eps, seed, root)
                        key = f"{federation}/{plan}/{'none' if eps is None else f'{eps:g}'}"
                        cells.setdefault(key, []).append(auroc)
                        print(f"{key} seed {seed}: AUROC {auroc:.4f}", flush=True)
    table = {k: {"mean": round(statistics.fmean(v), 4),
                 "sd": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0, "n": len(v)}
             for k, v in cells.items()}
    gaps = {}
    for key, cell in table.items():
        federation, plan, eps = key.split("/")
        base = table.get(f"{federation}/default/none")
        if eps != "none" and base is not None:
            gaps[key] = round(base["mean"] - cell["mean"], 4)
    print(json.dumps({"seeds": args.seeds, "auroc": table, "gap_to_no_dp": gaps}))


if __name__ == "__main__":
    main()

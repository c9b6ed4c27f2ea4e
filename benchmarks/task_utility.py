"""Each task kind's holdout figures: federated against centralized, fused against each
single modality, and the real survival cohort under DP.

Real ``mmfed`` runs on synthetic cohorts of each kind (``mmfed data synth --task``,
3 sites) and on GSE7390 with its censoring kept (``examples/gse7390_sites.py --task
survival``):

* ``centralized``: ``mmfed centralized``, all sites pooled, as many epochs as the
  federation's rounds × local epochs;
* ``federated``: ``mmfed simulate --no-dp`` (secure aggregation on);
* ``dp``: ``mmfed simulate`` with DP at ε = 8 per site (fresh ledgers);
* ``records`` / ``images`` / ``genomics``: the federated run restricted to one
  modality (``train.modalities``), for the fused-beats-single check.

GSE7390 survival is reported with a 95 % bootstrap interval of the holdout C-index
(1,000 resamples of the holdout's patients, seeded). The last line is one JSON object:
``{kind: {run: headline figure}}`` plus ``gse7390``.

    python benchmarks/task_utility.py                       # about 30 min on 2 cores
    python benchmarks/task_utility.py --kinds survival --runs centralized federated
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_env import ENV, mmfed  # same folder

ROOT = Path(__file__).resolve().parent.parent
HEADLINE = {"survival": "c_index", "regression": "r2", "multiclass": "auroc"}
RUNS = ("centralized", "federated", "dp", "records", "images", "genomics")
FEDSGD = ["--config", str(ROOT / "configs" / "fedsgd.toml")]


def figure(run: Path, key: str) -> float:
    return float(json.loads((run / "summary.json").read_text())["final"][key])


def one(kind: str, which: str, data: Path, root: Path, seed: int, extra: list[str]) -> float:
    out = root / f"{kind}-{which}"
    common = ["--data", str(data), "--seed", str(seed), "--out", str(out), *extra]
    if which == "centralized":
        mmfed("centralized", *common)
    elif which == "dp":
        mmfed("simulate", *common, "--no-progress", "--dp", "--set", "privacy.epsilon=8",
              "--set", f"privacy.ledger_dir={root / ('ledger-' + kind)}")
    else:
        mods = [] if which == "federated" else ["--set", f"train.modalities=[\"{which}\"]"]
        mmfed("simulate", *common, "--no-progress", "--no-dp", *mods)
    return figure(out, HEADLINE[kind])


def bootstrap_c_index(run: Path, resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """The saved model's holdout C-index with a percentile bootstrap interval."""
    from sksurv.metrics import concordance_index_censored

    from mmfed.data import load_site
    from mmfed.ml.features import encode
    from mmfed.ml.outcomes import risk_score
    from mmfed.ml.training import predict
    from mmfed.run.saved_model import holdout_folder, load_saved_model

    saved = load_saved_model(run)
    holdout = encode(load_site(holdout_folder(run, saved.cfg)), saved.schema)
    task = saved.schema.task
    surv, _ = predict(saved.model, holdout, tuple(saved.cfg["train.modalities"]), task=task)
    risk = risk_score(surv, np.asarray(task.cuts))
    event, time = holdout.labels.astype(bool), holdout.outcome
    point = float(concordance_index_censored(event, time, risk)[0])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, len(time), len(time))
        if event[idx].any():
            try:
                draws.append(float(concordance_index_censored(event[idx], time[idx],
                                                              risk[idx])[0]))
            except ValueError:  # no comparable pair in this resample
                continue
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"c_index": point, "low": float(low), "high": float(high)}


def gse7390(root: Path, seed: int) -> dict[str, object]:
    data = root / "gse7390"
    subprocess.run([sys.executable, str(ROOT / "examples" / "gse7390_sites.py"), "--out",
                    str(data), "--task", "survival", "--seed", str(seed)], check=True,
                   env=ENV, stdout=subprocess.DEVNULL)
    out: dict[str, object] = {}
    for plan, extra in (("default", ["--set", "train.batch_size=16"]), ("fedsgd", FEDSGD)):
        run = root / f"gse-{plan}"
        mmfed("simulate", "--data", str(data), "--seed", str(seed), "--out", str(run),
              "--no-progress", "--dp", "--set", "privacy.epsilon=8", "--set",
              "data.val_fraction=0.2", "--set",
              f"privacy.ledger_dir={root / ('ledger-gse-' + plan)}", *extra)
        out[plan] = bootstrap_c_index(run)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(HEADLINE), choices=list(HEADLINE))
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-gse7390", action="store_true")
    args = parser.parse_args()
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="mmfed-tasks-") as tmp:
        root = Path(tmp)
        for kind in args.kinds:
            data = root / f"data-{kind}"
            mmfed("data", "synth", "--out", str(data), "--task", kind, "--sites", "3",
                  "--patients-per-site", "200", "--holdout", "400", "--seed", str(args.seed))
            row = {}
            for which in args.runs:
                row[which] = round(one(kind, which, data, root, args.seed, []), 4)
                print(f"{kind} {which}: {HEADLINE[kind]} {row[which]}", flush=True)
            result[kind] = row
        if not args.no_gse7390:
            result["gse7390"] = gse7390(root, args.seed)
            print(f"gse7390 survival, ε = 8: {result['gse7390']}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Modality-aware aggregation vs plain FedAvg with zero-filling on an uneven consortium.

For each seed, one synthetic cohort is drawn from ``configs/uneven.toml`` (5 sites,
genomics at 2 of them, no images at one, 30% per-patient missingness) and the same
federation is trained under each arm:

* ``aware``: absent modalities masked out of the fusion, each encoder averaged over the
  patients who had its modality (mmfed's default);
* ``zero_fill``: absent modalities fed as zeros posing as data, plain example-weighted
  FedAvg (what FedMultimodal-style pipelines do);
* ``masked_fedavg`` (ablation, with ``--ablation``): masks but plain FedAvg.

Holdout AUROC is reported for all patients, complete patients and each missing-modality
pattern, as mean ± sd over seeds. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import tomllib
from pathlib import Path

from bench_env import mmfed  # same folder

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "aware": ["--set", "model.missing=mask", "--set", "aggregation.modality_aware=true"],
    "zero_fill": ["--set", "model.missing=zero_fill",
                  "--set", "aggregation.modality_aware=false"],
    "masked_fedavg": ["--set", "model.missing=mask",
                      "--set", "aggregation.modality_aware=false"],
}




def synth(config: Path, seed: int, out: Path) -> None:
    data = tomllib.loads(config.read_text())["data"]
    args = ["data", "synth", "--out", str(out), "--seed", str(seed),
            "--sites", str(data["sites"]), "--patients-per-site",
            str(data["patients_per_site"]), "--holdout", str(data["holdout"]),
            "--patient-missing", str(data["patient_missing"])]
    for item in data.get("missing", []):
        args += ["--missing", item]
    mmfed(*args)


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "uneven.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablation", action="store_true", help="also run masked_fedavg")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config override for every arm (e.g. privacy.enabled=true)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), help="arms to run "
                        "(default: aware and zero_fill)")
    args = parser.parse_args()
    arms = args.arms or (["aware", "zero_fill"] + (["masked_fedavg"] if args.ablation else []))
    scores: dict[str, dict[str, list[float]]] = {arm: {} for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            data = Path(tmp) / f"data-{seed}"
            synth(args.config, seed, data)
            for arm in arms:
                out = Path(tmp) / f"{arm}-{seed}"
                extra = [x for o in args.overrides for x in ("--set", o)]
                mmfed("simulate", "--config", str(args.config), "--data", str(data),
                      "--seed", str(seed), "--out", str(out), "--no-progress",
                      "--set", f"privacy.ledger_dir={Path(tmp) / f'ledger-{arm}-{seed}'}",
                      *ARMS[arm], *extra)
                summary = json.loads((out / "summary.json").read_text())
                row = {"all": summary["final"]["auroc"]}
                row.update({k: v["auroc"] for k, v in summary["final_patterns"].items()
                            if v["auroc"] is not None})
                for key, value in row.items():
                    scores[arm].setdefault(key, []).append(float(value))
                print(f"seed {seed} {arm}: " + ", ".join(f"{k} {v:.4f}"
                                                        for k, v in row.items()), flush=True)
    result = {arm: {k: mean_sd(v) for k, v in rows.items()} for arm, rows in scores.items()}
    result["seeds"] = args.seeds  # type: ignore[assignment]
    for key in result.get("aware", {}):
        if key in result.get("zero_fill", {}):
            a, z = result["aware"][key], result["zero_fill"][key]
            print(f"{key:24s} aware {a['mean']:.4f} ± {a['sd']:.4f}   "
                  f"zero_fill {z['mean']:.4f} ± {z['sd']:.4f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

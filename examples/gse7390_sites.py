"""Turn the real GSE7390 breast-cancer cohort into an mmfed federation folder.

Source: the breast-cancer data set that ships inside scikit-survival
(``sksurv.datasets.load_breast_cancer``): 198 node-negative, untreated breast-cancer
patients of the TRANSBIG multicentre validation series, GEO accession GSE7390
(Desmedt et al., Clin Cancer Res 2007;13(11):3207-14). It holds the expression of the
76 Affymetrix probes of the Wang et al. 76-gene prognostic signature plus clinical
variables (age, estrogen-receptor status, grade, tumour size) and the time to distant
metastasis (``t.tdm``, days) with its event indicator (``e.tdm``). This is REAL public
patient data, redistributed within scikit-survival; it is not synthetic. Use it for
demonstration and testing only.

Two tasks, both on the same endpoint (distant metastasis, ``t.tdm``/``e.tdm``):

``--task binary`` (default): a fixed-horizon classifier label, distant metastasis
within the horizon (default 5 years = 1826.25 days).

* label 1: a distant metastasis was observed at or before the horizon;
* label 0: the patient was followed beyond the horizon without a distant metastasis by
  then (metastases first observed after the horizon also count as 0);
* excluded: patients censored (lost to follow-up, no event) before the horizon. Their
  status at the horizon is unknown; counting them as 0 would bias the label towards
  "no metastasis", so they are left out, and the script prints how many and why.

``--task survival``: the survival outcome itself, so that nothing is thrown away.
Every patient is kept; records.csv has ``time`` (days to distant metastasis, or to the
end of follow-up without one) and ``event`` (1 = metastasis observed, 0 = censored), and
site.toml declares ``kind = "survival"``. A censored patient still tells a survival
model "metastasis-free for at least this long", which the binary task has to discard.
``--horizon-years`` does not apply and is refused.

Sites: the data set does not record which TRANSBIG centre treated each patient, so the
sites are an artificial partition of one cohort: a stratified (by label, or by event for
the survival task), seeded random split into a holdout set and N sites. They are close
to identically distributed, unlike real hospitals.

Usage::

    python examples/gse7390_sites.py --out data/gse7390
    mmfed data check data/gse7390/site-1
    mmfed simulate --data data/gse7390 --rounds 5 --set data.val_fraction=0.2 \
        --set train.batch_size=16

    python examples/gse7390_sites.py --out data/gse7390-surv --task survival
    mmfed data check data/gse7390-surv/site-1
    mmfed simulate --data data/gse7390-surv --rounds 5 --set data.val_fraction=0.2 \
        --set train.batch_size=16

Patient ids are ``GSE7390-001`` ... ``GSE7390-198`` by row order of the source table,
so the same patient has the same id whatever the task, seed or number of sites.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

DAYS_PER_YEAR = 365.25
PROBE_RE = re.compile(r"^X\d[\w.]*_at$")  # Affymetrix probe ids, prefixed "X" by R
UNKNOWN_MARKERS = {"unkown", "unknown"}  # sic: the source spells grade "unkown"
TASKS = ("binary", "survival")
SOURCE_TIME, SOURCE_EVENT = "t.tdm", "e.tdm"  # distant metastasis, in scikit-survival
TIME_COLUMN, EVENT_COLUMN, TIME_UNIT = "time", "event", "days"  # survival records.csv
SOURCE = {
    "dataset": "sksurv.datasets.load_breast_cancer (scikit-survival)",
    "geo_accession": "GSE7390",
    "geo_url": "https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE7390",
    "study": "TRANSBIG multicentre independent validation series (node-negative, "
             "systemically untreated breast cancer)",
    "citation": "Desmedt C, Piette F, Loi S, et al. Strong time dependence of the 76-gene "
                "prognostic signature for node-negative breast cancer patients in the "
                "TRANSBIG multicenter independent validation series. Clin Cancer Res. "
                "2007;13(11):3207-3214. doi:10.1158/1078-0432.CCR-06-2765",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="federation folder to create (must not exist or be empty)")
    p.add_argument("--task", choices=TASKS, default="binary",
                   help="binary: metastasis within the horizon, censored-early patients "
                        "dropped (default); survival: time + event, every patient kept")
    p.add_argument("--sites", type=int, default=3, help="number of site folders (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--horizon-years", type=float, default=None,
                   help="binary task only: label = distant metastasis within this many "
                        "years (default 5)")
    p.add_argument("--holdout-fraction", type=float, default=0.25,
                   help="fraction of the kept patients (binary: the labelled ones; "
                        "survival: all) held for the server's holdout (default 0.25)")
    args = p.parse_args(argv)
    if args.horizon_years is None:
        args.horizon_years = 5.0
    elif args.task == "survival":  # silently ignoring it would mislead the reader
        p.error("--horizon-years applies to --task binary only (survival keeps the "
                "full follow-up)")
    if args.sites < 1:
        p.error("--sites must be at least 1")
    if not 0.0 < args.holdout_fraction < 1.0:
        p.error("--holdout-fraction must be between 0 and 1 (exclusive)")
    if not args.horizon_years > 0:
        p.error("--horizon-years must be positive")
    if args.seed < 0:
        p.error("--seed must be non-negative")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        p.error(f"{args.out}: exists and is not an empty folder (choose a new --out)")
    return args


def load_cohort() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The source table with stable ids; returns (features, event, time in days).

    Both tasks use the distant-metastasis endpoint (``e.tdm``/``t.tdm``), the one the
    76-gene signature was built to predict."""
    try:
        from sksurv.datasets import load_breast_cancer
    except ImportError:
        sys.exit("this example needs scikit-survival: pip install 'mmfed[examples]'")
    x, y = load_breast_cancer()
    x = x.reset_index(drop=True)
    width = max(3, len(str(len(x))))
    x.insert(0, "patient_id", [f"GSE7390-{i + 1:0{width}d}" for i in range(len(x))])
    return (x, np.asarray(y[SOURCE_EVENT], dtype=bool),
            np.asarray(y[SOURCE_TIME], dtype=np.float64))


def make_labels(event: np.ndarray, time: np.ndarray,
                horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """Label 1/0 at the horizon; returns (labels, keep mask). See the module docstring."""
    positive = event & (time <= horizon)
    negative = time > horizon
    keep = positive | negative  # the rest: censored before the horizon, status unknown
    return positive.astype(np.int64), keep


def split(labels: np.ndarray, sites: int, holdout_fraction: float,
          seed: int) -> list[np.ndarray]:
    """Stratified, seeded split of row indices: [holdout, site-1, ..., site-N]."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(sites + 1)]
    offset = 0
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        n_hold = round(holdout_fraction * len(rows))
        parts[0] += rows[:n_hold].tolist()
        for k, row in enumerate(rows[n_hold:]):  # deal the rest out like cards
            parts[1 + (k + offset) % sites].append(int(row))
        offset += len(rows) - n_hold  # the next class starts where this one stopped
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def write_folder(folder: Path, name: str, records: pd.DataFrame, genomics: pd.DataFrame,
                 categorical: list[str], numeric: list[str], task: str = "binary") -> None:
    from mmfed.data.sitespec import SiteSpec, write_site_spec

    folder.mkdir(parents=True)
    records.to_csv(folder / "records.csv", index=False)
    genomics.to_csv(folder / "genomics.csv", index=False)
    modalities = {"records": True, "images": False, "genomics": True}
    if task == "survival":
        spec = SiteSpec(name=name, label="", classes=(), modalities=modalities,
                        image_size=None, categorical=tuple(categorical),
                        numeric=tuple(numeric), kind="survival", time=TIME_COLUMN,
                        event=EVENT_COLUMN, unit=TIME_UNIT)
    else:
        spec = SiteSpec(name=name, label="label", classes=("0", "1"), modalities=modalities,
                        image_size=None, categorical=tuple(categorical),
                        numeric=tuple(numeric))
    write_site_spec(folder / "site.toml", spec,
                    description="REAL public data: GSE7390 (TRANSBIG, Desmedt et al. 2007) "
                                "as redistributed in scikit-survival; see ../cohort.json")


def counts(labels: np.ndarray) -> dict[str, int]:
    return {"patients": len(labels), "label_0": int((labels == 0).sum()),
            "label_1": int((labels == 1).sum())}


def event_counts(event: np.ndarray) -> dict[str, int]:
    """Per-folder outcome summary of the survival task: how many events it can learn from."""
    return {"patients": len(event), "events": int(event.sum()),
            "censored": int((~event).sum())}


def clinical_records(x: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[str], list[str],
                                               dict[str, int]]:
    """records.csv without outcome columns, shared by both tasks.

    Returns (records, genes, categorical, numeric, unknown counts per categorical)."""
    genes = [c for c in x.columns if PROBE_RE.match(c)]
    clinical = [c for c in x.columns if c != "patient_id" and c not in genes]
    categorical = [c for c in clinical if not pd.api.types.is_numeric_dtype(x[c])]
    numeric = [c for c in clinical if c not in categorical]
    records = x[["patient_id", *clinical]].copy()
    n_unknown: dict[str, int] = {}
    for col in categorical:  # text; the source's "unkown" grade means not recorded
        text = records[col].astype("object")
        unknown = text.astype(str).str.strip().str.lower().isin(UNKNOWN_MARKERS)
        n_unknown[col] = int(unknown.sum())
        records[col] = text.where(~unknown & text.notna(), "")
    return records, genes, categorical, numeric, n_unknown


def genes_note(count: int) -> dict[str, object]:
    return {"count": count,
            "note": "Affymetrix HG-U133A probe ids of the 76-gene signature; the "
                    "leading 'X' is R's make.names prefix from the source table"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    x, event, time = load_cohort()
    records, genes, categorical, numeric, n_unknown = clinical_records(x)
    clinical = [c for c in records.columns if c != "patient_id"]
    genomics = x[["patient_id", *genes]]
    print(f"GSE7390 (scikit-survival): {len(x)} patients, {len(genes)} genes, clinical "
          f"columns {', '.join(clinical)}")
    if args.task == "survival":
        return survival_main(args, x, event, time, records, genomics, genes, categorical,
                             numeric, n_unknown)

    horizon = args.horizon_years * DAYS_PER_YEAR
    labels, keep = make_labels(event, time, horizon)
    records.insert(1, "label", labels)

    n_censored = int((~keep).sum())
    n_late = int((keep & event & (time > horizon)).sum())
    print(f"label = distant metastasis within {args.horizon_years:g} years "
          f"({horizon:g} days)")
    print(f"excluded {n_censored} of {len(x)} patients: censored without a distant "
          f"metastasis before {args.horizon_years:g} years, so their status at the "
          "horizon is unknown")
    print(f"kept {int(keep.sum())}: {int(labels[keep].sum())} with label 1, "
          f"{int((labels[keep] == 0).sum())} with label 0 (of which {n_late} had a "
          "metastasis only after the horizon)")

    kept = np.flatnonzero(keep)
    parts = split(labels[kept], args.sites, args.holdout_fraction, args.seed)
    names = ["holdout", *(f"site-{k + 1}" for k in range(args.sites))]
    for name, part in zip(names, parts, strict=True):
        part_labels = labels[kept[part]]
        if len(np.unique(part_labels)) < 2:
            sys.exit(f"error: {name} would get {len(part)} patient(s), not both labels; "
                     "use fewer --sites or another --holdout-fraction")

    args.out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, dict[str, int]] = {}
    for name, part in zip(names, parts, strict=True):
        rows = kept[part]
        write_folder(args.out / name, name, records.iloc[rows], genomics.iloc[rows],
                     categorical, numeric)
        splits[name] = counts(labels[rows])
        print(f"  {name}: {splits[name]['patients']} patients, "
              f"{splits[name]['label_1']} with label 1")

    cohort = {
        "synthetic": False,
        "note": "REAL public patient data (GEO GSE7390), redistributed within the "
                "scikit-survival package. Sites are an artificial, stratified random "
                "partition of one cohort, not the original TRANSBIG centres.",
        "source": SOURCE,
        "label": {
            "column": "label",
            "definition": f"1 = distant metastasis observed at or before "
                          f"{args.horizon_years:g} years ({horizon:g} days) after "
                          "diagnosis; 0 = followed beyond the horizon without distant "
                          "metastasis by then (including metastases first seen later)",
            "horizon_years": args.horizon_years,
            "horizon_days": horizon,
            "censoring": "patients censored without an event before the horizon have "
                         "an unknown status and are excluded",
        },
        "patients_total": len(x),
        "excluded": {"censored_before_horizon": n_censored},
        "kept": counts(labels[kept]),
        "events_after_horizon_labelled_0": n_late,
        **shared_fields(args, splits, len(genes), numeric, categorical, n_unknown),
    }
    return write_cohort(args, cohort)


def shared_fields(args: argparse.Namespace, splits: object, n_genes: int, numeric: object,
                  categorical: object, n_unknown: int) -> dict[str, object]:
    """The closing fields of cohort.json that both tasks write, in their order."""
    return {"seed": args.seed, "holdout_fraction": args.holdout_fraction, "splits": splits,
            "genes": genes_note(n_genes),
            "records": {"numeric": numeric, "categorical": categorical,
                        "unknown_set_to_missing": n_unknown},
            "patient_ids": "GSE7390-NNN by row order of the source table"}


def write_cohort(args: argparse.Namespace, cohort: dict[str, object]) -> int:
    (args.out / "cohort.json").write_text(json.dumps(cohort, indent=2) + "\n",
                                          encoding="utf-8")
    print(f"wrote {args.out}: cohort.json, holdout/ and {args.sites} site folder(s)")
    return 0


def survival_main(args: argparse.Namespace, x: pd.DataFrame, event: np.ndarray,
                  time: np.ndarray, records: pd.DataFrame, genomics: pd.DataFrame,
                  genes: list[str], categorical: list[str], numeric: list[str],
                  n_unknown: dict[str, int]) -> int:
    """``--task survival``: every patient, with time and event; see the module docstring.

    The split is stratified by event so that every folder has events: a site without
    any contributes nothing to a Cox partial likelihood, and a holdout without any has
    no concordance index."""
    if not (np.isfinite(time).all() and (time > 0).all()):  # the reader requires time > 0
        sys.exit("error: the source has non-positive or missing follow-up times")
    records = records.copy()
    records.insert(1, TIME_COLUMN, time)
    records.insert(2, EVENT_COLUMN, event.astype(np.int64))
    n_events = int(event.sum())
    print(f"task = survival: time to distant metastasis or censoring ({TIME_UNIT}), "
          f"event 1 = metastasis observed, 0 = censored")
    print(f"kept all {len(x)} patients: {n_events} events, {len(x) - n_events} censored "
          "(censored patients are kept with their follow-up time)")

    parts = split(event.astype(np.int64), args.sites, args.holdout_fraction, args.seed)
    names = ["holdout", *(f"site-{k + 1}" for k in range(args.sites))]
    for name, part in zip(names, parts, strict=True):
        if len(np.unique(event[part])) < 2:
            sys.exit(f"error: {name} would get {len(part)} patient(s), not both events "
                     "and censored ones; use fewer --sites or another --holdout-fraction")

    args.out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, dict[str, int]] = {}
    for name, part in zip(names, parts, strict=True):
        write_folder(args.out / name, name, records.iloc[part], genomics.iloc[part],
                     categorical, numeric, task="survival")
        splits[name] = event_counts(event[part])
        print(f"  {name}: {splits[name]['patients']} patients, "
              f"{splits[name]['events']} events, {splits[name]['censored']} censored")

    cohort = {
        "synthetic": False,
        "note": "REAL public patient data (GEO GSE7390), redistributed within the "
                "scikit-survival package. Sites are an artificial random partition of "
                "one cohort, stratified by event, not the original TRANSBIG centres.",
        "source": SOURCE,
        "task": "survival",
        "endpoint": {
            "name": "distant metastasis",
            "time_column": TIME_COLUMN,
            "event_column": EVENT_COLUMN,
            "unit": TIME_UNIT,
            "source_columns": {"time": SOURCE_TIME, "event": SOURCE_EVENT},
            "definition": "time = days from diagnosis to the first observed distant "
                          "metastasis (event = 1) or to the end of follow-up without one "
                          "(event = 0, censored)",
            "censoring": "censored patients are kept with their follow-up time; no "
                         "patient is excluded",
        },
        "patients_total": len(x),
        "all": event_counts(event),
        "time_days": {"min": float(time.min()), "median": float(np.median(time)),
                      "max": float(time.max())},
        **shared_fields(args, splits, len(genes), numeric, categorical, n_unknown),
    }
    return write_cohort(args, cohort)


if __name__ == "__main__":
    raise SystemExit(main())

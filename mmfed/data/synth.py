"""A synthetic multimodal hospital cohort, deterministic by seed and labelled synthetic.

One latent disease severity drives all three modalities, each seen through its own
independent noise: each modality alone is informative, their fusion more so (the
noises average out). Sites differ the way hospitals do: label prevalence, scanner
intensity response, cohort size and which modalities they hold.

The outcome is one of four task kinds (``SynthSettings.task``). ``binary`` (the
original cohort) draws the label first and the severity from it. The other kinds draw a
continuous latent disease first and derive the outcome from it (ordered subtypes, a
biomarker-like value, or a proportional-hazards event time with censoring), then map it
onto the binary severity scale so the modality generators are shared unchanged and every
modality carries the same planted signal whatever the task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

from mmfed.data.sitespec import OPTIONAL_MODALITIES, SiteSpec, write_site_spec
from mmfed.errors import UsageError

GENERATOR_VERSION = 1
SHARED_SEVERITY_SD = 0.35  # severity heterogeneity that no modality can average out
VIEW_NOISE_SD = {"records": 0.6, "images": 0.55, "genomics": 0.6}

# name, mean, sd, loading on the records view, low, high, decimals, missing rate
NUMERIC_VARS: tuple[tuple[str, float, float, float, float, float, int, float], ...] = (
    ("age", 62.0, 11.0, 0.3, 18, 95, 0, 0.0),
    ("bmi", 27.0, 4.5, 0.0, 15, 55, 1, 0.03),
    ("systolic_bp", 132.0, 17.0, 0.0, 80, 220, 0, 0.02),
    ("diastolic_bp", 81.0, 10.0, 0.0, 40, 130, 0, 0.02),
    ("heart_rate", 76.0, 11.0, 0.25, 35, 160, 0, 0.02),
    ("temperature", 36.8, 0.4, 0.1, 35.0, 40.5, 1, 0.02),
    ("resp_rate", 16.0, 2.5, 0.0, 8, 40, 0, 0.05),
    ("spo2", 96.5, 1.8, -0.15, 80, 100, 0, 0.03),
    ("glucose", 102.0, 22.0, 0.0, 50, 400, 0, 0.05),
    ("hba1c", 5.8, 0.8, 0.0, 4.0, 14.0, 1, 0.25),
    ("cholesterol", 195.0, 38.0, 0.0, 90, 400, 0, 0.08),
    ("ldl", 115.0, 32.0, 0.0, 30, 300, 0, 0.08),
    ("hdl", 52.0, 14.0, 0.0, 15, 120, 0, 0.08),
    ("triglycerides", 145.0, 60.0, 0.0, 30, 800, 0, 0.08),
    ("creatinine", 0.95, 0.25, 0.1, 0.3, 6.0, 2, 0.04),
    ("egfr", 82.0, 18.0, -0.1, 5, 140, 0, 0.04),
    ("alt", 27.0, 11.0, 0.0, 5, 300, 0, 0.06),
    ("ast", 25.0, 9.0, 0.1, 5, 300, 0, 0.06),
    ("albumin", 4.1, 0.45, -0.55, 1.5, 5.5, 1, 0.05),
    ("crp", 6.0, 4.0, 0.65, 0.1, 150, 1, 0.07),
    ("wbc", 7.2, 1.9, 0.5, 1.5, 30, 1, 0.03),
    ("hemoglobin", 13.6, 1.5, -0.5, 6, 19, 1, 0.03),
    ("platelets", 250.0, 60.0, 0.4, 40, 800, 0, 0.03),
    ("sodium", 139.5, 2.8, 0.0, 120, 155, 0, 0.03),
    ("potassium", 4.2, 0.4, 0.0, 2.5, 6.5, 1, 0.03),
    ("ldh", 190.0, 45.0, 0.6, 80, 900, 0, 0.15),
)
# name, categories, loading of the view on the category index (0 = uninformative)
CATEGORICAL_VARS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("sex", ("F", "M"), 0.0),
    ("smoking", ("never", "former", "current"), 0.5),
    ("diabetes", ("no", "yes"), 0.0),
    ("hypertension", ("no", "yes"), 0.0),
    ("family_history", ("no", "yes"), 0.4),
    ("alcohol", ("none", "moderate", "heavy"), 0.0),
)
N_MODULES, MODULE_SIZE, DISEASE_MODULES = 5, 20, 2

TASKS = ("binary", "multiclass", "regression", "survival")
# Continuous kinds: the latent disease z is standard normal at the holdout's case mix; its
# severity 0.5 + LATENT_SCALE * z spans about the binary severities' range (0/1 label
# plus noise), so the views, and so each modality's signal, match the binary cohort's.
LATENT_SCALE = 0.6
MULTICLASS_CUTS = (-0.674, 0.0, 0.674)  # quartiles of z at the holdout: ordered subtypes
MULTICLASS_NOISE_SD = 0.25  # subtype boundaries are blurred, not razor cuts of z
REGRESSION = {"intercept": 50.0, "slope": 10.0, "noise_sd": 4.0}  # label = a + b*z + e
# Survival: Weibull proportional hazards, h(t) = lambda*k*t^(k-1)*exp(beta*z), with the
# median time at z = 0 of SURVIVAL["median_days"]; censoring is administrative (uniform
# end of follow-up) or dropout (exponential), independent of z: ~35 % censored at z's
# holdout mix, ~30-45 % across the default sites' case mixes.
SURVIVAL = {"beta": 1.0, "shape": 1.2, "median_days": 1000.0, "followup_min": 1000.0,
            "followup_max": 3000.0, "dropout_mean_days": 8000.0}


@dataclass
class SynthSettings:
    """Knobs of the synthetic cohort; the defaults are the demo federation."""

    sites: int = 3
    patients_per_site: int = 400
    holdout: int = 600
    seed: int = 0
    image_size: int = 64
    genes: int = 2000
    prevalence: tuple[float, float] = (0.25, 0.5)  # spread across sites, first to last
    holdout_prevalence: float = 0.4
    size_skew: float = 0.3  # largest site is (1+skew)x the mean, smallest (1-skew)x
    patient_missing: dict[str, float] = field(
        default_factory=lambda: {"images": 0.1, "genomics": 0.1})
    site_missing: dict[str, set[str]] = field(default_factory=dict)  # site -> modalities
    # binary | multiclass | regression | survival; for the continuous-latent kinds the
    # prevalence knobs set each site's case mix (see _case_mix_shift)
    task: str = "binary"


def parse_missing(items: list[str], sites: int) -> dict[str, set[str]]:
    """Parse ``MODALITY@SITE`` items; SITE is a site name (``site-2``) or number."""
    out: dict[str, set[str]] = {}
    for item in items:
        mod, sep, site = item.partition("@")
        if not sep or mod not in OPTIONAL_MODALITIES:
            raise UsageError(f"--missing {item!r}: expected MODALITY@SITE with MODALITY one of "
                             f"{', '.join(OPTIONAL_MODALITIES)} (e.g. genomics@site-2)")
        name = f"site-{site}" if site.isdigit() else site
        valid = {f"site-{i + 1}" for i in range(sites)}
        if name not in valid:
            raise UsageError(f"--missing {item!r}: no site {name!r} (sites are site-1 … "
                             f"site-{sites})")
        out.setdefault(name, set()).add(mod)
    return out


@dataclass(frozen=True)
class _Biology:
    """What all sites share: the gene panel and its disease modules."""

    gene_names: list[str]
    gene_mean: np.ndarray
    gene_sd: np.ndarray
    modules: list[np.ndarray]  # gene indices per module; the first DISEASE_MODULES matter


def _biology(settings: SynthSettings) -> _Biology:
    rng = np.random.default_rng([settings.seed, 7919])
    g = settings.genes
    names = [f"GENE{i + 1:04d}" for i in range(g)]
    order = rng.permutation(g)
    size = max(1, min(MODULE_SIZE, g // (2 * N_MODULES)))  # modules never overlap
    modules = [np.sort(order[k * size:(k + 1) * size]) for k in range(N_MODULES)]
    return _Biology(names, rng.uniform(4.0, 10.0, g), rng.uniform(0.3, 1.2, g), modules)


def _site_sizes(settings: SynthSettings) -> list[int]:
    n = settings.sites
    if n == 1:
        return [settings.patients_per_site]
    factors = np.linspace(1 + settings.size_skew, 1 - settings.size_skew, n)
    return [max(20, round(settings.patients_per_site * f)) for f in factors]


def _prevalences(settings: SynthSettings) -> list[float]:
    lo, hi = settings.prevalence
    return [float(p) for p in np.linspace(lo, hi, settings.sites)] if settings.sites > 1 \
        else [float((lo + hi) / 2)]


def _views(rng: np.random.Generator, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Each modality's view of a 0/1 label (or of a severity on that scale).

    The shared noise is drawn first and then one noise per modality, in this order: the
    binary cohort's bytes depend on it.
    """
    severity = labels.astype(np.float64) + SHARED_SEVERITY_SD * rng.standard_normal(len(labels))
    return {m: severity - 0.5 + sd * rng.standard_normal(len(labels))
            for m, sd in VIEW_NOISE_SD.items()}


def _case_mix_shift(prevalence: float, settings: SynthSettings) -> float:
    """Mean of a site's latent disease z for the continuous-latent kinds.

    The binary prevalence knobs are reused as case mix: a site with prevalence p has
    z ~ N(Phi^-1(p) - Phi^-1(p_holdout), 1), so the holdout is the standard reference
    (z ~ N(0, 1)) and a lower-prevalence site sees milder patients, as in binary.
    """
    def probit(p: float) -> float:
        return NormalDist().inv_cdf(min(max(p, 0.01), 0.99))

    return probit(prevalence) - probit(settings.holdout_prevalence)


def _outcome(rng: np.random.Generator, task: str, n: int, shift: float
             ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, object]]:
    """A continuous-latent task's outcome columns, severities and summary.

    Returns the records columns to insert (in order), the severity on the binary scale
    (label 0/1 plus noise) from which the views are drawn, and the site's outcome summary
    for ``cohort.json``. The latent z is drawn first, the outcome second.
    """
    z = shift + rng.standard_normal(n)
    severity = 0.5 + LATENT_SCALE * z
    summary: dict[str, object] = {"case_mix_shift": round(shift, 3)}
    if task == "multiclass":
        classes = np.searchsorted(np.asarray(MULTICLASS_CUTS),
                                  z + MULTICLASS_NOISE_SD * rng.standard_normal(n))
        counts = np.bincount(classes, minlength=len(MULTICLASS_CUTS) + 1)
        summary["class_fractions"] = {str(c): round(float(k) / n, 3)
                                      for c, k in enumerate(counts)}
        return {"label": classes.astype(str)}, severity, summary
    if task == "regression":
        value = (REGRESSION["intercept"] + REGRESSION["slope"] * z
                 + REGRESSION["noise_sd"] * rng.standard_normal(n)).round(2)
        summary |= {"label_mean": round(float(value.mean()), 3),
                    "label_sd": round(float(value.std()), 3)}
        return {"label": np.array([f"{v:.2f}" for v in value])}, severity, summary
    s = SURVIVAL
    lam = np.log(2.0) / s["median_days"] ** s["shape"]
    event_time = (-np.log(1.0 - rng.random(n)) / (lam * np.exp(s["beta"] * z))
                  ) ** (1.0 / s["shape"])
    followup = rng.uniform(s["followup_min"], s["followup_max"], n)
    dropout = rng.exponential(s["dropout_mean_days"], n)
    censor = np.minimum(followup, dropout)
    event = (event_time <= censor).astype(np.int64)
    time = np.maximum(np.minimum(event_time, censor).round(1), 0.1)  # always > 0
    summary |= {"event_rate": round(float(event.mean()), 3),
                "censored": round(1.0 - float(event.mean()), 3),
                "median_time_days": round(float(np.median(time)), 1)}
    return ({"time": np.array([f"{t:.1f}" for t in time]), "event": event.astype(str)},
            severity, summary)


def _records(rng: np.random.Generator, view: np.ndarray) -> pd.DataFrame:
    n = len(view)
    cols: dict[str, list[str]] = {}
    for name, mean, sd, load, lo, hi, dec, miss in NUMERIC_VARS:
        z = load * view + np.sqrt(max(0.0, 1 - load**2)) * rng.standard_normal(n)
        vals = np.clip(mean + sd * z, lo, hi).round(dec)
        text = [f"{v:.{dec}f}" for v in vals]
        gone = rng.random(n) < miss
        cols[name] = ["" if g else t for t, g in zip(text, gone, strict=True)]
    for name, cats, load in CATEGORICAL_VARS:
        z = load * view + rng.standard_normal(n)
        cuts = np.quantile(rng.standard_normal(4000), np.linspace(0, 1, len(cats) + 1)[1:-1])
        idx = np.searchsorted(cuts, z)
        cols[name] = [cats[i] for i in idx]
    return pd.DataFrame(cols)


def _disk(size: int, cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / rx
    v = (-(xx - cx) * s + (yy - cy) * c) / ry
    return np.exp(-((u**2 + v**2) ** 1.5))  # soft-edged, slightly sharper than Gaussian


def _image(rng: np.random.Generator, view: float, size: int, scanner: dict[str, float]
           ) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    tissue = gaussian_filter(rng.standard_normal((size, size)), sigma=3.0)
    img = 95.0 + 10.0 * tissue / (tissue.std() + 1e-8)
    for _ in range(1 + rng.poisson(1.5)):  # benign structures everyone has
        r = rng.uniform(1.2, 2.5)
        cy, cx = rng.uniform(size // 8, size - size // 8, 2)
        img += rng.uniform(10, 30) * _disk(size, cy, cx, r, r, 0.0)
    burden = float(np.clip(view + 0.7, 0.0, 3.5))  # disease-driven lesion burden
    if burden > 0.05:
        ry = 2.5 + 2.0 * burden
        rx = ry * rng.uniform(0.6, 1.0)
        cy, cx = rng.uniform(size // 4, size - size // 4, 2)
        img += (30 + 30 * burden) * _disk(size, cy, cx, ry, rx, rng.uniform(0, np.pi))
    norm = np.clip(img / 255.0, 0, 1) ** scanner["gamma"]
    out = scanner["gain"] * norm * 255.0 + scanner["offset"]
    out += scanner["noise"] * rng.standard_normal((size, size))
    return np.clip(out, 0, 255).astype(np.uint8)


def _genomics(rng: np.random.Generator, bio: _Biology, view: np.ndarray,
              batch: np.ndarray) -> np.ndarray:
    n, g = len(view), len(bio.gene_names)
    z = rng.standard_normal((n, g))
    for k, idx in enumerate(bio.modules):
        if k < DISEASE_MODULES:
            factor = 0.95 * view + 0.3 * rng.standard_normal(n)
        else:
            factor = rng.standard_normal(n)  # co-regulated, unrelated to disease
        z[:, idx] = 0.85 * factor[:, None] + 0.5 * z[:, idx]
    return bio.gene_mean + bio.gene_sd * (z + batch)


def _write_folder(folder: Path, name: str, rng: np.random.Generator, n: int, prevalence: float,
                  settings: SynthSettings, bio: _Biology, id_prefix: str,
                  absent: set[str]) -> dict[str, object]:
    folder.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, object]
    if settings.task == "binary":  # label first, severity from it: the original draws
        labels = (rng.random(n) < prevalence).astype(np.int64)
        views = _views(rng, labels)
        columns: dict[str, np.ndarray] = {"label": labels.astype(str)}
        outcome = {"prevalence": round(prevalence, 3),
                   "observed_prevalence": round(float(labels.mean()), 3)}
    else:
        columns, severity, outcome = _outcome(rng, settings.task, n,
                                              _case_mix_shift(prevalence, settings))
        views = _views(rng, severity)
    ids = [f"{id_prefix}{i + 1:05d}" for i in range(n)]
    records = _records(rng, views["records"])
    for col, values in reversed(columns.items()):
        records.insert(0, col, values)
    records.insert(0, "patient_id", ids)
    records.to_csv(folder / "records.csv", index=False)
    scanner = {"gain": float(rng.uniform(0.75, 1.25)), "offset": float(rng.uniform(-25, 25)),
               "gamma": float(rng.uniform(0.8, 1.25)), "noise": float(rng.uniform(2, 8))}
    has_images = "images" not in absent
    has_genomics = "genomics" not in absent
    if has_images:
        from PIL import Image

        (folder / "images").mkdir(exist_ok=True)
        keep = rng.random(n) >= settings.patient_missing.get("images", 0.0)
        for i in range(n):
            img = _image(rng, float(views["images"][i]), settings.image_size, scanner)
            if keep[i]:
                Image.fromarray(img, mode="L").save(folder / "images" / f"{ids[i]}.png")
    if has_genomics:
        batch = 0.15 * rng.standard_normal(len(bio.gene_names))
        expr = _genomics(rng, bio, views["genomics"], batch)
        keep = rng.random(n) >= settings.patient_missing.get("genomics", 0.0)
        frame = pd.DataFrame(expr[keep].round(3), columns=bio.gene_names)
        frame.insert(0, "patient_id", [p for p, k in zip(ids, keep, strict=True) if k])
        frame.to_csv(folder / "genomics.csv", index=False)
    kind = {"binary": "classification", "multiclass": "classification"}.get(
        settings.task, settings.task)
    classes = {"binary": ("0", "1"),
               "multiclass": tuple(str(c) for c in range(len(MULTICLASS_CUTS) + 1))
               }.get(settings.task, ())
    spec = SiteSpec(name=name, label="" if kind == "survival" else "label", classes=classes,
                    modalities={"records": True, "images": has_images,
                                "genomics": has_genomics},
                    image_size=(settings.image_size, settings.image_size) if has_images
                    else None, synthetic=True, kind=kind,
                    time="time" if kind == "survival" else "",
                    event="event" if kind == "survival" else "",
                    unit={"survival": "days", "regression": "a.u."}.get(kind, ""))
    write_site_spec(folder / "site.toml", spec,
                    description="SYNTHETIC data generated by `mmfed data synth` - "
                                "not real patients")
    return {"name": name, "patients": n, **outcome, "scanner": scanner,
            "modalities": sorted(m for m, v in spec.modalities.items() if v)}


def _task_description(task: str) -> dict[str, object]:
    """How the outcome was generated, so users of the cohort know what is learnable."""
    if task == "binary":
        return {}
    common = {"latent": "z ~ N(case_mix_shift, 1); views see 0.5 + "
                        f"{LATENT_SCALE} * z plus noise"}
    if task == "multiclass":
        return {"outcome": common | {"classes": [str(c) for c in
                                                 range(len(MULTICLASS_CUTS) + 1)],
                                     "rule": "ordered subtype = bin of z + noise",
                                     "cuts": list(MULTICLASS_CUTS),
                                     "noise_sd": MULTICLASS_NOISE_SD}}
    if task == "regression":
        return {"outcome": common | {"rule": "label = intercept + slope * z + noise",
                                     **REGRESSION}}
    return {"outcome": common | {"rule": "Weibull proportional hazards, hazard ratio "
                                         "exp(beta * z) per unit z; censoring independent",
                                 **SURVIVAL}}


def synthesize(out: Path | str, settings: SynthSettings) -> dict[str, object]:
    """Write ``out/site-1 … site-N`` and ``out/holdout``; returns the cohort description."""
    out = Path(out)
    if settings.task not in TASKS:
        raise UsageError(f"unknown synth task {settings.task!r} (choose one of "
                         f"{', '.join(TASKS)})")
    if settings.sites < 1 or settings.patients_per_site < 20 or settings.holdout < 20:
        raise UsageError("synth needs at least 1 site, 20 patients per site and 20 holdout "
                         "patients")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: exists and is not empty (choose a new --out)")
    out.mkdir(parents=True, exist_ok=True)
    bio = _biology(settings)
    sites = []
    for k, (n, prev) in enumerate(zip(_site_sizes(settings), _prevalences(settings),
                                      strict=True)):
        name = f"site-{k + 1}"
        rng = np.random.default_rng([settings.seed, k + 1])
        sites.append(_write_folder(out / name, name, rng, n, prev, settings, bio,
                                   f"{k + 1:02d}", settings.site_missing.get(name, set())))
    rng = np.random.default_rng([settings.seed, 0])
    holdout = _write_folder(out / "holdout", "holdout", rng, settings.holdout,
                            settings.holdout_prevalence, settings, bio, "99", set())
    cohort: dict[str, object] = {
        "synthetic": True,
        "note": "SYNTHETIC cohort generated by mmfed; no real patient is represented.",
        "generator_version": GENERATOR_VERSION,
        "seed": settings.seed,
        "task": settings.task,
        **_task_description(settings.task),
        "sites": sites,
        "holdout": holdout,
        "disease_module_genes": sorted(bio.gene_names[i] for k in range(DISEASE_MODULES)
                                       for i in bio.modules[k]),
        "other_module_genes": sorted(bio.gene_names[i] for k in range(DISEASE_MODULES,
                                                                      len(bio.modules))
                                     for i in bio.modules[k]),
        "informative_records": sorted([v[0] for v in NUMERIC_VARS if v[3] != 0]
                                      + [v[0] for v in CATEGORICAL_VARS if v[2] != 0]),
    }
    (out / "cohort.json").write_text(json.dumps(cohort, indent=2) + "\n", encoding="utf-8")
    (out / "README.txt").write_text(
        "SYNTHETIC DATA. Generated by `mmfed data synth` (seed "
        f"{settings.seed}). No real patient is represented.\n", encoding="utf-8")
    return cohort

"""From a site's raw arrays to model-ready tensors under one federation-wide schema.

Sites must feed the shared model the same columns in the same order and on the same
scale, but must not pool their rows to compute that scale. A site states only its
column names in the clear (``ColumnNames``); the server merges them into a
``StatsLayout`` and each site then contributes, per column, its count and the means of
its clipped, scaled values and of their squares (``column_moments``). Under secure
aggregation those are summed masked, like model updates, so the server learns the
federation's per-column totals and never one site's; ``schema_from_moments`` turns the
totals into a ``FeatureSchema``. Categorical values are never shared at all: they are
hashed into a fixed number of buckets, so no site's vocabulary (which can identify
rare patients) ever leaves it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mmfed.ml.task import (
    HISTOGRAM_BINS,
    Task,
    outcome_values,
    outcome_width,
    task_from_moments,
)

if TYPE_CHECKING:  # the reader pulls in pandas; secure-aggregation stages never read data
    from mmfed.data.reader import SiteData

HASH_BUCKETS = 32  # index 0 means "missing"


@dataclass
class FeatureSchema:
    """What every site's encoder inputs look like; the model is built from it."""

    classes: list[str]
    numeric: list[str]
    numeric_mean: list[float]
    numeric_std: list[float]
    categorical: list[str]
    genes: list[str]
    gene_mean: list[float]
    gene_std: list[float]
    image_size: tuple[int, int]
    hash_buckets: int = HASH_BUCKETS
    outcome: dict[str, Any] = field(default_factory=dict)  # Task.to_config(); {} = classify

    @property
    def task(self) -> Task:
        from mmfed.errors import DataError

        try:
            return Task.from_config(self.outcome, self.classes)
        except (TypeError, ValueError) as exc:
            raise DataError(f"feature schema: malformed task ({exc})") from None

    def to_config(self) -> dict[str, Any]:
        out = {"classes": self.classes, "numeric": self.numeric,
               "numeric_mean": self.numeric_mean, "numeric_std": self.numeric_std,
               "categorical": self.categorical, "genes": self.genes,
               "gene_mean": self.gene_mean, "gene_std": self.gene_std,
               "image_size": list(self.image_size), "hash_buckets": self.hash_buckets}
        # Flat keys (a Flower ConfigRecord holds no nested tables); a classification
        # schema keeps its earlier form, and so its hash.
        out.update({f"task_{k}": v for k, v in self.outcome.items()})
        return out

    @staticmethod
    def from_config(cfg: dict[str, Any]) -> FeatureSchema:
        size = [int(s) for s in cfg["image_size"]]
        return FeatureSchema(
            classes=[str(c) for c in cfg["classes"]],
            numeric=[str(c) for c in cfg.get("numeric", [])],
            numeric_mean=[float(v) for v in cfg.get("numeric_mean", [])],
            numeric_std=[float(v) for v in cfg.get("numeric_std", [])],
            categorical=[str(c) for c in cfg.get("categorical", [])],
            genes=[str(g) for g in cfg.get("genes", [])],
            gene_mean=[float(v) for v in cfg.get("gene_mean", [])],
            gene_std=[float(v) for v in cfg.get("gene_std", [])],
            image_size=(size[0], size[1]), hash_buckets=int(cfg.get("hash_buckets",
                                                                    HASH_BUCKETS)),
            outcome={k[len("task_"):]: v for k, v in cfg.items() if k.startswith("task_")})


# Clipping scale of a column the server's holdout cannot suggest one for: wide enough
# for clinical values in their usual units; its mean and spread are then known coarsely.
DEFAULT_SCALE = 1e4


@dataclass
class ColumnNames:
    """What a site states in the clear for the schema: names, never numbers."""

    classes: list[str]
    numeric: list[str]
    categorical: list[str]
    genes: list[str]
    image_size: tuple[int, int] | None
    kind: str = "classification"
    unit: str = ""

    def to_config(self) -> dict[str, Any]:
        return {"classes": self.classes, "numeric": self.numeric,
                "categorical": self.categorical, "genes": self.genes,
                "image_size": list(self.image_size or (0, 0)), "kind": self.kind,
                "unit": self.unit}

    @staticmethod
    def from_config(cfg: dict[str, Any]) -> ColumnNames:
        size = [int(s) for s in cfg.get("image_size", [0, 0])]
        return ColumnNames(classes=[str(c) for c in cfg["classes"]],
                           numeric=[str(c) for c in cfg.get("numeric", [])],
                           categorical=[str(c) for c in cfg.get("categorical", [])],
                           genes=[str(g) for g in cfg.get("genes", [])],
                           image_size=(size[0], size[1]) if size[0] > 0 else None,
                           kind=str(cfg.get("kind", "classification")),
                           unit=str(cfg.get("unit", "")))


def column_names(site: SiteData) -> ColumnNames:
    size = site.spec.image_size if site.spec.has("images") else None
    genes = list(site.genes) if site.genomics is not None else []
    return ColumnNames(classes=list(site.spec.classes), numeric=list(site.numeric_cols),
                       categorical=list(site.categorical_cols), genes=genes,
                       image_size=size, kind=site.spec.kind, unit=site.spec.unit)


@dataclass
class StatsLayout:
    """The federation's columns, in schema order, each with a centre and a scale.

    Every site lays its moments out in this order, so the vectors add up column by
    column. A site contributes ``(x - centre) / scale``, clipped to [-1, 1]: the scale
    bounds what one patient can add to a column's moments, and because the fixed-point
    encoding of secure aggregation is exact only to a fraction of the scale, centring
    near the mean keeps the spread (the mean square minus the squared mean) from being
    lost to cancellation in a column such as body temperature, whose values are large
    next to their spread.
    """

    classes: list[str]
    numeric: list[str]
    categorical: list[str]
    genes: list[str]
    image_size: tuple[int, int]
    scales: list[float]  # numeric columns, then genes, then the outcome's columns
    centres: list[float] = field(default_factory=list)  # same order; empty: all 0
    kind: str = "classification"
    unit: str = ""
    edges: list[float] = field(default_factory=list)  # survival: event-time histogram

    def __post_init__(self) -> None:
        if not self.centres:
            self.centres = [0.0] * len(self.scales)

    @property
    def outcome_columns(self) -> int:
        """Statistics columns after the features that agree the task: the regression
        target's moments, or the event-time histogram (see :mod:`mmfed.ml.task`)."""
        return outcome_width(self.kind, self.edges)

    @property
    def columns(self) -> int:
        return len(self.numeric) + len(self.genes) + self.outcome_columns

    def to_config(self) -> dict[str, Any]:
        out = {"classes": self.classes, "numeric": self.numeric,
               "categorical": self.categorical, "genes": self.genes,
               "image_size": list(self.image_size), "scales": self.scales,
               "centres": self.centres}
        if self.kind != "classification":
            out.update(kind=self.kind, unit=self.unit, edges=self.edges)
        return out

    @staticmethod
    def from_config(cfg: dict[str, Any]) -> StatsLayout:
        from mmfed.errors import DataError

        size = [int(s) for s in cfg["image_size"]]
        layout = StatsLayout(classes=[str(c) for c in cfg["classes"]],
                             numeric=[str(c) for c in cfg.get("numeric", [])],
                             categorical=[str(c) for c in cfg.get("categorical", [])],
                             genes=[str(g) for g in cfg.get("genes", [])],
                             image_size=(size[0], size[1]),
                             scales=[float(s) for s in cfg.get("scales", [])],
                             centres=[float(c) for c in cfg.get("centres", [])],
                             kind=str(cfg.get("kind", "classification")),
                             unit=str(cfg.get("unit", "")),
                             edges=[float(e) for e in cfg.get("edges", [])])
        if layout.kind not in ("classification", "regression", "survival"):
            raise DataError(f"statistics layout: unknown task kind {layout.kind!r}")
        if layout.kind == "survival" and (len(layout.edges) < 3 or not all(
                np.isfinite(e) and e > 0 for e in layout.edges)
                or bool(np.any(np.diff(layout.edges) <= 0))):
            raise DataError("statistics layout: survival needs increasing positive "
                            "histogram edges")
        if len(layout.edges) > 4 * HISTOGRAM_BINS + 1:  # a request, not a data set
            raise DataError(f"statistics layout: {len(layout.edges) - 1} histogram bins "
                            f"asked, at most {4 * HISTOGRAM_BINS}")
        if len(layout.scales) != layout.columns or not all(
                np.isfinite(s) and s > 0 for s in layout.scales):
            raise DataError("statistics layout: one positive scale per column is needed")
        if len(layout.centres) != layout.columns or not all(
                np.isfinite(c) for c in layout.centres):
            raise DataError("statistics layout: one finite centre per column is needed")
        return layout

    def with_scales(self, references: list[SiteData]) -> StatsLayout:
        """Centres and scales from reference data (the server's holdout): the mean, and
        twice the largest distance from it, so that nearly no site value is clipped. A
        column no reference has is centred on 0 with the largest gene scale (genes
        share one assay) or ``DEFAULT_SCALE``. A survival task's histogram edges span
        the references' event times; its indicator columns need no scale."""
        from mmfed.errors import DataError
        from mmfed.ml.task import histogram_edges

        for ref in references:
            if ref.spec.kind != self.kind:
                raise DataError(f"{ref.name}: its task is {ref.spec.kind}, the sites' is "
                                f"{self.kind} (task.kind in site.toml)")
        if self.kind == "survival":
            times = [r.targets for r in references if r.targets is not None]
            self.edges = histogram_edges(np.concatenate(times) if times else None)
            self.scales = self.scales[:len(self.numeric) + len(self.genes)]
            self.scales += [1.0] * self.outcome_columns
            self.centres = [0.0] * len(self.scales)
        columns: list[list[np.ndarray]] = [[] for _ in range(self.columns)]
        for ref in references:
            for j, values in enumerate(_column_values(ref, self)):
                if values is not None:
                    columns[j].append(values[np.isfinite(values)].astype(np.float64))
        centres, spans = [], []
        for parts in columns:
            seen = np.concatenate(parts) if parts else np.zeros(0)
            centre = float(seen.mean()) if seen.size else 0.0
            centres.append(centre)
            spans.append(float(np.abs(seen - centre).max()) if seen.size else 0.0)
        k = len(self.numeric)
        gene_spans = [s for s in spans[k:k + len(self.genes)] if s > 0]
        gene_default = 2.0 * max(gene_spans) if gene_spans else DEFAULT_SCALE
        g = k + len(self.genes)
        scales = [max(2.0 * s, 1e-6) if s > 0 else (gene_default if k <= j < g
                                                     else DEFAULT_SCALE)
                  for j, s in enumerate(spans)]
        if self.kind == "survival":  # indicators: centre 0, scale 1, whatever was seen
            scales[g:] = [1.0] * self.outcome_columns
            centres[g:] = [0.0] * self.outcome_columns
        return StatsLayout(self.classes, self.numeric, self.categorical, self.genes,
                           self.image_size, scales, centres, self.kind, self.unit,
                           list(self.edges))


def _column_values(site: SiteData, layout: StatsLayout) -> list[np.ndarray | None]:
    """The site's values for each layout column (None where it lacks the column);
    genes only of the patients who have genomics; then the outcome's columns."""
    from mmfed.errors import DataError

    if site.spec.kind != layout.kind:
        raise DataError(f"{site.name}: the federation's task is {layout.kind}, this site's "
                        f"is {site.spec.kind} (task.kind in site.toml)")
    col = {c: j for j, c in enumerate(site.numeric_cols)}
    out: list[np.ndarray | None] = [site.numeric[:, col[c]] if c in col else None
                                    for c in layout.numeric]
    if site.genomics is None:
        out += [None] * len(layout.genes)
    else:
        present = site.genomics[site.genomics_mask]
        gcol = {g: j for j, g in enumerate(site.genes)}
        out += [present[:, gcol[g]] if g in gcol else None for g in layout.genes]
    tail = outcome_values(layout.kind, site.labels, site.targets, layout.edges)
    return out + ([*tail] if tail else [None] * layout.outcome_columns)


def merge_names(names: list[ColumnNames], default_image_size: tuple[int, int] = (64, 64)
                ) -> StatsLayout:
    """The sites' columns merged: the union, sorted for a stable order.

    Sites must agree on the task's classes: a model cannot be averaged across label
    spaces. A column that is numeric at one site and categorical at another is treated
    as categorical everywhere (hashing accepts numbers as text). Scales start at
    ``DEFAULT_SCALE``; the server sets them with ``with_scales``.
    """
    from mmfed.errors import DataError

    classes = names[0].classes
    for other in names[1:]:
        if other.kind != names[0].kind:
            raise DataError(f"sites disagree on task.kind: {names[0].kind} vs {other.kind} "
                            "(every site of a federation has the same task)")
        if other.classes != classes:
            raise DataError(f"sites disagree on task.classes: {classes} vs {other.classes}")
        if other.unit != names[0].unit:
            raise DataError(f"sites disagree on task.unit: {names[0].unit!r} vs "
                            f"{other.unit!r} (times and values must be in one unit)")
    sizes = {n.image_size for n in names if n.image_size is not None}
    if len(sizes) > 1:
        raise DataError(f"sites disagree on images.size: {sorted(sizes)}")
    categorical = sorted({c for n in names for c in n.categorical})
    numeric = sorted({c for n in names for c in n.numeric} - set(categorical))
    genes = sorted({g for n in names for g in n.genes})
    from mmfed.ml.task import histogram_edges

    kind = names[0].kind
    edges = histogram_edges(None) if kind == "survival" else []
    layout = StatsLayout(classes=classes, numeric=numeric, categorical=categorical,
                         genes=genes, image_size=sizes.pop() if sizes else default_image_size,
                         scales=[], kind=kind, unit=names[0].unit, edges=edges)
    layout.scales = [DEFAULT_SCALE] * (len(numeric) + len(genes)) \
        + [1.0 if kind == "survival" else DEFAULT_SCALE] * layout.outcome_columns
    layout.centres = [0.0] * len(layout.scales)
    return layout


def column_moments(site: SiteData, layout: StatsLayout, count_cap: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(moments, counts): per column, the mean of the centred, scaled, clipped values
    and of their squares (interleaved, each in [-1, 1]), and how many patients have it.

    ``count_cap`` bounds the count a site contributes (secure aggregation encodes it
    as a weight of at most 1); a column the site lacks has count 0 and adds nothing.
    """
    moments = np.zeros(2 * layout.columns, dtype=np.float64)
    counts = np.zeros(layout.columns, dtype=np.int64)
    sources = _column_values(site, layout)
    for j, (values, scale, centre) in enumerate(zip(sources, layout.scales, layout.centres,
                                                    strict=True)):
        if values is None:
            continue
        v = values[np.isfinite(values)].astype(np.float64)
        if count_cap is not None and v.size > count_cap:
            v = v[:count_cap]
        if not v.size:
            continue
        z = np.clip((v - centre) / scale, -1.0, 1.0)
        moments[2 * j] = z.mean()
        moments[2 * j + 1] = (z * z).mean()
        counts[j] = v.size
    return moments, counts


def pool_moments(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Count-weighted means of several sites' moments, in the clear: what a secure sum
    computes without showing the parts (for pooled data and plaintext rounds)."""
    counts = np.sum([c for _, c in parts], axis=0).astype(np.float64)
    weighted = np.sum([m * np.repeat(c, 2) for m, c in parts], axis=0)
    moments = np.divide(weighted, np.repeat(counts, 2), out=np.zeros_like(weighted),
                        where=np.repeat(counts, 2) > 0)
    return moments, counts


def schema_from_moments(layout: StatsLayout, moments: np.ndarray, counts: np.ndarray
                        ) -> FeatureSchema:
    """The schema from the federation's pooled moments; a column nobody has is left
    unscaled (mean 0, std 1), and a constant one keeps std 1."""
    means, stds = [], []
    for j, (scale, centre) in enumerate(zip(layout.scales, layout.centres, strict=True)):
        m1, m2 = float(moments[2 * j]), float(moments[2 * j + 1])
        if counts[j] <= 0:
            means.append(0.0)
            stds.append(1.0)
            continue
        var = max(m2 - m1 * m1, 0.0) * scale * scale
        means.append(centre + m1 * scale)
        stds.append(float(np.sqrt(var)) if var > 1e-12 else 1.0)
    k = len(layout.numeric)
    g = k + len(layout.genes)
    task = task_from_moments(layout.kind, layout.classes, layout.unit, layout.edges,
                             means[g:], stds[g:], [int(c) for c in counts[g:]])
    return FeatureSchema(classes=layout.classes, numeric=layout.numeric,
                         numeric_mean=means[:k], numeric_std=stds[:k],
                         categorical=layout.categorical, genes=layout.genes,
                         gene_mean=means[k:g], gene_std=stds[k:g],
                         image_size=layout.image_size,
                         outcome={} if layout.kind == "classification" else task.to_config())


def pooled_schema(sites: list[SiteData]) -> FeatureSchema:
    """The schema of several sites' data held in one place (the centralized reference,
    tests): the same moments as a federation, scaled on the data itself."""
    layout = merge_names([column_names(s) for s in sites]).with_scales(sites)
    return schema_from_moments(layout, *pool_moments([column_moments(s, layout)
                                                      for s in sites]))


def _bucket(column: str, value: str | None, buckets: int) -> int:
    if value is None:
        return 0
    digest = hashlib.blake2b(f"{column}\x00{value}".encode(), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (buckets - 1)


@dataclass
class EncodedSite:
    """Model-ready arrays for one site; every array has one row per patient."""

    num: np.ndarray  # float32 (n, Kn): standardized, missing -> 0
    num_missing: np.ndarray  # float32 (n, Kn): 1 where the value was missing
    cat: np.ndarray  # int64 (n, Kc): hash bucket, 0 = missing
    image: np.ndarray  # float32 (n, 1, H, W): per-image standardized, zeros if absent
    genomics: np.ndarray  # float32 (n, G): standardized, missing -> 0
    mask: np.ndarray  # float32 (n, 3): records, images, genomics present
    labels: np.ndarray  # int64 (n,): class index; survival: the event (0/1)
    targets: np.ndarray | None = None  # float64 (n,): regression value / survival time

    def __post_init__(self) -> None:
        if self.targets is None:
            self.targets = np.zeros(len(self.labels), dtype=np.float64)

    @property
    def outcome(self) -> np.ndarray:
        """``targets`` for code that needs an array (it is always set after init)."""
        assert self.targets is not None
        return self.targets

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> EncodedSite:
        return EncodedSite(self.num[idx], self.num_missing[idx], self.cat[idx], self.image[idx],
                           self.genomics[idx], self.mask[idx], self.labels[idx],
                           self.outcome[idx])

    @staticmethod
    def concat(parts: list[EncodedSite]) -> EncodedSite:
        return EncodedSite(*(np.concatenate([getattr(p, f) for p in parts]) for f in (
            "num", "num_missing", "cat", "image", "genomics", "mask", "labels", "targets")))


def encode(site: SiteData, schema: FeatureSchema) -> EncodedSite:
    """Map one site onto the schema: absent columns count as missing, never as data.

    The schema's task must be the site's own: a site's labels mean nothing under
    another task or another order of classes, so encoding them is refused."""
    from mmfed.errors import DataError

    task = schema.task
    if task.kind != site.spec.kind:
        raise DataError(f"{site.name}: the federation's task is {task.kind}, this site's is "
                        f"{site.spec.kind} (task.kind in site.toml)")
    if task.kind == "classification" and list(site.spec.classes) != list(schema.classes):
        raise DataError(f"{site.name}: the federation's classes {schema.classes} are not "
                        f"this site's {list(site.spec.classes)} (task.classes in site.toml)")
    n = len(site)
    col = {c: j for j, c in enumerate(site.numeric_cols)}
    num = np.zeros((n, len(schema.numeric)), dtype=np.float32)
    miss = np.ones_like(num)
    for j, name in enumerate(schema.numeric):
        if name in col:
            raw = site.numeric[:, col[name]]
            ok = np.isfinite(raw)
            z = (raw - schema.numeric_mean[j]) / schema.numeric_std[j]
            num[ok, j] = np.clip(z[ok], -10, 10)
            miss[ok, j] = 0.0
    cat = np.zeros((n, len(schema.categorical)), dtype=np.int64)
    text_cols = dict(zip(site.categorical_cols, site.categorical, strict=True))
    for j, name in enumerate(schema.categorical):
        if name in text_cols:
            cat[:, j] = [_bucket(name, v, schema.hash_buckets) for v in text_cols[name]]
        elif name in col:  # numeric here, categorical elsewhere: hash its text form
            cat[:, j] = [_bucket(name, None if not np.isfinite(v) else f"{v:g}",
                                 schema.hash_buckets) for v in site.numeric[:, col[name]]]
    h, w = schema.image_size
    image = np.zeros((n, 1, h, w), dtype=np.float32)
    img_mask = np.zeros(n, dtype=bool)
    if site.images is not None and site.images.shape[2:] == (h, w):
        img_mask = site.image_mask.copy()
        present = site.images[img_mask]
        # Per-image standardization: removes each scanner's gain and offset.
        mu = present.mean(axis=(1, 2, 3), keepdims=True)
        sd = present.std(axis=(1, 2, 3), keepdims=True) + 1e-6
        image[img_mask] = (present - mu) / sd
    genomics = np.zeros((n, len(schema.genes)), dtype=np.float32)
    gen_mask = np.zeros(n, dtype=bool)
    if site.genomics is not None:
        gcol = {g: j for j, g in enumerate(site.genes)}
        gen_mask = site.genomics_mask.copy()
        for j, gene in enumerate(schema.genes):
            if gene in gcol:
                raw = site.genomics[:, gcol[gene]]
                ok = np.isfinite(raw) & gen_mask
                genomics[ok, j] = np.clip(
                    (raw[ok] - schema.gene_mean[j]) / schema.gene_std[j], -10, 10)
    mask = np.stack([np.ones(n, dtype=bool), img_mask, gen_mask], axis=1).astype(np.float32)
    targets = (site.targets.astype(np.float64) if site.targets is not None
               else np.zeros(n, dtype=np.float64))
    return EncodedSite(num, miss, cat, image, genomics, mask, site.labels.astype(np.int64),
                       targets)


def split_indices(ids: list[str], labels: np.ndarray, val_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split, stratified by label, keyed by patient id.

    Within each class the patients with the smallest keyed hashes go to validation, so
    the split is stable across reruns and small sites still get both classes there.
    """
    keys = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{pid}".encode(),
                                                    digest_size=8).digest(), "little")
                     for pid in ids], dtype=np.uint64)
    val = np.zeros(len(ids), dtype=bool)
    if val_fraction > 0:
        for cls in np.unique(labels):
            members = np.flatnonzero(labels == cls)
            take = round(val_fraction * len(members))
            if take >= len(members):
                take = len(members) - 1  # keep at least one for training
            val[members[np.argsort(keys[members], kind="stable")[:take]]] = True
    return np.flatnonzero(~val), np.flatnonzero(val)

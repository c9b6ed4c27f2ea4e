"""From a site's raw arrays to model-ready tensors under one federation-wide schema.

Sites must feed the shared model the same columns in the same order and on the same
scale, but must not pool their rows to compute that scale. So each site reports only
column names and per-column sufficient statistics (count, sum, sum of squares); the
server merges them into a ``FeatureSchema``. Categorical values are never shared at
all: they are hashed into a fixed number of buckets, so no site's vocabulary (which
can identify rare patients) ever leaves it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the reader pulls in pandas; secure-aggregation stages never read data
    from mmfed.data.reader import SiteData

HASH_BUCKETS = 32  # index 0 means "missing"


@dataclass
class LocalStats:
    """Per-column sufficient statistics of one site (no rows, no category values)."""

    classes: list[str]
    numeric: dict[str, tuple[float, float, float]]  # col -> (n, sum, sumsq)
    categorical: list[str]
    genes: dict[str, tuple[float, float, float]]
    image_size: tuple[int, int] | None

    def to_config(self) -> dict[str, Any]:
        """Flatten to lists of scalars (Flower ConfigRecord friendly)."""
        def flat(d: dict[str, tuple[float, float, float]], p: str) -> dict[str, Any]:
            names = list(d)
            return {f"{p}.names": names,
                    f"{p}.n": [d[k][0] for k in names],
                    f"{p}.sum": [d[k][1] for k in names],
                    f"{p}.sumsq": [d[k][2] for k in names]}
        out: dict[str, Any] = {"classes": self.classes, "categorical": self.categorical,
                               "image_size": list(self.image_size or (0, 0))}
        out.update(flat(self.numeric, "numeric"))
        out.update(flat(self.genes, "genes"))
        return out

    @staticmethod
    def from_config(cfg: dict[str, Any]) -> LocalStats:
        def unflat(p: str) -> dict[str, tuple[float, float, float]]:
            names = list(cfg.get(f"{p}.names", []))
            return {k: (float(a), float(b), float(c)) for k, a, b, c in zip(
                names, cfg[f"{p}.n"], cfg[f"{p}.sum"], cfg[f"{p}.sumsq"], strict=True)}
        size = [int(s) for s in cfg.get("image_size", [0, 0])]
        return LocalStats(classes=[str(c) for c in cfg["classes"]], numeric=unflat("numeric"),
                          categorical=[str(c) for c in cfg.get("categorical", [])],
                          genes=unflat("genes"),
                          image_size=(size[0], size[1]) if size[0] > 0 else None)


def _col_stats(values: np.ndarray) -> tuple[float, float, float]:
    v = values[np.isfinite(values)].astype(np.float64)
    return float(v.size), float(v.sum()), float((v**2).sum())


def local_stats(site: SiteData) -> LocalStats:
    numeric = {c: _col_stats(site.numeric[:, j]) for j, c in enumerate(site.numeric_cols)}
    genes: dict[str, tuple[float, float, float]] = {}
    if site.genomics is not None:
        present = site.genomics[site.genomics_mask]
        genes = {g: _col_stats(present[:, j]) for j, g in enumerate(site.genes)}
    size = site.spec.image_size if site.spec.has("images") else None
    return LocalStats(classes=list(site.spec.classes), numeric=numeric,
                      categorical=list(site.categorical_cols), genes=genes, image_size=size)


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

    def to_config(self) -> dict[str, Any]:
        return {"classes": self.classes, "numeric": self.numeric,
                "numeric_mean": self.numeric_mean, "numeric_std": self.numeric_std,
                "categorical": self.categorical, "genes": self.genes,
                "gene_mean": self.gene_mean, "gene_std": self.gene_std,
                "image_size": list(self.image_size), "hash_buckets": self.hash_buckets}

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
                                                                    HASH_BUCKETS)))


def _merge(parts: list[dict[str, tuple[float, float, float]]]) -> tuple[list[str], list[float],
                                                                        list[float]]:
    totals: dict[str, list[float]] = {}
    for part in parts:
        for name, (n, s, ss) in part.items():
            t = totals.setdefault(name, [0.0, 0.0, 0.0])
            t[0] += n
            t[1] += s
            t[2] += ss
    names = sorted(totals)
    means, stds = [], []
    for name in names:
        n, s, ss = totals[name]
        mean = s / n if n else 0.0
        var = max(ss / n - mean**2, 0.0) if n else 1.0
        means.append(mean)
        stds.append(float(np.sqrt(var)) if var > 1e-12 else 1.0)
    return names, means, stds


def merge_stats(stats: list[LocalStats], default_image_size: tuple[int, int] = (64, 64)
                ) -> FeatureSchema:
    """Combine the sites' statistics; columns are the union, sorted for a stable order.

    Sites must agree on the task's classes: a model cannot be averaged across label
    spaces. A column that is numeric at one site and categorical at another is treated
    as categorical everywhere (hashing accepts numbers as text).
    """
    from mmfed.errors import DataError

    classes = stats[0].classes
    for st in stats[1:]:
        if st.classes != classes:
            raise DataError(f"sites disagree on task.classes: {classes} vs {st.classes}")
    sizes = {st.image_size for st in stats if st.image_size is not None}
    if len(sizes) > 1:
        raise DataError(f"sites disagree on images.size: {sorted(sizes)}")
    categorical = sorted({c for st in stats for c in st.categorical})
    numeric, nmean, nstd = _merge([{k: v for k, v in st.numeric.items() if k not in categorical}
                                   for st in stats])
    genes, gmean, gstd = _merge([st.genes for st in stats])
    return FeatureSchema(classes=classes, numeric=numeric, numeric_mean=nmean, numeric_std=nstd,
                         categorical=categorical, genes=genes, gene_mean=gmean, gene_std=gstd,
                         image_size=sizes.pop() if sizes else default_image_size)


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
    labels: np.ndarray  # int64 (n,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> EncodedSite:
        return EncodedSite(self.num[idx], self.num_missing[idx], self.cat[idx], self.image[idx],
                           self.genomics[idx], self.mask[idx], self.labels[idx])

    @staticmethod
    def concat(parts: list[EncodedSite]) -> EncodedSite:
        return EncodedSite(*(np.concatenate([getattr(p, f) for p in parts]) for f in (
            "num", "num_missing", "cat", "image", "genomics", "mask", "labels")))


def encode(site: SiteData, schema: FeatureSchema) -> EncodedSite:
    """Map one site onto the schema: absent columns count as missing, never as data."""
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
    return EncodedSite(num, miss, cat, image, genomics, mask, site.labels.astype(np.int64))


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

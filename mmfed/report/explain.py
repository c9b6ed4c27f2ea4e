"""Post-hoc explanations of a finished run's final model on the server's holdout.

A federated model is trained on data nobody can look at, so the holdout is the one
place where the federation can check *why* the model predicts what it does: which
modality carries the decision, which clinical variables and genes it relies on, and
which image regions move its output. ``explain_run`` answers those four questions and
writes ``RUN/explain/explanations.json`` plus figures next to it.

Everything here is model-agnostic perturbation (mask a modality, permute a column,
occlude a patch) measured in holdout AUROC (the run's headline metric), log-loss, or
positive-class probability, so the numbers need no attribution library to interpret.
To make 2,000-gene permutation importance take seconds rather than minutes, the
embeddings of the modalities that a perturbation does not touch are computed once
and only the perturbed encoder, the fusion and the head are re-run; for the genomic
encoder, whose first layer is linear, permuting one gene is an exact rank-one update of
that layer's output, so all genes are evaluated in batches without re-reading the
2,000-wide input.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmfed.errors import DataError, UsageError
from mmfed.ml.features import EncodedSite, FeatureSchema
from mmfed.ml.model import MODALITY_NAMES, MultimodalNet
from mmfed.ml.process import limit_threads
from mmfed.run.saved_model import holdout_folder, load_saved_model

EXPLAIN_DIR = "explain"
# Above this many genes, permuting every gene would dominate the run time, so genes are
# first ranked by |gradient x input| and only a shortlist (plus a random control sample,
# which keeps the shortlist's scores interpretable) is permuted.
GENE_SCREEN_ABOVE = 5000
# How ranked lists are ordered: by AUROC drop, or by log-loss (cross-entropy) increase.
RANK_METRICS = ("auroc", "loss")
SCREEN_TOP = 200
SCREEN_RANDOM = 50
OCCLUSION_PATCH = 8
OCCLUSION_STRIDE = 4
_GENE_CHUNK = 128  # genes per batched evaluation: bounds memory at ~chunk x n x hidden


@dataclass
class _Holdout:
    """The holdout as tensors, plus the per-modality embeddings that stay fixed."""

    num: torch.Tensor
    num_missing: torch.Tensor
    cat: torch.Tensor
    image: torch.Tensor
    genomics: torch.Tensor
    mask: torch.Tensor
    labels: np.ndarray
    emb_records: torch.Tensor
    emb_images: torch.Tensor
    emb_genomics: torch.Tensor


# --------------------------------------------------------------------------- loading


@torch.no_grad()
def _prepare(model: MultimodalNet, enc: EncodedSite) -> _Holdout:
    t = {f: torch.from_numpy(getattr(enc, f)) for f in
         ("num", "num_missing", "cat", "image", "genomics", "mask")}
    return _Holdout(t["num"], t["num_missing"], t["cat"], t["image"], t["genomics"], t["mask"],
                    enc.labels, model.records(t["num"], t["num_missing"], t["cat"]),
                    model.images(t["image"]), model.genomics(t["genomics"]))


# --------------------------------------------------------------------------- scoring


def _head_probs(model: MultimodalNet, er: torch.Tensor, ei: torch.Tensor, eg: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """Class probabilities from embeddings with any leading batch shape (..., n, d) ->
    (..., n, C), so that a perturbation re-runs only the encoder it touched.

    The fusion and head are the model's own (``MultimodalNet.fused_logits``); only the
    broadcasting of a batch of perturbed embedding sets is done here.
    """
    shape = torch.broadcast_shapes(er.shape, ei.shape, eg.shape)
    emb = torch.stack([er.expand(shape), ei.expand(shape), eg.expand(shape)], dim=-2)
    m = mask.expand(*shape[:-1], mask.shape[-1])
    logits = model.fused_logits(emb.reshape(-1, 3, shape[-1]), m.reshape(-1, m.shape[-1]))
    return torch.softmax(logits, dim=-1).reshape(*shape[:-1], -1)


def _binary_auroc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Rank-based (Mann-Whitney) AUROC over the last axis, ties averaged; batched."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    ranks = rankdata(scores, axis=-1)
    return (ranks[..., positive].sum(axis=-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auroc(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Holdout AUROC exactly as ``mmfed.ml.metrics`` defines it, for a batch of predictions.

    ``probs`` is (..., n, C). Binary: AUROC of class 1; more classes: macro one-vs-rest,
    averaged over the classes present. Batched because permutation importance scores
    thousands of prediction sets and sklearn's per-call overhead would dominate.
    """
    n_classes = probs.shape[-1]
    if n_classes == 2:
        return _binary_auroc(probs[..., 1], labels == 1)
    present = [c for c in range(n_classes) if 0 < (labels == c).sum() < len(labels)]
    return np.mean([_binary_auroc(probs[..., c], labels == c) for c in present], axis=0)


def _score(model: MultimodalNet, h: _Holdout, er: torch.Tensor | None = None,
           ei: torch.Tensor | None = None, eg: torch.Tensor | None = None,
           mask: torch.Tensor | None = None) -> np.ndarray:
    """(..., 2): AUROC and minus the mean cross-entropy, for any batch of perturbed inputs.

    Both are "higher is better", so ``base - score`` is the AUROC drop and the
    cross-entropy (log-loss) increase. The second exists because AUROC only moves when a
    perturbation swaps the order of two patients: one gene among 2,000 rarely does, so
    its AUROC drop is mostly permutation noise, while the log-loss feels every change of
    every probability and resolves single-gene effects with a few repeats.
    """
    probs = _head_probs(model, h.emb_records if er is None else er,
                        h.emb_images if ei is None else ei,
                        h.emb_genomics if eg is None else eg, h.mask if mask is None else mask)
    labels = torch.from_numpy(h.labels).expand(*probs.shape[:-1])
    loglik = torch.log(probs.clamp_min(1e-12)).gather(-1, labels[..., None]).squeeze(-1)
    return np.stack([auroc(probs.numpy(), h.labels), loglik.mean(-1).numpy()], axis=-1)


# --------------------------------------------------------------------------- modalities


@torch.no_grad()
def _modality_contributions(model: MultimodalNet, h: _Holdout, used: tuple[str, ...],
                            base: np.ndarray) -> dict[str, dict[str, float | None]]:
    """AUROC without each modality (its mask column zeroed) and with it alone."""
    out: dict[str, dict[str, float | None]] = {"drop": {}, "auroc_without": {},
                                                "auroc_alone": {}, "loss_increase": {}}
    for k, name in enumerate(MODALITY_NAMES):
        if name not in used:
            for key in out:
                out[key][name] = None
            continue
        without = h.mask.clone()
        without[:, k] = 0.0
        alone = torch.zeros_like(h.mask)
        alone[:, k] = h.mask[:, k]
        auc_without, loglik_without = (float(v) for v in _score(model, h, mask=without))
        out["drop"][name] = float(base[0]) - auc_without
        out["loss_increase"][name] = float(base[1]) - loglik_without
        out["auroc_without"][name] = auc_without
        out["auroc_alone"][name] = float(_score(model, h, mask=alone)[0])
    return out


# --------------------------------------------------------------------------- records


@torch.no_grad()
def _record_importance(model: MultimodalNet, h: _Holdout, schema: FeatureSchema,
                       rng: np.random.Generator, repeats: int, base: np.ndarray,
                       rank_by: str) -> list[dict[str, Any]]:
    """Permutation importance of every clinical variable, all variables in one batch.

    A numeric value is permuted together with its missing-indicator: permuting only the
    value would pair "missing" with a measured number, an input the model never saw.
    """
    n = len(h.labels)
    kn, kc = len(schema.numeric), len(schema.categorical)
    features = kn + kc
    if features == 0 or n < 2:
        return []
    drops = np.zeros((repeats, features, 2))
    for r in range(repeats):
        num = h.num.expand(features, -1, -1).clone()
        miss = h.num_missing.expand(features, -1, -1).clone()
        cat = h.cat.expand(features, -1, -1).clone()
        for f in range(features):
            perm = torch.from_numpy(rng.permutation(n))
            if f < kn:
                num[f, :, f] = h.num[perm, f]
                miss[f, :, f] = h.num_missing[perm, f]
            else:
                cat[f, :, f - kn] = h.cat[perm, f - kn]
        er = model.records(num.reshape(features * n, -1), miss.reshape(features * n, -1),
                           cat.reshape(features * n, -1)).reshape(features, n, -1)
        drops[r] = base - _score(model, h, er=er)
    names = [*schema.numeric, *schema.categorical]
    kinds = ["numeric"] * kn + ["categorical"] * kc
    return _ranked(names, drops, rank_by, kinds)


def _ranked(names: list[str], drops: np.ndarray, rank_by: str,
            kinds: list[str] | None = None) -> list[dict[str, Any]]:
    """Features sorted by the mean of ``rank_by`` over repeats (ties broken by name).

    ``drops`` is (repeats, features, 2): AUROC drop and log-loss increase. "importance"
    is always the AUROC drop (the run's headline metric); ``rank_by`` picks the order.
    """
    mean, sd = drops.mean(axis=0), drops.std(axis=0)
    key = mean[:, RANK_METRICS.index(rank_by)]
    order = sorted(range(len(names)), key=lambda j: (-key[j], names[j]))
    out = []
    for rank, j in enumerate(order, start=1):
        item: dict[str, Any] = {"rank": rank, "name": names[j],
                                "importance": float(mean[j, 0]), "std": float(sd[j, 0]),
                                "loss_increase": float(mean[j, 1]),
                                "loss_increase_std": float(sd[j, 1])}
        if kinds is not None:
            item["kind"] = kinds[j]
        out.append(item)
    return out


# --------------------------------------------------------------------------- genomics


def _split_first_linear(encoder: nn.Module) -> tuple[nn.Linear, nn.Module] | None:
    """(first linear layer, everything after it) when only dropout precedes it.

    Dropout is the identity in eval mode, so the encoder is ``rest(linear(x))`` and a
    one-column change of ``x`` is a rank-one change of ``linear(x)``. Any other layout
    returns None and the caller re-runs the whole encoder instead (slower, same result).
    """
    mlp = getattr(encoder, "mlp", None)
    if not isinstance(mlp, nn.Sequential) or getattr(encoder, "n_genes", 0) == 0:
        return None
    layers = list(mlp)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            return layer, nn.Sequential(*layers[i + 1:])
        if not isinstance(layer, nn.Dropout):
            return None
    return None


@torch.no_grad()
def _gene_permutation(model: MultimodalNet, h: _Holdout, genes: np.ndarray,
                      rng: np.random.Generator, repeats: int, base: np.ndarray,
                      rank_one: bool = True) -> np.ndarray:
    """(repeats, len(genes), 2) AUROC drops and log-loss increases, one gene permuted.

    Values are permuted among the patients who have genomics: the rest are masked out of
    the fusion, and swapping their placeholder zeros in would invent measurements.
    ``rank_one=False`` forces the generic whole-encoder path (tests compare the two).
    """
    present = np.flatnonzero(h.mask[:, 2].numpy() > 0.5)
    drops = np.zeros((repeats, len(genes), 2))
    if len(present) < 2 or len(genes) == 0:
        return drops
    split = _split_first_linear(model.genomics) if rank_one else None
    x = h.genomics
    rows = torch.from_numpy(present)
    pre = split[0](x) if split is not None else None
    for r in range(repeats):
        for start in range(0, len(genes), _GENE_CHUNK):
            chunk = genes[start:start + _GENE_CHUNK]
            cols = torch.from_numpy(chunk)
            perms = np.stack([rng.permutation(present) for _ in chunk])  # (B, P)
            permuted = x[torch.from_numpy(perms), cols[:, None]]  # (B, P)
            delta = torch.zeros(len(chunk), x.shape[0])
            delta[:, rows] = permuted - x[rows][:, cols].T
            if split is not None and pre is not None:
                linear, rest = split
                weight = linear.weight[:, cols].T  # (B, hidden)
                eg = rest(pre + delta[:, :, None] * weight[:, None, :])
            else:
                xs = x.expand(len(chunk), -1, -1).clone()
                xs[torch.arange(len(chunk)), :, cols] += delta
                eg = model.genomics(xs.reshape(-1, x.shape[1])).reshape(len(chunk),
                                                                         x.shape[0], -1)
            drops[r, start:start + len(chunk)] = base - _score(model, h, eg=eg)
    return drops


def _gene_saliency(model: MultimodalNet, h: _Holdout, target: torch.Tensor) -> np.ndarray:
    """Mean |gradient x input| of the target-class probability per gene (screening only)."""
    x = h.genomics.clone().requires_grad_(True)
    probs = _head_probs(model, h.emb_records, h.emb_images, model.genomics(x), h.mask)
    picked = probs.gather(1, target[:, None]).squeeze(1) * h.mask[:, 2]
    (grad,) = torch.autograd.grad(picked.sum(), x)
    present = h.mask[:, 2] > 0.5
    return (grad * x).detach()[present].abs().mean(dim=0).numpy()


def _gene_importance(model: MultimodalNet, h: _Holdout, schema: FeatureSchema,
                     rng: np.random.Generator, repeats: int, base: np.ndarray,
                     screen_above: int, target: torch.Tensor, rank_by: str
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    g = len(schema.genes)
    if g == 0:
        return [], {"genes_permuted": 0, "screened": False}
    if g <= screen_above:
        chosen = np.arange(g)
        method: dict[str, Any] = {"genes_permuted": g, "screened": False}
    else:
        saliency = _gene_saliency(model, h, target)
        order = np.argsort(-saliency, kind="stable")
        top = order[:SCREEN_TOP]
        rest = order[SCREEN_TOP:]
        control = rng.choice(rest, size=min(SCREEN_RANDOM, len(rest)), replace=False)
        chosen = np.sort(np.concatenate([top, control]))
        method = {"genes_permuted": len(chosen), "screened": True,
                  "screen": f"all {g} genes ranked by mean |gradient x input| of the "
                            f"target-class probability; the top {len(top)} plus a random "
                            f"control sample of {len(control)} others were permuted; "
                            "unlisted genes were not scored",
                  "control_genes": sorted(schema.genes[i] for i in control)}
    drops = _gene_permutation(model, h, chosen, rng, repeats, base)
    return _ranked([schema.genes[i] for i in chosen], drops, rank_by), method


# --------------------------------------------------------------------------- images


@torch.no_grad()
def _occlusion(model: MultimodalNet, h: _Holdout, i: int, target: int) -> tuple[np.ndarray,
                                                                                 float]:
    """Per-pixel mean drop in P(target) when an 8x8 patch covering it is set to gray.

    Images are standardized per image, so 0 is that image's mean intensity: "gray"
    removes local structure without adding a contrast the model would read as a lesion.
    """
    img = h.image[i]  # (1, H, W)
    _, hh, ww = img.shape
    p = OCCLUSION_PATCH
    ys = sorted({*range(0, max(hh - p, 0) + 1, OCCLUSION_STRIDE), max(hh - p, 0)})
    xs = sorted({*range(0, max(ww - p, 0) + 1, OCCLUSION_STRIDE), max(ww - p, 0)})
    batch = img.expand(len(ys) * len(xs), -1, -1, -1).clone()
    for k, (y, x) in enumerate((y, x) for y in ys for x in xs):
        batch[k, :, y:y + p, x:x + p] = 0.0
    ei = model.images(batch)
    probs = _head_probs(model, h.emb_records[i], ei, h.emb_genomics[i], h.mask[i])
    full = float(_head_probs(model, h.emb_records[i:i + 1], h.emb_images[i:i + 1],
                             h.emb_genomics[i:i + 1], h.mask[i:i + 1])[0, target])
    drop = full - probs[:, target].numpy()
    heat = np.zeros((hh, ww))
    count = np.zeros((hh, ww))
    for k, (y, x) in enumerate((y, x) for y in ys for x in xs):
        heat[y:y + p, x:x + p] += drop[k]
        count[y:y + p, x:x + p] += 1
    return heat / np.maximum(count, 1), full


def _pick_image_patients(h: _Holdout, image_probs: np.ndarray, target: np.ndarray, k: int
                         ) -> list[int]:
    """Patients whose image alone is the strongest evidence: positives, then negatives.

    Ranked by the model's target-class probability with the image as the only evidence,
    because the full model's most confident patients are mostly decided by records and
    genomics and their images need not show anything. The top true positives show what
    the model reads as disease; the clearest true negatives show it is not reacting to
    ordinary anatomy. Deterministic, so reruns compare.
    """
    with_image = np.flatnonzero(h.mask[:, 1].numpy() > 0.5)
    p_target = image_probs[np.arange(len(image_probs)), target]
    pos = [int(i) for i in with_image if h.labels[i] == 1]
    neg = [int(i) for i in with_image if h.labels[i] != 1]
    pos.sort(key=lambda i: (-p_target[i], i))
    neg.sort(key=lambda i: (p_target[i], i))
    want_pos = min(len(pos), (k + 1) // 2)
    chosen = pos[:want_pos] + neg[:k - want_pos]
    if len(chosen) < k:  # too few negatives: fill with further positives
        chosen += pos[want_pos:want_pos + k - len(chosen)]
    return chosen


# --------------------------------------------------------------------------- figures


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight", format="png")


def _image_figure(path: Path, img: np.ndarray, heat: np.ndarray, pid: str, label: str,
                  prob: float, class_name: str) -> None:
    # Figure without pyplot: no global backend switch, no state shared with callers.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 4.0))
    ax_img, ax_heat = fig.subplots(1, 2)
    ax_img.imshow(img, cmap="gray")
    ax_img.set_title(f"holdout image, patient {pid}")
    lim = float(np.abs(heat).max()) or 1e-6
    ax_heat.imshow(img, cmap="gray")
    shown = ax_heat.imshow(heat, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.6)
    ax_heat.set_title(f"occlusion map ({OCCLUSION_PATCH}x{OCCLUSION_PATCH} gray patch)")
    for ax in (ax_img, ax_heat):
        ax.set_xlabel("x (pixels)")
        ax.set_ylabel("y (pixels)")
    bar = fig.colorbar(shown, ax=ax_heat, fraction=0.046, pad=0.04)
    bar.set_label(f"drop in P({class_name}) when occluded")
    fig.suptitle(f"patient {pid}: label {label}, predicted P({class_name}) = {prob:.2f}")
    _save(fig, path)


def _modality_figure(path: Path, contrib: dict[str, float | None], base: float) -> None:
    from matplotlib.figure import Figure

    names = [m for m in MODALITY_NAMES if contrib.get(m) is not None]
    values = [float(contrib[m] or 0.0) for m in names]
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    ax.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868"][:len(names)])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("holdout AUROC drop when masked")
    ax.set_xlabel("modality")
    ax.set_title(f"Modality contribution (full-model AUROC {base:.3f})")
    for x, v in enumerate(values):
        ax.annotate(f"{v:.3f}", (x, v), ha="center", va="bottom" if v >= 0 else "top")
    _save(fig, path)


def _features_figure(path: Path, genes: list[dict[str, Any]], records: list[dict[str, Any]],
                     top: int, rank_by: str) -> None:
    from matplotlib.figure import Figure

    panels = [(p, title) for p, title in ((genes[:top], "Top genes"),
                                          (records[:top], "Top clinical features")) if p]
    fig = Figure(figsize=(6.0 * max(len(panels), 1), 0.32 * top + 1.6))
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (items, title) in zip(axes, panels, strict=False):
        names = [it["name"] for it in items][::-1]
        mean_key, sd_key, what = (("importance", "std", "AUROC drop") if rank_by == "auroc"
                                  else ("loss_increase", "loss_increase_std",
                                        "log-loss increase"))
        means = [it[mean_key] for it in items][::-1]
        sds = [it[sd_key] for it in items][::-1]
        ax.barh(names, means, xerr=sds, color="#4c72b0", ecolor="gray")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"holdout {what} when permuted (mean ± sd over repeats)")
        ax.set_title(title)
    if not panels:
        axes[0].set_title("no features to show")
    _save(fig, path)


# --------------------------------------------------------------------------- entry point


def explain_run(run: Path, *, seed: int = 0, repeats: int = 3, top: int = 15, images: int = 4,
                rank_by: str = "loss", data: Path | None = None,
                gene_screen_above: int = GENE_SCREEN_ABOVE) -> dict[str, Any]:
    """Explain a finished run's final model on the holdout; writes ``RUN/explain/``.

    ``rank_by`` orders the feature lists: "auroc" (mean AUROC drop, the run's headline
    metric) or "loss" (mean log-loss increase, far less noisy for single genes); every
    item carries both. ``data`` overrides the federation folder recorded in the run (for
    a moved run); ``gene_screen_above`` is the gene count above which genes are screened
    by gradient x input before permutation. Returns exactly what explanations.json
    holds. Deterministic given ``seed``: the permutations are the only randomness.
    """
    from mmfed.data.reader import load_site
    from mmfed.files import atomic_write_bytes
    from mmfed.ml.features import encode
    from mmfed.ml.training import restrict_modalities
    from mmfed.run.rundir import finite

    if repeats < 1 or top < 1 or images < 0:
        raise UsageError("explain: --repeats and --top must be >= 1 and --images >= 0")
    if rank_by not in RANK_METRICS:
        raise UsageError(f"explain: --rank-by must be one of {', '.join(RANK_METRICS)}")
    started = time.perf_counter()
    run = Path(run)
    saved = load_saved_model(run)
    model, schema, cfg = saved.model, saved.schema, saved.cfg
    meta = {"round": saved.round, "run_id": cfg["run_id"]}
    folder = holdout_folder(run, cfg, data)
    site = load_site(folder)
    used = tuple(m for m in MODALITY_NAMES if m in cfg["train.modalities"])
    enc = restrict_modalities(encode(site, schema), used)
    if len(np.unique(enc.labels)) < 2:
        raise DataError(f"{folder}: the holdout has one class only; AUROC is undefined")
    h = _prepare(model, enc)
    rng = np.random.default_rng([seed, 20240])
    with torch.no_grad():
        base = _score(model, h)  # [AUROC, mean log-likelihood]
    n_classes = len(schema.classes)
    # Binary: explain the positive class (index 1); otherwise each patient's own class.
    target = np.ones(len(enc), dtype=np.int64) if n_classes == 2 else enc.labels.copy()
    modal = _modality_contributions(model, h, used, base)
    records = (_record_importance(model, h, schema, rng, repeats, base, rank_by)
               if "records" in used else [])
    genes, gene_method = (_gene_importance(model, h, schema, rng, repeats, base,
                                           gene_screen_above, torch.from_numpy(target),
                                           rank_by)
                          if "genomics" in used else ([], {"genes_permuted": 0}))
    out_dir = run / EXPLAIN_DIR
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot be created ({exc.strerror})") from None
    for stale in out_dir.glob("image-*.png"):  # maps of an earlier call's patients
        stale.unlink()
    image_items = []
    if "images" in used and images > 0:
        image_only = torch.zeros_like(h.mask)
        image_only[:, 1] = h.mask[:, 1]
        with torch.no_grad():
            image_probs = _head_probs(model, h.emb_records, h.emb_images, h.emb_genomics,
                                      image_only).numpy()
        for i in _pick_image_patients(h, image_probs, target, images):
            heat, prob = _occlusion(model, h, i, int(target[i]))
            pid = site.ids[i]
            name = f"image-{pid}.png"
            cls = schema.classes[int(target[i])]
            _image_figure(out_dir / name, h.image[i, 0].numpy(), heat, pid,
                          schema.classes[int(h.labels[i])], prob, cls)
            peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
            image_items.append({"patient_id": pid, "png": name,
                                "label": schema.classes[int(h.labels[i])],
                                "target_class": cls, "probability": prob,
                                "image_only_probability": float(
                                    image_probs[i, int(target[i])]),
                                "max_drop": float(heat.max()),
                                "peak_yx": [int(peak[0]), int(peak[1])]})
    _modality_figure(out_dir / "modality_contributions.png", modal["drop"], float(base[0]))
    _features_figure(out_dir / "top_features.png", genes, records, top, rank_by)
    result: dict[str, Any] = finite({
        "run": str(run),
        "run_id": meta["run_id"],
        "model_round": meta["round"],
        "holdout": {"folder": str(folder), "patients": len(enc),
                    "classes": schema.classes,
                    "class_counts": np.bincount(enc.labels, minlength=n_classes).tolist(),
                    "with_images": int(enc.mask[:, 1].sum()),
                    "with_genomics": int(enc.mask[:, 2].sum())},
        "modalities_used": list(used),
        "auroc": float(base[0]),
        "loss": float(-base[1]),
        "modality_contribution": modal["drop"],
        "modality_loss_increase": modal["loss_increase"],
        "modality_auroc_without": modal["auroc_without"],
        "modality_auroc_alone": modal["auroc_alone"],
        "top_features": {"records": records[:top], "genomics": genes[:top]},
        "feature_importance": {
            mod: {"auroc_drop": {it["name"]: it["importance"] for it in items},
                  "loss_increase": {it["name"]: it["loss_increase"] for it in items}}
            for mod, items in (("records", records), ("genomics", genes))},
        "images": image_items,
        "figures": {"modality_contributions": "modality_contributions.png",
                    "top_features": "top_features.png"},
        "method": {
            "metric": "holdout AUROC (binary: class 1; otherwise macro one-vs-rest)",
            "modality_contribution": "AUROC(full) - AUROC with that modality's mask "
                                     "column set to 0 for every patient (absent = no "
                                     "evidence, as in training)",
            "permutation": f"AUROC drop ('importance') and log-loss increase when one "
                           f"column is permuted across patients, mean (and sd) over "
                           f"{repeats} seeded permutations; numeric records are "
                           "permuted with their missing-indicator; genes among "
                           "patients with genomics only",
            "rank_by": rank_by,
            "genomics": gene_method,
            "images": f"occlusion: {OCCLUSION_PATCH}x{OCCLUSION_PATCH} patch set to the "
                      f"image mean (gray), stride {OCCLUSION_STRIDE}; map = mean drop "
                      "in the target-class probability over patches covering a pixel",
            "image_patients": "patients with an image, ranked by the target-class "
                              "probability with the image as the only evidence: the "
                              "highest true positives, then the lowest true negatives; "
                              "the maps themselves use the full model",
            "seed": seed, "repeats": repeats, "top": top,
        },
        "runtime_seconds": round(time.perf_counter() - started, 2),
    })
    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(out_dir / "explanations.json", text.encode())
    return result


def summary_lines(result: dict[str, Any], top: int = 5) -> list[str]:
    """A short human-readable digest for the command line."""
    contrib = result["modality_contribution"]
    lines = [f"holdout AUROC {result['auroc']:.3f} ({result['holdout']['patients']} patients)",
             "modality contribution (AUROC drop when masked): " + ", ".join(
                 f"{m} {v:+.3f}" for m, v in contrib.items() if v is not None)]
    for mod in ("records", "genomics"):
        items = result["top_features"][mod][:top]
        if items:
            key = "importance" if result["method"]["rank_by"] == "auroc" else "loss_increase"
            lines.append(f"top {mod} ({key}): " + ", ".join(
                f"{it['name']} {it[key]:+.4f}" for it in items))
    if result["images"]:
        lines.append(f"{len(result['images'])} image maps: "
                     + ", ".join(it["png"] for it in result["images"]))
    lines.append(f"wrote {Path(result['run']) / EXPLAIN_DIR / 'explanations.json'} "
                 f"({result['runtime_seconds']:.1f}s)")
    return lines


def explain_from_args(args: Any) -> int:
    """``mmfed explain RUN``: the CLI's thin wrapper (argparse namespace in, exit code out)."""
    limit_threads()  # the stated budget is one CPU thread; results don't depend on it
    result = explain_run(Path(args.run), seed=args.seed, repeats=args.repeats, top=args.top,
                         images=args.images, rank_by=args.rank_by, data=args.data)
    print("\n".join(summary_lines(result)))
    return 0


__all__ = ["RANK_METRICS", "auroc", "explain_from_args", "explain_run", "summary_lines"]

"""Per-patient attributions of a run's final model with Captum, and shap's plots of them.

Permutation importance (``mmfed.report.explain``) says how much the *holdout's* figures
rely on a column; it cannot say what a feature did for one patient. These attributions
do: each is in the unit of the explained per-patient target (a probability, a predicted
value, a survival risk) and says how far that patient's own value moved it.

* Numeric clinical values and gene expression: Captum ``IntegratedGradients`` from the
  baseline "every numeric value and gene at the federation mean" (the standardized 0),
  everything else as observed. The gradient exists for these inputs, IG is exact in the
  sense that matters for a waterfall (completeness: a patient's attributions sum to
  target(x) - target(baseline), up to the integration error we report), and one pass
  scores all 2,000 genes. A missing value is stored as that same 0, so it gets exactly
  zero attribution, and so does every gene of a patient without genomics.
* Categorical clinical values: Captum ``FeatureAblation``, hashed category indices having
  no gradient: the target minus its expectation with the column replaced by each of the
  holdout's categories in proportion (``categorical_ablation`` says why not "missing").
* Modalities: exact Shapley values (Captum ``ShapleyValues``, all 3! orders) of the
  model's mask input, baseline mask 0, the absence the model was trained on. A
  modality a patient lacks has mask 0 already, so adding or removing it changes no
  input and its attribution is exactly zero, not approximately.

The global ranking is each feature's share of the model's separation of high from low
observed outcomes (:func:`separation`); mean |attribution| over the holdout, the usual
SHAP summary, is kept next to it and orders the beeswarm plots. The plots use shap's
beeswarm and waterfall on these Captum values: the values are ours, shap only draws them.

This module knows nothing about task kinds: the caller hands in ``TargetFn``, the
model's per-patient target from per-modality embeddings, the same function the
perturbation explanations score, so both explain one quantity.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

if TYPE_CHECKING:
    from mmfed.ml.model import MultimodalNet

# (records embedding, images embedding, genomics embedding, mask, per-patient class) ->
# the per-patient target (n,); every argument has the patients as its first axis.
TargetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                    torch.Tensor]

IG_STEPS = 32  # Gauss-Legendre nodes: completeness error ~1e-6 of the target on our models
# inputs x steps elements per IG call: bounds memory to ~100 MB (forward and backward)
# whatever the panel size, at a few calls for the default 600 x 2,000 holdout.
_IG_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class Inputs:
    """The holdout as the model sees it, plus the embeddings IG does not perturb."""

    num: torch.Tensor  # (n, Kn) standardized, 0 where missing
    num_missing: torch.Tensor  # (n, Kn)
    cat: torch.Tensor  # (n, Kc) int64 hash buckets, 0 = missing
    genomics: torch.Tensor  # (n, G) standardized, 0 where absent
    mask: torch.Tensor  # (n, 3) records, images, genomics
    emb_records: torch.Tensor
    emb_images: torch.Tensor
    emb_genomics: torch.Tensor
    target: torch.Tensor  # (n,) int64: the class explained per patient (classification)


@dataclass
class Attributions:
    """Per-patient attributions (rows: holdout patients), all in the target's unit."""

    numeric: np.ndarray  # (n, Kn) integrated gradients
    genes: np.ndarray  # (n, G) integrated gradients
    categorical: np.ndarray  # (n, Kc) ablation to "missing"
    modality: np.ndarray  # (n, 3) exact Shapley values of the mask
    prediction: np.ndarray  # (n,) the target at the patient's own inputs
    ig_baseline: np.ndarray  # (n,) the target with numeric values and genes at 0
    ig_delta: np.ndarray  # (n,) sum of IG attributions - (prediction - ig_baseline)
    modality_baseline: np.ndarray  # (n,) the target with every mask column 0


def integrated_gradients(model: MultimodalNet, fn: TargetFn, x: Inputs, numeric: bool,
                         genes: bool, steps: int = IG_STEPS
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(numeric (n, Kn), genes (n, G), target at the baseline (n,), convergence delta (n,)).

    One IG run over both inputs jointly, so that a patient's numeric and gene
    attributions together sum to target(x) - target(baseline), which is what a
    waterfall of that patient shows. ``numeric``/``genes`` False leaves that input as
    observed and its attributions zero (an unused modality, an empty panel).
    """
    from captum.attr import IntegratedGradients

    n = x.num.shape[0]
    out_num = np.zeros(tuple(x.num.shape))
    out_genes = np.zeros(tuple(x.genomics.shape))
    delta = np.zeros(n)
    with torch.no_grad():
        base_num = torch.zeros_like(x.num) if numeric else x.num
        base_genes = (model.genomics(torch.zeros_like(x.genomics)) if genes
                      else x.emb_genomics)
        baseline = fn(model.records(base_num, x.num_missing, x.cat) if numeric
                      else x.emb_records, x.emb_images, base_genes, x.mask, x.target)
    baseline_np = baseline.double().numpy()
    if not (numeric or genes) or n == 0:
        return out_num, out_genes, baseline_np, delta

    def forward(*args: torch.Tensor) -> torch.Tensor:
        inputs = list(args[:int(numeric) + int(genes)])
        num, miss, cat, ei, eg, mask, target = args[len(inputs):]
        er = model.records(inputs.pop(0) if numeric else num, miss, cat)
        if genes:
            eg = model.genomics(inputs.pop(0))
        return fn(er, ei, eg, mask, target)

    ig = IntegratedGradients(forward)
    width = x.num.shape[1] * int(numeric) + x.genomics.shape[1] * int(genes) + 1
    chunk = max(1, _IG_ELEMENTS // (width * steps))
    for s in range(0, n, chunk):
        rows = slice(s, s + chunk)
        ins = tuple(t[rows] for t, on in ((x.num, numeric), (x.genomics, genes)) if on)
        extra = tuple(t[rows] for t in (x.num, x.num_missing, x.cat, x.emb_images,
                                        x.emb_genomics, x.mask, x.target))
        attr, d = ig.attribute(ins, baselines=tuple(torch.zeros_like(t) for t in ins),
                               additional_forward_args=extra, n_steps=steps,
                               return_convergence_delta=True)
        parts = list(cast(tuple[torch.Tensor, ...], attr))
        if numeric:
            out_num[rows] = parts.pop(0).detach().double().numpy()
        if genes:
            out_genes[rows] = parts.pop(0).detach().double().numpy()
        delta[rows] = cast(torch.Tensor, d).detach().double().numpy()
    return out_num, out_genes, baseline_np, delta


@torch.no_grad()
def categorical_ablation(model: MultimodalNet, fn: TargetFn, x: Inputs) -> np.ndarray:
    """(n, Kc): target(x) - E[target(x with that column replaced)], the expectation over
    the column's categories as the holdout patients with records hold them.

    Captum ``FeatureAblation`` once per category rank r, the baseline of column j being
    its r-th most common category, weighted by that category's share: since the shares
    of a column sum to 1, the weighted sum of ablations is exactly the difference from
    the expectation. Replacing by one fixed value instead (such as "missing", which
    training rarely shows) would move the target by how unusual that value is, not by
    what the patient's own value says, and rank uninformative columns on top.
    """
    from captum.attr import FeatureAblation

    n, k = x.cat.shape
    out = np.zeros((n, k))
    have = x.mask[:, 0] > 0.5
    if k == 0 or n == 0 or not bool(have.any()):
        return out

    def forward(cat: torch.Tensor, num: torch.Tensor, miss: torch.Tensor, ei: torch.Tensor,
                eg: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fn(model.records(num, miss, cat), ei, eg, mask, target)

    shares = []  # per column: (category, share), most common first (ties: lower bucket)
    for j in range(k):
        values, counts = np.unique(x.cat[have, j].numpy(), return_counts=True)
        order = sorted(range(len(values)), key=lambda i: (-counts[i], values[i]))
        shares.append([(int(values[i]), counts[i] / counts.sum()) for i in order])
    ablation = FeatureAblation(forward)
    extra = (x.num, x.num_missing, x.emb_images, x.emb_genomics, x.mask, x.target)
    for r in range(max(len(col) for col in shares)):
        # columns with fewer than r + 1 categories get weight 0 (their ablation unused)
        baseline = torch.tensor([[col[min(r, len(col) - 1)][0] for col in shares]])
        weight = np.array([col[r][1] if r < len(col) else 0.0 for col in shares])
        attr = ablation.attribute(x.cat, baselines=baseline, perturbations_per_eval=min(k, 8),
                                  additional_forward_args=extra)
        out += cast(torch.Tensor, attr).double().numpy() * weight
    return out


@torch.no_grad()
def modality_shapley(fn: TargetFn, x: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """((n, 3) exact Shapley values of the mask columns, (n,) target with no modality).

    One evaluation per forward call (``perturbations_per_eval=1``): every call then has
    the same batch, so an absent modality's two evaluations are bit-for-bit the same
    computation and its Shapley value is exactly 0.0.
    """
    from captum.attr import ShapleyValues

    n = x.mask.shape[0]
    if n == 0:
        return np.zeros((0, 3)), np.zeros(0)

    def forward(mask: torch.Tensor, er: torch.Tensor, ei: torch.Tensor, eg: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        return fn(er, ei, eg, mask, target)

    extra = (x.emb_records, x.emb_images, x.emb_genomics, x.target)
    attr = ShapleyValues(forward).attribute(
        x.mask, baselines=0.0, feature_mask=torch.arange(x.mask.shape[1])[None, :],
        additional_forward_args=extra, perturbations_per_eval=1)
    empty = forward(torch.zeros_like(x.mask), *extra)
    return cast(torch.Tensor, attr).double().numpy(), empty.double().numpy()


def attribute(model: MultimodalNet, fn: TargetFn, x: Inputs, records: bool,
              genomics: bool) -> Attributions:
    """Every attribution of the module docstring; ``records``/``genomics``: the run uses
    that modality (an unused one keeps all-zero attributions)."""
    numeric = records and x.num.shape[1] > 0
    genes = genomics and x.genomics.shape[1] > 0
    num, gene, ig_base, delta = integrated_gradients(model, fn, x, numeric, genes)
    cat = (categorical_ablation(model, fn, x) if records
           else np.zeros(tuple(x.cat.shape)))
    modality, empty = modality_shapley(fn, x)
    with torch.no_grad():
        prediction = fn(x.emb_records, x.emb_images, x.emb_genomics, x.mask,
                        x.target).double().numpy()
    return Attributions(num, gene, cat, modality, prediction, ig_base, delta, empty)


def separation(values: np.ndarray, high: Sequence[int], low: Sequence[int]) -> np.ndarray:
    """Per feature: its mean attribution among the "high" observed outcomes minus that
    among the "low" ones, in the target's unit.

    This is the share of the model's separation of the two groups that the feature
    accounts for: attributions add up to each patient's prediction (minus the baseline),
    so these differences add up to the gap between the groups' mean predictions. It is
    the global ranking because it is what a feature does *for the task*: mean
    |attribution| also counts sensitivity to features unrelated to the outcome (a DP-
    trained layer has noise weights on every gene), which moves each patient's
    prediction but in no consistent direction. ``high`` empty (multiclass, where each
    patient's target is its own class's probability): the mean attribution over all
    patients, the feature's push toward the right class.
    """
    if len(values) == 0:
        return np.zeros(values.shape[1] if values.ndim == 2 else 0)
    if len(high) == 0:
        return values.mean(axis=0)
    if len(low) == 0:
        return values[list(high)].mean(axis=0)
    return values[list(high)].mean(axis=0) - values[list(low)].mean(axis=0)


def ranking(names: Sequence[str], values: np.ndarray, separated: np.ndarray,
            extra: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Features by ``separated`` (:func:`separation`), highest first (ties by name), with
    mean |attribution| (the order of the beeswarm plots) and the mean signed attribution;
    ``extra`` adds fields per feature."""
    mean_abs = np.abs(values).mean(axis=0) if len(values) else np.zeros(len(names))
    mean = values.mean(axis=0) if len(values) else np.zeros(len(names))
    order = sorted(range(len(names)), key=lambda j: (-separated[j], names[j]))
    return [{"rank": r, "name": names[j], "separation": float(separated[j]),
             "mean_abs": float(mean_abs[j]), "mean": float(mean[j]),
             **(extra[j] if extra is not None else {})}
            for r, j in enumerate(order, start=1)]


# --------------------------------------------------------------------------- shap plots


@contextmanager
def _agg_pyplot() -> Iterator[Any]:
    """pyplot on the Agg backend (files only, never a window), restored afterwards.

    shap draws through pyplot's current figure, unlike the rest of ``mmfed.report``
    (``matplotlib.figure.Figure`` directly); switching back keeps a caller's notebook
    or GUI backend as it was.
    """
    import matplotlib.pyplot as plt

    previous = plt.get_backend()
    switched = previous.lower() != "agg"
    if switched:
        plt.switch_backend("agg")
    try:
        yield plt
    finally:
        if switched:
            try:
                plt.switch_backend(previous)
            except (ImportError, RuntimeError):  # headless: that backend cannot start
                pass


def beeswarm_png(path: Path, values: np.ndarray, data: np.ndarray, names: Sequence[str],
                 top: int, title: str, xlabel: str) -> None:
    """shap's beeswarm of the ``top`` features by mean |attribution|: one dot per patient,
    coloured by that patient's (standardized) value; NaN data draws grey."""
    import shap

    explanation = shap.Explanation(values=values, data=data, feature_names=list(names))
    with _agg_pyplot() as plt, warnings.catch_warnings():
        # an all-NaN column (a categorical one, drawn grey) makes shap's colour scaling
        # warn; grey is what it should draw
        warnings.filterwarnings("ignore", message="All-NaN slice", category=RuntimeWarning)
        fig = plt.figure()
        try:
            shap.plots.beeswarm(explanation, max_display=top + 1, show=False,
                                color_bar_label="standardized value (z)")
            ax = fig.axes[0]
            ax.set_xlabel(xlabel)
            ax.set_title(title)
            fig.savefig(path, dpi=110, bbox_inches="tight", format="png")
        finally:
            plt.close(fig)


def waterfall_png(path: Path, values: np.ndarray, base: float, data: np.ndarray,
                  names: Sequence[str], top: int, title: str) -> None:
    """shap's waterfall of one patient: from ``base`` (the target at the attribution
    baseline) by each feature's attribution to the patient's own target."""
    import shap

    explanation = shap.Explanation(values=values, base_values=base, data=data,
                                   feature_names=list(names))
    with _agg_pyplot() as plt:
        fig = plt.figure()
        try:
            shap.plots.waterfall(explanation, max_display=top + 1, show=False)
            fig.suptitle(title, y=1.02)
            fig.savefig(path, dpi=110, bbox_inches="tight", format="png")
        finally:
            plt.close(fig)


__all__ = ["IG_STEPS", "Attributions", "Inputs", "TargetFn", "attribute", "beeswarm_png",
           "categorical_ablation", "integrated_gradients", "modality_shapley", "ranking",
           "separation", "waterfall_png"]

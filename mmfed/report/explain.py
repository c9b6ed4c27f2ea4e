"""Post-hoc explanations of a finished run's final model on the server's holdout.

A federated model is trained on data nobody can look at, so the holdout is the one
place where the federation can check *why* the model predicts what it does: which
modality carries the decision, which clinical variables and genes it relies on, and
which image regions move its output. ``explain_run`` answers those questions and writes
``RUN/explain/explanations.json``, per-patient attributions (``attributions.npz``) and
figures next to it.

Two complementary kinds of explanation, both of one per-patient quantity, the *target*:

* **Attributions** (``mmfed.report.attribution``, Captum): per patient and per feature,
  in the target's unit. Integrated gradients for numeric clinical values and genes,
  feature ablation for categorical values, exact Shapley values of the
  model's mask input for modalities (a modality a patient lacks gets exactly zero).
  Their global ranking is mean |attribution| over the holdout (``attribution`` in the
  JSON), drawn as shap beeswarm plots and one patient's waterfall. They say what moved
  each patient's prediction.
* **Perturbation importance** (this module): mask a modality, permute a column, occlude
  an image patch, measured in the task's own holdout figures. It says how much the
  holdout's *performance* relies on a feature, which an attribution cannot: a feature
  can move predictions a lot without improving their ranking.

Each task kind (``mmfed.ml.task``) is scored by its headline metric and its training
loss, and the target is:

* classification: holdout AUROC (the run's headline metric) and log-loss; the target is
  the positive-class probability (binary) or each patient's own class probability.
* regression: holdout R² and the Huber loss the head is trained with; the target is the
  predicted value in the label's unit.
* survival: Harrell's C-index and the discrete-time hazard negative log-likelihood; the
  target is the risk, minus the restricted mean survival time (RMST) up to the last
  interval cut: the score the run's C-index ranks patients by (``outcomes.risk_score``),
  differentiable in every hazard logit, and in days, so an occlusion map reads as
  "survival time this region costs".

To make 2,000-gene permutation importance take seconds rather than minutes, the
embeddings of the modalities that a perturbation does not touch are computed once
and only the perturbed encoder, the fusion and the head are re-run; for the genomic
encoder, whose first layer is linear, permuting one gene is an exact rank-one update of
that layer's output, so all genes are evaluated in batches without re-reading the
2,000-wide input. ``tests/test_attribution.py`` checks that this shortcut gives Captum's
``FeaturePermutation`` figures (same permutations, whole model) and is faster.
"""

from __future__ import annotations

import io
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
from mmfed.ml.task import Task, make_task_loss, target_tensor
from mmfed.report import attribution
from mmfed.run.saved_model import holdout_folder, load_saved_model

EXPLAIN_DIR = "explain"
# Above this many genes, permuting every gene would dominate the run time, so genes are
# first ranked by |gradient x input| and only a shortlist (plus a random control sample,
# which keeps the shortlist's scores interpretable) is permuted.
GENE_SCREEN_ABOVE = 5000
# How ranked lists are ordered: by the drop of the task's headline metric ("auroc" is
# the CLI's name for it: AUROC, R² or C-index), or by the increase of the task's loss.
RANK_METRICS = ("auroc", "loss")
SCREEN_TOP = 200
SCREEN_RANDOM = 50
OCCLUSION_PATCH = 8
OCCLUSION_STRIDE = 4
# shap plots of the attributions (kept apart from "figures", the perturbation plots)
ATTRIBUTION_FIGURES = ("beeswarm_records.png", "beeswarm_genomics.png", "waterfall.png")
_GENE_CHUNK = 128  # genes per batched evaluation: bounds memory at ~chunk x n x hidden
# Harrell's C over an explicit list of comparable pairs is exact and vectorises over a
# batch of permutations; above this many pairs (a holdout of several thousand) the list
# would cost too much memory and sksurv's loop scores one prediction set at a time.
_MAX_PAIRS = 4_000_000
_PAIR_CHUNK = 5_000_000  # pair x prediction-set elements per vectorised step
_TIED_RISK = 1e-8  # sksurv's tied_tol: risks closer than this count as a tie


@dataclass(frozen=True)
class _Terms:
    """How one task kind names its figures, so JSON keys and figure labels agree."""

    metric: str  # JSON key of the headline: auroc, r2, c_index
    metric_name: str  # AUROC, R², C-index
    loss_name: str  # what the loss increase measures
    target: str  # the per-patient quantity saliency and occlusion move


def _terms(task: Task, classes: list[str]) -> _Terms:
    """Names of the task's headline metric, loss and explained target."""
    metric, metric_name = task.headline
    if task.kind == "regression":
        unit = f" ({task.unit})" if task.unit else ""
        return _Terms(metric, metric_name, "Huber loss", f"the predicted value{unit}")
    if task.kind == "survival":
        unit = f" {task.unit}" if task.unit else ""
        return _Terms(metric, metric_name, "hazard NLL",
                      f"the risk: minus the restricted mean survival time up to "
                      f"{task.cuts[-1]:.4g}{unit}")
    target = f"P({classes[1]})" if len(classes) == 2 else "P(each patient's own class)"
    return _Terms(metric, metric_name, "log-loss", target)


@dataclass
class _Holdout:
    """The holdout as tensors, plus the per-modality embeddings that stay fixed.

    The trailing fields exist for the regression and survival scores: the task, the
    outcome (regression target / survival time, float64), what the task's loss reads,
    the loss module (per patient), and Harrell's comparable pairs (survival; None
    there: too many to list).
    """

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
    task: Task | None = None  # None: classification (as before tasks existed)
    targets: np.ndarray | None = None
    y: torch.Tensor | None = None
    loss_fn: nn.Module | None = None
    pairs: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def kind(self) -> str:
        return "classification" if self.task is None else self.task.kind


# --------------------------------------------------------------------------- loading


@torch.no_grad()
def _prepare(model: MultimodalNet, enc: EncodedSite) -> _Holdout:
    """Everything a perturbation does not change, computed once: the unperturbed
    embeddings, and for regression and survival the outcome, the loss and the pairs."""
    t = {f: torch.from_numpy(getattr(enc, f)) for f in
         ("num", "num_missing", "cat", "image", "genomics", "mask")}
    h = _Holdout(t["num"], t["num_missing"], t["cat"], t["image"], t["genomics"], t["mask"],
                 enc.labels, model.records(t["num"], t["num_missing"], t["cat"]),
                 model.images(t["image"]), model.genomics(t["genomics"]))
    task = getattr(model, "task", None)
    if isinstance(task, Task) and task.kind != "classification":
        loss_fn = make_task_loss(task, enc.labels, "none")
        loss_fn.reduction = "none"  # per patient: a batch of prediction sets is one call
        h.task, h.targets, h.loss_fn = task, enc.outcome.astype(np.float64), loss_fn
        h.y = torch.from_numpy(target_tensor(task, enc.labels, enc.outcome))
        if task.kind == "survival":
            h.pairs = comparable_pairs(h.targets, enc.labels)
    return h


# --------------------------------------------------------------------------- scoring


def _head_logits(model: MultimodalNet, er: torch.Tensor, ei: torch.Tensor, eg: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """Head outputs from embeddings with any leading batch shape, flattened to
    (prod(...) * n, outputs), and that leading shape (..., n).

    The fusion and head are the model's own (``MultimodalNet.fused_logits``); only the
    broadcasting of a batch of perturbed embedding sets is done here, so that a
    perturbation re-runs only the encoder it touched.
    """
    shape = torch.broadcast_shapes(er.shape, ei.shape, eg.shape)
    emb = torch.stack([er.expand(shape), ei.expand(shape), eg.expand(shape)], dim=-2)
    m = mask.expand(*shape[:-1], mask.shape[-1])
    return model.fused_logits(emb.reshape(-1, 3, shape[-1]), m.reshape(-1, m.shape[-1])), \
        shape[:-1]


def _head_probs(model: MultimodalNet, er: torch.Tensor, ei: torch.Tensor, eg: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """Class probabilities from embeddings with any leading batch shape (..., n, d) ->
    (..., n, C) (classification)."""
    logits, lead = _head_logits(model, er, ei, eg, mask)
    return torch.softmax(logits, dim=-1).reshape(*lead, -1)


def _survival_risk(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """Minus the RMST up to the last cut, (..., n) from hazard logits (..., n, K).

    The same number as ``outcomes.risk_score`` of ``outputs_of``'s curves (float64, like
    them), written in torch so that gradients reach the hazards: S(cuts[k]) is the
    product of surviving intervals 0..k, and the area under the step curve weights
    1, S(cuts[0]), ..., S(cuts[K-2]) by the interval widths.
    """
    surv = torch.cumprod(1.0 - torch.sigmoid(logits.double()), dim=-1)
    edges = torch.tensor((0.0, *task.cuts), dtype=torch.float64).clamp_min(0.0)
    values = torch.cat([torch.ones_like(surv[..., :1]), surv[..., :-1]], dim=-1)
    return -(values * torch.diff(edges)).sum(dim=-1)


def _task_target(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """The explained quantity of a regression or survival head: (..., n, K) -> (..., n).

    Regression: the predicted value in the label's unit; survival: the risk
    (``_survival_risk``). Both are differentiable and increase with what a clinician
    would call "worse" (a higher value, an earlier death).
    """
    if task.kind == "regression":
        return logits[..., 0].double() * task.target_std + task.target_mean
    return _survival_risk(task, logits)


def _target_values(model: MultimodalNet, h: _Holdout, er: torch.Tensor, ei: torch.Tensor,
                   eg: torch.Tensor, mask: torch.Tensor, target: torch.Tensor | int
                   ) -> torch.Tensor:
    """The target (see the module docstring) for embeddings of leading shape (..., n).

    Classification picks class ``target`` (an int, or a class per patient); the other
    kinds have one target per patient and ignore it.
    """
    if h.task is None or h.task.kind == "classification":
        probs = _head_probs(model, er, ei, eg, mask)
        if isinstance(target, int):
            return probs[..., target]
        return probs.gather(-1, target[..., None]).squeeze(-1)
    logits, lead = _head_logits(model, er, ei, eg, mask)
    return _task_target(h.task, logits.reshape(*lead, -1))


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


def comparable_pairs(time: np.ndarray, event: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """Harrell's comparable pairs (i, j): i had the event and j was still at risk later.

    Exactly sksurv's ``concordance_index_censored`` rule: j's time is later than i's, or
    equal with j censored. The pairs depend on the outcome only, never on a
    prediction, so they are listed once and every permutation reuses them. None when
    there would be more than ``_MAX_PAIRS`` (then ``harrell_c`` asks sksurv per set).
    """
    t = np.asarray(time, dtype=np.float64).reshape(-1)
    e = np.asarray(event).reshape(-1).astype(bool)
    events = np.flatnonzero(e)
    later = len(t) - np.searchsorted(np.sort(t), t[events], side="right")  # t_j > t_i
    if int(later.sum()) > _MAX_PAIRS:
        return None
    i_parts, j_parts = [], []
    step = max(1, _MAX_PAIRS // max(len(t), 1))  # bounds the boolean block's size
    for start in range(0, len(events), step):
        rows = events[start:start + step]
        ti = t[rows][:, None]
        ok = (t[None, :] > ti) | ((t[None, :] == ti) & ~e[None, :])
        r, j = np.nonzero(ok)
        i_parts.append(rows[r])
        j_parts.append(j)
    if not i_parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(i_parts), np.concatenate(j_parts)


def harrell_c(risk: np.ndarray, time: np.ndarray, event: np.ndarray,
              pairs: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Harrell's C-index over the last axis of ``risk`` (..., n); batched.

    Equal to sksurv's ``concordance_index_censored`` (what the run's C-index is): a
    comparable pair counts 1 when the earlier event has the higher risk, 1/2 when the
    risks tie within 1e-8. Vectorised over comparable pairs because permutation
    importance scores thousands of prediction sets; NaN where no pair is comparable.
    """
    r = np.asarray(risk, dtype=np.float64)
    flat = r.reshape(-1, r.shape[-1])
    out = np.full(len(flat), np.nan)
    if pairs is None:
        pairs = comparable_pairs(time, event)
    if pairs is None:  # too many pairs to list: sksurv's exact loop, one set at a time
        from sksurv.metrics import concordance_index_censored

        e = np.asarray(event).astype(bool)
        t = np.asarray(time, dtype=np.float64)
        for k, row in enumerate(flat):
            out[k] = concordance_index_censored(e, t, row)[0]
        return out.reshape(r.shape[:-1])
    i, j = pairs
    if len(i) == 0:
        return out.reshape(r.shape[:-1])
    step = max(1, _PAIR_CHUNK // len(i))
    for s in range(0, len(flat), step):
        d = flat[s:s + step, i] - flat[s:s + step, j]
        tied = np.abs(d) <= _TIED_RISK
        out[s:s + step] = ((d > _TIED_RISK).sum(-1) + 0.5 * tied.sum(-1)) / len(i)
    return out.reshape(r.shape[:-1])


def _task_score(h: _Holdout, logits: torch.Tensor, lead: torch.Size) -> np.ndarray:
    """(..., 2) for a regression or survival head: the headline metric and minus the
    mean training loss of each prediction set (``_score``'s two columns)."""
    assert h.task is not None and h.targets is not None and h.y is not None \
        and h.loss_fn is not None
    y = h.y.repeat(int(np.prod(lead[:-1], dtype=np.int64)), 1)  # rows are set-major
    per = h.loss_fn(logits, y).reshape(*lead, -1).sum(-1)  # regression: (N, 1); else (N,)
    mean_loss = per.double().mean(-1).numpy()
    target = _task_target(h.task, logits.reshape(*lead, -1)).numpy()
    if h.task.kind == "regression":
        t = h.targets
        sst = float(((t - t.mean()) ** 2).sum())
        headline = 1.0 - ((target - t) ** 2).sum(-1) / sst if sst > 0 else \
            np.full(target.shape[:-1], np.nan)
    else:
        headline = harrell_c(target, h.targets, h.labels, h.pairs)
    return np.stack([np.asarray(headline, dtype=np.float64), -mean_loss], axis=-1)


def _score(model: MultimodalNet, h: _Holdout, er: torch.Tensor | None = None,
           ei: torch.Tensor | None = None, eg: torch.Tensor | None = None,
           mask: torch.Tensor | None = None) -> np.ndarray:
    """(..., 2): the headline metric and minus the mean loss, for any batch of inputs.

    Classification: AUROC and minus the mean cross-entropy; regression: R² and minus
    the Huber loss; survival: Harrell's C-index and minus the hazard NLL. All are
    "higher is better", so ``base - score`` is the headline drop and the loss increase.
    The second exists because a rank metric only moves when a perturbation swaps the
    order of two patients: one gene among 2,000 rarely does, so its drop is mostly
    permutation noise, while the loss feels every change of every prediction and
    resolves single-gene effects with a few repeats.
    """
    er = h.emb_records if er is None else er
    ei = h.emb_images if ei is None else ei
    eg = h.emb_genomics if eg is None else eg
    mask = h.mask if mask is None else mask
    if h.kind != "classification":
        logits, lead = _head_logits(model, er, ei, eg, mask)
        return _task_score(h, logits, lead)
    probs = _head_probs(model, er, ei, eg, mask)
    labels = torch.from_numpy(h.labels).expand(*probs.shape[:-1])
    loglik = torch.log(probs.clamp_min(1e-12)).gather(-1, labels[..., None]).squeeze(-1)
    return np.stack([auroc(probs.numpy(), h.labels), loglik.mean(-1).numpy()], axis=-1)


# --------------------------------------------------------------------------- modalities


@torch.no_grad()
def _modality_contributions(model: MultimodalNet, h: _Holdout, used: tuple[str, ...],
                            base: np.ndarray) -> dict[str, dict[str, float | None]]:
    """The headline metric without each modality (its mask column zeroed) and with it
    alone; "drop" and "loss_increase" are relative to the full model."""
    out: dict[str, dict[str, float | None]] = {"drop": {}, "without": {}, "alone": {},
                                                "loss_increase": {}}
    for k, name in enumerate(MODALITY_NAMES):
        if name not in used:
            for key in out:
                out[key][name] = None
            continue
        without = h.mask.clone()
        without[:, k] = 0.0
        alone = torch.zeros_like(h.mask)
        alone[:, k] = h.mask[:, k]
        metric_without, loglik_without = (float(v) for v in _score(model, h, mask=without))
        out["drop"][name] = float(base[0]) - metric_without
        out["loss_increase"][name] = float(base[1]) - loglik_without
        out["without"][name] = metric_without
        out["alone"][name] = float(_score(model, h, mask=alone)[0])
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

    ``drops`` is (repeats, features, 2): headline-metric drop (AUROC, R² or C-index)
    and loss increase. "importance" is always the headline drop; ``rank_by`` picks the
    order ("auroc" means the headline, whatever the task).
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
    """(repeats, len(genes), 2) headline drops and loss increases, one gene permuted.

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
    """Mean |gradient x input| of the target per gene (screening only): the
    target-class probability, the predicted value, or the survival risk."""
    x = h.genomics.clone().requires_grad_(True)
    picked = _target_values(model, h, h.emb_records, h.emb_images, model.genomics(x),
                            h.mask, target) * h.mask[:, 2]
    (grad,) = torch.autograd.grad(picked.sum(), x)
    present = h.mask[:, 2] > 0.5
    return (grad * x).detach()[present].abs().mean(dim=0).numpy()


def _gene_importance(model: MultimodalNet, h: _Holdout, schema: FeatureSchema,
                     rng: np.random.Generator, repeats: int, base: np.ndarray,
                     screen_above: int, target: torch.Tensor, rank_by: str,
                     explained: str = "target-class probability"
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
                            f"{explained}; the top {len(top)} plus a random "
                            f"control sample of {len(control)} others were permuted; "
                            "unlisted genes were not scored",
                  "control_genes": sorted(schema.genes[i] for i in control)}
    drops = _gene_permutation(model, h, chosen, rng, repeats, base)
    return _ranked([schema.genes[i] for i in chosen], drops, rank_by), method


# --------------------------------------------------------------------------- images


@torch.no_grad()
def _occlusion(model: MultimodalNet, h: _Holdout, i: int, target: int) -> tuple[np.ndarray,
                                                                                 float]:
    """Per-pixel mean drop in the target (P(target class), the predicted value or the
    survival risk) when an 8x8 patch covering it is set to gray.

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
    occluded = _target_values(model, h, h.emb_records[i], ei, h.emb_genomics[i], h.mask[i],
                              target)
    full = float(_target_values(model, h, h.emb_records[i:i + 1], h.emb_images[i:i + 1],
                                h.emb_genomics[i:i + 1], h.mask[i:i + 1], target)[0])
    drop = full - occluded.numpy()
    heat = np.zeros((hh, ww))
    count = np.zeros((hh, ww))
    for k, (y, x) in enumerate((y, x) for y in ys for x in xs):
        heat[y:y + p, x:x + p] += drop[k]
        count[y:y + p, x:x + p] += 1
    return heat / np.maximum(count, 1), full


def _outcome_groups(h: _Holdout, with_image: np.ndarray) -> tuple[list[int], list[int]]:
    """Patients whose observed outcome is "high" and "low", among those with an image.

    Classification: class 1 vs the rest. Regression: at or above the median target vs
    below it. Survival: an event by the median follow-up time vs followed past it (event
    or not); censored before the median says neither, so those patients are left out.
    """
    if h.kind == "classification" or h.targets is None:
        return ([int(i) for i in with_image if h.labels[i] == 1],
                [int(i) for i in with_image if h.labels[i] != 1])
    t = h.targets
    if len(with_image) == 0:
        return [], []
    median = float(np.median(t[with_image]))
    if h.kind == "regression":
        return ([int(i) for i in with_image if t[i] >= median],
                [int(i) for i in with_image if t[i] < median])
    return ([int(i) for i in with_image if h.labels[i] == 1 and t[i] <= median],
            [int(i) for i in with_image if t[i] > median])


def _pick_image_patients(h: _Holdout, image_scores: np.ndarray, k: int) -> list[int]:
    """Patients whose image alone is the strongest evidence: high, then low outcomes.

    Ranked by the target (P(target class), the value or the risk) with the image as the
    only evidence, because the full model's most confident patients are mostly decided
    by records and genomics and their images need not show anything. The top true
    positives (highest observed outcomes) show what the model reads as disease; the
    clearest true negatives show it is not reacting to ordinary anatomy. Deterministic,
    so reruns compare.
    """
    with_image = np.flatnonzero(h.mask[:, 1].numpy() > 0.5)
    pos, neg = _outcome_groups(h, with_image)
    pos.sort(key=lambda i: (-image_scores[i], i))
    neg.sort(key=lambda i: (image_scores[i], i))
    want_pos = min(len(pos), (k + 1) // 2)
    chosen = pos[:want_pos] + neg[:k - want_pos]
    if len(chosen) < k:  # too few negatives: fill with further positives
        chosen += pos[want_pos:want_pos + k - len(chosen)]
    return chosen


# --------------------------------------------------------------------------- figures


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight", format="png")


def _image_figure(path: Path, img: np.ndarray, heat: np.ndarray, pid: str, bar_label: str,
                  title: str) -> None:
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
    bar.set_label(bar_label)
    fig.suptitle(title)
    _save(fig, path)


def _modality_figure(path: Path, contrib: dict[str, float | None], base: float,
                     metric_name: str = "AUROC", subtitle: str | None = None) -> None:
    from matplotlib.figure import Figure

    names = [m for m in MODALITY_NAMES if contrib.get(m) is not None]
    values = [float(contrib[m] or 0.0) for m in names]
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    ax.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868"][:len(names)])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel(f"holdout {metric_name} drop when masked")
    ax.set_xlabel("modality")
    title = f"Modality contribution (full-model {metric_name} {base:.3f})"
    ax.set_title(title if subtitle is None else f"{title}\n{subtitle}")
    for x, v in enumerate(values):
        ax.annotate(f"{v:.3f}", (x, v), ha="center", va="bottom" if v >= 0 else "top")
    _save(fig, path)


def _features_figure(path: Path, genes: list[dict[str, Any]], records: list[dict[str, Any]],
                     top: int, rank_by: str, terms: _Terms | None = None,
                     subtitle: str | None = None) -> None:
    from matplotlib.figure import Figure

    metric_name, loss_name = (("AUROC", "log-loss") if terms is None
                              else (terms.metric_name, terms.loss_name))
    panels = [(p, title) for p, title in ((genes[:top], "Top genes"),
                                          (records[:top], "Top clinical features")) if p]
    fig = Figure(figsize=(6.0 * max(len(panels), 1), 0.32 * top + 1.6))
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (items, title) in zip(axes, panels, strict=False):
        names = [it["name"] for it in items][::-1]
        mean_key, sd_key, what = (("importance", "std", f"{metric_name} drop")
                                  if rank_by == "auroc"
                                  else ("loss_increase", "loss_increase_std",
                                        f"{loss_name} increase"))
        means = [it[mean_key] for it in items][::-1]
        sds = [it[sd_key] for it in items][::-1]
        ax.barh(names, means, xerr=sds, color="#4c72b0", ecolor="gray")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"holdout {what} when permuted (mean ± sd over repeats)")
        ax.set_title(title)
    if not panels:
        axes[0].set_title("no features to show")
    if subtitle is not None:
        fig.suptitle(subtitle)
    _save(fig, path)


# --------------------------------------------------------------------------- attributions


def _waterfall_patient(h: _Holdout, used: tuple[str, ...], prediction: np.ndarray
                       ) -> int | None:
    """The patient whose waterfall is drawn: among those with every used modality, the
    highest target among the "high" observed outcomes (``_outcome_groups``), so the plot
    shows what the model reads as disease in a patient who has it; deterministic."""
    have = np.ones(len(h.labels), dtype=bool)
    for k, name in enumerate(MODALITY_NAMES):
        if name in used:
            have &= h.mask[:, k].numpy() > 0.5
    candidates = np.flatnonzero(have)
    if len(candidates) == 0:
        return None
    high, _ = _outcome_groups(h, candidates)
    pool = high or [int(i) for i in candidates]
    return max(pool, key=lambda i: (prediction[i], -i))


def _display_values(schema: FeatureSchema, h: _Holdout, i: int) -> list[str]:
    """Patient ``i``'s numeric values in their own unit (the schema's mean and sd undo the
    standardization), then its genes as z-scores: the waterfall's value labels."""
    out = []
    for j in range(len(schema.numeric)):
        if float(h.num_missing[i, j]) > 0.5:
            out.append("missing")
        else:
            raw = float(h.num[i, j]) * schema.numeric_std[j] + schema.numeric_mean[j]
            out.append(f"{raw:.4g}")
    out += [f"z {float(v):+.2f}" for v in h.genomics[i]]
    return out


def _attributions(model: MultimodalNet, h: _Holdout, schema: FeatureSchema, ids: list[str],
                  used: tuple[str, ...], target: np.ndarray, top: int, terms: _Terms,
                  out_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Captum attributions (``mmfed.report.attribution``): the JSON block, the shap
    figures written, and ``attributions.npz`` with every per-patient value."""
    from mmfed.files import atomic_write_bytes

    def fn(er: torch.Tensor, ei: torch.Tensor, eg: torch.Tensor, mask: torch.Tensor,
           tgt: torch.Tensor) -> torch.Tensor:
        return _target_values(model, h, er, ei, eg, mask, tgt)

    x = attribution.Inputs(h.num, h.num_missing, h.cat, h.genomics, h.mask, h.emb_records,
                           h.emb_images, h.emb_genomics, torch.from_numpy(target))
    a = attribution.attribute(model, fn, x, "records" in used, "genomics" in used)
    kn = len(schema.numeric)
    record_names = [*schema.numeric, *schema.categorical]
    record_values = np.concatenate([a.numeric, a.categorical], axis=1)
    kinds = ([{"kind": "numeric", "method": "integrated_gradients"}] * kn
             + [{"kind": "categorical", "method": "ablation"}] * len(schema.categorical))
    multiclass = h.kind == "classification" and len(schema.classes) > 2
    high, low = ([], []) if multiclass else _outcome_groups(h, np.arange(len(ids)))
    records = (attribution.ranking(record_names, record_values,
                                   attribution.separation(record_values, high, low), kinds)
               if "records" in used else [])
    genes = (attribution.ranking(schema.genes, a.genes,
                                 attribution.separation(a.genes, high, low))
             if "genomics" in used else [])
    modality: dict[str, dict[str, float | int | None]] = {
        "mean_abs": {}, "mean": {}, "patients_with": {}}
    for k, name in enumerate(MODALITY_NAMES):
        on = name in used
        modality["mean_abs"][name] = float(np.abs(a.modality[:, k]).mean()) if on else None
        modality["mean"][name] = float(a.modality[:, k].mean()) if on else None
        modality["patients_with"][name] = int((h.mask[:, k] > 0.5).sum()) if on else None
    absent = (h.mask.numpy() < 0.5) & (a.modality != 0.0)  # must never happen: exact zeros
    figures: dict[str, str] = {}
    what = terms.target.removeprefix("the ")
    short = what.split(":")[0]
    with_records = h.mask[:, 0].numpy() > 0.5
    if records and with_records.any():
        data = np.concatenate([np.where(h.num_missing.numpy() > 0.5, np.nan, h.num.numpy()),
                               np.full(tuple(h.cat.shape), np.nan)], axis=1)
        attribution.beeswarm_png(
            out_dir / "beeswarm_records.png", record_values[with_records],
            data[with_records], record_names, top,
            "Clinical features: integrated gradients (numeric), ablation "
            "(categorical, grey)", f"attribution to {short} (per patient)")
        figures["beeswarm_records"] = "beeswarm_records.png"
    with_genes = h.mask[:, 2].numpy() > 0.5
    if genes and with_genes.any():
        attribution.beeswarm_png(
            out_dir / "beeswarm_genomics.png", a.genes[with_genes],
            h.genomics.numpy()[with_genes], schema.genes, top,
            "Genes: integrated gradients (patients with genomics)",
            f"attribution to {short} (per patient)")
        figures["beeswarm_genomics"] = "beeswarm_genomics.png"
    patient = _waterfall_patient(h, used, a.prediction)
    pid = None if patient is None else ids[patient]
    if patient is not None and (records or genes):
        values = np.concatenate([a.numeric[patient], a.genes[patient]])
        names = [*schema.numeric, *schema.genes]
        attribution.waterfall_png(
            out_dir / "waterfall.png", values, float(a.ig_baseline[patient]),
            np.array(_display_values(schema, h, patient), dtype=object), names, top,
            f"patient {pid}: {short} {a.prediction[patient]:.3g}, from "
            f"{a.ig_baseline[patient]:.3g} with every numeric value and gene at the "
            "federation mean (integrated gradients)")
        figures["waterfall"] = "waterfall.png"
    per_patient = {"patient_ids": np.array(ids), "record_names": np.array(record_names),
                   "records": record_values.astype(np.float32),
                   "gene_names": np.array(schema.genes), "genes": a.genes.astype(np.float32),
                   "modality_names": np.array(MODALITY_NAMES), "modalities": a.modality,
                   "prediction": a.prediction, "ig_baseline": a.ig_baseline,
                   "modality_baseline": a.modality_baseline}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **per_patient)  # type: ignore[arg-type]
    atomic_write_bytes(out_dir / "attributions.npz", buffer.getvalue())
    effect = np.abs(a.prediction - a.ig_baseline)
    block = {
        "target": terms.target,
        "modality_shapley": modality,
        "absent_modality_nonzero": int(absent.sum()),
        "top_features": {"records": records[:top], "genomics": genes[:top]},
        "separation": {"records": {it["name"]: it["separation"] for it in records},
                       "genomics": {it["name"]: it["separation"] for it in genes}},
        "mean_abs": {"records": {it["name"]: it["mean_abs"] for it in records},
                     "genomics": {it["name"]: it["mean_abs"] for it in genes}},
        "outcome_groups": {"high": len(high), "low": len(low)},
        "integrated_gradients": {
            "steps": attribution.IG_STEPS,
            "max_abs_delta": float(np.abs(a.ig_delta).max()) if len(a.ig_delta) else 0.0,
            "max_abs_effect": float(effect.max()) if len(effect) else 0.0},
        "waterfall_patient": pid,
        "per_patient": "attributions.npz",
    }
    return block, figures


def _attribution_text(terms: _Terms) -> dict[str, str]:
    """What each attribution is, in words (``method.attribution`` in the JSON)."""
    what = terms.target
    return {
        "target": f"every attribution is in the unit of {what}, per patient",
        "numeric_and_genes": f"Captum IntegratedGradients ({attribution.IG_STEPS} "
                             "Gauss-Legendre steps) from the baseline 'every numeric "
                             "clinical value and gene at the federation mean' "
                             "(standardized 0), all else as observed; "
                             "a patient's values sum to its target minus the target at "
                             "that baseline (max_abs_delta: the integration error)",
        "categorical": "Captum FeatureAblation: target minus its expectation with that "
                       "column replaced by the holdout's categories in proportion",
        "modalities": "exact Shapley values (Captum ShapleyValues, all 6 orders) of the "
                      "model's mask input, baseline mask 0: they sum to the target minus "
                      "the target with no modality; a modality a patient lacks is exactly 0",
        "ranking": "separation: mean attribution among the high observed outcomes minus "
                   "among the low ones (multiclass: mean attribution to each patient's own "
                   "class), the feature's share of the model's separation of the groups; "
                   "mean_abs (mean |attribution|, patients without the modality count 0) "
                   "orders the beeswarm plots",
        "plots": "shap's beeswarm (top features, one dot per patient, coloured by the "
                 "standardized value) and waterfall (one patient with every used modality, "
                 "the highest target among the high observed outcomes) of these values; "
                 "the waterfall shows numeric values and genes, whose integrated "
                 "gradients sum to its prediction",
    }


# --------------------------------------------------------------------------- entry point


def _check_defined(task: Task, enc: EncodedSite, folder: Path) -> None:
    """Refuse a holdout on which the task's headline metric cannot exist, by name."""
    if task.kind == "classification":
        if len(np.unique(enc.labels)) < 2:
            raise DataError(f"{folder}: the holdout has one class only; AUROC is undefined")
    elif task.kind == "regression":
        t = enc.outcome
        if len(t) < 2 or not np.all(np.isfinite(t)) or float(np.var(t)) == 0.0:
            raise DataError(f"{folder}: the holdout's target is constant (or not finite); "
                            "R² is undefined")
    elif not enc.labels.any() or len(enc) < 2:
        raise DataError(f"{folder}: the holdout has no events; the C-index is undefined")


def _holdout_summary(task: Task, schema: FeatureSchema, enc: EncodedSite, folder: Path
                     ) -> dict[str, Any]:
    """Who the holdout is: the class counts, or the target's spread, or events and times."""
    out: dict[str, Any] = {"folder": str(folder), "patients": len(enc)}
    if task.kind == "classification":
        out["classes"] = schema.classes
        out["class_counts"] = np.bincount(enc.labels, minlength=len(schema.classes)).tolist()
    elif task.kind == "regression":
        t = enc.outcome
        out["target"] = {"unit": task.unit, "mean": float(t.mean()), "sd": float(t.std()),
                         "min": float(t.min()), "max": float(t.max())}
    else:
        t, e = enc.outcome, enc.labels.astype(bool)
        out.update(unit=task.unit, events=int(e.sum()), censored=int((~e).sum()),
                   median_time=float(np.median(t)))
    out["with_images"] = int(enc.mask[:, 1].sum())
    out["with_genomics"] = int(enc.mask[:, 2].sum())
    return out


def _method_text(task: Task, terms: _Terms, repeats: int) -> dict[str, str]:
    """The method's wording per task kind (classification's is the original text)."""
    if task.kind == "classification":
        return {
            "metric": "holdout AUROC (binary: class 1; otherwise macro one-vs-rest)",
            "modality_contribution": "AUROC(full) - AUROC with that modality's mask "
                                     "column set to 0 for every patient (absent = no "
                                     "evidence, as in training)",
            "permutation": f"AUROC drop ('importance') and log-loss increase when one "
                           f"column is permuted across patients, mean (and sd) over "
                           f"{repeats} seeded permutations; numeric records are "
                           "permuted with their missing-indicator; genes among "
                           "patients with genomics only",
            "images": f"occlusion: {OCCLUSION_PATCH}x{OCCLUSION_PATCH} patch set to the "
                      f"image mean (gray), stride {OCCLUSION_STRIDE}; map = mean drop "
                      "in the target-class probability over patches covering a pixel",
            "image_patients": "patients with an image, ranked by the target-class "
                              "probability with the image as the only evidence: the "
                              "highest true positives, then the lowest true negatives; "
                              "the maps themselves use the full model"}
    m = terms.metric_name
    if task.kind == "regression":
        metric = ("holdout R² of the predicted value (1 - residual / total sum of squares, "
                  "in the label's unit)")
        groups = ("the highest among patients observed at or above the holdout median, "
                  "then the lowest among those below it")
    else:
        metric = ("holdout Harrell's C-index of the risk (minus the RMST up to the last "
                  "hazard cut), as sksurv's concordance_index_censored: ties count 1/2")
        groups = ("the highest among patients with an event by the median follow-up "
                  "time, then the lowest among those followed past it")
    return {
        "metric": metric,
        "modality_contribution": f"{m}(full) - {m} with that modality's mask column set "
                                 "to 0 for every patient (absent = no evidence, as in "
                                 "training)",
        "permutation": f"{m} drop ('importance') and {terms.loss_name} increase when one "
                       f"column is permuted across patients, mean (and sd) over {repeats} "
                       "seeded permutations; numeric records are permuted with their "
                       "missing-indicator; genes among patients with genomics only",
        "images": f"occlusion: {OCCLUSION_PATCH}x{OCCLUSION_PATCH} patch set to the image "
                  f"mean (gray), stride {OCCLUSION_STRIDE}; map = mean drop in "
                  f"{terms.target} over patches covering a pixel",
        "image_patients": f"patients with an image, ranked by {terms.target} with the "
                          f"image as the only evidence: {groups}; the maps themselves use "
                          "the full model"}


def _loss_text(task: Task) -> str:
    if task.kind == "regression":
        return ("Huber loss (delta 1) on the target standardised by the federation's mean "
                "and sd, as in training")
    if task.kind == "survival":
        return "negative log-likelihood of the discrete-time (logistic) hazard model"
    return "log-loss: mean -log P(true class)"


def explain_run(run: Path, *, seed: int = 0, repeats: int = 3, top: int = 15, images: int = 4,
                rank_by: str = "loss", data: Path | None = None,
                gene_screen_above: int = GENE_SCREEN_ABOVE) -> dict[str, Any]:
    """Explain a finished run's final model on the holdout; writes ``RUN/explain/``.

    ``rank_by`` orders the feature lists: "auroc" (mean drop of the task's headline
    metric: AUROC, R² or C-index; the CLI keeps one name for all kinds) or "loss" (mean
    increase of the task's loss, far less noisy for single genes); every item carries
    both, and ``method.rank_metric`` names the one used. ``data`` overrides the
    federation folder recorded in the run (for a moved run); ``gene_screen_above`` is
    the gene count above which genes are screened by gradient x input before
    permutation. Returns exactly what explanations.json holds. Deterministic given
    ``seed``: the permutations are the only randomness.
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
    task = model.task
    terms = _terms(task, schema.classes)
    key = terms.metric
    classify = task.kind == "classification"
    meta = {"round": saved.round, "run_id": cfg["run_id"]}
    folder = holdout_folder(run, cfg, data)
    site = load_site(folder)
    used = tuple(m for m in MODALITY_NAMES if m in cfg["train.modalities"])
    enc = restrict_modalities(encode(site, schema), used)
    _check_defined(task, enc, folder)
    h = _prepare(model, enc)
    rng = np.random.default_rng([seed, 20240])
    with torch.no_grad():
        base = _score(model, h)  # [headline metric, minus the mean loss]
    if not np.isfinite(base[0]):
        raise DataError(f"{folder}: the holdout's {terms.metric_name} is undefined (no "
                        "comparable patients)")
    n_classes = len(schema.classes)
    # Binary: explain the positive class (index 1); otherwise each patient's own class.
    # Regression and survival have one target per patient and need no class.
    target = (np.zeros(len(enc), dtype=np.int64) if not classify
              else np.ones(len(enc), dtype=np.int64) if n_classes == 2
              else enc.labels.copy())
    modal = _modality_contributions(model, h, used, base)
    records = (_record_importance(model, h, schema, rng, repeats, base, rank_by)
               if "records" in used else [])
    explained = "target-class probability" if classify else terms.target.removeprefix("the ")
    genes, gene_method = (_gene_importance(model, h, schema, rng, repeats, base,
                                           gene_screen_above, torch.from_numpy(target),
                                           rank_by, explained)
                          if "genomics" in used else ([], {"genes_permuted": 0}))
    out_dir = run / EXPLAIN_DIR
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot be created ({exc.strerror})") from None
    for stale in out_dir.glob("image-*.png"):  # maps of an earlier call's patients
        stale.unlink()
    for stale_name in ATTRIBUTION_FIGURES:  # an earlier call's (this one may draw fewer)
        (out_dir / stale_name).unlink(missing_ok=True)
    image_items = []
    if "images" in used and images > 0:
        image_only = torch.zeros_like(h.mask)
        image_only[:, 1] = h.mask[:, 1]
        with torch.no_grad():
            image_scores = _target_values(model, h, h.emb_records, h.emb_images,
                                          h.emb_genomics, image_only,
                                          torch.from_numpy(target)).numpy()
        for i in _pick_image_patients(h, image_scores, images):
            heat, value = _occlusion(model, h, i, int(target[i]))
            pid = site.ids[i]
            name = f"image-{pid}.png"
            peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
            item, bar_label, title = _image_texts(task, schema, h, i, pid, value)
            _image_figure(out_dir / name, h.image[i, 0].numpy(), heat, pid, bar_label, title)
            shown = {"probability": value, "image_only_probability": float(image_scores[i])
                     } if classify else {"target": terms.target, "prediction": value,
                                         "image_only_prediction": float(image_scores[i])}
            image_items.append({"patient_id": pid, "png": name, **item, **shown,
                                "max_drop": float(heat.max()),
                                "peak_yx": [int(peak[0]), int(peak[1])]})
    attributed, attribution_figures = _attributions(model, h, schema, site.ids, used,
                                                    target, top, terms, out_dir)
    subtitle = None if classify else f"{task.kind} task, target: {terms.target}"
    _modality_figure(out_dir / "modality_contributions.png", modal["drop"], float(base[0]),
                     terms.metric_name, subtitle)
    _features_figure(out_dir / "top_features.png", genes, records, top, rank_by, terms,
                     subtitle)
    method: dict[str, Any] = _method_text(task, terms, repeats)
    method = {"metric": method["metric"],
              "modality_contribution": method["modality_contribution"],
              "permutation": method["permutation"], "rank_by": rank_by,
              "rank_metric": f"{key}_drop" if rank_by == "auroc" else "loss_increase",
              "genomics": gene_method, "attribution": _attribution_text(terms),
              "images": method["images"],
              "image_patients": method["image_patients"],
              "seed": seed, "repeats": repeats, "top": top}
    result: dict[str, Any] = finite({
        "run": str(run),
        "run_id": meta["run_id"],
        "model_round": meta["round"],
        "holdout": _holdout_summary(task, schema, enc, folder),
        "task": {"kind": task.kind, "metric": key, "metric_name": terms.metric_name,
                 "loss": _loss_text(task), "target": terms.target, "unit": task.unit},
        "modalities_used": list(used),
        key: float(base[0]),
        "loss": float(-base[1]),
        "modality_contribution": modal["drop"],
        "modality_loss_increase": modal["loss_increase"],
        f"modality_{key}_without": modal["without"],
        f"modality_{key}_alone": modal["alone"],
        "top_features": {"records": records[:top], "genomics": genes[:top]},
        "feature_importance": {
            mod: {f"{key}_drop": {it["name"]: it["importance"] for it in items},
                  "loss_increase": {it["name"]: it["loss_increase"] for it in items}}
            for mod, items in (("records", records), ("genomics", genes))},
        "attribution": attributed,
        "images": image_items,
        "attribution_figures": attribution_figures,
        "figures": {"modality_contributions": "modality_contributions.png",
                    "top_features": "top_features.png"},
        "method": method,
        "runtime_seconds": round(time.perf_counter() - started, 2),
    })
    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(out_dir / "explanations.json", text.encode())
    return result


def _image_texts(task: Task, schema: FeatureSchema, h: _Holdout, i: int, pid: str,
                 value: float) -> tuple[dict[str, Any], str, str]:
    """An image map's JSON fields on the observed outcome, colour-bar label and title."""
    if task.kind == "classification" or h.targets is None:
        label = schema.classes[int(h.labels[i])]
        cls = (schema.classes[1] if len(schema.classes) == 2
               else schema.classes[int(h.labels[i])])
        return ({"label": label, "target_class": cls}, f"drop in P({cls}) when occluded",
                f"patient {pid}: label {label}, predicted P({cls}) = {value:.2f}")
    t = float(h.targets[i])
    unit = f" {task.unit}" if task.unit else ""
    in_unit = f" ({task.unit})" if task.unit else ""
    if task.kind == "regression":
        return ({"label": f"{t:.6g}", "observed_value": t},
                f"drop in predicted value{in_unit} when occluded",
                f"patient {pid}: observed {t:.2f}{unit}, predicted {value:.2f}{unit} "
                "(regression)")
    event = bool(h.labels[i])
    label = f"{'event' if event else 'censored'} at {t:g}{unit}"
    # risk = -RMST, so a drop in risk is RMST gained: days of survival the region costs
    return ({"label": label, "observed_time": t, "event": event},
            f"drop in risk when occluded (RMST gained{in_unit})",
            f"patient {pid}: {label}; predicted RMST to {task.cuts[-1]:.0f}{unit} = "
            f"{-value:.0f} (risk = -RMST)")


def summary_lines(result: dict[str, Any], top: int = 5) -> list[str]:
    """A short human-readable digest for the command line."""
    task = result.get("task") or {}
    metric, name = task.get("metric", "auroc"), task.get("metric_name", "AUROC")
    contrib = result["modality_contribution"]
    head = f"holdout {name} {result[metric]:.3f} ({result['holdout']['patients']} patients)"
    if task.get("kind", "classification") != "classification":
        head += f"; {task['kind']} task, explaining {task.get('target')}"
    lines = [head, f"modality contribution ({name} drop when masked): " + ", ".join(
        f"{m} {v:+.3f}" for m, v in contrib.items() if v is not None)]
    if result["method"]["rank_by"] == "auroc" and metric != "auroc":
        lines.append(f"--rank-by auroc ranks by this task's headline metric, {name}")
    for mod in ("records", "genomics"):
        items = result["top_features"][mod][:top]
        if items:
            key = "importance" if result["method"]["rank_by"] == "auroc" else "loss_increase"
            lines.append(f"top {mod} ({key}): " + ", ".join(
                f"{it['name']} {it[key]:+.4f}" for it in items))
    attributed = result.get("attribution") or {}
    for mod in ("records", "genomics"):
        items = (attributed.get("top_features") or {}).get(mod, [])[:top]
        if items:
            lines.append(f"top {mod} (attribution separation, Captum): " + ", ".join(
                f"{it['name']} {it['separation']:+.4f}" for it in items))
    if attributed.get("modality_shapley"):
        shapley = attributed["modality_shapley"]["mean_abs"]
        lines.append("modality Shapley values (mean |value|): " + ", ".join(
            f"{m} {v:.4f}" for m, v in shapley.items() if v is not None))
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


__all__ = ["RANK_METRICS", "auroc", "comparable_pairs", "explain_from_args", "explain_run",
           "harrell_c", "summary_lines"]

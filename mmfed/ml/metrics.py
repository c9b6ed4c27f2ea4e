"""Classification metrics for a round: discrimination, threshold metrics and calibration.

AUROC is the headline figure because site prevalences differ; accuracy and F1 at a
0.5 threshold are reported because clinicians ask for them, and expected calibration
error because a class-weighted loss shifts probabilities and users must see that.
"""

from __future__ import annotations

import math

import numpy as np


def _safe(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def expected_calibration_error(prob_pos: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Equal-width ECE of the positive-class probability (binary) or top class."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(prob_pos, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(prob_pos[sel].mean() - y[sel].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, labels: np.ndarray,
                           loss: float | None = None) -> dict[str, float | None]:
    """All figures for one evaluation; a figure that is undefined (one class only) is None.

    Binary: n, auroc, accuracy, precision, recall, f1, ece, loss. Multi-class adds
    macro_f1 and recall_<k> per class index k; auroc is then the one-vs-rest macro
    average over the classes present in ``labels``.
    """
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    n_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    binary = n_classes == 2
    avg = "binary" if binary else "macro"
    out: dict[str, float | None] = {"n": float(len(labels))}
    present = np.unique(labels)
    if len(present) < 2:
        out["auroc"] = None
    elif binary:
        out["auroc"] = _safe(roc_auc_score(labels, probs[:, 1]))
    else:
        # One-vs-rest macro AUROC over the classes this site actually has: a small site
        # often lacks a rare class, and sklearn's multi-class call then refuses outright.
        # With two or more classes present each present class has positives and
        # negatives, so its binary AUROC exists; absent classes are simply left out.
        per_class = [roc_auc_score(labels == k, probs[:, k]) for k in present
                     if 0 <= k < n_classes]
        out["auroc"] = _safe(float(np.mean(per_class))) if len(per_class) >= 2 else None
    out["accuracy"] = _safe(accuracy_score(labels, pred))
    out["precision"] = _safe(precision_score(labels, pred, average=avg, zero_division=0))
    out["recall"] = _safe(recall_score(labels, pred, average=avg, zero_division=0))
    out["f1"] = _safe(f1_score(labels, pred, average=avg, zero_division=0))
    if not binary:
        # Macro F1 and per-class recall: with imbalanced classes accuracy hides a class
        # the model never predicts; per-class recall names it. A class absent from the
        # labels has no recall (None), not 0, so it does not drag a cross-site mean down.
        out["macro_f1"] = _safe(f1_score(labels, pred, average="macro", zero_division=0))
        recalls = recall_score(labels, pred, labels=list(range(n_classes)), average=None,
                               zero_division=0)
        for k in range(n_classes):
            out[f"recall_{k}"] = _safe(recalls[k]) if k in present else None
    if binary:
        out["ece"] = expected_calibration_error(probs[:, 1], labels.astype(np.float64))
    else:
        top = probs.max(axis=1)
        out["ece"] = expected_calibration_error(top, (pred == labels).astype(np.float64))
    out["loss"] = _safe(loss) if loss is not None else None
    return out

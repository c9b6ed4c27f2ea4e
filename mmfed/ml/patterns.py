"""Holdout figures split by which modalities a patient has.

A single AUROC hides what matters in uneven consortia: whether the model still works
for the patient without a genomic profile. Patients are grouped by their modality
pattern ("complete", "records+images", ...) and each group gets its own figures.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmfed.config import MODALITY_NAMES
from mmfed.ml.metrics import classification_metrics

COMPLETE = "complete"


def pattern_names(mask: np.ndarray, modalities: tuple[str, ...] = MODALITY_NAMES
                  ) -> list[str]:
    """One name per patient: "complete" when every used modality is present."""
    used = [i for i, m in enumerate(MODALITY_NAMES) if m in modalities]
    names = []
    for row in mask > 0.5:
        present = [MODALITY_NAMES[i] for i in used if row[i]]
        names.append(COMPLETE if len(present) == len(used) else "+".join(present) or "none")
    return names


def metrics_by_pattern(probs: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                       modalities: tuple[str, ...] = MODALITY_NAMES
                       ) -> dict[str, dict[str, Any]]:
    """Per pattern: n, AUROC (None when the group has one class), accuracy, F1, loss."""
    names = np.array(pattern_names(mask, modalities))
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(names.tolist()), key=lambda n: (n != COMPLETE, n)):
        sel = names == name
        p = probs[sel]
        nll = float(-np.log(np.clip(p[np.arange(int(sel.sum())), labels[sel]], 1e-12, 1.0))
                    .mean())
        figures = classification_metrics(p, labels[sel], nll)
        out[name] = {"n": int(sel.sum()),
                     **{k: figures[k] for k in ("auroc", "accuracy", "f1", "loss")}}
    return out

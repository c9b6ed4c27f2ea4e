"""Holdout figures split by which modalities a patient has.

A single AUROC hides what matters in uneven consortia: whether the model still works
for the patient without a genomic profile. Patients are grouped by their modality
pattern ("complete", "records+images", ...) and each group gets its own figures.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmfed.config import MODALITY_NAMES
from mmfed.ml.task import Task, task_metrics

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


# The figures a pattern's row shows, per task kind.
PATTERN_KEYS = {"classification": ("auroc", "accuracy", "f1", "loss"),
                "regression": ("mae", "rmse", "r2"),
                "survival": ("c_index", "ibs")}


def metrics_by_pattern(probs: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                       modalities: tuple[str, ...] = MODALITY_NAMES,
                       task: Task | None = None, targets: np.ndarray | None = None
                       ) -> dict[str, dict[str, Any]]:
    """Per pattern: n and the task's main figures (None where a group cannot define
    one, e.g. AUROC of a group with one class). ``probs`` are the task's outputs."""
    task = task or Task(classes=tuple(str(c) for c in range(probs.shape[1])))
    y = targets if targets is not None else np.zeros(len(labels))
    names = np.array(pattern_names(mask, modalities))
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(names.tolist()), key=lambda n: (n != COMPLETE, n)):
        sel = names == name
        p = probs[sel]
        loss = None
        if task.kind == "classification":
            loss = float(-np.log(np.clip(p[np.arange(int(sel.sum())), labels[sel]], 1e-12,
                                         1.0)).mean())
        figures = task_metrics(task, p, labels[sel], y[sel], loss)
        out[name] = {"n": int(sel.sum()),
                     **{k: figures.get(k) for k in PATTERN_KEYS[task.kind]}}
    return out

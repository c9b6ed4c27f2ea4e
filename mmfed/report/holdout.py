"""The final model on the server's holdout: ROC, confusion matrix and reliability.

The per-round metrics are single numbers; these figures show what lies behind the
final ones (where on the ROC curve the model operates, which class it confuses, and
whether a predicted 0.8 means 80 %), which is what a clinical reader needs before
trusting a model. The model and the holdout are rebuilt with mmfed's own loaders and
encoder, so the figures describe exactly the model the run saved and the data the
server evaluated it on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfed.errors import DataError
from mmfed.report.plots import Plot, message_plot, new_axes, save

CALIBRATION_BINS = 10  # the same equal-width bins as mmfed.ml.metrics' ECE


@dataclass(frozen=True)
class HoldoutResult:
    """Predictions of the saved model on the holdout, with what is needed to label them."""

    probs: np.ndarray  # (n, classes)
    labels: np.ndarray  # (n,)
    classes: list[str]
    loss: float
    model_round: int | None
    folder: Path
    metrics: dict[str, float | None]

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2


def evaluate_holdout(run: Path) -> HoldoutResult:
    """Rebuild RUN/model.pt and predict the holdout; any defect is a one-line DataError."""
    from mmfed.data import load_site
    from mmfed.ml.features import encode
    from mmfed.ml.metrics import classification_metrics
    from mmfed.ml.training import predict
    from mmfed.run.saved_model import holdout_folder, load_saved_model

    saved = load_saved_model(run)
    model, schema, cfg = saved.model, saved.schema, saved.cfg
    folder = holdout_folder(run, cfg)
    holdout = encode(load_site(folder), schema)  # load_site raises DataError itself
    if len(holdout) == 0:
        raise DataError(f"{folder}: the holdout has no patients")
    if holdout.labels.min() < 0 or holdout.labels.max() >= len(schema.classes):
        raise DataError(f"{folder}: holdout labels do not match the model's classes "
                        f"{schema.classes}")
    probs, loss = predict(model, holdout, tuple(cfg["train.modalities"]))
    return HoldoutResult(probs=probs, labels=holdout.labels, classes=list(schema.classes),
                         loss=float(loss), folder=folder, model_round=saved.round,
                         metrics=classification_metrics(probs, holdout.labels, loss))


def roc_plot(result: HoldoutResult, out: Path) -> Plot:
    """ROC of the positive class (binary) or one-vs-rest per class."""
    from sklearn.metrics import auc, roc_curve

    file, title = "holdout_roc.png", "ROC curve of the final model on the holdout"
    present = np.unique(result.labels)
    if len(present) < 2:
        return message_plot(out, file, title, "ROC undefined: the holdout has one class only",
                            xlabel="false positive rate", ylabel="true positive rate")
    fig, ax = new_axes(title, "false positive rate (1 − specificity)",
                       "true positive rate (sensitivity)")
    targets = [1] if result.binary else [int(c) for c in present]
    for cls in targets:
        fpr, tpr, _ = roc_curve(result.labels == cls, result.probs[:, cls])
        name = result.classes[cls] if not result.binary else f"positive = {result.classes[1]}"
        ax.plot(fpr, tpr, linewidth=2, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.legend(fontsize="small", loc="lower right")
    return save(fig, out, file, f"{title}; {len(result.labels)} holdout patients")


def confusion_plot(result: HoldoutResult, out: Path) -> Plot:
    """Counts of true vs predicted class at the arg-max (0.5 for binary) threshold."""
    from sklearn.metrics import confusion_matrix

    n = len(result.classes)
    matrix = confusion_matrix(result.labels, result.probs.argmax(axis=1), labels=list(range(n)))
    fig, ax = new_axes("Confusion matrix on the holdout (arg-max prediction)",
                       "predicted class", "true class")
    ax.grid(False)
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, label="patients")
    ax.set_xticks(range(n), result.classes, rotation=30 if n > 3 else 0)
    ax.set_yticks(range(n), result.classes)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if matrix[i, j] > threshold else "black")
    correct = int(np.trace(matrix))
    return save(fig, out, "holdout_confusion.png",
                f"Confusion matrix: {correct} of {int(matrix.sum())} holdout patients correct")


def calibration_bins(confidence: np.ndarray, outcome: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted, observed frequency, count) per equal-width bin.

    Empty bins have NaN mean and frequency (a gap in the curve) and count 0.
    """
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1]), 0, CALIBRATION_BINS - 1)
    pred = np.full(CALIBRATION_BINS, np.nan)
    obs = np.full(CALIBRATION_BINS, np.nan)
    count = np.zeros(CALIBRATION_BINS, dtype=np.int64)
    for b in range(CALIBRATION_BINS):
        sel = idx == b
        if sel.any():
            pred[b] = float(confidence[sel].mean())
            obs[b] = float(outcome[sel].mean())
            count[b] = int(sel.sum())
    return pred, obs, count


def calibration_plot(result: HoldoutResult, out: Path) -> Plot:
    """Reliability diagram: predicted probability vs observed frequency, with bin sizes."""
    if result.binary:
        confidence = result.probs[:, 1]
        outcome = (result.labels == 1).astype(np.float64)
        xlabel = f"predicted probability of class '{result.classes[1]}'"
        ylabel = f"observed fraction of class '{result.classes[1]}'"
    else:
        confidence = result.probs.max(axis=1)
        outcome = (result.probs.argmax(axis=1) == result.labels).astype(np.float64)
        xlabel, ylabel = "confidence of the predicted class", "observed accuracy"
    pred, obs, count = calibration_bins(confidence, outcome)
    ece = result.metrics.get("ece")
    title = "Calibration (reliability) on the holdout"
    if ece is not None:
        title += f", ECE {ece:.3f}"
    fig, ax = new_axes(title, xlabel, ylabel)
    hist = ax.twinx()
    centers = (np.arange(CALIBRATION_BINS) + 0.5) / CALIBRATION_BINS
    hist.bar(centers, count, width=0.9 / CALIBRATION_BINS, color="#cccccc", alpha=0.6,
             label="patients per bin")
    hist.set_ylabel("patients per bin")
    ax.set_zorder(hist.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    keep = count > 0  # connect the non-empty bins; empty ones are not evidence
    ax.plot(pred[keep], obs[keep], marker="o", linewidth=2, color="#1f77b4", label="model")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(fontsize="small", loc="upper left")
    return save(fig, out, "holdout_calibration.png",
                f"{title}; {int(keep.sum())} non-empty bins of {CALIBRATION_BINS}")

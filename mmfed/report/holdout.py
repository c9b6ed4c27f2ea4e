"""The final model on the server's holdout, in the figures its task is judged by.

The per-round metrics are single numbers; these figures show what lies behind the
final ones, which is what a clinical reader needs before trusting a model:

* classification: where on the ROC curve the model operates, which class it confuses,
  and whether a predicted 0.8 means 80 % (reliability);
* regression: predicted against observed values (the identity line is a perfect
  model) and the residuals, whose spread and offset say how far off a prediction is
  in the label's own unit and whether the model is biased;
* survival: the holdout's Kaplan–Meier curve against the model's mean predicted
  survival curve, overall (calibration-in-the-large) and per tertile of predicted
  risk (the separation a clinician would act on, and whether each group's curve is
  right), plus the time-dependent AUC at the study's horizons.

The model and the holdout are rebuilt with mmfed's own loaders and encoder, and the
task comes from the model's schema, so the figures describe exactly the model the run
saved and the data the server evaluated it on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfed.errors import DataError
from mmfed.ml.task import Task
from mmfed.report.plots import Plot, message_plot, new_axes, save

CALIBRATION_BINS = 10  # the same equal-width bins as mmfed.ml.metrics' ECE
RISK_GROUPS = (("lowest-risk third", "#2ca02c"), ("middle third", "#ff7f0e"),
               ("highest-risk third", "#d62728"))  # low to high predicted risk


def with_unit(text: str, unit: str) -> str:
    """An axis label with the label's unit when the task names one ("time (days)")."""
    return f"{text} ({unit})" if unit else text


@dataclass(frozen=True)
class HoldoutResult:
    """Predictions of the saved model on the holdout, with what is needed to label them."""

    outputs: np.ndarray  # the task's outputs: (n, C) probabilities, (n,) values or (n, K) S(cuts)
    labels: np.ndarray  # (n,) class index; survival: the event (1) or censoring (0)
    targets: np.ndarray  # (n,) float64: regression value or survival time; 0 to classify
    task: Task
    classes: list[str]
    loss: float
    model_round: int | None
    folder: Path
    metrics: dict[str, float | None]

    @property
    def probs(self) -> np.ndarray:
        """The class probabilities (a classification task's outputs; the earlier name)."""
        return self.outputs

    @property
    def kind(self) -> str:
        return self.task.kind

    @property
    def binary(self) -> bool:
        return self.task.kind == "classification" and len(self.classes) == 2

    @property
    def events(self) -> np.ndarray:
        """Survival: True where the patient had the event, False where censored."""
        return self.labels == 1


def evaluate_holdout(run: Path) -> HoldoutResult:
    """Rebuild RUN/model.pt and predict the holdout; any defect is a one-line DataError."""
    from mmfed.data import load_site
    from mmfed.ml.features import encode
    from mmfed.ml.task import task_metrics
    from mmfed.ml.training import predict
    from mmfed.run.saved_model import holdout_folder, load_saved_model

    saved = load_saved_model(run)
    model, schema, cfg = saved.model, saved.schema, saved.cfg
    task = schema.task  # raises DataError for a malformed task itself
    folder = holdout_folder(run, cfg)
    holdout = encode(load_site(folder), schema)  # load_site raises DataError itself
    if len(holdout) == 0:
        raise DataError(f"{folder}: the holdout has no patients")
    if task.kind == "classification":
        if holdout.labels.min() < 0 or holdout.labels.max() >= len(schema.classes):
            raise DataError(f"{folder}: holdout labels do not match the model's classes "
                            f"{schema.classes}")
    else:
        what = "regression targets" if task.kind == "regression" else "follow-up times"
        if not np.all(np.isfinite(holdout.outcome)):
            raise DataError(f"{folder}: the holdout's {what} are not all finite numbers")
        if task.kind == "survival" and not np.isin(holdout.labels, (0, 1)).all():
            raise DataError(f"{folder}: holdout events must be 0 (censored) or 1 (event)")
    outputs, loss = predict(model, holdout, tuple(cfg["train.modalities"]), task=task)
    return HoldoutResult(outputs=outputs, labels=holdout.labels,
                         targets=holdout.outcome.astype(np.float64), task=task,
                         classes=list(schema.classes), loss=float(loss), folder=folder,
                         model_round=saved.round,
                         metrics=task_metrics(task, outputs, holdout.labels, holdout.outcome,
                                              loss))


# ---------------------------------------------------------------- classification
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


# ---------------------------------------------------------------- regression
def _finite_pairs(result: HoldoutResult) -> tuple[np.ndarray, np.ndarray]:
    """(observed, predicted) of the patients with a finite prediction: a diverged model
    predicts NaN, and a figure must say so rather than fail to draw."""
    obs = result.targets.astype(np.float64)
    pred = np.asarray(result.outputs, dtype=np.float64).reshape(-1)
    keep = np.isfinite(obs) & np.isfinite(pred)
    return obs[keep], pred[keep]


def _figure_text(value: float | None, label: str, digits: str = ".3f",
                 unit: str = "") -> str | None:
    if value is None or not math.isfinite(value):
        return None
    return f"{label} {value:{digits}}" + (f" {unit}" if unit else "")


def regression_scatter(result: HoldoutResult, out: Path) -> Plot:
    """Predicted against observed value per patient, with the identity line.

    Points on the line are perfect predictions; a cloud flatter than the line is a
    model that shrinks towards the mean, one shifted off it a biased model. R² and MAE
    are in the title so the figure still says how good the model is when copied alone.
    """
    unit = result.task.unit
    file = "holdout_scatter.png"
    figures = [t for t in (_figure_text(result.metrics.get("r2"), "R²"),
                           _figure_text(result.metrics.get("mae"), "MAE", ".3g", unit))
               if t is not None]
    title = "Predicted vs observed on the holdout" + (f": {', '.join(figures)}"
                                                      if figures else "")
    xlabel = with_unit("observed value", unit)
    ylabel = with_unit("predicted value", unit)
    obs, pred = _finite_pairs(result)
    if not len(obs):
        return message_plot(out, file, title, "the model predicted no finite value",
                            xlabel=xlabel, ylabel=ylabel)
    fig, ax = new_axes(title, xlabel, ylabel)
    ax.scatter(obs, pred, s=18, alpha=0.7, color="#1f77b4", edgecolors="none",
               label=f"holdout patients (n = {len(obs)})")
    lo, hi = float(min(obs.min(), pred.min())), float(max(obs.max(), pred.max()))
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.05
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], linestyle=":", color="grey", label="identity (perfect)")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.legend(fontsize="small", loc="upper left")
    return save(fig, out, file, f"{title}; {len(obs)} holdout patients")


def residual_histogram(result: HoldoutResult, out: Path) -> Plot:
    """Histogram of predicted − observed: its centre is the model's bias, its width the
    typical error in the label's unit (what a clinician weighs against a decision)."""
    unit = result.task.unit
    file, title = "holdout_residuals.png", "Residuals on the holdout (predicted − observed)"
    xlabel = with_unit("residual: predicted − observed", unit)
    obs, pred = _finite_pairs(result)
    if not len(obs):
        return message_plot(out, file, title, "the model predicted no finite value",
                            xlabel=xlabel, ylabel="patients")
    residual = pred - obs
    bias, spread = float(residual.mean()), float(residual.std())
    fig, ax = new_axes(title, xlabel, "patients")
    ax.hist(residual, bins=int(np.clip(len(residual) // 3, 5, 30)), color="#1f77b4",
            alpha=0.8, edgecolor="white", label=f"patients (n = {len(residual)})")
    ax.axvline(0.0, linestyle=":", color="grey", label="no error")
    ax.axvline(bias, linestyle="--", color="#d62728", label=f"mean residual {bias:+.3g}")
    ax.legend(fontsize="small", loc="upper right")
    return save(fig, out, file, f"{title}; mean {bias:+.3g}, sd {spread:.3g}"
                + (f" {unit}" if unit else ""))


# ---------------------------------------------------------------- survival
def _km_steps(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Kaplan–Meier curve as step vertices from (0, 1), for ``drawstyle='steps-post'``."""
    from mmfed.ml.outcomes import kaplan_meier

    t, s = kaplan_meier(time, event)
    return np.concatenate(([0.0], t)), np.concatenate(([1.0], s))


def _predicted_steps(surv: np.ndarray, cuts: np.ndarray, end: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The mean predicted curve as steps at the cuts, read like ``step_survival``: 1
    before the first cut, S(cuts[k]) from cuts[k] on, the last value held to ``end``."""
    mean = np.asarray(surv, dtype=np.float64).mean(axis=0)
    x = np.concatenate(([0.0], cuts))
    y = np.concatenate(([1.0], mean))
    if end > cuts[-1]:
        x, y = np.append(x, end), np.append(y, mean[-1])
    return x, y


def _follow_up_end(time: np.ndarray) -> float:
    """The time axis ends just after the holdout's last follow-up: the last hazard
    interval may reach far beyond it (its cut is a histogram edge of the federation's
    event times), and there the predicted curve has nothing observed to be held against."""
    end = float(time.max())
    return end * 1.03 if end > 0 else 1.0


def survival_km_plot(result: HoldoutResult, out: Path) -> Plot:
    """The holdout's Kaplan–Meier curve against the mean predicted survival curve.

    KM is the model-free estimate of the cohort's survival that handles censoring; the
    mean of the patients' predicted curves should follow it if the model is calibrated
    in the large. Censored patients are ticked on the KM curve.
    """
    file = "holdout_km.png"
    ibs = _figure_text(result.metrics.get("ibs"), "IBS")
    title = "Kaplan–Meier vs mean predicted survival" + (f", {ibs}" if ibs else "")
    time, event = result.targets, result.events
    cuts = np.asarray(result.task.cuts, dtype=np.float64)
    fig, ax = new_axes(title, with_unit("time", result.task.unit), "survival probability")
    km_x, km_y = _km_steps(time, event)
    ax.plot(km_x, km_y, drawstyle="steps-post", linewidth=2, color="#1f1f1f",
            label=f"observed: Kaplan–Meier (n = {len(time)}, {int(event.sum())} events)")
    censored = np.sort(time[~event])
    if len(censored):
        idx = np.searchsorted(km_x, censored, side="right") - 1
        ax.plot(censored, km_y[np.clip(idx, 0, None)], linestyle="none", marker="|",
                markersize=8, color="#1f1f1f", label="censored")
    px, py = _predicted_steps(result.outputs, cuts, float(time.max()))
    ax.plot(px, py, drawstyle="steps-post", linewidth=2, linestyle="--", color="#1f77b4",
            label="predicted: mean of the model's curves")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0, _follow_up_end(time))
    ax.legend(fontsize="small", loc="best")
    return save(fig, out, file, f"{title}; {len(time)} holdout patients, "
                f"{int(event.sum())} events")


def risk_tertiles(result: HoldoutResult) -> list[np.ndarray]:
    """Patient indices of the three predicted-risk groups, lowest risk first.

    Split by rank into equal thirds (not at quantile values), so tied risks still give
    three groups of known size; ties are broken by holdout order, deterministically.
    """
    from mmfed.ml.task import risk_of

    risk = risk_of(result.task, result.outputs)
    order = np.argsort(np.nan_to_num(risk, nan=-np.inf), kind="stable")
    return list(np.array_split(order, len(RISK_GROUPS)))


def survival_tertile_plot(result: HoldoutResult, out: Path) -> Plot:
    """Observed (KM, solid) and mean predicted (dashed) survival per risk tertile.

    A useful model separates the groups' KM curves (discrimination), and each group's
    dashed curve lies on its own KM curve (calibration within groups). Each tertile has
    one colour in both curves, so the pairs are read together.
    """
    from matplotlib.lines import Line2D

    file = "holdout_km_tertiles.png"
    title = "Survival by predicted-risk tertile: observed vs predicted"
    xlabel = with_unit("time", result.task.unit)
    if len(result.labels) < len(RISK_GROUPS):
        return message_plot(out, file, title, "too few holdout patients for risk tertiles",
                            xlabel=xlabel, ylabel="survival probability")
    time, event = result.targets, result.events
    cuts = np.asarray(result.task.cuts, dtype=np.float64)
    end = float(time.max())
    fig, ax = new_axes(title, xlabel, "survival probability")
    handles: list[Line2D] = []
    for (name, color), idx in zip(RISK_GROUPS, risk_tertiles(result), strict=True):
        km_x, km_y = _km_steps(time[idx], event[idx])
        ax.plot(km_x, km_y, drawstyle="steps-post", linewidth=2, color=color)
        px, py = _predicted_steps(result.outputs[idx], cuts, end)
        ax.plot(px, py, drawstyle="steps-post", linewidth=1.5, linestyle="--", color=color)
        handles.append(Line2D([], [], color=color, linewidth=2,
                              label=f"{name} (n = {len(idx)}, {int(event[idx].sum())} events)"))
    handles += [Line2D([], [], color="#444444", linewidth=2, label="observed (Kaplan–Meier)"),
                Line2D([], [], color="#444444", linewidth=1.5, linestyle="--",
                       label="predicted (mean curve)")]
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0, _follow_up_end(time))
    ax.legend(handles=handles, fontsize="small", loc="best")
    return save(fig, out, file, f"{title}; {len(time)} holdout patients in three groups "
                "of predicted risk")


def survival_auc_plot(result: HoldoutResult, out: Path) -> Plot:
    """Cumulative/dynamic AUC at each horizon: does the model tell who has had the event
    by time t from who is still event-free at t, early and late in follow-up."""
    file = "holdout_td_auc.png"
    mean = _figure_text(result.metrics.get("td_auc"), "mean")
    title = "Time-dependent AUC on the holdout" + (f" ({mean})" if mean else "")
    xlabel = with_unit("horizon t", result.task.unit)
    ylabel = "cumulative/dynamic AUC at t"
    horizons = list(result.task.horizons)
    aucs = [result.metrics.get(f"auc_{i}") for i in range(1, len(horizons) + 1)]
    if not horizons:
        return message_plot(out, file, title, "the task names no horizons", xlabel=xlabel,
                            ylabel=ylabel)
    if all(a is None for a in aucs):
        return message_plot(out, file, title, "AUC undefined at every horizon (no event "
                            "before it, or nobody still at risk after it)", xlabel=xlabel,
                            ylabel=ylabel)
    fig, ax = new_axes(title, xlabel, ylabel)
    positions = np.arange(len(horizons))
    heights = [a if a is not None else 0.0 for a in aucs]
    ax.bar(positions, heights, width=0.6, color="#1f77b4", label="AUC(t)")
    for x, a in enumerate(aucs):
        ax.text(float(x), (a if a is not None else 0.0) + 0.02,
                f"{a:.3f}" if a is not None else "undefined", ha="center", va="bottom",
                fontsize="small")
    ax.axhline(0.5, linestyle=":", color="grey", label="chance (0.5)")
    ax.set_xticks(positions, [f"{h:.4g}" for h in horizons])
    ax.set_ylim(0, 1.08)
    ax.legend(fontsize="small", loc="lower right")
    return save(fig, out, file, f"{title} at {len(horizons)} horizon(s)")

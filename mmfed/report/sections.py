"""The report's sections: what a reviewer of a federated run needs to see, in order.

Each builder takes the validated run (and the figures it needs) and returns one
``Section``. Privacy and secure-aggregation status are stated in words as well as
plotted, because "DP was off" is the single most important fact about a run that
leaves a hospital, and an empty plot alone is easy to misread.

Tables, plots and wording follow the run's task (classification, regression or
survival, see :mod:`mmfed.ml.task`): each kind is judged by its own figures, and a
survival report that spoke of AUROC and cross-entropy would mislead its reader. The
task comes from the saved model's schema when the holdout was evaluated, else from
the figures metrics.jsonl recorded (``RunData.kind``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from mmfed.ml.task import Task
from mmfed.report import plots
from mmfed.report.holdout import (
    HoldoutResult,
    calibration_plot,
    confusion_plot,
    regression_scatter,
    residual_histogram,
    roc_plot,
    survival_auc_plot,
    survival_km_plot,
    survival_tertile_plot,
)
from mmfed.report.html import Section, figure, para, status, table
from mmfed.report.rundata import STATUSES, RunData, number

METRICS = (("auroc", "AUROC"), ("accuracy", "accuracy"), ("precision", "precision"),
           ("recall", "recall"), ("f1", "F1"), ("ece", "ECE (calibration error)"),
           ("loss", "loss (cross-entropy)"))
REGRESSION_METRICS = (("r2", "R² (explained variance)"), ("mae", "MAE"), ("rmse", "RMSE"),
                      ("loss", "loss (Huber, standardised target)"))
SURVIVAL_METRICS = (("c_index", "C-index (Harrell)"), ("uno_c_index", "Uno's C-index (IPCW)"),
                    ("td_auc", "time-dependent AUC (mean over horizons)"),
                    ("ibs", "integrated Brier score"), ("events", "events"),
                    ("loss", "loss (hazard negative log-likelihood)"))
# The per-round table's columns: a few figures per kind, so the table stays readable.
ROUND_COLUMNS = {
    "classification": (("auroc", "AUROC"), ("accuracy", "accuracy"), ("f1", "F1"),
                       ("ece", "ECE"), ("loss", "loss")),
    "regression": (("r2", "R²"), ("mae", "MAE"), ("rmse", "RMSE"), ("loss", "loss")),
    "survival": (("c_index", "C-index"), ("uno_c_index", "Uno's C"), ("td_auc", "td-AUC"),
                 ("ibs", "IBS"), ("loss", "loss")),
}
LOSS_CAPTIONS = {"classification": "Global cross-entropy loss on the holdout.",
                 "regression": "Global Huber loss on the holdout, on the standardised target "
                               "(the federation's mean and spread of the label).",
                 "survival": "Global discrete-time hazard negative log-likelihood on the "
                             "holdout."}
LOSS_LABELS = {"classification": "loss", "regression": "Huber loss",
               "survival": "hazard NLL"}  # short: a plot title and axis
HEADLINE_NOTES = {"classification": "0.5 is chance",
                  "regression": "0 is no better than predicting the mean, 1 is perfect",
                  "survival": "0.5 is chance, 1 orders every comparable pair correctly"}
UNDEFINED_LOCALLY = {"classification": "a split holds one class only",
                     "regression": "a split's values are all equal",
                     "survival": "a split has no events or no comparable pairs"}
BETTER_NOTES = {"classification": "ECE and loss: lower is better; the other figures: "
                                  "higher is better.",
                "regression": "MAE, RMSE and loss: lower is better; R²: higher is better.",
                "survival": "Integrated Brier score and loss: lower is better; C-index and "
                            "AUC: higher is better; events are a count, not a score."}
COUNT_KEYS = ("events", "n")  # shown as whole numbers
MAX_EVENT_ROWS = 50  # a long run with a flaky site would otherwise bury the page


def headline(kind: str) -> tuple[str, str]:
    """(key, name) of the figure a run of this kind is summarised by."""
    return Task(kind=kind).headline


def _kind(data: RunData, task: Task | None) -> str:
    """The model's own task where it was loaded, else what metrics.jsonl shows."""
    return task.kind if task is not None else data.kind


def _numbered(prefix: str, figures: tuple[dict[str, Any], ...]) -> list[int]:
    """The k of every ``<prefix>_<k>`` key in any of ``figures``, sorted."""
    pattern = re.compile(rf"{prefix}_(\d+)")
    found = {int(m.group(1)) for f in figures for k in f if (m := pattern.fullmatch(k))}
    return sorted(found)


def metric_labels(kind: str, task: Task | None, *figures: dict[str, Any]
                  ) -> list[tuple[str, str]]:
    """(key, label) of the figures a table shows for this kind of task, in order.

    Classification keeps its fixed list, plus macro F1 and per-class recall where more
    than two classes logged them; regression errors carry the label's unit; survival
    lists the AUC at each horizon, named by its time when the task is known.
    """
    unit = task.unit if task is not None else ""
    if kind == "regression":
        return [(k, f"{label} ({unit})" if unit and k in ("mae", "rmse") else label)
                for k, label in REGRESSION_METRICS]
    if kind == "survival":
        horizons = list(task.horizons) if task is not None else []
        ks = sorted(set(_numbered("auc", figures)) | set(range(1, len(horizons) + 1)))
        aucs = [(f"auc_{k}", f"AUC at t = {horizons[k - 1]:.4g}" + (f" {unit}" if unit else "")
                 if k <= len(horizons) else f"AUC at horizon {k}") for k in ks]
        rows = list(SURVIVAL_METRICS)
        return rows[:3] + aucs + rows[3:]
    rows = list(METRICS)
    extra: list[tuple[str, str]] = []
    if any("macro_f1" in f for f in figures):
        extra.append(("macro_f1", "macro F1"))
    classes = list(task.classes) if task is not None else []
    for k in _numbered("recall", figures):
        name = classes[k] if k < len(classes) else str(k)
        extra.append((f"recall_{k}", f"recall of class '{name}'"))
    at = [k for k, _ in rows].index("ece")
    return rows[:at] + extra + rows[at:]


def metric_value(key: str, value: Any) -> float | int:
    """A figure for a table cell: counts as whole numbers, null as NaN (an en dash)."""
    v = number(value)
    return int(v) if key in COUNT_KEYS and math.isfinite(v) else v


def task_text(task: Task | None, kind: str) -> str:
    """The task in words for the run table ("survival (time in days, 9 intervals)")."""
    if task is None:
        return kind
    unit = f" in {task.unit}" if task.unit else ""
    if kind == "regression":
        return f"regression (value{unit})"
    if kind == "survival":
        return f"survival (time{unit}, {len(task.cuts)} hazard intervals)"
    return f"classification ({len(task.classes)} classes)"


def _wall(seconds: Any) -> str:
    s = number(seconds)
    if not math.isfinite(s):
        return "–"
    minutes, sec = divmod(s, 60)
    return f"{s:.1f} s" if minutes < 1 else f"{int(minutes)} min {sec:.0f} s ({s:.0f} s)"


def _last_finite(values: list[float]) -> float:
    for value in reversed(values):
        if math.isfinite(value):
            return value
    return math.nan


def site_epsilon(data: RunData, site: str) -> float:
    """Final ε of a site: the summary's, else its last per-round report."""
    final = number(data.summary_sites.get(site, {}).get("epsilon"))
    return final if math.isfinite(final) else _last_finite(data.site_series(site, "epsilon"))


def privacy_status(data: RunData) -> tuple[str, str]:
    """(text, css class) of the run's differential-privacy status."""
    if not data.federated:
        return ("not applicable: centralized reference run (all data pooled, no DP)", "note")
    if data.dp_reported:
        spent = [site_epsilon(data, s) for s in data.site_names]
        spent = [e for e in spent if math.isfinite(e)]
        budget = data.config.get("privacy.epsilon")
        delta = data.config.get("privacy.delta")
        text = "ON (site-owned DP-SGD)"
        if isinstance(budget, int | float):
            text += f"; budget ε = {budget:g} per site"
        if isinstance(delta, int | float):
            text += f" at δ = {delta:g}"
        if spent:
            text += f"; largest ε spent {max(spent):.3g}"
        return text, "ok"
    if data.dp_configured:
        return "enabled in the config, but no site reported an ε spend", "warn"
    return "OFF: site updates carry no formal privacy guarantee", "bad"


def secagg_status(data: RunData) -> tuple[str, str]:
    """(text, css class) of the run's secure-aggregation status."""
    if not data.federated:
        return "not applicable: centralized reference run", "note"
    secure, total = data.secure_rounds, len(data.rounds)
    if secure == total:
        threshold = data.part(data.rounds[-1], "aggregation").get("threshold")
        extra = f", threshold {threshold} sites" if isinstance(threshold, int) else ""
        return f"ON in all {total} round(s){extra}: the server saw only the sum", "ok"
    if secure:
        return f"ON in {secure} of {total} rounds only", "warn"
    return "OFF: the server saw each site's plaintext update", "bad"


def summary_section(data: RunData, holdout: HoldoutResult | None) -> Section:
    cfg = data.config
    task = holdout.task if holdout is not None else None
    kind = _kind(data, task)
    rounds = data.summary.get("rounds", data.round_numbers[-1])
    run_rows: list[list[object]] = [
        ["mode", data.mode],
        ["run directory", str(data.path)],
        ["run id", cfg.get("run_id", "–")],
        ["seed", cfg.get("seed", "–")],
        ["rounds" if data.federated else "rounds (epochs)", rounds],
        ["sites", len(data.site_names) if data.federated else "pooled"],
        ["wall time", _wall(data.summary.get("wall_seconds"))],
        ["data folder", cfg.get("data.dir", "–")],
        ["model fusion", cfg.get("model.fusion", "–")],
        ["modalities", ", ".join(map(str, cfg.get("train.modalities", []))) or "–"],
    ]
    if kind != "classification":  # a classification report keeps its earlier rows
        run_rows.insert(4, ["task", task_text(task, kind)])
    if holdout is not None:
        run_rows.append(["holdout patients", len(holdout.labels)])
    final = data.final
    final_rows = [[label, metric_value(key, final.get(key))]
                  for key, label in metric_labels(kind, task, final)]
    dp_text, dp_cls = privacy_status(data)
    sa_text, sa_cls = secagg_status(data)
    body = (status("Differential privacy", dp_text, dp_cls)
            + status("Secure aggregation", sa_text, sa_cls)
            + table(["setting", "value"], run_rows, "Run", "table-run")
            + table(["metric", "value"], final_rows,
                    f"Final global figures on the holdout (round {data.round_numbers[-1]})",
                    "table-final"))
    return Section("summary", "Summary", body)


def _per_round_table(data: RunData, kind: str) -> str:
    counts = data.status_counts()
    columns = ROUND_COLUMNS[kind]
    rows: list[list[object]] = []
    for i, line in enumerate(data.rounds):
        g = line["global"]
        rows.append([line["round"], *(number(g.get(key)) for key, _ in columns),
                     counts["trained"][i]])
    return table(["round", *(label for _, label in columns), "sites trained"], rows,
                 "Global figures by round", "table-rounds")


def performance_section(data: RunData, out: Path, task: Task | None = None) -> Section:
    kind = _kind(data, task)
    key, label = headline(kind)
    bounded = kind != "regression"  # R² is unbounded below; AUROC and C in [0, 1]
    main = plots.global_metric(data, out, key, label, unit_interval=bounded)
    loss = plots.global_metric(data, out, "loss", LOSS_LABELS[kind], unit_interval=False)
    body = (para("Global figures are measured by the server on its holdout after each "
                 "round's aggregation.")
            + figure(main, f"Global {label} on the holdout; {HEADLINE_NOTES[kind]}.")
            + figure(loss, LOSS_CAPTIONS[kind]))
    local = (plots.site_local_metric(data, out, key, label, unit_interval=bounded)
             if data.federated else None)
    if local is not None:
        body += figure(local, f"Each site's {label} of the global model on its own "
                       f"validation split (undefined where {UNDEFINED_LOCALLY[kind]}).")
    elif data.federated:
        body += para(f"No site reported local validation {label} (federation.local_eval "
                     "off?).", "note")
    else:
        body += para("Centralized run: there are no per-site evaluations.", "note")
    return Section("performance", "Performance", body + _per_round_table(data, kind))


def privacy_section(data: RunData, out: Path) -> Section:
    plot = plots.privacy_epsilon(data, out)
    dp_text, dp_cls = privacy_status(data)
    body = status("Differential privacy", dp_text, dp_cls)
    if data.dp_reported:
        body += para("ε is each site's cumulative privacy loss as reported by its own "
                     "accountant after the round; a site declines a round that would take it "
                     "past its budget (dashed).")
    else:
        body += para("Differential privacy was off for this run: no privacy loss was "
                     "accounted and there is no ε to plot."
                     if data.federated else
                     "Centralized reference run: differential privacy was off.")
    body += figure(plot, "Cumulative ε by round per site, budgets dashed."
                   if data.dp_reported else "No ε was reported, so the plot is empty.")
    if data.federated and data.site_names:
        rows: list[list[object]] = []
        for site in data.site_names:
            info = data.summary_sites.get(site, {})
            rows.append([site, site_epsilon(data, site), number(info.get("delta")),
                         number(info.get("epsilon_budget")),
                         *(info.get(f"rounds_{s}", "–") for s in STATUSES)])
        body += table(["site", "final ε", "δ", "ε budget", "rounds trained", "rounds declined",
                       "rounds dropped"], rows, "Privacy by site", "table-privacy")
        body += para("These figures are what the sites reported. Each site's own record "
                     "is at the site: its privacy ledger, and its hash-chained audit trail "
                     "of every request it served or refused and every release it made "
                     "(audit.jsonl in its privacy folder; check it there with "
                     "`mmfed audit verify DIR`).")
    return Section("privacy", "Privacy", body)


def _event_reason(entry: dict[str, Any]) -> str:
    """Why a site did not train; a decline is explained by its privacy projection."""
    reason = entry.get("reason")
    if isinstance(reason, str) and reason:
        return reason
    projected, budget = number(entry.get("epsilon_projected")), number(
        entry.get("epsilon_budget"))
    if entry.get("status") == "declined" and math.isfinite(projected + budget):
        return f"privacy budget: training would reach ε {projected:.3g} > budget {budget:g}"
    return "–"


def participation_section(data: RunData, out: Path) -> Section:
    plot = plots.participation(data, out)
    body = figure(plot, "Sites per round by outcome: trained, declined (privacy budget) "
                  "or dropped (failure, timeout, rejected update).")
    events: list[list[object]] = []
    for line in data.rounds:
        for site in data.site_names:
            entry = data.site_entry(line, site)
            if entry and entry.get("status") != "trained":
                events.append([line["round"], site, entry.get("status", "–"),
                               _event_reason(entry)])
    if not data.federated:
        body += para("Centralized run: all data was pooled, no sites took part.", "note")
    elif not events:
        body += para("Every site trained in every round.", "ok")
    else:
        shown = events[:MAX_EVENT_ROWS]
        body += table(["round", "site", "status", "reason"], shown,
                      "Rounds a site did not train", "table-events")
        if len(events) > len(shown):
            body += para(f"… and {len(events) - len(shown)} more (see metrics.jsonl).", "note")
    return Section("participation", "Participation", body)


def _bytes(value: float) -> str:
    unit, scale = plots.byte_unit(value)
    return f"{value / scale:.1f} {unit}" if unit != "B" else f"{value:.0f} B"


def communication_section(data: RunData, out: Path) -> Section:
    sent = plots.communication_bytes(data, out)
    timing = plots.communication_seconds(data, out)
    up = sum(v for v in data.series("bytes", "up") if math.isfinite(v))
    down = sum(v for v in data.series("bytes", "down") if math.isfinite(v))
    if data.federated:
        body = para(f"Total over {len(data.rounds)} round(s): {_bytes(up)} up (sites → "
                    f"server), {_bytes(down)} down (server → sites).")
    else:
        body = para("Centralized run: no model updates were exchanged.", "note")
    body += figure(sent, "Bytes of model parameters (or masked updates) exchanged per round, "
                   "summed over sites.")
    body += figure(timing, "Wall-clock seconds per round, split by stage where the run "
                   "recorded stages; 'other' is the remainder of the round.")
    return Section("communication", "Communication and time", body)


def _holdout_text(result: HoldoutResult) -> str:
    """Who the holdout figures are about: class balance, follow-up, or value range."""
    n = len(result.labels)
    unit = f" {result.task.unit}" if result.task.unit else ""
    if result.kind == "regression":
        values = result.targets
        return (f"observed values{' in' + unit if unit else ''}: mean {values.mean():.4g}, "
                f"sd {values.std():.4g}, range {values.min():.4g} to {values.max():.4g}")
    if result.kind == "survival":
        events = int(result.events.sum())
        return (f"{events} events, {n - events} censored; follow-up "
                f"{result.targets.min():.4g} to {result.targets.max():.4g}{unit}")
    counts = np.bincount(result.labels, minlength=len(result.classes))
    balance = ", ".join(f"{c}: {int(k)}" for c, k in zip(result.classes, counts, strict=True))
    return f"patients per class: {balance}"


def _holdout_figures(result: HoldoutResult, out: Path) -> str:
    """The figures that show what lies behind the task's final numbers."""
    if result.kind == "regression":
        return (figure(regression_scatter(result, out), "Predicted against observed value "
                       "per holdout patient; points on the dotted identity line are exact.")
                + figure(residual_histogram(result, out), "Residuals (predicted − observed): "
                         "the dashed line is the mean error (bias), the spread the typical "
                         "error."))
    if result.kind == "survival":
        return (figure(survival_km_plot(result, out), "Kaplan–Meier estimate of the holdout "
                       "(solid, censored patients ticked) against the mean of the model's "
                       "predicted survival curves (dashed, a step at each interval cut); "
                       "close curves mean calibrated predictions.")
                + figure(survival_tertile_plot(result, out), "Holdout split into thirds by "
                         "predicted risk: each third's Kaplan–Meier curve (solid) against "
                         "its mean predicted curve (dashed, same colour). Separated groups "
                         "mean discrimination, matching pairs calibration.")
                + figure(survival_auc_plot(result, out), "Cumulative/dynamic AUC at each "
                         "horizon: how well the predicted risk separates patients with an "
                         "event by t from those still event-free at t; 0.5 is chance."))
    return (figure(roc_plot(result, out), "ROC curve; the area under it is the AUROC.")
            + figure(confusion_plot(result, out), "Confusion matrix at the arg-max decision.")
            + figure(calibration_plot(result, out), "Reliability diagram: points on the "
                     "diagonal are perfectly calibrated; grey bars show how many patients "
                     "fall in each bin."))


def holdout_section(result: HoldoutResult, data: RunData, out: Path) -> Section:
    rnd = f"round {result.model_round}" if result.model_round is not None else "final round"
    body = para(f"The saved model (model.pt, {rnd}) re-evaluated on {len(result.labels)} "
                f"holdout patients from {result.folder} ({_holdout_text(result)}).")
    rows = [[label, metric_value(key, result.metrics.get(key)),
             metric_value(key, data.final.get(key))]
            for key, label in metric_labels(result.kind, result.task, result.metrics,
                                            data.final)]
    body += table(["metric", "recomputed now", "recorded in summary.json"], rows,
                  "Holdout figures", "table-holdout")
    body += _holdout_figures(result, out)
    return Section("holdout", "Holdout evaluation of the final model", body)


def baseline_section(data: RunData, base: RunData, out: Path,
                     task: Task | None = None) -> Section:
    kind = _kind(data, task)
    key, label = headline(kind)
    plot = plots.baseline_metric(data, base, out, key, label,
                                 unit_interval=kind != "regression")
    body = para(f"Baseline: {base.mode} run {base.path}.")
    ours, theirs = data.config.get("data.dir"), base.config.get("data.dir")
    if base.kind != kind:
        body += status("Caution", f"the baseline trained a {base.kind} task, this run a "
                       f"{kind} task; their figures cannot be compared", "warn")
    elif ours and theirs and Path(str(ours)) != Path(str(theirs)):
        body += status("Caution", f"the baseline used a different data folder ({theirs}); "
                       "its figures may not be comparable", "warn")
    body += figure(plot, f"Holdout {label} by round of this run and of the baseline "
                   "(a centralized baseline's rounds are epochs over the pooled data).")
    rows: list[list[object]] = []
    for key, label in metric_labels(kind, task, data.final, base.final):
        a, b = metric_value(key, data.final.get(key)), metric_value(key, base.final.get(key))
        rows.append([label, a, b, a - b if math.isfinite(a) and math.isfinite(b) else math.nan])
    rows.append(["rounds", data.round_numbers[-1], base.round_numbers[-1], "–"])
    rows.append(["wall time", _wall(data.summary.get("wall_seconds")),
                 _wall(base.summary.get("wall_seconds")), "–"])
    body += table(["metric", f"this run ({data.mode})", f"baseline ({base.mode})",
                   "difference"], rows, "Final figures", "table-baseline")
    body += para(BETTER_NOTES[kind], "note")
    return Section("baseline", "Baseline comparison", body)


def explanations_section(run: Path, out: Path) -> Section:
    """What drove the predictions, from ``mmfed explain RUN`` when it has been run."""
    import json

    folder = run / "explain"
    source = folder / "explanations.json"
    if not source.is_file():
        return Section("explanations", "Explanations", para(
            "No explanations yet: run `mmfed explain RUN`, then render the report again, "
            "to add per-modality contributions, top features and image attribution maps."))
    try:
        found = json.loads(source.read_text(encoding="utf-8"))
        contribution = dict(found["modality_contribution"])
        top = dict(found["top_features"])
        images = list(found.get("images", []))
        figures = dict(found.get("figures", {}))
    except (OSError, ValueError, KeyError, TypeError):
        return Section("explanations", "Explanations", para(
            f"{source} is unreadable; run `mmfed explain RUN` again."))
    method = found.get("method", {}) if isinstance(found.get("method"), dict) else {}
    task = found.get("task", {}) if isinstance(found.get("task"), dict) else {}
    metric = str(task.get("metric_name", "AUROC"))  # files before task kinds: AUROC
    loss = "log-loss" if task.get("kind", "classification") == "classification" else "loss"
    body = para(f"Computed on the holdout by `mmfed explain` ({method.get('rank_by', 'loss')} "
                f"ranking, seed {method.get('seed', '?')}). "
                f"A modality's contribution is the {metric} lost when it is masked out for "
                "every patient.")
    body += table(["modality", f"{metric} drop when masked"],
                  [[m, contribution[m]] for m in contribution], "Modality contributions",
                  "table-modality-contribution")
    for modality, rows in top.items():
        body += table(["rank", "feature", f"{loss} increase", f"{metric} drop"],
                      [[r.get("rank"), r.get("name"), r.get("loss_increase"),
                        r.get("importance")] for r in rows[:10]],
                      f"Top {modality} features (permutation importance)",
                      f"table-top-{modality}")
    body += _attribution_block(found.get("attribution"), found.get("attribution_figures"),
                               folder, out)
    names = [str(v) for v in figures.values()] + [str(i.get("png")) for i in images]
    for name in names:
        body += _explain_figure(folder, name, out,
                                name.removesuffix(".png").replace("-", " ").replace("_", " "))
    return Section("explanations", "Explanations", body)


def _explain_figure(folder: Path, name: str, out: Path, caption: str) -> str:
    """A PNG of ``mmfed explain`` copied next to the report, or nothing for a name that
    is not a plain PNG file in ``folder`` (the JSON is data, not a path to trust)."""
    import shutil

    src = folder / name
    if not name.endswith(".png") or "/" in name or not src.is_file():
        return ""
    shutil.copyfile(src, out / f"explain-{name}")
    return figure(plots.Plot(f"explain-{name}", name.removesuffix(".png")), caption)


ATTRIBUTION_CAPTIONS = {
    "beeswarm_records": "Clinical features (Captum): one dot per holdout patient, its "
                        "attribution on the x axis, coloured by its own standardized value "
                        "(categorical values grey).",
    "beeswarm_genomics": "Genes (Captum integrated gradients): one dot per holdout patient "
                         "with genomics, coloured by its standardized expression.",
    "waterfall": "One patient's prediction, built up from the attribution baseline by each "
                 "feature's integrated gradient.",
}


def _attribution_block(block: object, figures: object, folder: Path, out: Path) -> str:
    """The Captum attributions of ``mmfed explain``: modality Shapley values, the
    global ranking, and shap's beeswarm and waterfall plots (absent in older files)."""
    if not isinstance(block, dict):
        return ""
    try:
        shapley = dict(block["modality_shapley"])
        rows = [[m, shapley["mean_abs"][m], shapley["mean"][m], shapley["patients_with"][m]]
                for m in shapley["mean_abs"] if shapley["mean_abs"][m] is not None]
        top = dict(block["top_features"])
        target = str(block.get("target", "the target"))
    except (KeyError, TypeError, ValueError):
        return para("The attributions in explanations.json are unreadable; run "
                    "`mmfed explain RUN` again.")
    html = para(f"Attributions (Captum) are per patient, in the unit of {target}: "
                "integrated gradients for numeric values and genes, feature ablation for "
                "categorical values, exact Shapley values for modalities (zero for a "
                "modality a patient lacks). Features are ranked by their separation: mean "
                "attribution among high observed outcomes minus among low ones, their share "
                "of how the model tells the groups apart.")
    html += table(["modality", "mean |Shapley value|", "mean Shapley value", "patients with it"],
                  rows, "Modality attributions (exact Shapley values)",
                  "table-modality-shapley")
    for modality, items in top.items():
        if isinstance(items, list) and items:
            html += table(["rank", "feature", "separation", "mean |attribution|"],
                          [[r.get("rank"), r.get("name"), r.get("separation"),
                            r.get("mean_abs")]
                           for r in items[:10] if isinstance(r, dict)],
                          f"Top {modality} features (attributions)",
                          f"table-attribution-{modality}")
    for key, name in (figures.items() if isinstance(figures, dict) else []):
        html += _explain_figure(folder, str(name), out, ATTRIBUTION_CAPTIONS.get(str(key),
                                                                                 str(name)))
    return html


def subtitle(data: RunData) -> str:
    """Plain text (the page escapes it)."""
    kind = data.kind
    what = data.mode if kind == "classification" else f"{data.mode} {kind}"
    return f"{what} run · {len(data.rounds)} round(s) · {data.path}"

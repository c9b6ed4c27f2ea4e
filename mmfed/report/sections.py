"""The report's sections: what a reviewer of a federated run needs to see, in order.

Each builder takes the validated run (and the figures it needs) and returns one
``Section``. Privacy and secure-aggregation status are stated in words as well as
plotted, because "DP was off" is the single most important fact about a run that
leaves a hospital, and an empty plot alone is easy to misread.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mmfed.report import plots
from mmfed.report.holdout import (
    HoldoutResult,
    calibration_plot,
    confusion_plot,
    roc_plot,
)
from mmfed.report.html import Section, figure, para, status, table
from mmfed.report.rundata import STATUSES, RunData, number

METRICS = (("auroc", "AUROC"), ("accuracy", "accuracy"), ("precision", "precision"),
           ("recall", "recall"), ("f1", "F1"), ("ece", "ECE (calibration error)"),
           ("loss", "loss (cross-entropy)"))
MAX_EVENT_ROWS = 50  # a long run with a flaky site would otherwise bury the page


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
    if holdout is not None:
        run_rows.append(["holdout patients", len(holdout.labels)])
    final = data.final
    final_rows = [[label, number(final.get(key))] for key, label in METRICS]
    dp_text, dp_cls = privacy_status(data)
    sa_text, sa_cls = secagg_status(data)
    body = (status("Differential privacy", dp_text, dp_cls)
            + status("Secure aggregation", sa_text, sa_cls)
            + table(["setting", "value"], run_rows, "Run", "table-run")
            + table(["metric", "value"], final_rows,
                    f"Final global figures on the holdout (round {data.round_numbers[-1]})",
                    "table-final"))
    return Section("summary", "Summary", body)


def _per_round_table(data: RunData) -> str:
    counts = data.status_counts()
    rows: list[list[object]] = []
    for i, line in enumerate(data.rounds):
        g = line["global"]
        rows.append([line["round"], number(g.get("auroc")), number(g.get("accuracy")),
                     number(g.get("f1")), number(g.get("ece")), number(g.get("loss")),
                     counts["trained"][i]])
    return table(["round", "AUROC", "accuracy", "F1", "ECE", "loss", "sites trained"], rows,
                 "Global figures by round", "table-rounds")


def performance_section(data: RunData, out: Path) -> Section:
    auroc = plots.global_metric(data, out, "auroc", "AUROC", unit_interval=True)
    loss = plots.global_metric(data, out, "loss", "loss", unit_interval=False)
    body = (para("Global figures are measured by the server on its holdout after each "
                 "round's aggregation.")
            + figure(auroc, "Global AUROC on the holdout; 0.5 is chance.")
            + figure(loss, "Global cross-entropy loss on the holdout."))
    local = plots.site_local_auroc(data, out) if data.federated else None
    if local is not None:
        body += figure(local, "Each site's AUROC of the global model on its own validation "
                       "split (undefined where a split holds one class only).")
    elif data.federated:
        body += para("No site reported local validation AUROC (federation.local_eval off?).",
                     "note")
    else:
        body += para("Centralized run: there are no per-site evaluations.", "note")
    return Section("performance", "Performance", body + _per_round_table(data))


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


def holdout_section(result: HoldoutResult, data: RunData, out: Path) -> Section:
    roc = roc_plot(result, out)
    confusion = confusion_plot(result, out)
    calibration = calibration_plot(result, out)
    counts = np.bincount(result.labels, minlength=len(result.classes))
    balance = ", ".join(f"{c}: {int(n)}" for c, n in zip(result.classes, counts, strict=True))
    rnd = f"round {result.model_round}" if result.model_round is not None else "final round"
    body = para(f"The saved model (model.pt, {rnd}) re-evaluated on {len(result.labels)} "
                f"holdout patients from {result.folder} (patients per class: {balance}).")
    rows = [[label, number(result.metrics.get(key)), number(data.final.get(key))]
            for key, label in METRICS]
    body += table(["metric", "recomputed now", "recorded in summary.json"], rows,
                  "Holdout figures", "table-holdout")
    body += figure(roc, "ROC curve; the area under it is the AUROC.")
    body += figure(confusion, "Confusion matrix at the arg-max decision.")
    body += figure(calibration, "Reliability diagram: points on the diagonal are perfectly "
                   "calibrated; grey bars show how many patients fall in each bin.")
    return Section("holdout", "Holdout evaluation of the final model", body)


def baseline_section(data: RunData, base: RunData, out: Path) -> Section:
    plot = plots.baseline_auroc(data, base, out)
    body = para(f"Baseline: {base.mode} run {base.path}.")
    ours, theirs = data.config.get("data.dir"), base.config.get("data.dir")
    if ours and theirs and Path(str(ours)) != Path(str(theirs)):
        body += status("Caution", f"the baseline used a different data folder ({theirs}); "
                       "its figures may not be comparable", "warn")
    body += figure(plot, "Holdout AUROC by round of this run and of the baseline "
                   "(a centralized baseline's rounds are epochs over the pooled data).")
    rows: list[list[object]] = []
    for key, label in METRICS:
        a, b = number(data.final.get(key)), number(base.final.get(key))
        rows.append([label, a, b, a - b if math.isfinite(a) and math.isfinite(b) else math.nan])
    rows.append(["rounds", data.round_numbers[-1], base.round_numbers[-1], "–"])
    rows.append(["wall time", _wall(data.summary.get("wall_seconds")),
                 _wall(base.summary.get("wall_seconds")), "–"])
    body += table(["metric", f"this run ({data.mode})", f"baseline ({base.mode})",
                   "difference"], rows, "Final figures", "table-baseline")
    body += para("ECE and loss: lower is better; the other figures: higher is better.", "note")
    return Section("baseline", "Baseline comparison", body)


def explanations_section(run: Path, out: Path) -> Section:
    """What drove the predictions, from ``mmfed explain RUN`` when it has been run."""
    import json
    import shutil

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
    body = para(f"Computed on the holdout by `mmfed explain` ({method.get('rank_by', 'loss')} "
                f"ranking, seed {method.get('seed', '?')}). "
                "A modality's contribution is the AUROC lost when it is masked out for "
                "every patient.")
    body += table(["modality", "AUROC drop when masked"],
                  [[m, contribution[m]] for m in contribution], "Modality contributions",
                  "table-modality-contribution")
    for modality, rows in top.items():
        body += table(["rank", "feature", "log-loss increase", "AUROC drop"],
                      [[r.get("rank"), r.get("name"), r.get("loss_increase"),
                        r.get("importance")] for r in rows[:10]],
                      f"Top {modality} features (permutation importance)",
                      f"table-top-{modality}")
    names = [str(v) for v in figures.values()] + [str(i.get("png")) for i in images]
    for name in names:
        src = folder / name
        if not name.endswith(".png") or "/" in name or not src.is_file():
            continue
        shutil.copyfile(src, out / f"explain-{name}")
        body += figure(plots.Plot(f"explain-{name}", name.removesuffix(".png")),
                       name.removesuffix(".png").replace("-", " ").replace("_", " "))
    return Section("explanations", "Explanations", body)


def subtitle(data: RunData) -> str:
    """Plain text (the page escapes it)."""
    return f"{data.mode} run · {len(data.rounds)} round(s) · {data.path}"

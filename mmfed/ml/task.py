"""What the model predicts: the task a federation trains, its head, loss and outputs.

Three kinds (``site.toml`` ``[task] kind``). Every loss is a mean of per-patient terms,
because DP-SGD clips each patient's gradient on its own:

* ``classification``: softmax over ``classes``, cross-entropy (class-weighted as
  ``train.class_weighting`` says).
* ``regression``: one output, the target standardised with the federation's mean and
  spread (learned from the secure sum of the sites' moments, like the features), and
  the Huber loss on that scale: squared near the truth, linear for the outlying
  values that real laboratory exports hold, so one patient cannot dominate a step.
* ``survival``: a discrete-time hazard model (logistic hazard). Follow-up is cut into
  intervals at quantiles of the federation's event times (again from a secure sum:
  a histogram of event times, see :func:`task_from_moments`); the head gives one
  hazard logit per interval, and a patient's likelihood is the product of surviving
  each interval before theirs and of the event (or, censored, of surviving the
  interval up to its midpoint rule). Unlike Cox's partial likelihood, which couples
  every patient of a risk set, each patient's term depends on that patient alone,
  so per-sample clipping bounds exactly one patient's influence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("classification", "regression", "survival")
SURVIVAL_INTERVALS = 10  # hazard intervals: enough resolution for a few dozen events a site
HORIZON_QUANTILES = (0.25, 0.5, 0.75)  # of event times: where time-dependent AUC is read
HISTOGRAM_BINS = 48  # log-spaced bins of the event-time histogram the sites sum
# Without a holdout to suggest a range, the histogram spans these times (any unit from
# hours to decades in days); with one, its own event times set the range.
DEFAULT_TIME_RANGE = (1e-2, 1e5)


@dataclass(frozen=True)
class Task:
    """The federation's task, agreed before round 1 and carried in the schema."""

    kind: str = "classification"
    classes: tuple[str, ...] = ()
    unit: str = ""
    target_mean: float = 0.0  # regression: the standardisation the head predicts on
    target_std: float = 1.0
    cuts: tuple[float, ...] = ()  # survival: right ends of the hazard intervals
    horizons: tuple[float, ...] = ()  # survival: times at which AUC is reported
    baseline: tuple[float, ...] = ()  # survival: the federation's hazard per interval

    @property
    def outputs(self) -> int:
        if self.kind == "regression":
            return 1
        if self.kind == "survival":
            return len(self.cuts)
        return len(self.classes)

    @property
    def headline(self) -> tuple[str, str]:
        """The figure a run is summarised by, and its name."""
        return {"classification": ("auroc", "AUROC"), "regression": ("r2", "R²"),
                "survival": ("c_index", "C-index")}[self.kind]

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "unit": self.unit, "target_mean": self.target_mean,
                "target_std": self.target_std, "cuts": list(self.cuts),
                "horizons": list(self.horizons), "baseline": list(self.baseline)}

    @staticmethod
    def from_config(cfg: dict[str, Any], classes: list[str]) -> Task:
        kind = str(cfg.get("kind", "classification"))
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}")
        task = Task(kind=kind, classes=tuple(classes), unit=str(cfg.get("unit", "")),
                    target_mean=float(cfg.get("target_mean", 0.0)),
                    target_std=float(cfg.get("target_std", 1.0)),
                    cuts=tuple(float(c) for c in cfg.get("cuts", [])),
                    horizons=tuple(float(h) for h in cfg.get("horizons", [])),
                    baseline=tuple(float(b) for b in cfg.get("baseline", [])))
        task.check()
        return task

    def check(self) -> None:
        """A task the model can be built from; a malformed one is refused by name."""
        if self.kind == "classification" and len(self.classes) < 2:
            raise ValueError("a classification task needs at least 2 classes")
        if self.kind == "regression" and not (math.isfinite(self.target_std)
                                              and self.target_std > 0
                                              and math.isfinite(self.target_mean)):
            raise ValueError("a regression task needs a finite mean and positive spread")
        if self.kind == "survival":
            cuts = np.asarray(self.cuts)
            if cuts.size < 1 or not np.all(np.isfinite(cuts)) or cuts[0] <= 0 \
                    or np.any(np.diff(cuts) <= 0):
                raise ValueError("a survival task needs increasing positive interval cuts")
            if self.baseline and (len(self.baseline) != cuts.size or not all(
                    0 < b < 1 for b in self.baseline)):
                raise ValueError("a survival baseline needs one hazard in (0, 1) per "
                                 "interval")


def target_tensor(task: Task, labels: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """What the loss reads as ``y``: class indices, the standardised regression target
    (n, 1), or (time, event) pairs (n, 2)."""
    if task.kind == "regression":
        z = (targets.astype(np.float64) - task.target_mean) / task.target_std
        return z.astype(np.float32)[:, None]
    if task.kind == "survival":
        return np.stack([targets.astype(np.float32), labels.astype(np.float32)], axis=1)
    return labels.astype(np.int64)


# ----------------------------------------------------------------------- losses
def make_task_loss(task: Task, labels: np.ndarray, class_weighting: str) -> Any:
    """The per-patient-decomposable loss of the task (an ``nn.Module`` with Opacus's
    ``reduction`` attribute, which ghost clipping switches to ``"none"``)."""
    import torch
    from torch import nn

    if task.kind == "regression":
        return nn.HuberLoss(delta=1.0)
    if task.kind == "survival":
        return HazardLoss(task.cuts)
    return nn.CrossEntropyLoss(weight=class_weights(labels, task.outputs, class_weighting)
                               .to(torch.float32))


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> Any:
    """Inverse-frequency weights normalised to mean 1; absent classes get weight 1."""
    import torch

    if mode == "none":
        return torch.ones(n_classes)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.ones(n_classes)
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    return torch.tensor(w / w[present].mean(), dtype=torch.float32)


def _hazard_loss_class() -> type:
    import torch
    from torch import nn

    class _HazardLoss(nn.Module):
        """Negative log-likelihood of the logistic discrete-time hazard model.

        Interval k is (cuts[k-1], cuts[k]] with cuts[-1] = 0. A patient whose event is
        in interval j survived the intervals before it and had the event in j; one
        censored in j survived the intervals before it, and j too when followed past
        its midpoint (half an interval at risk counts as surviving it, the usual
        discrete-time rule). Follow-up beyond the last cut counts as surviving every
        interval.
        """

        cuts: torch.Tensor
        mids: torch.Tensor

        def __init__(self, cuts: tuple[float, ...], reduction: str = "mean") -> None:
            super().__init__()
            edges = torch.tensor(cuts, dtype=torch.float32)
            lefts = torch.cat([torch.zeros(1), edges[:-1]])
            self.register_buffer("cuts", edges)
            self.register_buffer("mids", (lefts + edges) / 2)
            self.reduction = reduction

        def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            time, event = y[:, 0].contiguous(), y[:, 1] > 0.5
            n_int = logits.shape[1]
            j = torch.bucketize(time, self.cuts)  # cuts[j-1] < time <= cuts[j]
            inside = j < n_int
            k = torch.arange(n_int, device=logits.device)[None, :]
            jc = j.clamp(max=n_int - 1)[:, None]
            past_mid = time >= self.mids[jc.squeeze(1)]
            survived = (k < j[:, None]) | ((k == jc) & (inside & ~event & past_mid)[:, None])
            had_event = (k == jc) & (inside & event)[:, None]
            logsig = nn.functional.logsigmoid
            per = -(survived.to(logits.dtype) * logsig(-logits)
                    + had_event.to(logits.dtype) * logsig(logits)).sum(dim=1)
            if self.reduction == "none":
                return per
            if self.reduction == "sum":
                return per.sum()
            return per.mean()

    return _HazardLoss


_HAZARD: type | None = None


def HazardLoss(cuts: tuple[float, ...]) -> Any:
    """The hazard loss module (the class is built on first use: torch loads lazily)."""
    global _HAZARD
    if _HAZARD is None:
        _HAZARD = _hazard_loss_class()
    return _HAZARD(cuts)


# ----------------------------------------------------------------------- outputs
def outputs_of(task: Task, logits: Any) -> np.ndarray:
    """What the model predicts, in the task's own terms: class probabilities (n, C),
    the regression value in the label's unit (n,), or the survival curve at the cuts
    (n, K)."""
    import torch

    if task.kind == "regression":
        return (logits[:, 0].double() * task.target_std + task.target_mean).cpu().numpy()
    if task.kind == "survival":
        return torch.cumprod(1.0 - torch.sigmoid(logits.double()), dim=1).cpu().numpy()
    return torch.softmax(logits, dim=1).cpu().numpy()


def task_metrics(task: Task, outputs: np.ndarray, labels: np.ndarray, targets: np.ndarray,
                 loss: float | None) -> dict[str, float | None]:
    """The task's own figures (``../shared/design.md`` section 3)."""
    if task.kind == "regression":
        from mmfed.ml.outcomes import regression_metrics

        return regression_metrics(outputs, targets, loss)
    if task.kind == "survival":
        from mmfed.ml.outcomes import survival_metrics

        return survival_metrics(outputs, np.asarray(task.cuts), targets, labels,
                                list(task.horizons), loss)
    from mmfed.ml.metrics import classification_metrics

    return classification_metrics(outputs, labels, loss)


def risk_of(task: Task, outputs: np.ndarray) -> np.ndarray:
    """One higher-is-worse number per patient: P(class 1) for a binary task, the value
    for regression, the risk score for survival (explanations rank features by it)."""
    if task.kind == "regression":
        return outputs.astype(np.float64)
    if task.kind == "survival":
        from mmfed.ml.outcomes import risk_score

        return risk_score(outputs, np.asarray(task.cuts))
    return outputs[:, -1].astype(np.float64)


# ----------------------------------------------------------------- agreement
def histogram_edges(times: np.ndarray | None) -> list[float]:
    """Log-spaced edges of the event-time histogram: a holdout's event times set the
    range (with a factor 2 of room each side); without them, ``DEFAULT_TIME_RANGE``."""
    lo, hi = DEFAULT_TIME_RANGE
    if times is not None:
        t = times[np.isfinite(times) & (times > 0)]
        if t.size:
            lo, hi = float(t.min()) / 2, float(t.max()) * 2
    if not hi > lo:
        hi = lo * 4
    return [float(e) for e in np.geomspace(lo, hi, HISTOGRAM_BINS + 1)]


def bin_indicators(times: np.ndarray, edges: list[float]) -> np.ndarray:
    """(n, bins) one-hot of each time's histogram bin; times outside fall in the end
    bins, so every event is counted once."""
    e = np.asarray(edges)
    idx = np.clip(np.searchsorted(e, times, side="right") - 1, 0, len(e) - 2)
    out = np.zeros((len(times), len(e) - 1), dtype=np.float64)
    out[np.arange(len(times)), idx] = 1.0
    return out


def cuts_from_histogram(edges: list[float], fractions: np.ndarray,
                        intervals: int = SURVIVAL_INTERVALS) -> tuple[list[float], list[float]]:
    """(cuts, horizons): interval ends at equal quantiles of the federation's event
    times, and the AUC horizons at its quartiles, interpolated log-linearly in a bin.

    Quantile cuts give every interval about the same number of events, which keeps
    each hazard estimable on a small cohort. Cuts that coincide are merged."""
    f = np.clip(np.asarray(fractions, dtype=np.float64), 0, None)
    total = f.sum()
    e = np.log(np.asarray(edges))
    if total <= 0:
        grid = np.exp(np.linspace(e[0], e[-1], intervals + 1)[1:])
        return [float(c) for c in grid], [float(np.exp(np.quantile(e, q)))
                                          for q in HORIZON_QUANTILES]
    cdf = np.concatenate([[0.0], np.cumsum(f) / total])

    def quantile(q: float) -> float:
        # the bin where the CDF first reaches q, then linear in log time inside it
        # (np.interp is undefined on the CDF's flat stretches of empty bins)
        b = int(np.clip(np.searchsorted(cdf, q * (1 - 1e-12), side="left") - 1, 0,
                        len(f) - 1))
        share = (q - cdf[b]) / (cdf[b + 1] - cdf[b]) if cdf[b + 1] > cdf[b] else 1.0
        return float(np.exp(e[b] + np.clip(share, 0.0, 1.0) * (e[b + 1] - e[b])))

    raw = [quantile(k / intervals) for k in range(1, intervals + 1)]
    cuts: list[float] = []
    for c in raw:
        if not cuts or c > cuts[-1] * (1 + 1e-9):
            cuts.append(c)
    return cuts, [quantile(q) for q in HORIZON_QUANTILES]


def outcome_width(kind: str, edges: list[float]) -> int:
    """How many statistics columns the task's agreement adds after the features: the
    regression target; or, for survival, a histogram of event times (over the patients
    with an event) and one of follow-up times (over all patients)."""
    if kind == "regression":
        return 1
    if kind == "survival":
        return 2 * (len(edges) - 1)
    return 0


def outcome_values(kind: str, labels: np.ndarray, targets: np.ndarray | None,
                   edges: list[float]) -> list[np.ndarray]:
    """A site's values for the task's statistics columns (see ``outcome_width``): the
    mean of a bin's indicator is the fraction of the column's patients in that bin."""
    if kind == "regression" and targets is not None:
        return [targets.astype(np.float64)]
    if kind == "survival" and targets is not None:
        events = bin_indicators(targets[labels == 1], edges)
        everyone = bin_indicators(targets, edges)
        return [events[:, b] for b in range(events.shape[1])] + \
            [everyone[:, b] for b in range(everyone.shape[1])]
    return []


def baseline_hazards(edges: list[float], events: np.ndarray, exits: np.ndarray,
                     cuts: list[float]) -> list[float]:
    """The federation's hazard in each interval, life-table style: events in it over
    patients still at risk at its start, from the two summed histograms (counts per
    bin, interpolated log-linearly inside a bin). The head starts from it, so round 1
    begins at the pooled Kaplan–Meier curve instead of an arbitrary one."""
    e = np.log(np.asarray(edges))
    cum_events = np.concatenate([[0.0], np.cumsum(np.clip(events, 0, None))])
    cum_exits = np.concatenate([[0.0], np.cumsum(np.clip(exits, 0, None))])
    total = cum_exits[-1]
    out, left = [], 0.0
    for cut in cuts:
        lo = np.interp(np.log(left), e, cum_events) if left > 0 else 0.0
        hi = np.interp(np.log(cut), e, cum_events)
        gone = np.interp(np.log(left), e, cum_exits) if left > 0 else 0.0
        at_risk = total - gone
        hazard = (hi - lo) / at_risk if at_risk > 0 else 0.5
        out.append(float(np.clip(hazard, 1e-3, 0.95)))
        left = cut
    return out


def task_from_moments(kind: str, classes: list[str], unit: str, edges: list[float],
                      means: list[float], stds: list[float], counts: list[int]) -> Task:
    """The task from the outcome columns' pooled moments and counts (see
    ``outcome_values``)."""
    if kind == "regression":
        return Task(kind=kind, classes=tuple(classes), unit=unit, target_mean=means[0],
                    target_std=stds[0])
    if kind == "survival":
        bins = len(edges) - 1
        fe, fa = np.asarray(means[:bins]), np.asarray(means[bins:2 * bins])
        n_events, n_all = float(counts[0]), float(counts[bins])
        cuts, horizons = cuts_from_histogram(edges, fe)
        baseline = baseline_hazards(edges, fe * n_events, fa * n_all, cuts) \
            if n_all > 0 and n_events > 0 else []
        return Task(kind=kind, unit=unit, cuts=tuple(cuts), horizons=tuple(horizons),
                    baseline=tuple(baseline))
    return Task(kind=kind, classes=tuple(classes), unit=unit)


def kind_of_metrics(figures: dict[str, Any]) -> str:
    """The task kind a set of figures belongs to (each kind has its own keys)."""
    if "c_index" in figures:
        return "survival"
    if "rmse" in figures:
        return "regression"
    return "classification"


# Per kind: the two figures a progress line shows next to the loss.
PROGRESS_KEYS = {"classification": (("auroc", "AUROC"), ("accuracy", "accuracy")),
                 "regression": (("r2", "R²"), ("mae", "MAE")),
                 "survival": (("c_index", "C-index"), ("ibs", "IBS"))}


def headline_text(kind: str | None, final: dict[str, Any]) -> str:
    """'holdout AUROC 0.91' (or R², C-index): the figure a run's last line names."""
    kind = kind or kind_of_metrics(final)
    key, label = Task(kind=kind, classes=("0", "1")).headline
    value = final.get(key)
    shown = value if value is None else round(float(value), 4)
    return f"holdout {label} {shown}"

"""Metrics for continuous and time-to-event outcomes: regression and survival.

A federation that predicts a length of stay or a time to relapse is judged by other
figures than a classifier. For survival the model emits a survival curve per patient on a
fixed time grid; we report Harrell's C because clinicians know it, Uno's C because it does
not depend on the site's censoring pattern (sites censor very differently), the integrated
Brier score because it is the one figure that checks the curve is *calibrated* and not just
well ordered, and time-dependent AUC at the horizons the study names ("5-year survival").

The estimators themselves come from scikit-survival and scikit-learn; this module only
adapts a model's output to their inputs and turns every "cannot be computed on this data"
(no events, one patient, horizons past follow-up) into ``None``. A round's metrics are
logged and aggregated across sites, so one small site must never crash the round or
inject NaN into an average. sksurv and sklearn are imported inside the functions so that
importing ``mmfed`` stays fast.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

IBS_GRID_POINTS = 50  # enough to integrate a Brier curve smoothly, cheap on large sites


def _safe(value: Any) -> float | None:
    """A finite float, or None: NaN and inf never reach the logs or a cross-site mean."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _attempt(fn: Callable[[], Any]) -> float | None:
    """Run one sksurv/sklearn estimate; its ValueError means "undefined here", i.e. None.

    sksurv signals degenerate data (all censored, no comparable pairs, times out of range,
    a censoring distribution that reaches zero) with ValueError; numeric edge cases show up
    as NaN plus a RuntimeWarning. Both are expected on small sites, so both become None
    quietly instead of an exception or a warning flood in every round.
    """
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            return _safe(fn())
        except (ValueError, ZeroDivisionError):
            return None


def _loss(loss: float | None) -> float | None:
    return _safe(loss) if loss is not None else None


def regression_metrics(pred: np.ndarray, y: np.ndarray,
                       loss: float | None = None) -> dict[str, float | None]:
    """MAE (in the outcome's own units, what clinicians read), RMSE and R².

    R² is None when it is meaningless rather than the 0.0 or 1.0 sklearn substitutes for
    a constant target: a site whose patients all have the same value says nothing about
    explained variance, and a made-up number would bias the federation average.
    """
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(y, dtype=np.float64).reshape(-1)
    n = len(t)
    out: dict[str, float | None] = {"n": float(n)}
    if n == 0 or len(p) != n:
        out.update(mae=None, rmse=None, r2=None)
    else:
        out["mae"] = _attempt(lambda: mean_absolute_error(t, p))
        mse = _attempt(lambda: mean_squared_error(t, p))
        out["rmse"] = math.sqrt(mse) if mse is not None else None
        constant = n < 2 or not np.all(np.isfinite(t)) or float(np.var(t)) == 0.0
        out["r2"] = None if constant else _attempt(lambda: r2_score(t, p))
    out["loss"] = _loss(loss)
    return out


def _check_curves(surv: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate the model's (n, K) curve grid; a malformed grid is a bug, so it raises."""
    s = np.asarray(surv, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    if s.ndim != 2 or len(t) == 0 or s.shape[1] != len(t):
        raise ValueError(f"surv must be (n, {len(t)}) with at least one time, got {s.shape}")
    if len(t) > 1 and not np.all(np.diff(t) > 0):
        raise ValueError("times must be strictly increasing")
    return s, t


def step_survival(surv: np.ndarray, times: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Evaluate each patient's survival curve at arbitrary times, as a step function.

    The model only predicts S on its own grid ``times``; metrics need it on the
    evaluation's grid (horizons, the IBS grid). A right-continuous step function is the
    conservative reading of a discrete curve: S(t) = surv[:, k] for the largest k with
    times[k] <= t, 1 before the first time (nobody has died yet) and the last value after
    the grid (no extrapolation). Shape (n, len(at)).
    """
    s, t = _check_curves(surv, times)
    a = np.asarray(at, dtype=np.float64).reshape(-1)
    idx = np.searchsorted(t, a, side="right") - 1
    out = s[:, np.clip(idx, 0, None)]
    out[:, idx < 0] = 1.0
    return out


def risk_score(surv: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Minus the restricted mean survival time up to times[-1]: higher means riskier.

    Concordance and time-dependent AUC rank patients by one number; RMST (the area under
    the step survival curve from 0 to the last grid time) summarises the whole curve in the
    outcome's units, unlike S at one arbitrary time, and is what a curve-predicting model
    implies about who dies first. The value at times[-1] itself spans no time, so it does
    not enter the area. Shape (n,).
    """
    s, t = _check_curves(surv, times)
    edges = np.maximum(np.concatenate(([0.0], t)), 0.0)
    widths = np.diff(edges)  # [0, t0), [t0, t1), ..., [t_{K-2}, t_{K-1})
    values = np.concatenate((np.ones((s.shape[0], 1)), s[:, :-1]), axis=1)
    return -(values @ widths)


def _usable_horizon(h: float, time: np.ndarray, event: np.ndarray) -> bool:
    """Whether cumulative/dynamic AUC exists at h: inside follow-up, a case and a control."""
    return (math.isfinite(h) and len(time) > 0 and time.min() <= h < time.max()
            and bool(np.any(event & (time <= h))) and bool(np.any(time > h)))


def survival_metrics(surv: np.ndarray, times: np.ndarray, time: np.ndarray, event: np.ndarray,
                     horizons: list[float], loss: float | None = None) -> dict[str, float | None]:
    """Discrimination and calibration of predicted survival curves on one site's patients.

    Keys: ``n``, ``events``, ``c_index`` (Harrell), ``uno_c_index`` (IPCW, truncated at the
    largest horizon inside follow-up so the censoring weights stay finite), ``ibs``
    (integrated Brier score over up to 50 times inside follow-up), ``td_auc`` (sksurv's
    survival-weighted mean of the cumulative/dynamic AUC over the usable horizons),
    ``auc_1``... (that AUC at each entry of ``horizons``, in order) and ``loss``.

    The censoring distribution is estimated from the evaluation data itself: in a
    federation the site does not see the training data of the others, and its own
    censoring pattern is exactly what IPCW has to undo. Every figure sksurv refuses
    (no events, no comparable pairs, a horizon past follow-up, n < 2) is None.
    """
    from sksurv.metrics import (
        concordance_index_censored,
        concordance_index_ipcw,
        cumulative_dynamic_auc,
        integrated_brier_score,
    )
    from sksurv.util import Surv

    s, grid = _check_curves(surv, times)
    t = np.asarray(time, dtype=np.float64).reshape(-1)
    e = np.asarray(event).reshape(-1).astype(bool)
    n = len(t)
    if s.shape[0] != n or len(e) != n:
        raise ValueError(f"surv has {s.shape[0]} rows, time {n}, event {len(e)}")
    hs = [float(h) for h in horizons]
    out: dict[str, float | None] = {"n": float(n), "events": float(e.sum())}
    out.update(c_index=None, uno_c_index=None, ibs=None, td_auc=None)
    aucs: list[float | None] = [None] * len(hs)

    finite = n >= 2 and bool(np.all(np.isfinite(t)))
    if finite and e.any():
        y = Surv.from_arrays(event=e, time=t)
        risk = risk_score(s, grid)
        tmin, tmax = float(t.min()), float(t.max())
        out["c_index"] = _attempt(lambda: concordance_index_censored(e, t, risk)[0])

        inside = [h for h in hs if math.isfinite(h) and h < tmax]
        tau = max(inside) if inside else None
        out["uno_c_index"] = _attempt(lambda: concordance_index_ipcw(y, y, risk, tau=tau)[0])

        if tmax > tmin:
            ibs_times = np.linspace(tmin, tmax, IBS_GRID_POINTS + 2)[1:-1]
            ibs_times = ibs_times[(ibs_times > tmin) & (ibs_times < tmax)]
            est = step_survival(s, grid, ibs_times)
            out["ibs"] = _attempt(lambda: integrated_brier_score(y, y, est, ibs_times))

        usable = sorted({h for h in hs if _usable_horizon(h, t, e)})
        if usable:
            result: list[Any] = []

            def dynamic_auc() -> float:
                scores, mean_auc = cumulative_dynamic_auc(y, y, risk, np.array(usable))
                result.append(scores)
                return float(mean_auc)

            out["td_auc"] = _attempt(dynamic_auc)
            if result:
                by_h = dict(zip(usable, result[0], strict=True))
                aucs = [_safe(by_h[h]) if h in by_h else None for h in hs]
    for i, auc in enumerate(aucs, start=1):
        out[f"auc_{i}"] = auc
    out["loss"] = _loss(loss)
    return out


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Kaplan–Meier curve (t, S(t)) of a cohort, for the report's survival plots.

    Drawn next to the model's mean predicted curve it shows at a glance whether the
    predictions are calibrated. An empty cohort gives empty arrays instead of an error,
    so a report over many sites never fails on one without patients.
    """
    from sksurv.nonparametric import kaplan_meier_estimator

    t = np.asarray(time, dtype=np.float64).reshape(-1)
    e = np.asarray(event).reshape(-1).astype(bool)
    if len(t) == 0:
        return np.zeros(0), np.zeros(0)
    km_t, km_s = kaplan_meier_estimator(e, t)[:2]
    return np.asarray(km_t, dtype=np.float64), np.asarray(km_s, dtype=np.float64)

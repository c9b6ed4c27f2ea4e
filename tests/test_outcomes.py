"""Regression and survival metrics (mmfed.ml.outcomes) and multi-class classification metrics."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from mmfed.ml.metrics import classification_metrics
from mmfed.ml.outcomes import (
    kaplan_meier,
    regression_metrics,
    risk_score,
    step_survival,
    survival_metrics,
)

BINARY_KEYS = {"n", "auroc", "accuracy", "precision", "recall", "f1", "ece", "loss"}


def _no_nan(d: dict[str, float | None]) -> None:
    for k, v in d.items():
        assert v is None or (isinstance(v, float) and math.isfinite(v)), (k, v)


# --- regression ---------------------------------------------------------------------------

def test_regression_metrics_hand_computed():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.5, 2.0, 2.0, 5.0])
    m = regression_metrics(pred, y, loss=0.25)
    # errors: 0.5, 0, -1, 1 -> |e| mean 2.5/4, e^2 mean 2.25/4
    assert m["n"] == 4.0
    assert m["mae"] == pytest.approx(0.625)
    assert m["rmse"] == pytest.approx(math.sqrt(0.5625))
    # SS_res = 2.25, SS_tot = 5 -> R2 = 1 - 0.45
    assert m["r2"] == pytest.approx(0.55)
    assert m["loss"] == 0.25
    assert set(m) == {"n", "mae", "rmse", "r2", "loss"}


def test_regression_r2_none_when_undefined():
    m = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0]))
    assert m["r2"] is None
    assert m["mae"] == pytest.approx(2.0 / 3.0)
    assert m["loss"] is None
    one = regression_metrics(np.array([1.0]), np.array([3.0]))
    assert one["r2"] is None and one["mae"] == pytest.approx(2.0)
    empty = regression_metrics(np.zeros(0), np.zeros(0))
    assert empty["n"] == 0.0 and empty["mae"] is None and empty["rmse"] is None
    for d in (m, one, empty):
        _no_nan(d)


# --- step survival and risk ---------------------------------------------------------------

def test_step_survival_hand_cases():
    times = np.array([1.0, 2.0, 4.0])
    surv = np.array([[0.9, 0.7, 0.4],
                     [0.8, 0.5, 0.1]])
    at = np.array([0.0, 0.999, 1.0, 1.5, 2.0, 3.9, 4.0, 10.0])
    got = step_survival(surv, times, at)
    want = np.array([[1.0, 1.0, 0.9, 0.9, 0.7, 0.7, 0.4, 0.4],
                     [1.0, 1.0, 0.8, 0.8, 0.5, 0.5, 0.1, 0.1]])
    np.testing.assert_allclose(got, want)
    assert got.shape == (2, len(at))
    # the input is not modified through the returned array
    got[:] = 0
    assert surv[0, 0] == 0.9


def test_step_survival_rejects_bad_grid():
    with pytest.raises(ValueError):
        step_survival(np.ones((2, 2)), np.array([2.0, 1.0]), np.array([1.0]))
    with pytest.raises(ValueError):
        step_survival(np.ones((2, 3)), np.array([1.0, 2.0]), np.array([1.0]))


def test_risk_score_is_minus_rmst_and_orders_curves():
    times = np.array([1.0, 2.0, 4.0])
    surv = np.array([[0.9, 0.7, 0.4],
                     [0.8, 0.5, 0.1]])
    r = risk_score(surv, times)
    # area: 1*1 + 0.9*1 + 0.7*2 = 3.3 ; 1 + 0.8 + 0.5*2 = 2.8
    np.testing.assert_allclose(r, [-3.3, -2.8])
    assert r[1] > r[0]  # uniformly lower curve is riskier
    rng = np.random.default_rng(0)
    base = np.sort(rng.uniform(0.2, 1.0, size=(50, 10)), axis=1)[:, ::-1]
    lower = base * 0.8
    grid = np.arange(1.0, 11.0)
    assert np.all(risk_score(lower, grid) > risk_score(base, grid))


# --- survival metrics ---------------------------------------------------------------------

def _exponential_cohort(n: int, seed: int, censor: bool):
    rng = np.random.default_rng(seed)
    rate = np.exp(rng.normal(0.0, 0.7, size=n))
    t_event = rng.exponential(1.0 / rate)
    if censor:
        c = rng.exponential(2.0, size=n)
        time = np.minimum(t_event, c)
        event = (t_event <= c).astype(int)
    else:
        time, event = t_event, np.ones(n, dtype=int)
    return rate, time, event


def _monotone_curves(score: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Survival curves ordered by `score`: higher score -> uniformly higher survival."""
    s = (np.argsort(np.argsort(score)) + 1.0) / (len(score) + 1.0)  # ranks in (0, 1)
    return np.exp(-np.outer(1.0 - s, grid) / grid[-1] * 3.0)


def test_c_index_perfect_reversed_random():
    rng = np.random.default_rng(1)
    n = 300
    time = rng.uniform(0.1, 10.0, size=n)
    event = np.ones(n, dtype=int)
    grid = np.linspace(0.05, 10.0, 40)
    perfect = survival_metrics(_monotone_curves(time, grid), grid, time, event, [2.0, 5.0])
    assert perfect["c_index"] == pytest.approx(1.0)
    reversed_ = survival_metrics(_monotone_curves(-time, grid), grid, time, event, [2.0, 5.0])
    assert reversed_["c_index"] == pytest.approx(0.0)
    assert perfect["auc_1"] == pytest.approx(1.0) and reversed_["auc_2"] == pytest.approx(0.0)
    assert perfect["uno_c_index"] == pytest.approx(1.0)

    n = 2000
    time = rng.uniform(0.1, 10.0, size=n)
    event = rng.integers(0, 2, size=n)
    event[0] = 1
    rand = survival_metrics(_monotone_curves(rng.normal(size=n), grid), grid, time, event,
                            [2.0, 5.0])
    assert abs(rand["c_index"] - 0.5) < 0.05
    assert abs(rand["td_auc"] - 0.5) < 0.05
    _no_nan(rand)


def _brute_harrell(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    num = den = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if time[i] < time[j] and event[i] == 1:
                den += 1
                if risk[i] > risk[j]:
                    num += 1
                elif risk[i] == risk[j]:
                    num += 0.5
    return num / den


def test_harrell_matches_brute_force_pair_count():
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    event = np.array([1, 0, 1, 1, 0, 1, 0, 1])
    grid = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    # a deliberately imperfect ordering with one tie in risk (rows 2 and 5 identical)
    level = np.array([0.3, 0.5, 0.4, 0.2, 0.6, 0.4, 0.9, 0.1])
    surv = np.exp(-np.outer(1.0 - level, grid) / 4.0)
    m = survival_metrics(surv, grid, time, event, [3.0])
    risk = risk_score(surv, grid)
    want = _brute_harrell(time, event, risk)
    assert 0.0 < want < 1.0 and want != 0.5
    assert m["c_index"] == pytest.approx(want)
    assert m["events"] == 5.0 and m["n"] == 8.0


def test_ibs_true_model_beats_constant():
    rate, time, event = _exponential_cohort(800, seed=2, censor=True)
    grid = np.linspace(0.01, float(time.max()) + 1.0, 200)
    true = np.exp(-np.outer(rate, grid))
    half = np.full_like(true, 0.5)
    horizons = [0.5, 1.0, 100.0]
    good = survival_metrics(true, grid, time, event, horizons, loss=1.5)
    bad = survival_metrics(half, grid, time, event, horizons)
    assert good["ibs"] is not None and bad["ibs"] is not None
    assert good["ibs"] < bad["ibs"]
    assert good["c_index"] > 0.65 and good["uno_c_index"] > 0.65
    assert good["auc_1"] > 0.65 and good["auc_2"] > 0.65
    assert good["auc_3"] is None  # past follow-up
    assert good["td_auc"] is not None and good["loss"] == 1.5
    assert set(good) == {"n", "events", "c_index", "uno_c_index", "ibs", "td_auc",
                         "auc_1", "auc_2", "auc_3", "loss"}
    _no_nan(good)
    _no_nan(bad)


def test_survival_degenerate_data_gives_none():
    grid = np.array([1.0, 2.0, 3.0])
    surv = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4], [0.95, 0.9, 0.85]])
    time = np.array([1.0, 2.0, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # degenerate data must be quiet, too
        none = survival_metrics(surv, grid, time, np.zeros(3), [1.5])
        assert none["events"] == 0.0
        for k in ("c_index", "uno_c_index", "ibs", "td_auc", "auc_1"):
            assert none[k] is None, k
        one = survival_metrics(surv[:1], grid, time[:1], np.ones(1), [1.5])
        assert one["c_index"] is None and one["ibs"] is None and one["auc_1"] is None
        empty = survival_metrics(np.zeros((0, 3)), grid, np.zeros(0), np.zeros(0), [])
        assert empty["n"] == 0.0 and empty["c_index"] is None
        # identical predictions: Harrell's C is 0.5 (all ties), never NaN
        same = survival_metrics(np.tile(surv[:1], (3, 1)), grid, time,
                                np.array([True, True, False]), [1.5, 99.0])
        assert same["c_index"] == pytest.approx(0.5)
        assert same["auc_2"] is None
        # all patients at the same time: no comparable pairs, no IBS grid
        tied = survival_metrics(surv, grid, np.full(3, 2.0), np.ones(3), [1.0])
        assert tied["c_index"] is None and tied["ibs"] is None and tied["auc_1"] is None
    for d in (none, one, empty, same, tied):
        _no_nan(d)


def test_kaplan_meier_hand_example():
    t, s = kaplan_meier(np.array([1.0, 2.0, 2.0, 3.0, 4.0]), np.array([1, 0, 1, 1, 0]))
    np.testing.assert_allclose(t, [1.0, 2.0, 3.0, 4.0])
    # 5 at risk: 4/5; at 2: 4 at risk, 1 event -> *3/4; at 3: 2 at risk, 1 event -> *1/2
    np.testing.assert_allclose(s, [0.8, 0.6, 0.3, 0.3])
    et, es = kaplan_meier(np.zeros(0), np.zeros(0))
    assert et.shape == (0,) and es.shape == (0,)


# --- multi-class classification -----------------------------------------------------------

def test_multiclass_per_class_recall_and_macro_f1():
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 0, 2])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), pred] = 0.8
    m = classification_metrics(probs, labels)
    assert m["recall_0"] == pytest.approx(0.5)
    assert m["recall_1"] == pytest.approx(1.0)
    assert m["recall_2"] == pytest.approx(0.5)
    # per-class F1: class0 p=1/2 r=1/2 -> 0.5; class1 p=2/3 r=1 -> 0.8; class2 p=1 r=1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2.0 / 3.0) / 3.0)
    from sklearn.metrics import roc_auc_score
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    assert BINARY_KEYS | {"macro_f1", "recall_0", "recall_1", "recall_2"} == set(m)
    _no_nan(m)


def test_multiclass_absent_class():
    labels = np.array([0, 0, 2, 2])
    probs = np.array([[0.7, 0.2, 0.1],
                      [0.3, 0.4, 0.3],
                      [0.1, 0.2, 0.7],
                      [0.5, 0.1, 0.4]])
    m = classification_metrics(probs, labels)
    assert m["recall_1"] is None
    assert m["recall_0"] == pytest.approx(0.5) and m["recall_2"] == pytest.approx(0.5)
    from sklearn.metrics import roc_auc_score
    want = (roc_auc_score(labels == 0, probs[:, 0]) + roc_auc_score(labels == 2, probs[:, 2])) / 2
    assert m["auroc"] == pytest.approx(want)
    single = classification_metrics(probs[:2], labels[:2])
    assert single["auroc"] is None and single["recall_2"] is None
    _no_nan(m)
    _no_nan(single)


def test_binary_output_unchanged():
    labels = np.array([0, 1, 1, 0, 1])
    p1 = np.array([0.2, 0.9, 0.4, 0.6, 0.8])
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(probs, labels, loss=0.3)
    assert set(m) == BINARY_KEYS
    assert m["auroc"] == pytest.approx(5.0 / 6.0)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["recall"] == pytest.approx(2.0 / 3.0)
    assert m["precision"] == pytest.approx(2.0 / 3.0)

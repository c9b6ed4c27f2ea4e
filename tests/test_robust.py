"""Update validation, aggregation, corrupt-update drills and the site's guard (unit).

Pure numpy: every expected value is worked out by hand or by an independent numpy
expression, so a wrong median, trim count or rejection reason fails here before a
simulation ever runs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmfed.errors import MmfedError
from mmfed.ml.updates import grouped_average
from mmfed.secagg import SecAggParams
from mmfed.server import robust
from mmfed.site import faults
from mmfed.site.secagg import guard
from mmfed.wire import SecAggRequest


def state(w: list[float] | np.ndarray, b: float = 0.0, steps: int = 3) -> dict[str, np.ndarray]:
    """A tiny model: a float32 weight vector, a float32 bias and an integer buffer."""
    return {"layer.weight": np.asarray(w, dtype=np.float32),
            "layer.bias": np.array([b], dtype=np.float32),
            "layer.steps": np.array(steps, dtype=np.int64)}


REF = state([0.0, 0.0, 0.0])


# --------------------------------------------------------------------------- validation


def test_valid_update_passes_and_norm_is_over_float_params_only() -> None:
    upd = state([3.0, 0.0, 0.0], b=4.0, steps=99)  # the int buffer is not part of the norm
    assert robust.update_norm(upd, REF) == pytest.approx(5.0)
    assert robust.validate_update(upd, REF) is None
    assert robust.validate_update(upd, REF, max_norm=5.0) is None  # the bound is inclusive


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda s: s.pop("layer.bias"), "update lacks parameter(s) layer.bias"),
    (lambda s: s.update(extra=np.zeros(1, np.float32)), "update has unknown parameter(s) extra"),
    (lambda s: s.update({"layer.weight": np.zeros(4, np.float32)}),
     "parameter layer.weight has shape (4,), expected (3,)"),
    (lambda s: s.update({"layer.weight": np.zeros(3, np.float64)}),
     "parameter layer.weight has dtype float64, expected float32"),
    (lambda s: s.update({"layer.steps": np.array(3.0, np.float32)}),
     "parameter layer.steps has dtype float32, expected int64"),
    (lambda s: s.update({"layer.weight": np.array([np.nan, 1, np.inf], np.float32)}),
     "parameter layer.weight has 2 NaN or infinite value(s)"),
    (lambda s: s.update({"layer.bias": [0.0]}), "parameter layer.bias is a list, not an array"),
])
def test_each_defect_is_rejected_with_its_reason(mutate: object, reason: str) -> None:
    upd = state([0.1, 0.2, 0.3])
    mutate(upd)  # type: ignore[operator]
    assert robust.validate_update(upd, REF) == reason


def test_norm_bound_rejects_above_and_zero_means_no_bound() -> None:
    upd = state([1e6, 0.0, 0.0])
    assert robust.validate_update(upd, REF, max_norm=0.0) is None
    reason = robust.validate_update(upd, REF, max_norm=100.0)
    assert reason == "update norm 1e+06 exceeds the bound 100 (aggregation.max_update_norm)"
    assert "\n" not in reason


def test_norm_does_not_overflow_in_float32() -> None:
    big = np.float32(3e38)  # its square overflows float32: a float32 norm would say inf
    upd = state([big, big, 0.0])
    assert robust.update_norm(upd, REF) == pytest.approx(math.sqrt(2) * 3e38, rel=1e-6)
    assert robust.validate_update(upd, REF, max_norm=1e39) is None


def test_many_missing_names_are_summarised_on_one_line() -> None:
    ref = {f"p{i}": np.zeros(1, np.float32) for i in range(6)}
    assert robust.validate_update({}, ref) == "update lacks parameter(s) p0, p1, p2 and 3 more"


# --------------------------------------------------------------------------- aggregation


def test_median_odd_even_and_one_vote_per_site() -> None:
    states = [state([1, 10, -5], b=1), state([2, 20, 5], b=2), state([100, 30, 0], b=3)]
    med = robust.coordinate_median(states)
    np.testing.assert_array_equal(med["layer.weight"], [2, 20, 0])
    assert med["layer.weight"].dtype == np.float32
    assert med["layer.steps"] == 3  # non-float entries: the first site's
    even = robust.coordinate_median([*states, state([4, 0, 1], b=4)])
    np.testing.assert_array_equal(even["layer.weight"], [3, 15, 0.5])
    # Weights are ignored: a site claiming a million examples still has one vote.
    weighted = robust.aggregate_robust("median", [(states[0], 1), (states[1], 1),
                                                  (states[2], 1e6)])
    np.testing.assert_array_equal(weighted["layer.weight"], [2, 20, 0])


@pytest.mark.parametrize(("n", "fraction", "k"), [
    (3, 0.1, 1), (2, 0.45, 0), (5, 0.0, 0), (10, 0.1, 1), (20, 0.1, 2), (21, 0.1, 3),
    (4, 0.45, 1), (9, 0.45, 4), (1, 0.3, 0),
])
def test_trim_count(n: int, fraction: float, k: int) -> None:
    assert robust.trim_count(n, fraction) == k


def test_trim_count_refuses_impossible_fractions() -> None:
    with pytest.raises(ValueError):
        robust.trim_count(5, 0.5)
    with pytest.raises(ValueError):
        robust.trim_count(0, 0.1)


def test_trimmed_mean_drops_each_end_per_coordinate() -> None:
    rows = np.array([[1, -100, 7], [2, 5, 7], [3, 6, 7], [4, 7, 7], [1000, 8, 7]], np.float32)
    states = [state(r) for r in rows]
    out = robust.trimmed_mean(states, 0.2)  # k = 1 of 5 from each end
    expected = np.sort(rows.astype(np.float64), axis=0)[1:4].mean(axis=0)
    np.testing.assert_allclose(out["layer.weight"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["layer.weight"], [3, 6, 7])
    plain = robust.trimmed_mean(states, 0.0)  # k = 0: the plain (unweighted) mean
    np.testing.assert_allclose(plain["layer.weight"], rows.mean(axis=0), rtol=1e-6)


def test_robust_rules_resist_an_outlier_that_breaks_fedavg() -> None:
    rng = np.random.default_rng(0)
    honest = [state(rng.normal(0, 0.01, 50)) for _ in range(4)]
    evil = state(np.full(50, 1e6))
    pairs = [(s, 100.0) for s in honest] + [(evil, 100.0)]
    lo = np.min([s["layer.weight"] for s in honest], axis=0)
    hi = np.max([s["layer.weight"] for s in honest], axis=0)
    for rule in ("median", "trimmed_mean"):
        out = robust.aggregate_robust(rule, pairs, trim_fraction=0.1)["layer.weight"]
        assert np.all((lo <= out) & (out <= hi)), rule
    # FedAvg as the plaintext round computes it: the contrast that makes the check above
    # meaningful
    avg = grouped_average([(s, {"examples": 100}) for s, _ in pairs],
                          state(np.zeros(50)))["layer.weight"]
    assert np.all(avg > 1e5)


def test_fedavg_is_example_weighted() -> None:
    """FedAvg is ``grouped_average``: parameters outside a modality's encoder are weighted
    by examples; a group nobody trained keeps the global value; integers are kept."""
    out = grouped_average([(state([0, 0, 0], steps=7), {"examples": 1}),
                           (state([4, 8, 12], steps=9), {"examples": 3})], REF)
    np.testing.assert_allclose(out["layer.weight"], [3, 6, 9])
    assert out["layer.weight"].dtype == np.float32
    assert out["layer.steps"] == REF["layer.steps"]  # non-float entries: the global model's
    untouched = grouped_average([(state([4, 8, 12]), {"examples": 0})], REF)
    np.testing.assert_array_equal(untouched["layer.weight"], REF["layer.weight"])


def test_aggregation_refuses_unknown_rule_and_unvalidated_input() -> None:
    with pytest.raises(ValueError, match="unknown robust aggregation rule"):
        robust.aggregate_robust("krum", [(REF, 1.0)])
    with pytest.raises(ValueError, match="unknown robust aggregation rule"):
        robust.aggregate_robust("fedavg", [(REF, 1.0)])  # not robust: grouped_average
    with pytest.raises(ValueError, match="validate first"):
        robust.coordinate_median([state([1, 2, 3]), state([1, 2])])
    with pytest.raises(ValueError):
        robust.trimmed_mean([], 0.1)


# --------------------------------------------------------------------------- drills


def test_corruption_schedule() -> None:
    plan = ["site-1:2:nan", "site-2:1:huge", "site-10:1:shape", "bogus"]
    assert faults.corruption(plan, "site-1", 2) == "nan"
    assert faults.corruption(plan, "site-1", 1) is None
    assert faults.corruption(plan, "site-2", 1) == "huge"
    assert faults.corruption(plan, "site-1", 12) is None
    assert faults.corruption(plan, "site-10", 1) == "shape"


@pytest.mark.parametrize(("kind", "reason"), [
    ("nan", "parameter layer.bias has 1 NaN or infinite value(s)"),
    ("shape", "parameter layer.bias has shape (2,), expected (1,)"),
    ("huge", "update norm 1e+06 exceeds the bound 100 (aggregation.max_update_norm)"),
])
def test_each_corruption_is_caught_by_validation(kind: str, reason: str) -> None:
    new = state([0.5, -0.5, 0.1], b=0.2)
    bad = faults.corrupt_state(new, REF, kind)
    assert robust.validate_update(new, REF, max_norm=100.0) is None
    assert robust.validate_update(bad, REF, max_norm=100.0) == reason
    if kind == "huge":
        assert robust.update_norm(bad, REF) == pytest.approx(1e6, rel=1e-5)
        direction = bad["layer.weight"] / np.linalg.norm(bad["layer.weight"])
        np.testing.assert_allclose(direction, new["layer.weight"] / np.linalg.norm(
            new["layer.weight"]), rtol=1e-5)  # scaled, not replaced
    assert robust.validate_update(new, REF) is None  # the original was not modified


# --------------------------------------------------------------------------- site guard


def test_guard_refuses_bad_vectors_and_clips_good_ones() -> None:
    params = SecAggParams(run_id="r", round=1, site_ids=[0, 1], threshold=2, neighbours=None,
                          clip_range=1.0, max_sites=2, count_cap=100, vector_length=4)
    record = SecAggRequest(params, 0)
    honest = np.array([0.5, -2.0, 0.25, 3.0], np.float32)
    np.testing.assert_array_equal(guard(record, honest, max_norm=10.0), [0.5, -1, 0.25, 1])
    cases = {"nan": "1 NaN or infinite value(s)", "shape": "has 5 values, the model 4",
             "huge": "update norm 1e+06 exceeds the bound 10"}
    for kind, text in cases.items():
        with pytest.raises(MmfedError) as info:
            guard(record, faults.corrupt_vector(honest, kind), max_norm=10.0)
        assert text in str(info.value) and "\n" not in str(info.value)
    # Without a bound, a huge but finite update is only clipped (the server's aggregate
    # check is then the last line of defence).
    clipped = guard(record, faults.corrupt_vector(honest, "huge"), max_norm=0.0)
    assert np.abs(clipped).max() <= 1.0

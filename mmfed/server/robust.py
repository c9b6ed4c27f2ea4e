"""Checking sites' updates and aggregating them robustly (plaintext rounds only).

Without secure aggregation the server sees every site's new weights, so it can refuse
a bad one outright (wrong names, shapes or dtypes, NaN or infinity, an update whose L2
norm exceeds ``aggregation.max_update_norm``) and can aggregate with a rule that a few
bad sites cannot drag arbitrarily far: the coordinate-wise median or trimmed mean
(Yin et al., 2018). Everything here is plain numpy on ``dict[str, np.ndarray]`` states,
so the plaintext round, the tests and any future strategy share one definition.

Example weights and the robust rules: the median and the trimmed mean give every site
one vote and ignore the example counts. A site reports its own count and nothing can
verify it, so weighting by it would let one site claim a million patients and outvote
every other site, which is exactly what these rules exist to prevent; with one vote
each, fewer than ``k`` bad sites (``k`` trimmed from each end) can move no coordinate
outside the range of the honest values. The price is statistical efficiency when
honest sites differ a lot in size; FedAvg (``fedavg``) stays the weighted mean, computed
by ``mmfed.ml.updates.grouped_average``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

Weighted = tuple[dict[str, np.ndarray], float]
ROBUST_RULES = ("median", "trimmed_mean")
_SHOWN = 3  # parameter names listed in a rejection reason


def _names(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


def update_norm(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of ``update − reference`` over the float parameters, in float64.

    float64 because a hostile update near float32's maximum would overflow a float32
    sum of squares to infinity and hide how large it really was.
    """
    total = 0.0
    for key, ref in reference.items():
        if _is_float(ref):
            diff = update[key].astype(np.float64) - ref.astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def validate_update(update: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                    max_norm: float = 0.0) -> str | None:
    """Why a site's new weights cannot be aggregated, or None when they can.

    ``reference`` is the global model the site was sent; ``max_norm`` bounds the L2
    norm of the update (new − reference, float parameters only), 0 meaning no bound.
    The reason is one line, written to the run's log and to the site's entry in
    ``metrics.jsonl``, so it names the first offending parameter and the figures.
    """
    missing = set(reference) - set(update)
    extra = set(update) - set(reference)
    if missing:
        return f"update lacks parameter(s) {_names(missing)}"
    if extra:
        return f"update has unknown parameter(s) {_names(extra)}"
    for key in sorted(reference):
        ref, value = reference[key], update[key]
        if not isinstance(value, np.ndarray):
            return f"parameter {key} is a {type(value).__name__}, not an array"
        if value.dtype != ref.dtype:
            return f"parameter {key} has dtype {value.dtype}, expected {ref.dtype}"
        if value.shape != ref.shape:
            return f"parameter {key} has shape {value.shape}, expected {ref.shape}"
        if _is_float(value):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            if bad:
                return f"parameter {key} has {bad} NaN or infinite value(s)"
    if max_norm > 0:
        norm = update_norm(update, reference)
        if not norm <= max_norm:
            return (f"update norm {norm:.4g} exceeds the bound {max_norm:g} "
                    "(aggregation.max_update_norm)")
    return None


def _stack(states: Sequence[dict[str, np.ndarray]], key: str) -> np.ndarray:
    return np.stack([s[key].astype(np.float64) for s in states])


def _check_same(states: Sequence[dict[str, np.ndarray]]) -> None:
    """Aggregation assumes validated updates; a mismatch here is a caller's bug."""
    if not states:
        raise ValueError("no updates to aggregate")
    first = states[0]
    for state in states[1:]:
        if set(state) != set(first) or any(state[k].shape != first[k].shape for k in first):
            raise ValueError("updates differ in parameter names or shapes; validate first")


def coordinate_median(states: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-coordinate median over sites, one vote each (the mean of the middle two when
    the count is even). Non-float entries are taken from the first site."""
    _check_same(states)
    out: dict[str, np.ndarray] = {}
    for key, ref in states[0].items():
        if not _is_float(ref):
            out[key] = ref.copy()
            continue
        out[key] = np.median(_stack(states, key), axis=0).astype(ref.dtype)
    return out


def trim_count(n: int, trim_fraction: float) -> int:
    """Sites cut from each end of every coordinate: ceil(fraction · n), keeping at least one.

    Rounded up, not down: federations here have 3 to 20 sites, and the textbook
    floor(0.1 · 3) = 0 would silently turn a requested trimmed mean into a plain mean.
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    if n < 1:
        raise ValueError("no updates to aggregate")
    k = math.ceil(trim_fraction * n - 1e-9) if trim_fraction > 0 else 0
    return min(k, (n - 1) // 2)


def trimmed_mean(states: Sequence[dict[str, np.ndarray]], trim_fraction: float
                 ) -> dict[str, np.ndarray]:
    """Per coordinate, drop the ``trim_count`` largest and smallest site values and average
    the rest, one vote per site. Non-float entries are taken from the first site."""
    _check_same(states)
    k = trim_count(len(states), trim_fraction)
    out: dict[str, np.ndarray] = {}
    for key, ref in states[0].items():
        if not _is_float(ref):
            out[key] = ref.copy()
            continue
        stacked = np.sort(_stack(states, key), axis=0)
        kept = stacked[k:len(states) - k]
        out[key] = kept.mean(axis=0).astype(ref.dtype)
    return out


def aggregate_robust(rule: str, updates: Sequence[Weighted], trim_fraction: float = 0.1
                     ) -> dict[str, np.ndarray]:
    """Aggregate validated ``(state, weight)`` pairs with a robust ``aggregation.rule``.

    Both rules ignore the weights (see the module docstring for why). ``fedavg`` is not
    one of them: it is ``mmfed.ml.updates.grouped_average``, which the plaintext round
    calls itself, weighted per modality group.
    """
    states = [s for s, _ in updates]
    if rule == "median":
        return coordinate_median(states)
    if rule == "trimmed_mean":
        return trimmed_mean(states, trim_fraction)
    raise ValueError(f"unknown robust aggregation rule {rule!r} (known: "
                     f"{', '.join(ROBUST_RULES)})")

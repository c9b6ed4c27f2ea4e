"""Fixed-point encoding of weighted, clipped updates into Z_{2^32}.

Masks only cancel exactly in a finite ring, so float updates are mapped to integers
modulo 2**32 first. Each coordinate is clipped to [-R, R], multiplied by the site's
weight w in (0, 1] (so w·x stays in [-R, R]) and shifted by +R, which makes every code
non-negative: a site sends a code in [0, L] with L = floor((2**32 - 1) / max_sites),
so the sum of up to ``max_sites`` codes stays below 2**32 and never wraps. The shift is
undone at decoding time from the number of contributors, which the server knows anyway.

The weight itself travels as one more coordinate (round(w·L)), so the server learns
Σ w_i and can divide: a weighted FedAvg without any site's example count in the clear.

Precision: each code is off by at most half a step, so the decoded weighted mean of n
contributors is off by at most 1.5·R / (L·w_min - 0.5) per coordinate, where w_min is
the smallest weight (see :func:`mean_error_bound`). With max_sites = 20 this is below
1e-5·R once every weight is at least 7e-4 (e.g. 70 examples with count_cap = 100_000);
pick ``count_cap`` near the largest site's size rather than far above it.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mmfed.secagg.errors import SecAggError

MODULUS = 2**32
MAX_SITES_LIMIT = 2**16  # beyond this a site's code has < 16 bits: too coarse to be useful

U32Array = NDArray[np.uint32]
F64Array = NDArray[np.float64]


def levels(max_sites: int) -> int:
    """Largest code one site may send, chosen so ``max_sites`` codes sum below 2**32."""
    if isinstance(max_sites, bool) or not isinstance(max_sites, int):
        raise SecAggError(f"max_sites must be an integer, got {max_sites!r}")
    if not 1 <= max_sites <= MAX_SITES_LIMIT:
        raise SecAggError(f"max_sites must be in 1..{MAX_SITES_LIMIT}, got {max_sites}")
    return (MODULUS - 1) // max_sites


def site_weight(num_examples: int, count_cap: int) -> float:
    """A site's FedAvg weight, bounded by 1 so that weighting never widens the code range."""
    if isinstance(count_cap, bool) or not isinstance(count_cap, int) or count_cap < 1:
        raise SecAggError(f"count_cap must be a positive integer, got {count_cap!r}")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int):
        raise SecAggError(f"num_examples must be an integer, got {num_examples!r}")
    if num_examples < 1:
        raise SecAggError(f"num_examples must be at least 1, got {num_examples}")
    if num_examples > count_cap:
        raise SecAggError(
            f"num_examples {num_examples} exceeds count_cap {count_cap}; "
            "raise count_cap for this federation"
        )
    return num_examples / count_cap


def mean_error_bound(clip_range: float, max_sites: int, min_weight: float) -> float:
    """Worst-case per-coordinate error of :func:`unpack_mean`, for choosing ``count_cap``."""
    _check_range(clip_range)
    _check_weight(min_weight)
    denom = levels(max_sites) * min_weight - 0.5
    if denom <= 0:
        return math.inf
    return 1.5 * clip_range / denom


def encode(vec: ArrayLike, weight: float, clip_range: float, max_sites: int) -> U32Array:
    """Codes for w·clip(vec), each in [0, L], so ``max_sites`` of them add without wrapping."""
    x = _finite_vector(vec)
    _check_weight(weight)
    _check_range(clip_range)
    top = levels(max_sites)
    value = np.clip(x, -clip_range, clip_range) * weight
    codes = np.rint((value + clip_range) * (top / (2.0 * clip_range)))
    np.clip(codes, 0, top, out=codes)  # float rounding must never push a code past L
    return codes.astype(np.uint32)


def noise_headroom(n_contributors: int, max_sites: int) -> int:
    """How far integer noise may move a sum of ``n_contributors`` codes either way
    without wrapping modulo 2**32: half of what the codes leave unused.

    Distributed DP adds each site's noise share to its codes, so the sum's codes may
    fall below 0 or above n·L. A round laid out with ``max_sites`` above the number of
    contributors leaves (max_sites - n)·L unused codes, split between both sides.
    """
    top = levels(max_sites)
    return (MODULUS - 1 - n_contributors * top) // 2


def decode_sum(
    sum_u32: ArrayLike, n_contributors: int, clip_range: float, max_sites: int,
    noisy: bool = False,
) -> F64Array:
    """Σ w_i·clip(x_i) from the sum of ``n_contributors`` codes from :func:`encode`.

    ``noisy``: the sites added integer noise, so a code sum may lie up to
    :func:`noise_headroom` below 0 (wrapped to the top of the ring) or above n·L; it
    is read back as the signed value it stands for.
    """
    _check_range(clip_range)
    top = levels(max_sites)
    n = _check_contributors(n_contributors, max_sites)
    total = _u32_vector(sum_u32, "sum")
    values = total.astype(np.int64)
    limit = n * top
    if noisy:
        room = noise_headroom(n, max_sites)
        wrapped = values >= MODULUS - room
        values[wrapped] -= MODULUS
        if values.size and int(values.max()) > limit + room:
            raise SecAggError(
                "aggregate code outside the noise headroom: the masks did not cancel, or "
                "the noise wrapped around (the round was laid out with too little room)"
            )
    elif total.size and int(total.max()) > limit:
        raise SecAggError(
            f"aggregate code exceeds {n} × {top}: the masks did not cancel "
            "(inconsistent protocol state or contributor count)"
        )
    return values.astype(np.float64) * (2.0 * clip_range / top) - n * clip_range


def pack(update: ArrayLike, weight: float, clip_range: float, max_sites: int) -> U32Array:
    """One site's input to the masked sum: the weighted codes plus the weight's own code."""
    body = encode(update, weight, clip_range, max_sites)
    weight_code = round(weight * levels(max_sites))
    if weight_code < 1:
        raise SecAggError(f"weight {weight} is too small to encode with max_sites {max_sites}")
    return np.concatenate([body, np.array([weight_code], dtype=np.uint32)])


def pack_segments(update: ArrayLike, weights: list[float], segments: list[int],
                  clip_range: float, max_sites: int) -> U32Array:
    """Like :func:`pack`, with one weight per contiguous segment of the update.

    Lets each part of a model be averaged with its own weights (an encoder over the
    patients who had its modality) inside one masked sum. A weight may be 0: that
    segment then adds nothing, and its weight code is 0.
    """
    x = _finite_vector(update)
    _check_segments(segments, x.size, len(weights))
    top = levels(max_sites)
    parts, offset, codes = [], 0, []
    for weight, size in zip(weights, segments, strict=True):
        if not _is_real(weight) or not 0.0 <= float(weight) <= 1.0:
            raise SecAggError(f"segment weight must be in [0, 1], got {weight!r}")
        value = np.clip(x[offset:offset + size], -clip_range, clip_range) * float(weight)
        part = np.rint((value + clip_range) * (top / (2.0 * clip_range)))
        np.clip(part, 0, top, out=part)
        parts.append(part.astype(np.uint32))
        codes.append(round(float(weight) * top))
        offset += size
    if not any(codes):
        raise SecAggError("every segment weight is zero: this site has nothing to add")
    return np.concatenate([*parts, np.array(codes, dtype=np.uint32)])


def unpack_segments(sum_u32: ArrayLike, n_contributors: int, segments: list[int],
                    clip_range: float, max_sites: int, noisy: bool = False
                    ) -> tuple[F64Array, F64Array]:
    """(per-segment weighted means, Σ w per segment) from a sum of :func:`pack_segments`.

    A segment whose total weight is zero (nobody had that modality) decodes to zeros:
    the caller keeps the previous values for it.
    """
    total = _u32_vector(sum_u32, "sum")
    k = len(segments)
    _check_segments(segments, total.size - k, k)
    top = levels(max_sites)
    n = _check_contributors(n_contributors, max_sites)
    weight_codes = total[-k:].astype(np.int64)
    if (weight_codes > n * top).any():
        raise SecAggError("aggregate weight code out of range: the masks did not cancel")
    weighted_sum = decode_sum(total[:-k], n, clip_range, max_sites, noisy)
    means = np.zeros_like(weighted_sum)
    offset = 0
    for code, size in zip(weight_codes, segments, strict=True):
        if code > 0:
            means[offset:offset + size] = weighted_sum[offset:offset + size] / (code / top)
        offset += size
    return means, weight_codes.astype(np.float64) / top


def _check_segments(segments: list[int], length: int, n_weights: int) -> None:
    if not segments or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                           for s in segments):
        raise SecAggError(f"segments must be positive integers, got {segments!r}")
    if sum(segments) != length:
        raise SecAggError(f"segments cover {sum(segments)} values, the update has {length}")
    if n_weights != len(segments):
        raise SecAggError(f"{n_weights} weights for {len(segments)} segments")


def unpack_mean(
    sum_u32: ArrayLike, n_contributors: int, clip_range: float, max_sites: int,
    noisy: bool = False,
) -> tuple[F64Array, float]:
    """(Σ w_i·clip(x_i) / Σ w_i, Σ w_i) from the sum of ``n_contributors`` packed vectors."""
    total = _u32_vector(sum_u32, "sum")
    if total.size < 2:
        raise SecAggError("a packed sum needs at least one coordinate plus the weight")
    top = levels(max_sites)
    n = _check_contributors(n_contributors, max_sites)
    weight_code = int(total[-1])
    if not n <= weight_code <= n * top:
        raise SecAggError(
            f"aggregate weight code {weight_code} is outside [{n}, {n * top}]: "
            "the masks did not cancel"
        )
    total_weight = weight_code / top
    weighted_sum = decode_sum(total[:-1], n, clip_range, max_sites, noisy)
    return weighted_sum / total_weight, total_weight


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_weight(weight: float) -> None:
    if not _is_real(weight) or not 0.0 < float(weight) <= 1.0:
        raise SecAggError(f"site weight must be in (0, 1], got {weight!r}")


def _check_range(clip_range: float) -> None:
    if not _is_real(clip_range) or not math.isfinite(clip_range) or clip_range <= 0:
        raise SecAggError(f"clip_range must be a positive finite number, got {clip_range!r}")


def _check_contributors(n_contributors: int, max_sites: int) -> int:
    if isinstance(n_contributors, bool) or not isinstance(n_contributors, int):
        raise SecAggError(f"n_contributors must be an integer, got {n_contributors!r}")
    if not 1 <= n_contributors <= max_sites:
        raise SecAggError(f"n_contributors must be in 1..{max_sites}, got {n_contributors}")
    return n_contributors


def _finite_vector(vec: ArrayLike) -> F64Array:
    x = np.asarray(vec)
    if x.ndim != 1:
        raise SecAggError(f"an update must be a 1-D vector, got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise SecAggError(f"an update must be numeric, got dtype {x.dtype}")
    x64 = x.astype(np.float64)
    if not np.isfinite(x64).all():
        raise SecAggError("update contains NaN or infinite values")
    return x64


def _u32_vector(arr: ArrayLike, what: str) -> U32Array:
    a = np.asarray(arr)
    if a.ndim != 1 or a.dtype.kind != "u" or a.dtype.itemsize != 4:
        raise SecAggError(f"{what} must be a 1-D uint32 vector, got {a.dtype} {a.shape}")
    return a.astype(np.uint32, copy=False)

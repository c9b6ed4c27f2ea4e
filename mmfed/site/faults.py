"""Corrupt-update drills (``faults.corrupt``): a site that sends a bad update on purpose.

``site:round:kind`` makes that site, after training honestly in that round, turn its
update into one a faulty or malicious site could send: ``nan`` (a NaN in one
parameter), ``shape`` (one parameter, or the flat vector, one value too long) or
``huge`` (the update scaled to an L2 norm of 1e6). This exercises the server's update
validation in plaintext rounds and the site's own guard under secure aggregation
(the corruption is applied before that guard, so the guard is what must stop it).
"""

from __future__ import annotations

import numpy as np

from mmfed.ml.updates import float_keys

KINDS = ("nan", "shape", "huge")
HUGE_NORM = 1e6


def corruption(faults: list[str], site: str, round_num: int) -> str | None:
    """The kind of corruption planned for this site and round, if any."""
    for entry in faults:
        name, _, rest = entry.partition(":")
        when, _, kind = rest.partition(":")
        if name == site and when == str(round_num) and kind in KINDS:
            return kind
    return None


def corrupt_state(new: dict[str, np.ndarray], old: dict[str, np.ndarray], kind: str
                  ) -> dict[str, np.ndarray]:
    """``new`` (a site's trained weights, relative to the global ``old``) made bad."""
    out = {k: v.copy() for k, v in new.items()}
    keys = float_keys(old)
    if not keys:
        return out
    first = keys[0]
    if kind == "nan":
        out[first].reshape(-1)[0] = np.nan
    elif kind == "shape":
        out[first] = np.append(out[first].ravel(), out[first].dtype.type(0))
    elif kind == "huge":
        deltas = {k: new[k].astype(np.float64) - old[k].astype(np.float64) for k in keys}
        norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas.values())))
        size = sum(d.size for d in deltas.values())
        for key, delta in deltas.items():
            step = delta * (HUGE_NORM / norm) if norm > 0 else np.full(
                delta.shape, HUGE_NORM / np.sqrt(size))
            out[key] = (old[key].astype(np.float64) + step).astype(old[key].dtype)
    else:
        raise ValueError(f"unknown corruption kind {kind!r}")
    return out


def corrupt_vector(update: np.ndarray, kind: str) -> np.ndarray:
    """The flat update a site would mask under secure aggregation, made bad."""
    vec = np.array(update, dtype=np.float32, copy=True)
    if kind == "nan":
        if vec.size:
            vec[0] = np.nan
    elif kind == "shape":
        vec = np.append(vec, np.float32(0))
    elif kind == "huge":
        norm = float(np.linalg.norm(vec.astype(np.float64)))
        vec = (vec.astype(np.float64) * (HUGE_NORM / norm) if norm > 0 else
               np.full(vec.shape, HUGE_NORM / np.sqrt(max(vec.size, 1)))).astype(np.float32)
    else:
        raise ValueError(f"unknown corruption kind {kind!r}")
    return vec

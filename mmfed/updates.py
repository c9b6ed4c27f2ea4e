"""Model updates as flat vectors: what secure aggregation masks and sums.

The order is the sorted parameter names, so every site and the server agree on which
coordinate is which without sending names.
"""

from __future__ import annotations

import numpy as np


def float_keys(state: dict[str, np.ndarray]) -> list[str]:
    return sorted(k for k, v in state.items() if np.issubdtype(v.dtype, np.floating))


def flat_delta(new: dict[str, np.ndarray], old: dict[str, np.ndarray]) -> np.ndarray:
    """new − old over every float parameter, as one float32 vector."""
    keys = float_keys(old)
    if not keys:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([(new[k].astype(np.float64) - old[k].astype(np.float64)).ravel()
                           for k in keys]).astype(np.float32)


def apply_delta(old: dict[str, np.ndarray], delta: np.ndarray) -> dict[str, np.ndarray]:
    """old + delta (the inverse of ``flat_delta``), keeping each parameter's dtype."""
    out = {k: v.copy() for k, v in old.items()}
    offset = 0
    for key in float_keys(old):
        size = old[key].size
        step = delta[offset:offset + size].reshape(old[key].shape)
        out[key] = (old[key].astype(np.float64) + step).astype(old[key].dtype)
        offset += size
    if offset != delta.size:
        raise ValueError(f"update has {delta.size} values, the model {offset}")
    return out


def vector_length(state: dict[str, np.ndarray]) -> int:
    return int(sum(state[k].size for k in float_keys(state)))

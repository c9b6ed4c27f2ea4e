"""Model updates as flat vectors: what secure aggregation masks and sums.

The order is the sorted parameter names, so every site and the server agree on which
coordinate is which without sending names.
"""

from __future__ import annotations

import numpy as np

from mmfed.config import MODALITY_NAMES


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


def weight_group(key: str) -> str:
    """Which count weighs a parameter: its modality's encoder, or all examples."""
    head = key.split(".", 1)[0]
    return head if head in MODALITY_NAMES else "examples"


def segment_layout(state: dict[str, np.ndarray]) -> list[tuple[str, int]]:
    """Contiguous runs of the flat vector that share a weight group, in vector order.

    Sorted names keep each top-level module contiguous, so the layout is a handful
    of segments (fusion, genomics, head, images, records) that every site and the
    server derive from the same global state without exchanging anything.
    """
    layout: list[tuple[str, int]] = []
    for key in float_keys(state):
        group = weight_group(key)
        if layout and layout[-1][0] == group:
            layout[-1] = (group, layout[-1][1] + int(state[key].size))
        else:
            layout.append((group, int(state[key].size)))
    return layout


def group_weights(num_examples: int, counts: dict[str, int], modality_aware: bool
                  ) -> dict[str, int]:
    """A site's weight per group: patients with the modality for its encoder (when
    modality-aware), examples for everything else."""
    weights = {"examples": int(num_examples)}
    for modality in MODALITY_NAMES:
        weights[modality] = int(counts.get(modality, 0)) if modality_aware else int(num_examples)
    return weights


def grouped_average(updates: list[tuple[dict[str, np.ndarray], dict[str, int]]],
                    reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FedAvg where each parameter is weighted by its group's count at each site.

    With modality-aware weights an encoder is the mean over the sites (and patients)
    that had its modality; a group nobody trained this round keeps its previous value
    rather than becoming the average of untouched copies. Accumulated in float64.
    """
    out: dict[str, np.ndarray] = {}
    for key, ref in reference.items():
        if not np.issubdtype(ref.dtype, np.floating):
            out[key] = ref.copy()
            continue
        group = weight_group(key)
        total = float(sum(w.get(group, 0) for _, w in updates))
        if total <= 0:
            out[key] = ref.copy()
            continue
        acc = np.zeros(ref.shape, dtype=np.float64)
        for state, weights in updates:
            share = weights.get(group, 0) / total
            if share:
                acc += state[key].astype(np.float64) * share
        out[key] = acc.astype(ref.dtype)
    return out

"""A site's side of secure aggregation, on top of its Flower node state.

After local training the site keeps its update and its protocol secrets in its own
node state (never in a reply), then answers the server's share, mask and unmask
stages from there. Nothing here imports torch: these stages must stay cheap.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from mmfed import wire
from mmfed.errors import MmfedError
from mmfed.secagg import SecAggClient, client_from_state, client_to_state
from mmfed.site import consent

STATE = "mmfed.secagg"
UPDATE = "mmfed.secagg.update"


def segment_weights(request: wire.SecAggRequest, num_examples: int,
                    group_weights: dict[str, int] | None) -> list[int]:
    """This site's count for each segment the server laid out (by weight group name)."""
    groups = list(request.segment_groups)
    if not groups:
        return [int(num_examples)]
    weights = group_weights or {}
    unknown = [g for g in groups if g not in weights and g != "examples"]
    if unknown:
        raise MmfedError(f"secure aggregation asked for unknown weight groups {unknown}")
    return [int(weights.get(g, num_examples)) for g in groups]


def check_fault(faults: list[str], site: str, round_num: int, stage: str) -> None:
    """Fault injection for tests and drills: ``site:round:stage`` makes this site fail."""
    if f"{site}:{round_num}:{stage}" in faults:
        raise MmfedError(f"{site}: injected failure at round {round_num}, stage {stage}")


def guard(request: wire.SecAggRequest, update: np.ndarray, max_norm: float) -> np.ndarray:
    """The site's own check of its update before masking; returns it clipped.

    Once masked, an update cannot be inspected by anyone, so an honest site checks
    itself: the vector length the server laid out, finite values, and the L2 bound
    ``aggregation.max_update_norm`` (0 = none). A failure refuses the round with a
    one-line reason instead of sending a masked vector. Every coordinate is then
    clipped to ``clip_range``, which the fixed-point encoding would do anyway; doing
    it here makes the bound on what this site can contribute explicit. A malicious
    site would simply skip this guard, which is why the server also checks the
    unmasked aggregate (finite, norm within bound) and keeps the previous model if
    it fails.
    """
    expected = request.params.vector_length
    vec = np.asarray(update)
    if vec.ndim != 1 or vec.size != expected:
        raise MmfedError(f"update guard: the update has {vec.size} values, the model "
                         f"{expected}; not masking it")
    bad = int(vec.size - np.count_nonzero(np.isfinite(vec)))
    if bad:
        raise MmfedError(f"update guard: {bad} NaN or infinite value(s) in the update; "
                         "not masking it")
    norm = float(np.linalg.norm(vec.astype(np.float64)))
    if max_norm > 0 and norm > max_norm:
        raise MmfedError(f"update guard: update norm {norm:.4g} exceeds the bound "
                         f"{max_norm:g} (aggregation.max_update_norm); not masking it")
    clip = request.params.clip_range
    return np.clip(vec, -clip, clip).astype(np.float32)


def _save(state: RecordDict, client: SecAggClient, extra: dict[str, Any] | None = None) -> None:
    old = dict(state.config_records[STATE]) if STATE in state.config_records else {}
    old.update(extra or {})
    old["client"] = client_to_state(client)
    state[STATE] = ConfigRecord(old)


def _load(state: RecordDict, params_round: int | None = None) -> tuple[SecAggClient,
                                                                        dict[str, Any]]:
    if STATE not in state.config_records:
        raise MmfedError("secure aggregation stage without a trained update in this round")
    record = dict(state.config_records[STATE])
    blob = record.get("client")
    if not isinstance(blob, bytes):
        raise MmfedError("corrupt secure aggregation state")
    client = client_from_state(blob)
    if params_round is not None and client.params.round != params_round:
        raise MmfedError(f"secure aggregation state is for round {client.params.round}, "
                         f"not {params_round}")
    return client, record


def begin(state: RecordDict, request: wire.SecAggRequest, update: np.ndarray,
          num_examples: int, group_weights: dict[str, int] | None = None,
          counts: list[int] | None = None, *, min_cohort: int) -> ConfigRecord:
    """After training: create this round's client, keep secrets, advertise public keys.

    ``group_weights`` (patients per modality, examples for the rest), or ``counts``
    given per segment (the patients behind each column's moments), stay in the site's
    state and only ever leave inside the masked vector. ``min_cohort`` is the site's
    own term for the unmask stage, kept with its secrets so a later message cannot
    change it.
    """
    if counts is None:
        counts = segment_weights(request, num_examples, group_weights)
    elif len(counts) != request.params.n_weights:
        raise MmfedError(f"secure aggregation laid out {request.params.n_weights} "
                         f"segment(s); this site has {len(counts)} counts")
    client = SecAggClient(request.params, request.my_id)
    pks = client.advertise()
    state[UPDATE] = ArrayRecord({"u": Array(np.ascontiguousarray(update, dtype=np.float32))})
    _save(state, client, {"num_examples": int(num_examples), "counts": list(counts),
                          "min_cohort": int(min_cohort)})
    return wire.public_keys(pks)


def share(state: RecordDict, request: ConfigRecord, round_num: int) -> ConfigRecord:
    client, _ = _load(state, round_num)
    out = client.share_keys(wire.peer_keys_of(request))
    _save(state, client)
    return wire.shares(out)


def mask(state: RecordDict, request: ConfigRecord, round_num: int) -> ArrayRecord:
    client, record = _load(state, round_num)
    cts = wire.routed_of(request)
    update = state.array_records[UPDATE]["u"].numpy()
    counts = wire.ints(record.get("counts", [record["num_examples"]]))
    masked = client.masked_input(cts, update, counts if client.params.segments else counts[0])
    del state[UPDATE]  # the plaintext update is no longer needed
    _save(state, client)
    return wire.masked(masked)


def unmask(state: RecordDict, request: ConfigRecord, round_num: int) -> ConfigRecord:
    """Reveal the shares that unmask the survivors' sum, if the sum hides this site."""
    client, record = _load(state, round_num)
    survivors, dropped = wire.unmask_request_of(request)
    min_cohort = record.get("min_cohort")
    if not isinstance(min_cohort, int) or isinstance(min_cohort, bool):
        raise MmfedError("corrupt secure aggregation state (no cohort term)")
    consent.check_unmask(min_cohort, survivors, client.my_id)
    out = client.unmask(survivors, dropped)
    del state[STATE]
    return wire.reveals(out)

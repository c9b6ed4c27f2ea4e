"""A site's side of secure aggregation, on top of its Flower node state.

After local training the site keeps its update and its protocol secrets in its own
node state (never in a reply), then answers the server's share, mask and unmask
stages from there. Nothing here imports torch: these stages must stay cheap.

Keys ahead: when the server asks at unmask (``wire.NEXT_ROUND``), the site makes
fresh key pairs for the next round (``RoundKeys``), keeps their secrets here and sends
the public keys with its reveals. If the next round's train request then carries its
share group's keys (``wire.PEERS``), the site shares right after training, in its
train reply, and the round skips the share trip. Those keys serve that one round:
any train request takes them out of the state, and a request for any other round,
or one that does not carry this site's own keys as advertised, is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from mmfed import wire
from mmfed.errors import MmfedError
from mmfed.privacy.distributed import draw_noise
from mmfed.secagg import RoundKeys, SecAggClient, SecAggError, client_from_state, client_to_state
from mmfed.site import consent

STATE = "mmfed.secagg"
UPDATE = "mmfed.secagg.update"
NEXT = "mmfed.secagg.next"  # key pairs made ahead for the next round (RoundKeys)


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


def take_round_keys(state: RecordDict) -> RoundKeys | None:
    """The key pairs made ahead for a round, taken out of the state: whatever the train
    request that asks for them says, they are never there for another one."""
    if NEXT not in state.config_records:
        return None
    blob = state.config_records[NEXT].get("keys")
    del state[NEXT]
    if not isinstance(blob, bytes):
        return None
    try:
        return RoundKeys.from_state(blob)
    except SecAggError:
        return None


def check_round_keys(round_keys: RoundKeys | None, request: wire.SecAggRequest,
                     peers: dict[int, dict[str, bytes]], round_num: int) -> RoundKeys:
    """Before training on a request that carries the share group's keys: they must be
    the keys this site made for exactly this round of this run, its own among them
    unaltered. Anything else is refused, with nothing trained or spent."""
    params = request.params
    if round_keys is None:
        raise MmfedError(f"secure aggregation: the round-{params.round} request carries "
                         "keys this site never advertised for it (it holds none)")
    if params.round != round_num:
        raise MmfedError(f"secure aggregation parameters for round {params.round} in a "
                         f"round-{round_num} request")
    if (round_keys.run_id, round_keys.round) != (params.run_id, params.round):
        raise MmfedError(f"secure aggregation: this site's keys were advertised for round "
                         f"{round_keys.round} (run {round_keys.run_id!r}), not for round "
                         f"{params.round} (run {params.run_id!r}); refused")
    if peers.get(request.my_id) != round_keys.public():
        raise MmfedError("secure aggregation: the request does not carry this site's "
                         "advertised keys as its own; refused")
    return round_keys


def begin(state: RecordDict, request: wire.SecAggRequest, update: np.ndarray,
          num_examples: int, group_weights: dict[str, int] | None = None,
          counts: list[int] | None = None, *, min_cohort: int,
          round_keys: RoundKeys | None = None,
          peers: dict[int, dict[str, bytes]] | None = None,
          noise_share: float | None = None) -> ConfigRecord:
    """After training: create this round's client, keep secrets, and advertise its
    public keys, or, given the keys it advertised ahead (``round_keys``, checked by
    ``check_round_keys``) and its share group's (``peers``), send its encrypted shares.

    ``group_weights`` (patients per modality, examples for the rest), or ``counts``
    given per segment (the patients behind each column's moments), stay in the site's
    state and only ever leave inside the masked vector. ``min_cohort`` is the site's
    own term for the unmask stage, kept with its secrets so a later message cannot
    change it; so is ``noise_share`` (distributed DP), the Skellam parameter of the
    noise added to the codes at masking.
    """
    if counts is None:
        counts = segment_weights(request, num_examples, group_weights)
    elif len(counts) != request.params.n_weights:
        raise MmfedError(f"secure aggregation laid out {request.params.n_weights} "
                         f"segment(s); this site has {len(counts)} counts")
    if (round_keys is None) != (peers is None):
        raise MmfedError("secure aggregation: keys ahead need the share group's keys")
    client = SecAggClient(request.params, request.my_id, round_keys)
    pks = client.advertise()
    out = None if peers is None else client.share_keys(peers)
    state[UPDATE] = ArrayRecord({"u": Array(np.ascontiguousarray(update, dtype=np.float32))})
    extra: dict[str, Any] = {"num_examples": int(num_examples), "counts": list(counts),
                             "min_cohort": int(min_cohort)}
    if noise_share is not None:
        extra["noise_share"] = float(noise_share)
    _save(state, client, extra)
    return wire.public_keys(pks) if out is None else wire.shares(out)


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
    share = record.get("noise_share")
    if (share is not None) != client.params.noisy or not isinstance(share, float | None):
        raise MmfedError("secure aggregation: the round's noise layout does not match how "
                         "this site trained (distributed noise share or none); not masking")
    noise = None if share is None else draw_noise(share, client.params.vector_length)
    masked = client.masked_input(cts, update, counts if client.params.segments else counts[0],
                                 noise=noise)
    del state[UPDATE]  # the plaintext update is no longer needed
    _save(state, client)
    return wire.masked(masked)


def unmask(state: RecordDict, request: ConfigRecord, round_num: int
           ) -> tuple[ConfigRecord, ConfigRecord | None]:
    """Reveal the shares that unmask the survivors' sum, if the sum hides this site;
    and, when the server asks, make fresh keys for the next round (only round + 1:
    keys are made for the round that follows, never for one further ahead)."""
    client, record = _load(state, round_num)
    survivors, dropped = wire.unmask_request_of(request)
    next_round = wire.next_round_of(request)
    if next_round is not None and next_round != round_num + 1:
        raise MmfedError(f"secure aggregation: asked at round {round_num} for keys for "
                         f"round {next_round}; keys are made only for the next round")
    min_cohort = record.get("min_cohort")
    if not isinstance(min_cohort, int) or isinstance(min_cohort, bool):
        raise MmfedError("corrupt secure aggregation state (no cohort term)")
    consent.check_unmask(min_cohort, survivors, client.my_id)
    out = client.unmask(survivors, dropped)
    del state[STATE]
    ahead = None
    if next_round is not None:
        keys = RoundKeys.generate(client.params.run_id, next_round)
        state[NEXT] = ConfigRecord({"keys": keys.to_state()})
        ahead = wire.next_keys(next_round, keys.public())
    return wire.reveals(out), ahead

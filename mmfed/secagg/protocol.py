"""Secure aggregation (Bonawitz et al., CCS 2017) with SecAgg+ neighbourhoods (Bell et al., 2020).

Threat model
------------
* The server is honest-but-curious: it runs the protocol as written (relays every
  message, reports dropouts truthfully and consistently) but tries to learn what it can
  from everything it sees.
* Up to t - 1 sites (t = ``threshold``) may collude with the server and pool their state.
  With SecAgg+ sparse neighbourhoods the guarantee is probabilistic over the random graph
  (Bell et al.): it holds unless the colluders happen to cover t of one site's share group.
* Protected: each site's individual update and its example count (both are masked).
* Revealed: the weighted sum of the surviving updates, hence their weighted mean and the
  total weight Σ n_i / count_cap; which sites took part and at which stage others dropped.
  With two contributors the aggregate alone reveals each one's update to the other.
* Not covered: an actively malicious server (no signatures or consistency-check round, so
  it could tell different sites different dropout stories; the "never both shares for one
  peer" rule plus t > half the share group is the only defence), sites that submit
  poisoned updates, and side channels. Python cannot reliably erase secrets from memory;
  the client drops its references as soon as it no longer needs them.

Round flow (one ``SecAggClient`` per site and one ``SecAggServer`` per round)
---------------------------------------------------------------------------
1. ``client.advertise()`` → server ``collect_keys`` → each client gets the public keys.
2. ``client.share_keys(pks)`` → server ``route`` → each client gets ciphertexts for it.
3. ``client.masked_input(cts, update, n)`` → server ``unmask_request`` → (survivors, dropped).
4. ``client.unmask(survivors, dropped)`` → server ``aggregate`` → weighted mean.

Key freshness: every ``SecAggClient`` generates new X25519 key pairs and a new self-mask
seed, and is single-use (each stage runs once, in order). A round that reconstructs a
dropped site's mask key therefore never exposes a key used in any other round; callers
must create a new client per round and never persist or reuse one. Key pairs made
ahead for the next round (``RoundKeys``, so that a round can start at step 2) are
equally single-use: bound to one round of one run, and refused for any other.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mmfed.secagg import keys, shamir
from mmfed.secagg.errors import SecAggAborted, SecAggError
from mmfed.secagg.prg import expand
from mmfed.secagg.quantize import (
    MAX_SITES_LIMIT,
    MODULUS,
    F64Array,
    U32Array,
    levels,
    pack,
    pack_segments,
    site_weight,
    unpack_mean,
    unpack_segments,
)

_B_TAG = b"\x01"  # reveal of a survivor's self-mask seed share
_S_TAG = b"\x02"  # reveal of a dropped site's mask-key share
# A share travels as its value alone (``shamir.encode_value``): its x is the holder's,
# which the recipient of a ciphertext (the holder itself) and the server (who knows who
# revealed it) both know, and the ciphertext's associated data binds its recipient.
_REVEAL_BYTES = 1 + shamir.Y_BYTES
_PAYLOAD_BYTES = 2 * shamir.Y_BYTES


@dataclass(frozen=True)
class SecAggParams:
    """Everything all parties must agree on for one round; the server sends it to sites."""

    run_id: str
    round: int
    site_ids: list[int]
    threshold: int
    neighbours: int | None
    clip_range: float
    max_sites: int
    count_cap: int
    vector_length: int
    # Lengths of contiguous parts of the update, each with its own weight (e.g. each
    # encoder weighted by the patients who had its modality); empty = one weight.
    segments: tuple[int, ...] = ()
    # Distributed DP: each site adds an integer noise share to its codes before
    # masking, and the sum is decoded as signed within the room max_sites leaves.
    noisy: bool = False

    @property
    def n_weights(self) -> int:
        return len(self.segments) or 1

    def to_record(self) -> dict[str, str | int | float | list[int]]:
        """Plain scalars and integer lists: what a Flower ConfigRecord or JSON can hold.

        The one encoding of the parameters, used on the wire and in a site's saved
        state alike; ``neighbours`` None (everyone is everyone's neighbour) is 0.
        """
        return {"run_id": self.run_id, "round": self.round, "site_ids": list(self.site_ids),
                "threshold": self.threshold, "neighbours": self.neighbours or 0,
                "clip_range": self.clip_range, "max_sites": self.max_sites,
                "count_cap": self.count_cap, "vector_length": self.vector_length,
                "segments": list(self.segments), "noisy": int(self.noisy)}

    @staticmethod
    def from_record(raw: Mapping[str, object]) -> SecAggParams:
        """Inverse of ``to_record``, validated; anything malformed is a SecAggError."""

        def integer(key: str) -> int:
            value = raw.get(key)
            if not _is_int(value):
                raise SecAggError(f"secure aggregation parameter {key!r} must be an "
                                  f"integer, got {value!r}")
            return int(value)  # type: ignore[call-overload]

        def integers(key: str) -> list[int]:
            value = raw.get(key, [])
            if not isinstance(value, list | tuple) or not all(_is_int(v) for v in value):
                raise SecAggError(f"secure aggregation parameter {key!r} must be a list "
                                  f"of integers")
            return [int(v) for v in value]

        run_id, clip = raw.get("run_id"), raw.get("clip_range")
        if not isinstance(run_id, str):
            raise SecAggError(f"secure aggregation parameter 'run_id' must be text, "
                              f"got {run_id!r}")
        if not isinstance(clip, int | float) or isinstance(clip, bool):
            raise SecAggError(f"secure aggregation parameter 'clip_range' must be a "
                              f"number, got {clip!r}")
        neighbours = 0 if raw.get("neighbours") is None else integer("neighbours")
        noisy = raw.get("noisy", 0)
        if noisy not in (0, 1) or isinstance(noisy, bool | float):
            raise SecAggError(f"secure aggregation parameter 'noisy' must be 0 or 1, got "
                              f"{noisy!r}")
        params = SecAggParams(run_id=run_id, round=integer("round"),
                              site_ids=integers("site_ids"), threshold=integer("threshold"),
                              neighbours=neighbours if neighbours > 0 else None,
                              clip_range=float(clip), max_sites=integer("max_sites"),
                              count_cap=integer("count_cap"),
                              vector_length=integer("vector_length"),
                              segments=tuple(integers("segments")), noisy=bool(noisy))
        params.validate()
        return params

    def validate(self) -> None:
        """Raise a one-line SecAggError for any parameter the protocol cannot run with."""
        if not isinstance(self.run_id, str) or not self.run_id:
            raise SecAggError("run_id must be a non-empty string")
        if len(self.run_id.encode("utf-8")) > 1024:
            raise SecAggError("run_id must be at most 1024 bytes")
        if not _is_int(self.round) or not 0 <= self.round < 2**64:
            raise SecAggError(f"round must be an integer in 0..2**64-1, got {self.round!r}")
        ids = self.site_ids
        if not isinstance(ids, list | tuple) or not all(_is_int(s) for s in ids):
            raise SecAggError("site_ids must be a list of integers")
        if len(ids) < 2:
            raise SecAggError(f"secure aggregation needs at least 2 sites, got {len(ids)}")
        if len(set(ids)) != len(ids):
            raise SecAggError("site_ids contains duplicates")
        if any(not 0 <= s < 2**64 for s in ids):
            raise SecAggError("site ids must be in 0..2**64-1")
        if not _is_int(self.max_sites) or not len(ids) <= self.max_sites <= MAX_SITES_LIMIT:
            raise SecAggError(
                f"max_sites must be an integer in {len(ids)}..{MAX_SITES_LIMIT} "
                f"(at least the number of sites), got {self.max_sites!r}"
            )
        if self.neighbours is not None and (not _is_int(self.neighbours) or self.neighbours < 2):
            raise SecAggError(
                f"neighbours must be None or an integer >= 2, got {self.neighbours!r}"
            )
        group = share_group_size(len(ids), self.neighbours)
        if not _is_int(self.threshold) or not group / 2 < self.threshold <= group:
            raise SecAggError(
                f"threshold must be more than half of the share group ({group} sites: a site "
                f"and its neighbours) and at most {group}, got {self.threshold!r}"
            )
        if (
            not isinstance(self.clip_range, numbers.Real)
            or isinstance(self.clip_range, bool)
            or not math.isfinite(self.clip_range)
            or self.clip_range <= 0
        ):
            raise SecAggError(
                f"clip_range must be a positive finite number, got {self.clip_range!r}"
            )
        top = levels(self.max_sites)
        if not _is_int(self.count_cap) or not 1 <= self.count_cap <= top:
            raise SecAggError(
                f"count_cap must be an integer in 1..{top} for max_sites {self.max_sites}, "
                f"got {self.count_cap!r}"
            )
        if not _is_int(self.vector_length) or self.vector_length < 1:
            raise SecAggError(
                f"vector_length must be a positive integer, got {self.vector_length!r}"
            )
        if self.segments and (
            not all(_is_int(n) and n >= 1 for n in self.segments)
            or sum(self.segments) != self.vector_length
        ):
            raise SecAggError(
                f"segments must be positive integers summing to vector_length "
                f"{self.vector_length}, got {list(self.segments)!r}"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_threshold(n: int) -> int:
    """⌊n/2⌋ + 1 for a share group of ``n`` sites: more than half of the group, the least
    that keeps a curious server from collecting both kinds of share for one site (see
    ``SecAggParams.validate``), and so the most drop-out a round tolerates."""
    if not _is_int(n) or n < 2:
        raise SecAggError(f"a share group has at least 2 sites, got {n!r}")
    return n // 2 + 1


def effective_degree(n_sites: int, neighbours: int | None) -> int:
    """Neighbours per site. An odd k with an odd number of sites cannot form a k-regular
    graph, so it is rounded up to k + 1; k >= n - 1 means the complete graph."""
    if neighbours is None or neighbours >= n_sites - 1:
        return n_sites - 1
    k = neighbours + (neighbours % 2 == 1 and n_sites % 2 == 1)
    return min(k, n_sites - 1)


def share_group_size(n_sites: int, neighbours: int | None) -> int:
    """Sites holding shares of one site's secrets: its neighbours plus itself."""
    return effective_degree(n_sites, neighbours) + 1


def neighbourhood(site_id: int, params: SecAggParams) -> list[int]:
    """Sorted ids of the sites that ``site_id`` masks with and sends shares to."""
    graph = _graph(params)
    if site_id not in graph:
        raise SecAggError(f"site {site_id} is not part of this round")
    return list(graph[site_id])


def _graph(params: SecAggParams) -> dict[int, tuple[int, ...]]:
    return _build_graph(
        params.run_id, params.round, tuple(sorted(params.site_ids)), params.neighbours
    )


@lru_cache(maxsize=32)
def _build_graph(
    run_id: str, round_: int, ids: tuple[int, ...], neighbours: int | None
) -> dict[int, tuple[int, ...]]:
    """Harary-style ring on a pseudorandom permutation of the sites (SecAgg+).

    Seeded only by public values so every site and the server derive the same graph with
    no extra message; the shuffle uses our own ChaCha20 stream, not numpy's RNG, whose
    streams may change between numpy versions that different sites may run.
    """
    n = len(ids)
    degree = effective_degree(n, neighbours)
    if degree == n - 1:
        return {s: tuple(x for x in ids if x != s) for s in ids}
    rid = run_id.encode("utf-8")
    seed = hashlib.sha256(
        b"mmfed-secagg/v1 graph\x00" + len(rid).to_bytes(4, "big") + rid + round_.to_bytes(8, "big")
    ).digest()
    words = expand(seed, 2 * n, "graph").astype(np.uint64)
    draws = [int(v) for v in (words[0::2] << np.uint64(32)) | words[1::2]]
    order = list(ids)
    for i in range(n - 1, 0, -1):  # Fisher-Yates; modulo bias <= n / 2**64
        j = draws[i] % (i + 1)
        order[i], order[j] = order[j], order[i]
    half = degree // 2
    offsets = [o for h in range(1, half + 1) for o in (h, n - h)]
    if degree % 2 == 1:  # only reached with n even: add the antipode
        offsets.append(n // 2)
    return {
        order[p]: tuple(sorted(order[(p + o) % n] for o in offsets)) for p in range(n)
    }


def _x_of(site_id: int, params: SecAggParams) -> int:
    """Shamir x coordinate: 1 + the site's index among the sorted site ids."""
    return _x_coordinates(tuple(params.site_ids))[site_id]


@lru_cache(maxsize=32)
def _x_coordinates(ids: tuple[int, ...]) -> dict[int, int]:
    return {sid: k + 1 for k, sid in enumerate(sorted(ids))}


def _check_id_list(values: Iterable[int], what: str) -> list[int]:
    out = list(values)
    if not all(_is_int(v) for v in out):
        raise SecAggError(f"{what} must contain integer site ids")
    if len(set(out)) != len(out):
        raise SecAggError(f"{what} contains duplicate site ids")
    return out


@dataclass(frozen=True)
class RoundKeys:
    """A site's two key pairs for one future round, made before that round's parameters.

    Advertising keys is the first step of every round, and it needs nothing from the
    round's parameters: so a site can make the next round's key pairs at the end of
    this one and advertise them with its last reply, and the next round can start at
    the share step. The pairs are as fresh as ``SecAggClient``'s own (new X25519 keys,
    made for one round of one run and used by one client), and ``SecAggClient`` refuses
    them for any other round or run. They hold private keys: kept in the site's own
    state only, like ``client_to_state``'s blob.
    """

    run_id: str
    round: int
    c_sk: bytes
    s_sk: bytes

    @staticmethod
    def generate(run_id: str, round_: int) -> RoundKeys:
        if not isinstance(run_id, str) or not run_id or not _is_int(round_) \
                or not 0 <= round_ < 2**64:
            raise SecAggError(f"round keys need a run id and a round, got {run_id!r}, "
                              f"{round_!r}")
        c_sk, _ = keys.generate_keypair()
        s_sk, _ = keys.generate_keypair()
        return RoundKeys(run_id, round_, keys.private_bytes(c_sk), keys.private_bytes(s_sk))

    def public(self) -> dict[str, bytes]:
        """What the site advertises: the two public keys."""
        return {"c_pk": keys.public_bytes(keys.load_private(self.c_sk)),
                "s_pk": keys.public_bytes(keys.load_private(self.s_sk))}

    def to_state(self) -> bytes:
        import json

        return json.dumps({"run_id": self.run_id, "round": self.round,
                           "c_sk": self.c_sk.hex(), "s_sk": self.s_sk.hex()}).encode()

    @staticmethod
    def from_state(data: bytes) -> RoundKeys:
        """Inverse of ``to_state``; anything inconsistent is a SecAggError."""
        import json

        try:
            blob = json.loads(data)
            out = RoundKeys(str(blob["run_id"]), int(blob["round"]),
                            bytes.fromhex(blob["c_sk"]), bytes.fromhex(blob["s_sk"]))
            keys.load_private(out.c_sk)
            keys.load_private(out.s_sk)
        except (KeyError, TypeError, ValueError, SecAggError) as exc:
            raise SecAggError(f"corrupt secure-aggregation round keys ({exc})") from None
        return out


class SecAggClient:
    """One site's side of one round; create a new one every round (keys are single-use).

    ``round_keys``: the key pairs the site made and advertised ahead for this round
    (``RoundKeys``); without them the client makes its own.
    """

    def __init__(self, params: SecAggParams, my_id: int,
                 round_keys: RoundKeys | None = None) -> None:
        params.validate()
        if my_id not in params.site_ids:
            raise SecAggError(f"site {my_id} is not in this round's site_ids")
        self.params = params
        self.my_id = my_id
        self._neighbours = neighbourhood(my_id, params)
        self._x = _x_of(my_id, params)
        self._stage = "new"
        self._c_sk: X25519PrivateKey | None
        self._s_sk: X25519PrivateKey | None
        if round_keys is None:
            self._c_sk, self._c_pk = keys.generate_keypair()
            self._s_sk, self._s_pk = keys.generate_keypair()
        else:
            if (round_keys.run_id, round_keys.round) != (params.run_id, params.round):
                raise SecAggError(
                    f"site {my_id}: keys made for round {round_keys.round} of run "
                    f"{round_keys.run_id!r}, not round {params.round} of run "
                    f"{params.run_id!r}; keys are never used for another round")
            self._c_sk = keys.load_private(round_keys.c_sk)
            self._s_sk = keys.load_private(round_keys.s_sk)
            self._c_pk, self._s_pk = keys.public_bytes(self._c_sk), keys.public_bytes(self._s_sk)
        self._b: bytes | None = secrets.token_bytes(shamir.SECRET_BYTES)
        self._peer_s_pk: dict[int, bytes] = {}
        self._channel: dict[int, bytes] = {}  # AES-GCM key per live neighbour
        self._held: dict[int, tuple[shamir.Share, shamir.Share]] = {}  # (b-share, s-share)

    @property
    def neighbours(self) -> list[int]:
        return list(self._neighbours)

    def _require_stage(self, expected: str, action: str) -> None:
        if self._stage != expected:
            raise SecAggError(
                f"site {self.my_id}: cannot run {action} in stage '{self._stage}' "
                "(stages run once, in order; use a new SecAggClient each round)"
            )

    def _secrets(self) -> tuple[bytes, X25519PrivateKey, X25519PrivateKey]:
        if self._b is None or self._s_sk is None or self._c_sk is None:
            raise SecAggError(f"site {self.my_id}: secrets already discarded this round")
        return self._b, self._s_sk, self._c_sk

    def advertise(self) -> dict[str, bytes]:
        """Stage 1: public keys for share encryption (c) and pairwise masking (s)."""
        self._require_stage("new", "advertise")
        self._stage = "advertised"
        return {"c_pk": self._c_pk, "s_pk": self._s_pk}

    def share_keys(self, all_pks: Mapping[int, Mapping[str, bytes]]) -> dict[int, bytes]:
        """Stage 2: an encrypted share of b_i and of s_sk_i for every live neighbour."""
        self._require_stage("advertised", "share_keys")
        p = self.params
        pks = _check_public_keys(all_pks, p)
        mine = pks.get(self.my_id)
        if mine is not None and mine != (self._c_pk, self._s_pk):
            raise SecAggError(f"site {self.my_id}: the server altered this site's public keys")
        live = [j for j in self._neighbours if j in pks]
        if len(live) + 1 < p.threshold:
            raise SecAggAborted(
                f"site {self.my_id}: only {len(live) + 1} of its share group advertised keys, "
                f"threshold is {p.threshold}"
            )
        b, s_sk, c_sk = self._secrets()
        holders = [*live, self.my_id]
        xs = [_x_of(j, p) for j in holders]
        b_shares = shamir.split_at(b, p.threshold, xs)
        s_shares = shamir.split_at(keys.private_bytes(s_sk), p.threshold, xs)
        out: dict[int, bytes] = {}
        channel: dict[int, bytes] = {}
        for j, b_share, s_share in zip(holders, b_shares, s_shares, strict=True):
            if j == self.my_id:
                continue
            key = keys.derive_key(c_sk, pks[j][0], "share-key", p.run_id, p.round,
                                  self.my_id, j)
            payload = shamir.encode_value(b_share) + shamir.encode_value(s_share)
            out[j] = keys.encrypt_share(key, payload, p.run_id, p.round, self.my_id, j)
            channel[j] = key
        self._stage = "shared"
        self._channel = channel
        self._peer_s_pk = {j: pks[j][1] for j in live}
        self._held = {self.my_id: (b_shares[-1], s_shares[-1])}
        return out

    def masked_input(
        self,
        ciphertexts_for_me: Mapping[int, bytes],
        update: np.ndarray,
        num_examples: int | Sequence[int],
        noise: np.ndarray | None = None,
    ) -> U32Array:
        """Stage 3: encode(pack(update)) + PRG(b_i) ± PRG(s_ij) for neighbours that shared.

        ``noise``: integer noise (one value per update coordinate, not on the weight
        codes) added to the codes modulo 2**32, for distributed DP; only a round laid
        out as ``noisy`` takes it, since only such a round decodes it.
        """
        self._require_stage("shared", "masked_input")
        p = self.params
        if (noise is not None) != p.noisy:
            raise SecAggError("integer noise goes with a round laid out as noisy, and only "
                              "with one")
        vec = np.asarray(update)
        if vec.ndim != 1 or vec.shape[0] != p.vector_length:
            raise SecAggError(
                f"update must be a 1-D vector of length {p.vector_length}, got shape {vec.shape}"
            )
        packed = self._pack(vec, num_examples)
        received: dict[int, tuple[shamir.Share, shamir.Share]] = {}
        for sender, ct in ciphertexts_for_me.items():
            if sender not in self._channel:
                raise SecAggError(
                    f"site {self.my_id}: unexpected share ciphertext from site {sender} "
                    "(not a neighbour that this site shared keys with)"
                )
            plain = keys.decrypt_share(self._channel[sender], ct, p.run_id, p.round,
                                       sender, self.my_id)
            if len(plain) != _PAYLOAD_BYTES:
                raise SecAggError(f"share payload from site {sender} has the wrong length")
            # decrypted, so it was made for this site: its shares are at this site's x
            b_share = shamir.decode_value(plain[: shamir.Y_BYTES], self._x)
            s_share = shamir.decode_value(plain[shamir.Y_BYTES :], self._x)
            received[sender] = (b_share, s_share)
        if len(received) + 1 < p.threshold:
            raise SecAggAborted(
                f"site {self.my_id}: only {len(received) + 1} of its share group shared keys, "
                f"threshold is {p.threshold}"
            )
        b, s_sk, _ = self._secrets()
        length = p.vector_length + p.n_weights
        masked = packed.copy()
        if noise is not None:
            share = np.asarray(noise)
            if share.shape != (p.vector_length,) or share.dtype.kind != "i":
                raise SecAggError(f"noise must be {p.vector_length} integers")
            masked[: p.vector_length] += np.mod(share.astype(np.int64), MODULUS).astype(np.uint32)
        masked += expand(b, length, "self-mask")
        for j in sorted(received):
            seed = keys.derive_key(s_sk, self._peer_s_pk[j], "pair-mask", p.run_id,
                                   p.round, self.my_id, j)
            if j > self.my_id:
                masked += expand(seed, length, "pair-mask")
            else:
                masked -= expand(seed, length, "pair-mask")
        self._stage = "masked"
        self._held.update(received)
        self._b = None  # from here on only the shares are needed
        self._s_sk = None
        self._c_sk = None
        self._channel = {}
        return masked

    def _pack(self, vec: np.ndarray, num_examples: int | Sequence[int]) -> U32Array:
        """Weighted codes: one weight per segment when the round has segments."""
        p = self.params
        if not p.segments:
            if not isinstance(num_examples, int):
                raise SecAggError("this round has one weight: give one example count")
            return pack(vec, site_weight(num_examples, p.count_cap), p.clip_range,
                        p.max_sites)
        counts = [num_examples] if isinstance(num_examples, int) else list(num_examples)
        if len(counts) != len(p.segments):
            raise SecAggError(f"{len(counts)} counts for {len(p.segments)} segments")
        for count in counts:
            if not _is_int(count) or not 0 <= count <= p.count_cap:
                raise SecAggError(f"segment count must be an integer in 0..{p.count_cap}, "
                                  f"got {count!r}")
        return pack_segments(vec, [c / p.count_cap for c in counts], list(p.segments),
                             p.clip_range, p.max_sites)

    def unmask(self, survivors: Iterable[int], dropped: Iterable[int]) -> dict[int, bytes]:
        """Stage 4: for each share-group member, its b-share if it survived, else its
        s_sk-share; never both for one peer, and only once per round."""
        self._require_stage("masked", "unmask")
        p = self.params
        alive = set(_check_id_list(survivors, "survivors"))
        gone = set(_check_id_list(dropped, "dropped"))
        both = sorted(alive & gone)
        if both:
            raise SecAggError(
                f"site {self.my_id}: sites {both} listed as both survivor and dropped; "
                "refusing to reveal both shares of a peer"
            )
        if self.my_id not in alive:
            raise SecAggError(
                f"site {self.my_id}: not listed as a survivor although it sent its masked input"
            )
        group = set(self._neighbours) | {self.my_id}
        for j in sorted((alive | gone) & group):
            if j not in self._held:
                raise SecAggError(
                    f"site {self.my_id}: site {j} is listed but never shared keys with this site"
                )
        alive_in_group = len(alive & group)
        if alive_in_group < p.threshold:
            raise SecAggAborted(
                f"site {self.my_id}: only {alive_in_group} of its share group survived, "
                f"threshold is {p.threshold}; refusing to unmask"
            )
        out: dict[int, bytes] = {}
        for j, (b_share, s_share) in sorted(self._held.items()):
            if j in alive:
                out[j] = _B_TAG + shamir.encode_value(b_share)
            elif j in gone:
                out[j] = _S_TAG + shamir.encode_value(s_share)
        self._stage = "done"
        self._held = {}
        return out


def _hex(data: bytes | None) -> str | None:
    return None if data is None else data.hex()


def _unhex(text: object) -> bytes | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise SecAggError("corrupt secure-aggregation client state")
    return bytes.fromhex(text)


def client_to_state(client: SecAggClient) -> bytes:
    """Serialize a client between protocol messages (kept in the site's own state only).

    Each Flower message may be handled by a fresh process, so a site's secrets must
    survive between stages in its node state. The blob holds private keys: it must
    never be put in a reply.
    """
    import json

    def sk(key: X25519PrivateKey | None) -> str | None:
        return None if key is None else keys.private_bytes(key).hex()

    p = client.params
    blob = {
        "params": p.to_record(),
        "my_id": client.my_id, "stage": client._stage, "c_sk": sk(client._c_sk),
        "s_sk": sk(client._s_sk), "c_pk": client._c_pk.hex(), "s_pk": client._s_pk.hex(),
        "b": _hex(client._b),
        "peer_s_pk": {str(j): v.hex() for j, v in client._peer_s_pk.items()},
        "channel": {str(j): v.hex() for j, v in client._channel.items()},
        "held": {str(j): [[b[0], str(b[1])], [s_[0], str(s_[1])]]
                 for j, (b, s_) in client._held.items()},
    }
    return json.dumps(blob).encode()


def client_from_state(data: bytes) -> SecAggClient:
    """Inverse of ``client_to_state``; any inconsistency is a SecAggError."""
    import json

    try:
        blob = json.loads(data)
        params = SecAggParams.from_record(dict(blob["params"]))
        client = SecAggClient.__new__(SecAggClient)
        client.params = params
        client.my_id = int(blob["my_id"])
        client._neighbours = neighbourhood(client.my_id, params)
        client._x = _x_of(client.my_id, params)
        client._stage = str(blob["stage"])
        c_sk, s_sk = _unhex(blob["c_sk"]), _unhex(blob["s_sk"])
        client._c_sk = None if c_sk is None else keys.load_private(c_sk)
        client._s_sk = None if s_sk is None else keys.load_private(s_sk)
        client._c_pk = bytes.fromhex(blob["c_pk"])
        client._s_pk = bytes.fromhex(blob["s_pk"])
        client._b = _unhex(blob["b"])
        client._peer_s_pk = {int(j): bytes.fromhex(v) for j, v in blob["peer_s_pk"].items()}
        client._channel = {int(j): bytes.fromhex(v) for j, v in blob["channel"].items()}
        client._held = {int(j): ((int(b[0]), int(b[1])), (int(s_[0]), int(s_[1])))
                        for j, (b, s_) in blob["held"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise SecAggError(f"corrupt secure-aggregation client state ({exc})") from None
    return client


def _check_public_keys(
    all_pks: Mapping[int, Mapping[str, bytes]], params: SecAggParams
) -> dict[int, tuple[bytes, bytes]]:
    """(c_pk, s_pk) per site, rejecting unknown sites and repeated keys.

    A key that appears twice means the server substituted one site's key for another's;
    refusing it costs nothing for honest parties.
    """
    out: dict[int, tuple[bytes, bytes]] = {}
    known = set(params.site_ids)
    for sid, entry in all_pks.items():
        if not _is_int(sid) or sid not in known:
            raise SecAggError(f"public keys for unknown site {sid!r}")
        if not isinstance(entry, Mapping) or set(entry) != {"c_pk", "s_pk"}:
            raise SecAggError(f"public keys of site {sid} must be a dict with c_pk and s_pk")
        out[sid] = (
            keys.check_public(entry["c_pk"], f"c_pk of site {sid}"),
            keys.check_public(entry["s_pk"], f"s_pk of site {sid}"),
        )
    flat = [k for pair in out.values() for k in pair]
    if len(set(flat)) != len(flat):
        raise SecAggError("two advertised public keys are identical")
    return out


class SecAggServer:
    """The aggregator's side of one round: relays, tracks dropouts, removes masks."""

    def __init__(self, params: SecAggParams) -> None:
        params.validate()
        self.params = params
        self._graph = _graph(params)
        self._pks: dict[int, tuple[bytes, bytes]] | None = None
        self._shared: set[int] | None = None  # U2: sites whose shares were routed
        self._request: tuple[list[int], list[int]] | None = None
        self._done = False
        # Σ w per segment after ``aggregate`` (0 = nobody contributed to that segment)
        self.segment_weights: list[float] = []

    def _abort_if_few(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise SecAggAborted(
                f"only {count} sites {what}, threshold is {self.params.threshold}; "
                "round aborted"
            )

    def collect_keys(
        self, advertised: Mapping[int, Mapping[str, bytes]]
    ) -> dict[int, dict[str, bytes]]:
        """Stage 1: record U1 and return the key list every site needs for ``share_keys``."""
        if self._pks is not None:
            raise SecAggError("collect_keys already ran this round")
        pks = _check_public_keys(advertised, self.params)
        self._abort_if_few(len(pks), "advertised keys")
        self._pks = pks
        return {s: {"c_pk": c, "s_pk": k} for s, (c, k) in sorted(pks.items())}

    def keys_for(self, site_id: int) -> dict[int, dict[str, bytes]]:
        """The subset of keys ``site_id`` actually uses (saves bandwidth under SecAgg+)."""
        pks = self._require_keys()
        wanted = set(self._graph.get(site_id, ())) | {site_id}
        return {s: {"c_pk": c, "s_pk": k} for s, (c, k) in sorted(pks.items()) if s in wanted}

    def _require_keys(self) -> dict[int, tuple[bytes, bytes]]:
        if self._pks is None:
            raise SecAggError("collect_keys must run before this stage")
        return self._pks

    def route(
        self, shares_by_sender: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """Stage 2: regroup ciphertexts by receiver; record U2 (the senders)."""
        pks = self._require_keys()
        if self._shared is not None:
            raise SecAggError("route already ran this round")
        for sender, cts in shares_by_sender.items():
            if sender not in pks:
                raise SecAggError(f"site {sender} sent shares without advertising keys")
            expected = {j for j in self._graph[sender] if j in pks}
            if set(cts) != expected:
                raise SecAggError(
                    f"site {sender} sent shares to {sorted(cts)}, expected its live "
                    f"neighbours {sorted(expected)}"
                )
            for receiver, ct in cts.items():
                if not isinstance(ct, bytes | bytearray):
                    raise SecAggError(f"share ciphertext from {sender} to {receiver} is not bytes")
        senders = set(shares_by_sender)
        self._abort_if_few(len(senders), "shared keys")
        routed: dict[int, dict[int, bytes]] = {r: {} for r in sorted(senders)}
        for sender in sorted(senders):
            for receiver, ct in sorted(shares_by_sender[sender].items()):
                if receiver in senders:
                    routed[receiver][sender] = bytes(ct)
        self._shared = senders
        return routed

    def _require_shared(self) -> set[int]:
        if self._shared is None:
            raise SecAggError("route must run before this stage")
        return self._shared

    def unmask_request(self, received_from: Iterable[int]) -> tuple[list[int], list[int]]:
        """Stage 3: (survivors, dropped) to send every survivor for ``unmask``."""
        shared = self._require_shared()
        if self._request is not None:
            raise SecAggError("unmask_request already ran this round")
        alive = set(_check_id_list(received_from, "masked inputs"))
        stray = sorted(alive - shared)
        if stray:
            raise SecAggError(f"sites {stray} sent masked input without sharing keys")
        self._abort_if_few(len(alive), "sent masked input")
        self._request = (sorted(alive), sorted(shared - alive))
        return self._request

    def aggregate(
        self,
        masked: Mapping[int, np.ndarray],
        reveals: Mapping[int, Mapping[int, bytes]],
    ) -> tuple[F64Array, float, list[int]]:
        """Stage 4: remove every mask and return (weighted mean, Σ w_i, survivors)."""
        p = self.params
        self._require_shared()
        if self._done:
            raise SecAggError("aggregate already ran this round")
        if self._request is None:
            self.unmask_request(masked.keys())
        assert self._request is not None and self._pks is not None
        survivors, dropped = self._request
        if sorted(masked) != survivors:
            raise SecAggError("masked inputs differ from the survivors sent to the sites")
        stray = sorted(set(reveals) - set(survivors))
        if stray:
            raise SecAggError(f"sites {stray} revealed shares without being survivors")
        b_shares, s_shares = self._collect_reveals(reveals, set(survivors), set(dropped))

        length = p.vector_length + p.n_weights
        total = np.zeros(length, dtype=np.uint32)
        for sid in survivors:
            total += _masked_vector(masked[sid], length, sid)
        for sid in survivors:
            seed = self._reconstruct(b_shares.get(sid, []), sid, "self-mask seed")
            total -= expand(seed, length, "self-mask")
        alive = set(survivors)
        for sid in dropped:
            partners = [j for j in self._graph[sid] if j in alive]
            if not partners:
                continue  # none of its masks reached the sum
            raw = self._reconstruct(s_shares.get(sid, []), sid, "mask key")
            sk = keys.load_private(raw)
            if keys.public_bytes(sk) != self._pks[sid][1]:
                raise SecAggError(f"reconstructed mask key of site {sid} does not match its s_pk")
            for j in partners:
                seed = keys.derive_key(sk, self._pks[j][1], "pair-mask", p.run_id, p.round,
                                       sid, j)
                mask = expand(seed, length, "pair-mask")
                if sid > j:  # survivor j added +PRG(s_j,sid) because sid > j
                    total -= mask
                else:
                    total += mask
        self._done = True
        if p.segments:
            mean, weights = unpack_segments(total, len(survivors), list(p.segments),
                                            p.clip_range, p.max_sites, p.noisy)
            self.segment_weights = [float(w) for w in weights]
            return mean, float(weights.max()), list(survivors)
        mean, total_weight = unpack_mean(total, len(survivors), p.clip_range, p.max_sites,
                                         p.noisy)
        self.segment_weights = [total_weight]
        return mean, total_weight, list(survivors)

    def _collect_reveals(
        self, reveals: Mapping[int, Mapping[int, bytes]], alive: set[int], gone: set[int]
    ) -> tuple[dict[int, list[shamir.Share]], dict[int, list[shamir.Share]]]:
        """Sort revealed shares by owner, refusing any that the holder could not hold."""
        p = self.params
        b_shares: dict[int, list[shamir.Share]] = {}
        s_shares: dict[int, list[shamir.Share]] = {}
        for holder, items in reveals.items():
            x = _x_of(holder, p)
            for owner, blob in items.items():
                if owner != holder and owner not in self._graph[holder]:
                    raise SecAggError(f"site {holder} revealed a share of non-neighbour {owner}")
                if not isinstance(blob, bytes | bytearray) or len(blob) != _REVEAL_BYTES:
                    raise SecAggError(f"malformed reveal from site {holder} for site {owner}")
                # a holder only ever holds shares at its own x
                tag, share = bytes(blob[:1]), shamir.decode_value(bytes(blob[1:]), x)
                if owner in alive and tag == _B_TAG:
                    b_shares.setdefault(owner, []).append(share)
                elif owner in gone and tag == _S_TAG and owner != holder:
                    s_shares.setdefault(owner, []).append(share)
                else:
                    raise SecAggError(
                        f"site {holder} revealed the wrong kind of share for site {owner}"
                    )
        return b_shares, s_shares

    def _reconstruct(self, shares: list[shamir.Share], owner: int, what: str) -> bytes:
        t = self.params.threshold
        if len(shares) < t:
            raise SecAggAborted(
                f"only {len(shares)} shares of site {owner}'s {what} arrived, "
                f"threshold is {t}; round aborted"
            )
        return shamir.reconstruct(shares, t)


def _masked_vector(arr: np.ndarray, length: int, sid: int) -> U32Array:
    a = np.asarray(arr)
    if a.shape != (length,) or a.dtype.kind != "u" or a.dtype.itemsize != 4:
        raise SecAggError(
            f"masked input of site {sid} must be a uint32 vector of length {length}, "
            f"got {a.dtype} {a.shape}"
        )
    return a.astype(np.uint32, copy=False)

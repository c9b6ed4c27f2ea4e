"""The round interface: what a round kind gets from the loop and what it gives back.

A round kind (``PlainRound``, ``SecureRound``) turns the global model into the next
one with the sites of one round. The loop gives it a ``RoundContext``: the grid, the
run config, the federation's sites and the round's one deadline. Everything a round
kind waits for is bounded by that deadline, so no dead or slow site holds a round
past ``federation.round_timeout``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.serverapp import Grid

from mmfed.config import RunConfig
from mmfed.ml.features import FeatureSchema
from mmfed.server.records import RoundInfo, SiteRef

ModelState = dict[str, np.ndarray]
# Every stage after the first keeps at least this share of the timeout, however long
# the stages before it took: in deployment each message starts a ClientApp process,
# seconds each, so a stage with no time left would drop every site.
MIN_SHARE = 0.15
MIN_SECONDS = 1.0  # and never less than this


@dataclass(frozen=True)
class Deadline:
    """One time budget for a sequence of exchanges, from ``start`` (monotonic)."""

    timeout: float
    start: float = field(default_factory=time.monotonic)

    @property
    def end(self) -> float:
        return self.start + self.timeout

    def remaining(self, share: float = 1.0) -> float:
        """Seconds the next exchange may wait.

        With ``share`` < 1 the exchange may use time only up to that share of the
        timeout from the start (a secure round's training keeps the rest for its three
        short stages). Otherwise it gets what is left, but at least ``MIN_SHARE`` of the
        timeout: a stage that follows a slow one still gives its sites a fair chance,
        at the cost of overrunning the deadline by at most that share per stage.
        """
        now = time.monotonic()
        if share < 1.0:
            return max(MIN_SECONDS, self.start + share * self.timeout - now)
        return max(MIN_SHARE * self.timeout, self.end - now, MIN_SECONDS)


class KeysAhead:
    """Public keys sites made for a coming round and sent with their unmask reply.

    A secure round whose every site has keys here for that very round skips the share
    trip: its train requests carry the keys and its train replies the encrypted
    shares. Held in the server's memory only, never in a checkpoint: a restarted or
    resumed server holds none, so its first round takes the classic path and no key
    advertised before a restart is ever used. Keys for a round are forgotten once that
    round has started, whether or not it used them.
    """

    def __init__(self) -> None:
        self._by_node: dict[int, tuple[int, dict[str, bytes]]] = {}

    def add(self, node: int, round_num: int, keys: Mapping[str, bytes]) -> None:
        self._by_node[node] = (round_num, dict(keys))

    def take(self, round_num: int, nodes: list[int]) -> dict[int, dict[str, bytes]] | None:
        """Every node's keys for ``round_num``, or None when any node has none for it;
        all keys for this round or earlier ones are forgotten either way."""
        found = {n: keys for n, (r, keys) in self._by_node.items() if r == round_num}
        self._by_node = {n: (r, k) for n, (r, k) in self._by_node.items() if r > round_num}
        if not nodes or any(n not in found for n in nodes):
            return None
        return {n: found[n] for n in nodes}


@dataclass(frozen=True)
class RoundContext:
    """What a round kind may use: the grid, the config, the sites and the deadline, and
    the keys sites advertised ahead for this round (``KeysAhead``)."""

    grid: Grid
    cfg: RunConfig
    sites: Mapping[int, SiteRef]
    deadline: Deadline
    keys_ahead: KeysAhead = field(default_factory=KeysAhead)

    def remaining(self, share: float = 1.0) -> float:
        """See ``Deadline.remaining``."""
        return self.deadline.remaining(share)

    def name(self, node: int) -> str:
        return self.sites[node].name

    def sample(self, round_num: int) -> list[int]:
        """The nodes asked to train in this round: ``federation.fraction_train`` of them
        (at least ``min_sites``), drawn from (seed, round) so a resumed run asks the same."""
        nodes = sorted(self.sites)
        fraction = self.cfg["federation.fraction_train"]
        k = max(self.cfg["federation.min_sites"], round(fraction * len(nodes)))
        if k >= len(nodes):
            return nodes
        rng = np.random.default_rng([self.cfg["seed"], round_num])
        return sorted(int(n) for n in rng.choice(nodes, size=k, replace=False))


class Round(Protocol):
    """A way of running one round: train at the sites, then aggregate."""

    def run(self, ctx: RoundContext, round_num: int, schema: FeatureSchema,
            state: ModelState) -> tuple[ModelState, RoundInfo]:
        """The new global model (``state`` itself when the round could not aggregate)
        and what the round reports."""
        ...

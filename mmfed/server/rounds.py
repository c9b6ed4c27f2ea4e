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


@dataclass(frozen=True)
class RoundContext:
    """What a round kind may use: the grid, the config, the sites and the deadline."""

    grid: Grid
    cfg: RunConfig
    sites: Mapping[int, SiteRef]
    deadline: Deadline

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

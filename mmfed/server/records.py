"""What the server records about a round: each site's entry and the round's summary.

Both round kinds (plain and secure) report through these, so ``metrics.jsonl`` has the
same shape whichever way the updates were aggregated, and a site's status is always
one of the three the run directory contract names: trained, declined or dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from mmfed import wire

log = logging.getLogger("mmfed")

SiteEntry = dict[str, Any]
PRIVACY_FIGURES = ("epsilon", "delta", "epsilon_budget", "epsilon_projected", "sigma",
                   "sample_rate", "snr")


@dataclass(frozen=True)
class SiteRef:
    """A federation site as the server knows it: the Flower node that speaks for it now
    (a restarted site comes back under a new node id) and its stable name."""

    node_id: int
    name: str


def privacy_figures(metrics: dict[str, float]) -> dict[str, float | None]:
    """A site's privacy figures; ε and δ are null (not absent) when it trained without DP."""
    figures: dict[str, float | None] = {"epsilon": None, "delta": None}
    figures.update({k: metrics[k] for k in PRIVACY_FIGURES if k in metrics})
    return figures


def declined_entry(round_num: int, name: str, metrics: dict[str, float]) -> SiteEntry:
    """A site that declined because its privacy budget would be exceeded (a normal reply)."""
    log.warning("round %d: %s declined: its privacy budget would be exceeded (ε %.3f spent, "
                "%.3f after this round, budget %.3f)", round_num, name,
                metrics.get("epsilon", float("nan")),
                metrics.get("epsilon_projected", float("nan")),
                metrics.get("epsilon_budget", float("nan")))
    return {"status": "declined", **privacy_figures(metrics)}


def refused_entry(round_num: int, name: str, reason: str) -> SiteEntry:
    """A site that declined under its own policy (a request weaker than its terms)."""
    log.warning("%s: %s %s", f"round {round_num}" if round_num else "setup", name, reason)
    return {"status": "declined", "reason": reason}


def trained_entry(metrics: dict[str, float]) -> SiteEntry:
    """A site that trained; its reply must say on how many examples and with what loss,
    or it is a malformed reply (``wire.WireError``), that site's failure alone."""
    missing = [k for k in ("num_examples", "train_loss") if k not in metrics]
    if missing:
        raise wire.WireError(f"train reply without {' or '.join(missing)}")
    return {"num_examples": int(metrics["num_examples"]),
            "train_loss": float(metrics["train_loss"]),
            "seconds": float(metrics.get("seconds", 0.0)), "status": "trained",
            **privacy_figures(metrics)}


def dropped_entry(reason: str) -> SiteEntry:
    return {"status": "dropped", "reason": reason}


@dataclass(frozen=True)
class RoundInfo:
    """What one round reports, whichever way its updates were aggregated.

    ``dropped`` and ``declined`` are counted when the round ends, before local
    evaluation adds entries for the sites that were not asked to train.
    """

    sites: dict[str, SiteEntry]
    participants: int
    dropped: int
    declined: int
    bytes_up: int
    bytes_down: int
    train_seconds: float
    secure: bool = False
    stage_seconds: dict[str, float] = field(default_factory=dict)
    threshold: int | None = None
    neighbours: int | None = None
    aborted: str | None = None
    trips: int = 1  # message exchanges with the sites (each costs a deployed round time)

    def aggregation(self, private: bool) -> dict[str, Any]:
        """The ``aggregation`` object of the round's metrics line."""
        out: dict[str, Any] = {"participants": self.participants, "dropped": self.dropped,
                               "declined": self.declined, "secure": self.secure,
                               "private": private}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.neighbours is not None:
            out["neighbours"] = self.neighbours
        if self.aborted:
            out["aborted"] = self.aborted
        return out

    def stage_figures(self) -> dict[str, float]:
        """Seconds of the secure stages after training, as ``secagg_<stage>`` keys."""
        return {f"secagg_{k}": v for k, v in self.stage_seconds.items() if k != "train"}


def round_info(sites: dict[str, SiteEntry], participants: int, bytes_up: int,
               bytes_down: int, train_seconds: float, **secure: Any) -> RoundInfo:
    """A round's summary, its drop-out and decline counts taken now."""
    return RoundInfo(
        sites=sites, participants=participants,
        dropped=sum(1 for s in sites.values() if s["status"] == "dropped"),
        declined=sum(1 for s in sites.values() if s["status"] == "declined"),
        bytes_up=bytes_up, bytes_down=bytes_down, train_seconds=train_seconds, **secure)

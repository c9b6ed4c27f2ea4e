"""The site's privacy gate around each training round: plan, project, decline or spend.

Before a run's first round the site calibrates one noise multiplier σ for everything
the server plans (rounds × local epochs × batches), on top of what its ledger says
was already spent on this data. Before every round it projects ε after the round
from the full history; if that would exceed its budget it declines. After training,
and before the update leaves the site, the spend is written to the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmfed.privacy.accounting import Event, calibrate_sigma, epsilon_of
from mmfed.privacy.dp_sgd import batches_per_epoch, sample_rate
from mmfed.privacy.ledger import Entry, PrivacyLedger, ledger_dir, site_fingerprint
from mmfed.privacy.policy import PrivacyPolicy

_FINGERPRINTS: dict[tuple[str, float], str] = {}
_PLANS: dict[tuple[str, str], float] = {}  # (fingerprint, run id) -> σ


@dataclass(frozen=True)
class RoundPlan:
    """What this round will spend, or why it will not train."""

    sigma: float
    sample_rate: float
    steps: int
    spent: float  # ε before the round
    projected: float  # ε after the round
    declined: bool

    @property
    def event(self) -> Event:
        return (self.sigma, self.sample_rate, self.steps)


def fingerprint(folder: Path) -> str:
    stamp = max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=0.0)
    key = (str(folder.resolve()), stamp)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = site_fingerprint(folder)
    return _FINGERPRINTS[key]


class SiteBudget:
    """One site's budget for one run, backed by its durable ledger."""

    def __init__(self, folder: Path, policy: PrivacyPolicy, ledger_directory: str,
                 site: str, run_id: str) -> None:
        self.policy = policy
        self.site = site
        self.run_id = run_id
        self.ledger = PrivacyLedger(ledger_dir(ledger_directory), fingerprint(folder))

    def spent(self) -> float:
        return self.ledger.spent(self.policy.delta, self.policy.accountant)

    def _sigma(self, history: list[Event], entries: list[Entry], q: float, steps_per_round: int,
               rounds_left: int) -> float:
        key = (self.ledger.fingerprint, self.run_id)
        if key in _PLANS:
            return _PLANS[key]
        earlier = [e.sigma for e in entries if e.run_id == self.run_id]
        if earlier:  # restarted mid-run: keep the calibration the run started with
            sigma = earlier[-1]
        else:
            found = calibrate_sigma(history, q, steps_per_round * rounds_left,
                                    self.policy.epsilon, self.policy.delta,
                                    self.policy.accountant, self.policy.max_noise_multiplier)
            sigma = self.policy.max_noise_multiplier if found is None else found
        _PLANS[key] = sigma
        return sigma

    def plan_round(self, n_train: int, batch_size: int, epochs: int, round_num: int,
                   total_rounds: int) -> RoundPlan:
        entries = self.ledger.entries()
        history = [e.event for e in entries]
        q = sample_rate(n_train, batch_size)
        steps = epochs * batches_per_epoch(n_train, batch_size)
        sigma = self._sigma(history, entries, q, steps, max(1, total_rounds - round_num + 1))
        spent = epsilon_of(history, self.policy.delta, self.policy.accountant)
        projected = epsilon_of([*history, (sigma, q, steps)], self.policy.delta,
                               self.policy.accountant)
        return RoundPlan(sigma=sigma, sample_rate=q, steps=steps, spent=spent,
                         projected=projected, declined=projected > self.policy.epsilon)

    def record(self, plan: RoundPlan, steps_taken: int, round_num: int) -> Entry:
        """Write the spend durably before the update is released."""
        return self.ledger.record(run_id=self.run_id, round_num=round_num,
                                  event=(plan.sigma, plan.sample_rate, max(steps_taken,
                                                                           plan.steps)),
                                  delta=self.policy.delta, accountant=self.policy.accountant,
                                  site=self.site)

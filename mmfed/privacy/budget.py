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
from typing import TYPE_CHECKING

from mmfed.errors import DataError
from mmfed.privacy.accounting import (
    Event,
    calibrate_mu,
    calibrate_sigma,
    epsilon_mixed,
    epsilon_of,
)
from mmfed.privacy.dp_sgd import batches_per_epoch, sample_rate
from mmfed.privacy.ledger import Entry, PrivacyLedger, ledger_dir, site_fingerprint
from mmfed.privacy.policy import PrivacyPolicy

if TYPE_CHECKING:
    from mmfed.privacy.distributed import NoiseShare
    from mmfed.secagg import SecAggParams

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

    def plan_distributed(self, params: SecAggParams, lr: float, round_num: int,
                         total_rounds: int) -> tuple[RoundPlan, NoiseShare | None]:
        """A distributed-DP round: the aggregate noise (μ_total) is calibrated once per
        run for every round left, as a noise multiplier in units of the sensitivity,
        and each round's exact Skellam event is projected from the full history.
        None for the share when even the policy's largest noise would not fit."""
        from mmfed.privacy.distributed import noise_share, sensitivity

        entries = self.ledger.entries()
        gaussian = [e.event for e in entries if e.skellam is None]
        skellam = [e.skellam for e in entries if e.skellam is not None]
        l2, l1, scale, inflation = sensitivity(params, lr, self.policy.max_grad_norm)
        key = (self.ledger.fingerprint, self.run_id)
        sigma = _PLANS.get(key)
        if sigma is None:
            earlier = [e for e in entries if e.run_id == self.run_id and e.skellam is not None]
            if earlier:  # restarted mid-run: keep the run's calibration
                sigma = earlier[-1].sigma
            else:
                mu = calibrate_mu(gaussian, skellam, max(1, total_rounds - round_num + 1), l1,
                                  l2, self.policy.epsilon, self.policy.delta,
                                  self.policy.max_noise_multiplier)
                sigma = (self.policy.max_noise_multiplier if mu is None
                         else (2.0 * mu) ** 0.5 / l2)
            _PLANS[key] = sigma
        mu_total = (sigma * l2) ** 2 / 2.0
        spent = epsilon_mixed(gaussian, skellam, self.policy.delta)
        projected = epsilon_mixed(gaussian, [*skellam, (1, mu_total, l1, l2)],
                                  self.policy.delta)
        plan = RoundPlan(sigma=sigma, sample_rate=1.0, steps=1, spent=spent,
                         projected=projected, declined=projected > self.policy.epsilon)
        if plan.declined:
            return plan, None
        return plan, noise_share(self.policy, params, lr, mu_total, l2, l1, scale, inflation)

    def record_distributed(self, plan: RoundPlan, share: NoiseShare, round_num: int) -> Entry:
        """Write a distributed-DP release durably before its masked input is sent."""
        return self.ledger.record(run_id=self.run_id, round_num=round_num,
                                  event=(plan.sigma, 1.0, 1), delta=self.policy.delta,
                                  accountant=self.policy.accountant, site=self.site,
                                  distributed=share.ledger_fields())

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
        if any(e.skellam is not None for e in entries):
            raise DataError("this dataset's ledger holds distributed-DP releases; train it "
                            "with privacy.noise = distributed, or account both by hand")
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

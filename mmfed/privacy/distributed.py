"""Distributed DP: each site adds only its share of the noise, inside secure aggregation.

A round is one full-batch DP step per site (``train.full_batch``, one local epoch,
plain SGD): the site clips every patient's gradient to C and takes the step without
noise, so its update is −lr·(Σ clipped gradients)/n plus weight decay. Secure
aggregation weights it by n / count_cap and encodes it on L levels over [−R, R]
(:mod:`mmfed.secagg.quantize`); one patient then moves the site's codes by at most
``lr·C/count_cap · L/(2R)`` in L2, plus up to 1 per coordinate from rounding. Into
those codes the site adds Skellam noise Sk(μ_share) per coordinate, from OS entropy,
before masking. Skellam sums stay Skellam, so the unmasked sum of t sites carries
Sk(t·μ_share): the site picks μ_share = μ_total / (t_min − colluders), where t_min is
the fewest survivors it lets the server unmask (its min_cohort, the round's
threshold) and μ_total is calibrated with the Skellam RDP bound
(:mod:`mmfed.privacy.skellam`) to its budget.

What is guaranteed, exactly: the released sum (ε, δ)-DP for each patient of this
site, under add/remove of one patient with the site's size n treated as public (the
same convention as the DP-SGD accountant, which divides by the expected batch),
against the server and any ``colluders`` of the other sites in the sum, provided at
least t_min sites' masked inputs are in every sum this site helps unmask (enforced:
below that it refuses to unmask, and the round ends without a release), the other
sites add their shares honestly, and the server follows the secure-aggregation
protocol (a server that shows sites different survivor lists is not detected, as
with SecAgg itself). It does not hold against a coalition of more than
``colluders`` sites with the server: a site that needs that keeps ``noise = local``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mmfed.errors import Declined
from mmfed.privacy import skellam
from mmfed.privacy.policy import PrivacyPolicy
from mmfed.secagg import SecAggParams
from mmfed.secagg.quantize import levels, noise_headroom

MODULUS_BITS = 32
# A round is refused when its noise could wrap the modular sum with more than this
# probability (union bound over coordinates): far below any δ a site would accept.
MAX_WRAP = 2.0 ** -30


@dataclass(frozen=True)
class NoiseShare:
    """This site's share of one round's noise, and every figure its accounting needs."""

    mu_share: float  # Skellam parameter added per coordinate (variance 2·mu_share)
    mu_total: float  # what the smallest accepted sum carries, net of colluders
    survivors: int  # fewest masked inputs in a sum this site helps unmask
    colluders: int
    l1: float  # code-unit sensitivities of one patient, rounding included
    l2: float
    scale: float  # codes per unit of the weighted update
    rounding_inflation: float  # l2 over the sensitivity before rounding, minus 1
    wrap_probability: float
    modulus_bits: int = MODULUS_BITS

    @property
    def sigma(self) -> float:
        """The aggregate noise in units of the L2 sensitivity: comparable to DP-SGD's σ."""
        return skellam.gaussian_equivalent_sigma(self.mu_total, self.l2)

    def ledger_fields(self) -> dict[str, Any]:
        return {"rounds": 1, **asdict(self)}


def check_request(policy: PrivacyPolicy, params: SecAggParams | None, full_batch: bool,
                  epochs: int, optimizer: str) -> None:
    """The terms under which a share of the noise is enough; anything else is declined
    before training, with nothing spent."""
    if params is None:
        raise Declined("declined: this site adds distributed DP noise, which protects only "
                       "inside secure aggregation, and the request is plaintext")
    if not params.noisy:
        raise Declined("declined: this site adds distributed DP noise and the round is not "
                       "laid out for it (privacy.noise = distributed at the server)")
    if not full_batch or epochs != 1 or optimizer != "sgd":
        raise Declined("declined: distributed DP needs one full-batch SGD step per round "
                       "(train.full_batch = true, local_epochs = 1, optimizer = sgd), so "
                       "that the secure sum is what each patient's gradient is released in")
    if policy.accountant != "rdp":
        raise Declined("declined: distributed DP is accounted with the rdp accountant only "
                       f"(the site's policy says {policy.accountant!r})")


def check_joins(policy: PrivacyPolicy, params: SecAggParams | None) -> None:
    """A round laid out for noise shares counts on every site in the sum adding one; a
    site that keeps local noise (or none) would add none and silently weaken the other
    sites' guarantee, so it declines the round instead."""
    if params is None or not params.noisy or (policy.enabled and policy.noise == "distributed"):
        return
    raise Declined("declined: the round is laid out for distributed DP noise shares and this "
                   "site's policy keeps " + ("local noise" if policy.enabled else "no DP")
                   + "; it would add no share and weaken the other sites' guarantee")


def survivors_assumed(policy: PrivacyPolicy, params: SecAggParams) -> int:
    """The smallest set of survivors this site lets a sum be unmasked for."""
    return max(policy.min_cohort, policy.min_threshold, params.threshold)


def sensitivity(params: SecAggParams, lr: float, max_grad_norm: float
                ) -> tuple[float, float, float, float]:
    """(l2, l1, scale, inflation) of one patient in the codes this site sends."""
    scale = levels(params.max_sites) / (2.0 * params.clip_range)
    per_patient = lr * max_grad_norm / params.count_cap  # in units of w·update
    l2, l1 = skellam.rounding_sensitivity(per_patient, scale, params.vector_length)
    return l2, l1, scale, l2 / (scale * per_patient) - 1.0


def noise_share(policy: PrivacyPolicy, params: SecAggParams, lr: float, mu_total: float,
                l2: float, l1: float, scale: float, inflation: float) -> NoiseShare:
    """This round's share, refused when the layout leaves too little room for it."""
    survivors = survivors_assumed(policy, params)
    honest = survivors - policy.colluders
    if honest < 1:
        raise Declined(f"declined: with {policy.colluders} colluding site(s) assumed, a sum "
                       f"of {survivors} leaves no honest noise (raise min_cohort)")
    share = skellam.mu_share(mu_total, honest)
    # every listed site may add a share: the most noise the sum can carry
    worst = share * len(params.site_ids)
    room = noise_headroom(len(params.site_ids), params.max_sites)
    wrap = skellam.wrap_probability(worst, room, params.vector_length) if room > 0 else 1.0
    if wrap > MAX_WRAP:
        raise Declined(f"declined: the round's layout leaves {room} codes of room, and the "
                       f"noise could wrap the sum (probability bound {wrap:.2g}); the "
                       "server must lay it out with max_sites above the number of sites")
    return NoiseShare(mu_share=share, mu_total=mu_total, survivors=survivors,
                      colluders=policy.colluders, l1=l1, l2=l2, scale=scale,
                      rounding_inflation=inflation, wrap_probability=wrap)


def draw_noise(mu_share: float, size: int) -> np.ndarray:
    """Sk(μ_share) per coordinate: the difference of two Poisson draws, from a
    generator keyed with 256 bits of OS entropy (never from a seed the server knows)."""
    if not math.isfinite(mu_share) or mu_share <= 0:
        raise ValueError(f"noise share must be positive, got {mu_share!r}")
    rng = np.random.Generator(np.random.PCG64DXSM(int.from_bytes(os.urandom(32), "little")))
    return (rng.poisson(mu_share, size).astype(np.int64)
            - rng.poisson(mu_share, size).astype(np.int64))

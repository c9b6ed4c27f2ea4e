"""Privacy accounting over a site's whole spending history, with Opacus's accountants.

ε is never carried forward as a number: it is always recomputed from the full list of
(σ, q, steps) events, so composition across rounds, runs and restarts is exact for
the chosen accountant and a ledger can be audited independently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ACCOUNTANTS = ("rdp", "prv")
Event = tuple[float, float, int]  # (noise multiplier σ, sample rate q, steps)
# distributed DP: (rounds, aggregate Skellam μ, L1 and L2 sensitivity in code units)
SkellamEvent = tuple[int, float, float, float]


def epsilon_of(history: Sequence[Event], delta: float, accountant: str = "rdp") -> float:
    """ε spent by a history of DP-SGD events at the given δ (0 for an empty history)."""
    events = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not events:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = events
    if accountant == "rdp":
        return float(acc.get_epsilon(delta=delta))
    return float(acc.get_epsilon(delta=delta, eps_error=0.01))


def calibrate_sigma(history: Sequence[Event], sample_rate: float, steps: int, target: float,
                    delta: float, accountant: str = "rdp", max_sigma: float = 10.0,
                    tolerance: float = 0.01) -> float | None:
    """Smallest σ (within tolerance) so that history + the planned training stays ≤ target.

    Returns None when even ``max_sigma`` would exceed the target: the site cannot fit
    the plan into what is left of its budget.
    """
    def eps(sigma: float) -> float:
        return epsilon_of([*history, (sigma, sample_rate, steps)], delta, accountant)

    if eps(max_sigma) > target:
        return None
    lo, hi = 0.05, max_sigma
    if eps(lo) <= target:
        return lo
    while hi - lo > tolerance * max(lo, 0.1):
        mid = math.sqrt(lo * hi) if lo > 0 else (lo + hi) / 2
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def expected_snr(batch: float, sigma: float, dim: int, steps: int) -> float:
    """Upper bound on a run's signal-to-noise ratio under DP-SGD.

    One step's signal is the mean of ``batch`` clipped gradients (norm at most C), its
    noise has norm about σ·C·√dim / batch; over ``steps`` steps the signal adds up
    linearly and the noise as √steps. So the figure is batch·√steps / (σ·√dim): the
    bound a perfectly consistent gradient would reach; real gradients reach less. It
    grows with the patients per step and falls with the parameter count, the two
    levers a plan controls.
    """
    if sigma <= 0:
        return math.inf
    return batch * math.sqrt(max(steps, 1)) / (sigma * math.sqrt(max(dim, 1)))


def epsilon_mixed(gaussian: Sequence[Event], skellam: Sequence[SkellamEvent],
                  delta: float) -> float:
    """ε of a history with local DP-SGD and distributed-DP (Skellam) releases.

    Both compose in Rényi DP: their curves add at every order. The Skellam bound is
    stated for integer orders, so both are evaluated on :data:`skellam.ORDERS` and
    converted together; Opacus's RDP analysis gives the subsampled Gaussian's curve.
    """
    from mmfed.privacy import skellam as sk

    orders = list(sk.ORDERS)
    total = [0.0] * len(orders)
    events = [(float(s), float(q), int(n)) for s, q, n in gaussian if n > 0]
    if events:
        from opacus.accountants.analysis.rdp import compute_rdp

        for sigma, q, steps in events:
            curve = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
            total = [a + float(b) for a, b in zip(total, curve, strict=True)]
    for rounds, mu, l1, l2 in skellam:
        if rounds > 0:
            total = [a + rounds * sk.rdp_skellam(o, mu, l1, l2)
                     for a, o in zip(total, orders, strict=True)]
    if not events and not any(r > 0 for r, *_ in skellam):
        return 0.0
    return sk.epsilon_from_rdp(total, orders, delta)[0]


def calibrate_mu(gaussian: Sequence[Event], skellam: Sequence[SkellamEvent], rounds: int,
                 l1: float, l2: float, target: float, delta: float,
                 max_sigma: float) -> float | None:
    """Smallest aggregate Skellam μ (within 1%) so that the history plus ``rounds``
    releases stays within ``target``; None when even the noise of ``max_sigma`` (the
    policy's largest noise multiplier, in units of the L2 sensitivity) would not."""
    def eps(mu: float) -> float:
        return epsilon_mixed(gaussian, [*skellam, (rounds, mu, l1, l2)], delta)

    hi = (max_sigma * l2) ** 2 / 2.0
    if eps(hi) > target:
        return None
    lo = (0.05 * l2) ** 2 / 2.0
    if eps(lo) <= target:
        return lo
    from mmfed.privacy.skellam import smallest_fitting

    return smallest_fitting(lambda mu: eps(mu) <= target, lo, hi, 0.01)

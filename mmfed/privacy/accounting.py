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

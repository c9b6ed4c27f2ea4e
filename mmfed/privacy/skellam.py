"""Privacy accounting for distributed DP with Skellam noise, in pure math.

In distributed-DP mode each site sends integer codes: its patients' clipped gradients
summed, scaled, rounded to integers and clipped per coordinate to [-M, M], plus its
share Sk(mu_share, mu_share) of Skellam noise per coordinate; secure aggregation sums
them mod 2**32. The difference of two independent Poisson(mu) variables is Sk(mu, mu),
and Poissons add, so the sum of t honest shares carries Sk(t * mu_share) per
coordinate. What is released is therefore one draw of the multi-dimensional Skellam
mechanism on an integer-valued query, and this module accounts for it.

The module is deliberately independent of the training code (no torch, no Opacus, only
:mod:`math`): an auditor can check a ledger of ``(rounds, mu, l1, l2)`` events against
the published formulas without trusting anything else in the package. The RDP bound is
Theorem 3.5 of Agarwal, Kairouz & Liu, "The Skellam Mechanism for Differentially
Private Federated Learning" (NeurIPS 2021); the conversion to (epsilon, delta) is the
one Opacus's RDP accountant uses (Balle et al. 2020, "Hypothesis testing
interpretations and Rényi differential privacy", Theorem 21).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

# The Skellam bound is proved for integer orders only, so the whole curve lives on
# integers; 256 reaches far enough that small-epsilon regimes are not order-limited.
ORDERS: tuple[int, ...] = tuple(range(2, 257))

# (rounds, aggregate Skellam mu, L1 sensitivity, L2 sensitivity), all in code units
SkellamEvent = tuple[int, float, float, float]

# Relative slack allowed between l1 and l2 before "l1 < l2" is called an error: the two
# are often computed in floating point from the same quantities (e.g. dim = 1).
_L1_SLACK = 1e-12
# calibrate_mu returns a mu within this relative distance above the exact threshold.
_CALIBRATION_TOLERANCE = 0.005


def _check_positive(name: str, value: float) -> float:
    """A finite, strictly positive float, or ValueError naming the argument."""
    v = float(value)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0 (got {value!r})")
    return v


def _check_delta(delta: float) -> float:
    """delta in (0, 1): delta = 0 makes every RDP-converted epsilon infinite, and
    delta >= 1 is no guarantee at all."""
    d = float(delta)
    if not (0.0 < d < 1.0):
        raise ValueError(f"delta must be in (0, 1) (got {delta!r})")
    return d


def _check_int(name: str, value: int, minimum: int) -> int:
    """An integer (numpy integers accepted, bools and floats refused) >= minimum."""
    if isinstance(value, bool | float):
        raise ValueError(f"{name} must be an integer >= {minimum} (got {value!r})")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum} (got {value!r})") from None
    if v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} (got {value!r})")
    return v


def _check_sensitivity(l1: float, l2: float) -> tuple[float, float]:
    """l2 > 0 and l1 >= l2: ||v||_1 >= ||v||_2 for every vector, so l1 < l2 means the
    arguments were swapped or mis-computed, and the bound would silently be wrong."""
    b2 = _check_positive("l2", l2)
    b1 = _check_positive("l1", l1)
    if b1 < b2 * (1.0 - _L1_SLACK):
        raise ValueError(f"l1 must be >= l2, since ||v||_1 >= ||v||_2 (got l1={l1!r}, "
                         f"l2={l2!r}; were they swapped?)")
    return b1, b2


def rdp_skellam(alpha: int, mu: float, l1: float, l2: float) -> float:
    """RDP at integer order ``alpha`` of one release of the multi-dimensional Skellam
    mechanism: every coordinate of the aggregate carries independent Sk(mu, mu) noise
    (variance 2*mu), on an integer-valued query of L1 / L2 sensitivity ``l1`` / ``l2``.

    Agarwal, Kairouz & Liu (2021), Theorem 3.5::

        eps(alpha) = alpha*l2**2/(4*mu)
                     + min(((2*alpha - 1)*l2**2 + 6*l1) / (16*mu**2), 3*l1/(4*mu))

    The first term is exactly the Gaussian mechanism's RDP at the same variance 2*mu;
    the second is the price of discreteness and vanishes as O(1/mu**2), so with enough
    noise Skellam costs what Gaussian noise would. The theorem is stated for integer
    alpha, which is why only integers are accepted.
    """
    a = _check_int("alpha", alpha, 2)
    m = _check_positive("mu", mu)
    b1, b2 = _check_sensitivity(l1, l2)
    gaussian = a * b2 * b2 / (4.0 * m)
    # divided by mu twice rather than by mu**2, so a tiny mu overflows to inf (and the
    # min picks the other branch) instead of dividing by an underflowed zero
    discrete = min(((2 * a - 1) * b2 * b2 + 6.0 * b1) / (16.0 * m) / m, 3.0 * b1 / (4.0 * m))
    return gaussian + discrete


def epsilon_from_rdp(rdp: Sequence[float], orders: Sequence[int],
                     delta: float) -> tuple[float, int]:
    """(epsilon, best order) from an RDP curve, as Opacus's RDP accountant converts it.

    Balle et al. (2020), Theorem 21: an (alpha, r)-RDP mechanism is (eps, delta)-DP with
    ``eps = r + log1p(-1/alpha) - (log(delta) + log(alpha)) / (alpha - 1)``; every order
    is a valid bound, so the smallest is taken. The same formula as Opacus (which writes
    ``log((alpha - 1)/alpha)``) keeps a ledger's epsilon identical whichever accountant
    recomputes it. Floored at 0, since a negative epsilon is meaningless (it can appear
    for a zero curve at large orders and weak delta).
    """
    d = _check_delta(delta)
    if len(rdp) != len(orders):
        raise ValueError(f"rdp and orders must have the same length "
                         f"(got {len(rdp)} and {len(orders)})")
    if len(orders) == 0:
        raise ValueError("orders must not be empty")
    best_eps = math.inf
    best_order = -1
    log_delta = math.log(d)
    for r, order in zip(rdp, orders, strict=True):
        a = _check_int("order", order, 2)
        value = float(r)
        if math.isnan(value) or value < 0.0:
            raise ValueError(f"rdp values must be >= 0 (got {r!r} at order {a})")
        eps = value + math.log1p(-1.0 / a) - (log_delta + math.log(a)) / (a - 1)
        if eps < best_eps:
            best_eps, best_order = eps, a
    if best_order < 0:  # every order had an infinite RDP
        return math.inf, int(orders[0])
    return max(best_eps, 0.0), best_order


def _curve(events: Sequence[SkellamEvent]) -> list[float]:
    """The composed RDP curve on :data:`ORDERS`: RDP of adaptive composition adds, so
    each event contributes rounds * its per-release RDP at every order."""
    total = [0.0] * len(ORDERS)
    for event in events:
        if len(event) != 4:
            raise ValueError(f"an event is (rounds, mu, l1, l2) (got {event!r})")
        rounds, mu, l1, l2 = event
        n = _check_int("rounds", rounds, 0)
        if n == 0:
            continue
        total = [t + n * rdp_skellam(a, mu, l1, l2) for t, a in zip(total, ORDERS, strict=True)]
    return total


def skellam_epsilon_of(events: Sequence[SkellamEvent], delta: float) -> float:
    """epsilon at ``delta`` of a history of heterogeneous Skellam releases, each event
    ``(rounds, mu, l1, l2)``, composed in RDP. Recomputed from the whole list rather than
    added up in epsilon, so composition is as tight as RDP allows and a ledger can be
    re-audited from its events alone. An empty history (or only zero-round events)
    spends nothing: 0.0.
    """
    d = _check_delta(delta)
    curve = _curve(events)
    if not any(_check_int("rounds", e[0], 0) > 0 for e in events):
        return 0.0
    return epsilon_from_rdp(curve, ORDERS, d)[0]


def skellam_epsilon(rounds: int, mu: float, l1: float, l2: float, delta: float) -> float:
    """epsilon at ``delta`` of ``rounds`` identical releases at aggregate ``mu`` (0.0 for
    no rounds)."""
    return skellam_epsilon_of([(rounds, mu, l1, l2)], delta)


def calibrate_mu(target_epsilon: float, delta: float, rounds: int, l1: float, l2: float,
                 history: Sequence[SkellamEvent] = ()) -> float:
    """Smallest aggregate mu (within 0.5%, erring on the private side) such that
    ``history`` plus ``rounds`` releases at mu stays within ``target_epsilon``.

    epsilon decreases monotonically in mu (each order's RDP does), so bisection
    applies; it runs on log(mu) because the useful mu spans many orders of magnitude.
    As mu grows epsilon tends not to the history's epsilon but to the conversion of the
    history's curve with a zero added, which at finite orders and delta stays above 0:
    a target at or below that limit is unreachable and raises ValueError, as does a
    history that alone already spends the target.
    """
    target = _check_positive("target_epsilon", target_epsilon)
    d = _check_delta(delta)
    n = _check_int("rounds", rounds, 1)
    _check_sensitivity(l1, l2)
    spent = skellam_epsilon_of(history, d)
    if spent >= target:
        raise ValueError(f"the history alone already spends epsilon = {spent:.6g}, "
                         f"at or over the target {target:.6g}")
    base = _curve(history)
    limit = epsilon_from_rdp(base, ORDERS, d)[0]
    if limit >= target:
        raise ValueError(f"target epsilon {target:.6g} is unreachable at delta={d:g}: "
                         f"even infinite noise converts to {limit:.6g} at orders "
                         f"{ORDERS[0]}..{ORDERS[-1]}")

    def eps(mu: float) -> float:
        curve = [b + n * rdp_skellam(a, mu, l1, l2) for b, a in zip(base, ORDERS, strict=True)]
        return epsilon_from_rdp(curve, ORDERS, d)[0]

    # Start from the Gaussian-like scale of the problem and widen until bracketed.
    guess = n * float(l2) ** 2 / (4.0 * target)
    lo = hi = max(guess, 1e-12)
    while eps(hi) > target:
        hi *= 4.0
        if hi > 1e300:
            raise ValueError("could not bracket mu: the target is numerically unreachable")
    while eps(lo) <= target:
        lo /= 4.0
        if lo < 1e-300:
            return hi  # even vanishing noise fits the target: the smallest mu tried
    # invariant: eps(lo) > target >= eps(hi)
    return smallest_fitting(lambda mu: eps(mu) <= target, lo, hi, _CALIBRATION_TOLERANCE)


def smallest_fitting(fits: Callable[[float], bool], lo: float, hi: float,
                     tolerance: float) -> float:
    """Bisection on a log scale between ``lo`` (does not fit) and ``hi`` (fits), for a
    monotone ``fits``: the returned value fits and is within ``tolerance`` (relative)
    of the smallest that does. Noise scales span orders of magnitude, hence the log."""
    while hi / lo > 1.0 + tolerance:
        mid = math.sqrt(lo * hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def rounding_sensitivity(clip: float, scale: float, dim: int) -> tuple[float, float]:
    """(l2, l1) of the integer query after scaling by ``scale`` and rounding to nearest.

    A patient's contribution x to the scaled sum has ||x||_2 <= scale*clip. The codes
    are round(S + x) with and round(S) without them, and round(y) = y + e with
    |e| <= 1/2, so d = round(S + x) - round(S) differs from x by at most 1 per
    coordinate (exactly 1 is reachable with ties, e.g. round-half-even). By the
    triangle inequality ||d||_2 <= ||x||_2 + sqrt(dim) and
    ||d||_1 <= ||x||_1 + dim <= sqrt(dim)*||x||_2 + dim; also ||d||_1 <= sqrt(dim)*||d||_2
    (Cauchy-Schwarz). Both l1 bounds are valid; the smaller is returned (with these
    l2 bounds they coincide algebraically, so this only guards floating point).

    Clipping each coordinate to [-M, M] afterwards does not change the bounds: the clip
    is 1-Lipschitz per coordinate, so |clip(a) - clip(b)| <= |a - b| coordinate by
    coordinate and neither norm of the difference can grow.
    """
    c = _check_positive("clip", clip)
    s = _check_positive("scale", scale)
    n = _check_int("dim", dim, 1)
    root = math.sqrt(n)
    l2 = s * c + root
    l1 = min(root * (s * c) + n, root * l2)
    return l2, max(l1, l2)


def gaussian_equivalent_sigma(mu: float, l2: float) -> float:
    """sqrt(2*mu)/l2: the aggregate's noise standard deviation in units of the L2
    sensitivity, i.e. the noise multiplier a Gaussian mechanism of equal variance would
    have. For reporting side by side with DP-SGD's sigma, not for accounting."""
    m = _check_positive("mu", mu)
    s = _check_positive("l2", l2)
    return math.sqrt(2.0 * m) / s


def _log_tail_target(dim: int, target: float) -> float:
    """log(2*dim/target): the exponent the Bernstein bound must reach for ``dim``
    coordinates to stay within ``target`` by the union bound."""
    return math.log(2.0 * dim / target)


def wrap_probability(mu_total: float, margin: float, dim: int) -> float:
    """Upper bound on P(some coordinate of Sk(mu_total) noise has |X| >= margin).

    The modular sum wraps only if the noise in some coordinate exceeds the headroom left
    above the largest code, so this bounds the probability that the decoded aggregate
    is garbage. X = P1 - P2 with P1, P2 ~ Poisson(mu_total): a sum of centred terms
    bounded by 1 with total variance 2*mu_total, so Bernstein's inequality gives
    P(|X| >= t) <= 2*exp(-t**2 / (2*(2*mu_total + t/3))); a union bound over ``dim``
    coordinates multiplies by dim. Capped at 1.
    """
    m = _check_positive("mu_total", mu_total)
    t = _check_positive("margin", margin)
    n = _check_int("dim", dim, 1)
    exponent = -t * t / (2.0 * (2.0 * m + t / 3.0))
    return min(1.0, n * 2.0 * math.exp(exponent))


def noise_margin(mu_total: float, dim: int, target: float = 2.0**-40) -> float:
    """Smallest margin t with :func:`wrap_probability` (mu_total, t, dim) <= ``target``.

    Setting the bound equal to the target gives t**2 = 2*L*(2*mu_total + t/3) with
    L = log(2*dim/target), whose positive root is t = L/3 + sqrt(L**2/9 + 4*L*mu_total).
    The result is nudged up by a few ulps if floating point leaves it a hair over.
    """
    m = _check_positive("mu_total", mu_total)
    n = _check_int("dim", dim, 1)
    p = float(target)
    if not (0.0 < p < 1.0):
        raise ValueError(f"target must be in (0, 1) (got {target!r})")
    big_l = _log_tail_target(n, p)  # > 0, since 2*dim/target > 2
    t = big_l / 3.0 + math.sqrt(big_l * big_l / 9.0 + 4.0 * big_l * m)
    for _ in range(64):  # the root is exact up to rounding: a few ulps at most
        if wrap_probability(m, t, n) <= p:
            return t
        t = math.nextafter(t, math.inf)
    raise ArithmeticError(f"noise_margin: the closed-form root {t!r} misses the target {p!r}")


def mu_share(mu_total: float, survivors: int) -> float:
    """mu_total / survivors: what each site adds so that any sum of at least
    ``survivors`` honest shares carries at least Sk(mu_total) (Skellam is closed under
    summation, and more noise only helps privacy)."""
    m = _check_positive("mu_total", mu_total)
    n = _check_int("survivors", survivors, 1)
    return m / n

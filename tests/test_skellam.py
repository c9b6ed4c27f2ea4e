"""The Skellam accountant (mmfed.privacy.skellam) against exact math and Opacus.

The RDP bound is checked against the exact Rényi divergence of shifted Skellam
distributions, summed over the integer support; the (ε, δ) conversion against Opacus;
the rounding sensitivity and the wrap-around tail bound against simulation.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import poisson, skellam

from mmfed.privacy import skellam as sk

SHIFTS = (1, 2, 5)
MUS = (2.0, 5.0, 20.0, 100.0)
ALPHAS = (2, 3, 5, 10, 32)
DELTA = 1e-5


def _half_width(mu: float, shift: int = 5) -> int:
    return int(shift + 60 * math.sqrt(2 * mu) + 200)


@functools.cache
def _skellam_logpmf(mu: float, half_width: int) -> np.ndarray:
    """log P(Sk(mu, mu) = k) for k in [-half_width, half_width], exactly: the convolution
    of two Poisson(mu) log-pmfs, summed in log space. scipy's skellam.logpmf goes through
    the non-central chi-square and loses accuracy (~0.1 nats) near its underflow, then
    returns -inf, which would poison p(k)**(1 - alpha); this one stays finite and exact
    over the whole support. It is checked against scipy in the bulk below."""
    j = np.arange(int(mu + 60 * math.sqrt(mu) + 200))
    log_j = poisson.logpmf(j, mu)
    k = np.arange(-half_width, half_width + 1)
    # P(X = k) = sum_j P(P1 = j + |k|) P(P2 = j), symmetric in k
    return logsumexp(poisson.logpmf(np.abs(k)[:, None] + j[None, :], mu) + log_j[None, :],
                     axis=1)


def _renyi_terms(alpha: int, mu: float, shift: int, swap: bool = False) -> np.ndarray:
    """log of p(k)**alpha q(k)**(1 - alpha) over the support, P = Sk(mu) + shift,
    Q = Sk(mu) (or the other way round with ``swap``)."""
    w = _half_width(mu)
    log_p = _skellam_logpmf(mu, w + abs(shift))
    center = w + abs(shift)
    base = log_p[center - w:center + w + 1]  # Sk(mu) at k in [-w, w]
    shifted = log_p[center - w - shift:center + w + 1 - shift]  # Sk(mu) + shift at k
    num, den = (base, shifted) if swap else (shifted, base)
    return alpha * num + (1 - alpha) * den


def exact_rdp(alpha: int, mu: float, shift: int, swap: bool = False) -> float:
    """D_alpha(Sk(mu) + shift || Sk(mu)), or the reverse with ``swap``, by summation."""
    terms = _renyi_terms(alpha, mu, shift, swap)
    # the truncated tails must be negligible, or the "exact" value is not exact
    assert terms.max() - max(terms[0], terms[-1]) > 100
    return float(logsumexp(terms)) / (alpha - 1)


# ---------------------------------------------------------------------------- the bound


def test_exact_logpmf_agrees_with_scipy_in_the_bulk():
    for mu in MUS:
        w = 300
        ours = _skellam_logpmf(mu, w)
        theirs = skellam.logpmf(np.arange(-w, w + 1), mu, mu)
        bulk = theirs > -300
        assert bulk.sum() > 100
        np.testing.assert_allclose(ours[bulk], theirs[bulk], rtol=0, atol=1e-10)
        # and it is a distribution
        assert math.isclose(float(np.exp(logsumexp(ours))), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("mu", MUS)
def test_bound_dominates_exact_divergence_1d(shift, mu):
    for alpha in ALPHAS:
        bound = sk.rdp_skellam(alpha, mu, l1=shift, l2=shift)
        for signed in (shift, -shift):
            for swap in (False, True):
                exact = exact_rdp(alpha, mu, signed, swap)
                assert exact > 0
                assert exact <= bound * (1 + 1e-9), (alpha, mu, signed, swap, exact, bound)


def test_bound_is_tight_with_much_noise():
    exact = exact_rdp(2, 100.0, 1)
    bound = sk.rdp_skellam(2, 100.0, 1, 1)
    assert bound / exact <= 1.5
    # measured: 1.0113 (exact 0.0049999, bound 0.0050563); the Gaussian term alone is
    # 0.005, so nearly all the slack is the discreteness term
    assert bound / exact <= 1.02
    assert exact == pytest.approx(2 / (4 * 100.0), rel=1e-4)


def test_bound_dominates_exact_divergence_2d():
    # shift (1, 1): a product distribution, so the divergence is the sum over coordinates
    mu = 5.0
    for alpha in (2, 4):
        exact = 2 * exact_rdp(alpha, mu, 1)
        bound = sk.rdp_skellam(alpha, mu, l1=2.0, l2=math.sqrt(2.0))
        assert exact <= bound * (1 + 1e-9)
        # the 2-D bound is not just the sum of two 1-D bounds: the Gaussian part agrees
        assert bound <= 2 * sk.rdp_skellam(alpha, mu, 1, 1) * (1 + 1e-12)


def test_bound_approaches_the_gaussian_with_much_noise():
    alpha, l1, l2 = 8, 3.0, 2.0
    ratios = []
    for mu in (10.0, 100.0, 1e3, 1e4):
        gaussian = alpha * l2**2 / (4 * mu)  # Gaussian RDP at variance 2*mu
        ratios.append(sk.rdp_skellam(alpha, mu, l1, l2) / gaussian)
    assert all(r >= 1 for r in ratios)
    assert ratios == sorted(ratios, reverse=True)
    assert ratios[-1] == pytest.approx(1.0, abs=1e-3)
    # the exact divergence too
    assert exact_rdp(2, 100.0, 2) / (2 * 4 / 400) == pytest.approx(1.0, abs=1e-3)


def test_bound_uses_the_smaller_discreteness_term():
    # little noise: the 3*l1/(4*mu) branch; much noise: the 1/mu**2 branch
    a, l1, l2 = 10, 40.0, 10.0
    small, large = 0.5, 1e4
    assert sk.rdp_skellam(a, small, l1, l2) == pytest.approx(
        a * l2**2 / (4 * small) + 3 * l1 / (4 * small))
    assert sk.rdp_skellam(a, large, l1, l2) == pytest.approx(
        a * l2**2 / (4 * large) + ((2 * a - 1) * l2**2 + 6 * l1) / (16 * large**2))


def test_orders_are_the_integers_2_to_256():
    assert sk.ORDERS == tuple(range(2, 257))
    assert all(isinstance(a, int) for a in sk.ORDERS)


# ---------------------------------------------------------------------- the conversion


@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (1.1, 100), (4.0, 1000), (0.8, 10)])
def test_conversion_matches_opacus(sigma, steps):
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = list(sk.ORDERS)
    rdp = [a / (2 * sigma**2) * steps for a in orders]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the best order is an end one
        eps_o, order_o = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    eps, order = sk.epsilon_from_rdp(rdp, orders, DELTA)
    assert eps == pytest.approx(float(eps_o), rel=1e-9, abs=1e-9)
    assert order == int(order_o)


def test_conversion_floors_at_zero_and_validates():
    eps, _ = sk.epsilon_from_rdp([0.0] * len(sk.ORDERS), sk.ORDERS, 0.5)
    assert eps == 0.0
    with pytest.raises(ValueError, match="same length"):
        sk.epsilon_from_rdp([1.0], [2, 3], DELTA)
    with pytest.raises(ValueError, match="delta"):
        sk.epsilon_from_rdp([1.0], [2], 0.0)
    with pytest.raises(ValueError, match="rdp"):
        sk.epsilon_from_rdp([-1.0], [2], DELTA)


def test_composition():
    mu, l1, l2 = 50.0, 12.0, 4.0
    assert sk.skellam_epsilon(0, mu, l1, l2, DELTA) == 0.0
    assert sk.skellam_epsilon_of([], DELTA) == 0.0
    one = sk.skellam_epsilon(1, mu, l1, l2, DELTA)
    ten = sk.skellam_epsilon(10, mu, l1, l2, DELTA)
    assert 0 < one < ten < 10 * one  # RDP composition beats adding ε
    split = sk.skellam_epsilon_of([(3, mu, l1, l2), (7, mu, l1, l2), (0, 1.0, 1.0, 1.0)],
                                  DELTA)
    assert split == pytest.approx(ten, rel=1e-12)
    # by hand: the curve adds at every order
    curve = [10 * sk.rdp_skellam(a, mu, l1, l2) for a in sk.ORDERS]
    assert ten == pytest.approx(sk.epsilon_from_rdp(curve, sk.ORDERS, DELTA)[0], rel=1e-12)
    mixed = sk.skellam_epsilon_of([(5, mu, l1, l2), (5, 2 * mu, l1, l2)], DELTA)
    assert sk.skellam_epsilon(10, 2 * mu, l1, l2, DELTA) < mixed < ten


# ----------------------------------------------------------------------- calibration


def test_calibrate_mu_is_tight():
    for target, rounds, l1, l2 in [(1.0, 10, 30.0, 10.0), (8.0, 100, 3.0, 1.5),
                                   (0.5, 1, 1.0, 1.0)]:
        mu = sk.calibrate_mu(target, DELTA, rounds, l1, l2)
        assert sk.skellam_epsilon(rounds, mu, l1, l2, DELTA) <= target
        assert sk.skellam_epsilon(rounds, mu * 0.99, l1, l2, DELTA) > target
        assert sk.skellam_epsilon(rounds, mu / 1.005, l1, l2, DELTA) > target * (1 - 1e-3)


def test_calibrate_mu_is_monotone():
    l1, l2 = 20.0, 5.0
    by_rounds = [sk.calibrate_mu(2.0, DELTA, n, l1, l2) for n in (1, 5, 25, 125)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    by_target = [sk.calibrate_mu(t, DELTA, 10, l1, l2) for t in (0.5, 1.0, 4.0, 16.0)]
    assert by_target == sorted(by_target, reverse=True) and len(set(by_target)) == 4


def test_calibrate_mu_composes_with_history():
    l1, l2, target = 20.0, 5.0, 3.0
    mu = sk.calibrate_mu(target, DELTA, 30, l1, l2)
    continued = sk.calibrate_mu(target, DELTA, 20, l1, l2, history=[(10, mu, l1, l2)])
    assert continued == pytest.approx(mu, rel=0.011)
    # a history at more noise leaves room for less noise in what follows
    cheaper = sk.calibrate_mu(target, DELTA, 20, l1, l2, history=[(10, 4 * mu, l1, l2)])
    assert cheaper < continued


def test_calibrate_mu_refuses_a_spent_history():
    l1, l2 = 20.0, 5.0
    history = [(100, 1.0, l1, l2)]
    assert sk.skellam_epsilon_of(history, DELTA) > 1.0
    with pytest.raises(ValueError, match="already spends"):
        sk.calibrate_mu(1.0, DELTA, 1, l1, l2, history=history)
    with pytest.raises(ValueError, match="unreachable"):
        sk.calibrate_mu(1e-4, DELTA, 1, l1, l2)  # below the conversion's floor


# ----------------------------------------------------------------------- sensitivity


@pytest.mark.parametrize("dim", [1, 10, 1000])
def test_rounding_sensitivity_holds_empirically(dim):
    rng = np.random.default_rng(dim)
    clip, scale = 0.37, 11.0
    l2, l1 = sk.rounding_sensitivity(clip, scale, dim)
    assert l2 == pytest.approx(scale * clip + math.sqrt(dim))
    assert l1 <= math.sqrt(dim) * l2 * (1 + 1e-12)
    assert l1 >= l2
    trials = 200_000 // dim
    s = rng.uniform(-1e4, 1e4, size=(trials, dim))
    # half the sums sit on rounding ties (.5), the worst case for a difference of roundings
    s[: trials // 2] = np.floor(s[: trials // 2]) + 0.5
    x = rng.standard_normal((trials, dim))
    x *= scale * clip / np.linalg.norm(x, axis=1, keepdims=True)
    if dim == 1:  # also the extremes, where the ±1 from rounding is reached
        x[: trials // 2] = np.where(x[: trials // 2] > 0, scale * clip, -scale * clip)
    d = np.round(s + x) - np.round(s)
    assert np.all(np.linalg.norm(d, axis=1) <= l2 * (1 + 1e-12))
    assert np.all(np.abs(d).sum(axis=1) <= l1 * (1 + 1e-12))
    assert np.all(np.abs(d - x) <= 1 + 1e-9)
    # coordinate clipping to [-M, M] afterwards (M inside the range of the sums, so it
    # bites) cannot grow the difference: it is 1-Lipschitz per coordinate
    m = 5000.0
    clipped = np.clip(np.round(s + x), -m, m) - np.clip(np.round(s), -m, m)
    assert np.any(np.abs(np.round(s)) > m)
    assert np.all(np.abs(clipped) <= np.abs(d))
    assert np.all(np.linalg.norm(clipped, axis=1) <= l2 * (1 + 1e-12))


def test_rounding_sensitivity_is_attained_in_one_dimension():
    # with round-half-even, S = 0.5 rounds down to 0 and S + x = 1.5 rounds up to 2: the
    # codes move by 2 = x + 1, exactly the bound
    l2, l1 = sk.rounding_sensitivity(1.0, 1.0, 1)
    assert (l2, l1) == (2.0, 2.0)
    assert float(np.round(0.5 + 1.0) - np.round(0.5)) == l2


def test_gaussian_equivalent_sigma():
    assert sk.gaussian_equivalent_sigma(50.0, 10.0) == pytest.approx(1.0)
    assert sk.gaussian_equivalent_sigma(2.0, 1.0) == pytest.approx(2.0)


def test_mu_share():
    assert sk.mu_share(90.0, 3) == pytest.approx(30.0)
    assert sk.mu_share(90.0, 1) == 90.0
    with pytest.raises(ValueError, match="survivors"):
        sk.mu_share(90.0, 0)
    with pytest.raises(ValueError, match="survivors"):
        sk.mu_share(90.0, 2.5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ wrap-around


def test_wrap_probability_bounds_the_empirical_tail():
    mu = 50.0
    rng = np.random.default_rng(0)
    draws = np.abs(rng.poisson(mu, 200_000) - rng.poisson(mu, 200_000))
    for t in (5, 10, 20, 30, 40, 50):
        empirical = float(np.mean(draws >= t))
        bound = sk.wrap_probability(mu, t, 1)
        assert empirical <= bound, (t, empirical, bound)
    assert sk.wrap_probability(mu, 1e-3, 1) == 1.0
    # union bound over coordinates
    assert sk.wrap_probability(mu, 60.0, 1000) == pytest.approx(
        1000 * sk.wrap_probability(mu, 60.0, 1))


def test_noise_margin_meets_its_target():
    for mu, dim, target in [(50.0, 1, 2.0**-40), (1e4, 10**6, 2.0**-40), (3.0, 100, 1e-3)]:
        t = sk.noise_margin(mu, dim, target)
        assert sk.wrap_probability(mu, t, dim) <= target
        assert sk.wrap_probability(mu, 0.9 * t, dim) > target
        assert sk.wrap_probability(mu, t * (1 - 1e-9), dim) > target * 0.999
    assert sk.noise_margin(50.0, 10) == sk.noise_margin(50.0, 10, 2.0**-40)
    with pytest.raises(ValueError, match="target"):
        sk.noise_margin(50.0, 10, 0.0)


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize("args,match", [
    ((1, 1.0, 1.0, 1.0), "alpha"),
    ((2.5, 1.0, 1.0, 1.0), "alpha"),
    ((2.0, 1.0, 1.0, 1.0), "alpha"),  # floats refused: the bound is for integer orders
    ((True, 1.0, 1.0, 1.0), "alpha"),
    ((2, 0.0, 1.0, 1.0), "mu"),
    ((2, -1.0, 1.0, 1.0), "mu"),
    ((2, math.inf, 1.0, 1.0), "mu"),
    ((2, math.nan, 1.0, 1.0), "mu"),
    ((2, 1.0, 1.0, 0.0), "l2"),
    ((2, 1.0, 0.0, 1.0), "l1"),
    ((2, 1.0, 1.0, 2.0), "l1 must be >= l2"),
])
def test_rdp_validation(args, match):
    with pytest.raises(ValueError, match=match):
        sk.rdp_skellam(*args)


def test_rdp_accepts_numpy_integers():
    assert sk.rdp_skellam(np.int64(3), 5.0, 2.0, 1.0) == sk.rdp_skellam(3, 5.0, 2.0, 1.0)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, math.nan])
def test_delta_validation(delta):
    with pytest.raises(ValueError, match="delta"):
        sk.skellam_epsilon(1, 10.0, 2.0, 1.0, delta)
    with pytest.raises(ValueError, match="delta"):
        sk.calibrate_mu(1.0, delta, 1, 2.0, 1.0)


def test_other_validation():
    with pytest.raises(ValueError, match="rounds"):
        sk.skellam_epsilon(-1, 10.0, 2.0, 1.0, DELTA)
    with pytest.raises(ValueError, match="rounds"):
        sk.calibrate_mu(1.0, DELTA, 0, 2.0, 1.0)
    with pytest.raises(ValueError, match="target_epsilon"):
        sk.calibrate_mu(0.0, DELTA, 1, 2.0, 1.0)
    with pytest.raises(ValueError, match="event"):
        sk.skellam_epsilon_of([(1, 10.0, 2.0)], DELTA)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="dim"):
        sk.rounding_sensitivity(1.0, 1.0, 0)
    with pytest.raises(ValueError, match="clip"):
        sk.rounding_sensitivity(-1.0, 1.0, 3)
    with pytest.raises(ValueError, match="scale"):
        sk.rounding_sensitivity(1.0, 0.0, 3)
    with pytest.raises(ValueError, match="margin"):
        sk.wrap_probability(10.0, 0.0, 3)
    with pytest.raises(ValueError, match="mu_total"):
        sk.wrap_probability(0.0, 1.0, 3)
    with pytest.raises(ValueError, match="l2"):
        sk.gaussian_equivalent_sigma(1.0, 0.0)

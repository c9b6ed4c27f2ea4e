"""t-of-n Shamir secret sharing of 32-byte secrets over GF(2**256 + 297).

Dropout recovery needs any t surviving sites to rebuild a missing site's secrets while
t - 1 of them learn nothing; a random polynomial of degree t - 1 with the secret as its
constant term gives exactly that (any t - 1 points are consistent with every secret),
in any prime field larger than the secrets and the number of sites. 2**256 + 297 is the
smallest prime above every 256-bit secret, so a secret is a field element as-is, with
no reduction that could lose information, and a share's value fits in 33 bytes: each
site sends two shares to every neighbour, so the field's size is most of what secure
aggregation adds to a site's upload (a 521-bit field took twice as much, for nothing:
the secrecy of Shamir's scheme does not grow with the field).

Reconstruction uses exactly t shares and, when more are available, checks that the
extra ones lie on the same polynomial: one honest extra share is enough to notice any
single corrupted share among the t used, instead of silently returning a wrong key.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from typing import Protocol

from mmfed.secagg.errors import SecAggError

PRIME = 2**256 + 297
SECRET_BYTES = 32
X_BYTES = 4
Y_BYTES = (PRIME.bit_length() + 7) // 8  # 33
SHARE_BYTES = X_BYTES + Y_BYTES

Share = tuple[int, int]


class RandBelow(Protocol):
    """Source of uniform integers; the ``secrets`` module is the intended one."""

    def randbelow(self, exclusive_upper_bound: int, /) -> int: ...


def split(secret: bytes, t: int, n: int, rng: RandBelow = secrets) -> list[Share]:
    """Shares of ``secret`` at x = 1..n, any ``t`` of which rebuild it."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SecAggError(f"number of shares must be a positive integer, got {n!r}")
    return split_at(secret, t, range(1, n + 1), rng)


def split_at(secret: bytes, t: int, xs: Iterable[int], rng: RandBelow = secrets) -> list[Share]:
    """Shares of ``secret`` at the given distinct non-zero x coordinates."""
    if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_BYTES:
        raise SecAggError(f"a shared secret must be {SECRET_BYTES} bytes")
    points = list(xs)
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise SecAggError(f"threshold must be a positive integer, got {t!r}")
    if t > len(points):
        raise SecAggError(f"threshold {t} exceeds the number of shares {len(points)}")
    if len(set(points)) != len(points) or any(not 1 <= x < 2 ** (8 * X_BYTES) for x in points):
        raise SecAggError("share x coordinates must be distinct integers in 1..2**32-1")
    coeffs = [int.from_bytes(secret, "big")] + [rng.randbelow(PRIME) for _ in range(t - 1)]
    shares: list[Share] = []
    for x in points:
        acc = 0
        for c in reversed(coeffs):  # Horner's rule
            acc = (acc * x + c) % PRIME
        shares.append((x, acc))
    return shares


def interpolate(shares: Sequence[Share], at: int = 0) -> int:
    """Value at ``at`` of the unique polynomial of degree < len(shares) through ``shares``.

    Exposed (rather than only :func:`reconstruct`) so tests can show what t - 1 shares
    give: a field element unrelated to the secret.
    """
    xs = [x % PRIME for x, _ in shares]
    return _evaluate(xs, [y for _, y in shares], _inverse_denominators(xs), at)


def _inverse_denominators(xs: Sequence[int]) -> list[int]:
    """1 / prod_{m != j} (x_j - x_m): computed once per set of x, reused for every point."""
    if len(set(xs)) != len(xs):
        raise SecAggError("shares must have distinct x coordinates")
    inverses = []
    for j, xj in enumerate(xs):
        den = 1
        for m, xm in enumerate(xs):
            if m != j:
                den = den * (xj - xm) % PRIME
        inverses.append(pow(den, -1, PRIME))
    return inverses


def _evaluate(xs: Sequence[int], ys: Sequence[int], inv_dens: Sequence[int], at: int) -> int:
    k = len(xs)
    diffs = [(at - x) % PRIME for x in xs]
    # prefix[j] * suffix[j + 1] = product of (at - x_m) over m != j, without division.
    prefix = [1] * (k + 1)
    suffix = [1] * (k + 1)
    for j in range(k):
        prefix[j + 1] = prefix[j] * diffs[j] % PRIME
    for j in range(k - 1, -1, -1):
        suffix[j] = suffix[j + 1] * diffs[j] % PRIME
    total = 0
    for j in range(k):
        total = (total + ys[j] * prefix[j] % PRIME * suffix[j + 1] % PRIME * inv_dens[j]) % PRIME
    return total


def reconstruct(shares: Iterable[Share], t: int) -> bytes:
    """The 32-byte secret from at least ``t`` shares made by :func:`split`."""
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise SecAggError(f"threshold must be a positive integer, got {t!r}")
    unique: dict[int, int] = {}
    for x, y in shares:
        if unique.setdefault(x, y) != y:
            raise SecAggError(f"two different shares claim x = {x}")
    if len(unique) < t:
        raise SecAggError(
            f"cannot reconstruct: {len(unique)} distinct shares, threshold is {t}"
        )
    ordered = sorted(unique.items())
    xs = [x % PRIME for x, _ in ordered[:t]]
    ys = [y for _, y in ordered[:t]]
    inv_dens = _inverse_denominators(xs)
    for x, y in ordered[t:]:
        if _evaluate(xs, ys, inv_dens, x) != y % PRIME:
            raise SecAggError("inconsistent shares: they do not lie on one polynomial")
    value = _evaluate(xs, ys, inv_dens, 0)
    if value >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError("reconstructed value is not a 32-byte secret: shares are corrupt")
    return value.to_bytes(SECRET_BYTES, "big")


def encode_share(share: Share) -> bytes:
    """Fixed-length bytes (4-byte x, 33-byte y) so a share's size reveals nothing."""
    x, y = share
    if not 1 <= x < 2 ** (8 * X_BYTES) or not 0 <= y < PRIME:
        raise SecAggError("share out of range")
    return x.to_bytes(X_BYTES, "big") + y.to_bytes(Y_BYTES, "big")


def decode_share(data: bytes) -> Share:
    """Inverse of :func:`encode_share`, rejecting anything that is not a field element."""
    if not isinstance(data, bytes | bytearray) or len(data) != SHARE_BYTES:
        raise SecAggError(f"an encoded share must be {SHARE_BYTES} bytes")
    x = int.from_bytes(data[:X_BYTES], "big")
    y = int.from_bytes(data[X_BYTES:], "big")
    if x == 0 or y >= PRIME:
        raise SecAggError("encoded share out of range")
    return x, y


def encode_value(share: Share) -> bytes:
    """A share's value alone, in ``Y_BYTES`` fixed-length bytes: for a recipient (or
    the server) that knows whose x the share is at, sending x again is padding."""
    x, y = share
    if not 1 <= x < 2 ** (8 * X_BYTES) or not 0 <= y < PRIME:
        raise SecAggError("share out of range")
    return y.to_bytes(Y_BYTES, "big")


def decode_value(data: bytes, x: int) -> Share:
    """Inverse of :func:`encode_value`: the share at ``x``, the x its holder is at."""
    if not isinstance(data, bytes | bytearray) or len(data) != Y_BYTES:
        raise SecAggError(f"an encoded share value must be {Y_BYTES} bytes")
    y = int.from_bytes(data, "big")
    if y >= PRIME or not 1 <= x < 2 ** (8 * X_BYTES):
        raise SecAggError("encoded share out of range")
    return x, y

"""Tolerances for numbers that come out of a trained model or an attack, derived from stated bounds.

Why tests need them: such a number is not a constant of the code. A model trained on another
processor (or under another ``ATEN_CPU_CAPABILITY`` on this one) differs from this machine's in the
last bits of its weights, and after a few hundred optimiser steps those bits decide the borderline
test images. Two attacks that draw their random starts differently agree only in distribution. A
tolerance read off the number one machine gives fails on the next one; twice so far.

So a test that checks such a number either compares exactly, where the computation is
deterministic by construction (same machine and process, or exact arithmetic), or states a claim
about the rate it measures and checks the count against the binomial bound below:

* ``fewest(n, p)``: the least count of successes out of ``n`` that a rate of at least ``p`` gives
  but for a false alarm: if each of the n images succeeds independently with probability
  >= p, the count falls below ``fewest(n, p)`` with probability at most ``FALSE_ALARM``.
  ``most(n, p)`` is the mirror image, for a rate of at most ``p``.
* ``paired_p(b, c)``: two procedures run on the same images; ``b`` images only the first
  succeeds on, ``c`` only the second. If the two are equally strong, each discordant image is a
  fair coin, so given b + c, b ~ Binomial(b + c, 1/2) (exact McNemar). The test fails when the
  two-sided p value is below ``FALSE_ALARM``. ``paired_p_greater(b, c)`` is the one-sided
  version, for a claim that the first is no more successful than the second.
* ``two_sample_p(k1, n1, k2, n2)``: two rates measured on separate runs when only their counts
  are at hand (a committed number against a re-derived one). Given k1 + k2, k1 is
  hypergeometric under equal rates (Fisher's exact test); two-sided p value, same rule.

Treating the test images as independent trials is conservative for the variation between
processors: the images are the same on every machine and most outcomes do not move at all, so
the counts vary less than a fresh binomial sample would, and the actual false-alarm rate is below
the stated one.

``FALSE_ALARM`` is per comparison. The suite makes a few dozen of them, so a correct build fails
on fewer than one processor (or kernel setting) in 10,000. The price is a looser tolerance: each
claim below is stated with a margin, and a test fails only when the code is clearly off it.
"""

from __future__ import annotations

import math

FALSE_ALARM = 1e-6


def _log_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly term by term."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, sum(math.exp(_log_pmf(i, n, p)) for i in range(k + 1)))


def fewest(n: int, p: float, alpha: float = FALSE_ALARM) -> int:
    """The smallest k with P(Binomial(n, p) < k) <= alpha: a rate of at least ``p`` on ``n``
    independent images gives fewer than k successes with probability at most ``alpha``."""
    k = 0
    while k < n and binom_cdf(k, n, p) <= alpha:  # P(X < k + 1) still small: k + 1 is safe
        k += 1
    return k


def most(n: int, p: float, alpha: float = FALSE_ALARM) -> int:
    """The largest k with P(Binomial(n, p) > k) <= alpha: a rate of at most ``p`` on ``n``
    independent images gives more than k successes with probability at most ``alpha``."""
    return n - fewest(n, 1.0 - p, alpha)


def paired_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p value for ``b`` and ``c`` discordant pairs (1.0 when none)."""
    m = b + c
    if m == 0:
        return 1.0
    return min(1.0, 2.0 * binom_cdf(min(b, c), m, 0.5))


def paired_p_greater(b: int, c: int) -> float:
    """Exact one-sided McNemar p value against "the first procedure succeeds more often": the
    probability of at least ``b`` first-only images among ``b + c`` discordant ones when each
    is a fair coin."""
    return binom_cdf(c, b + c, 0.5) if b + c else 1.0


def _log_hyper(k: int, n1: int, n2: int, t: int) -> float:
    def log_comb(n: int, r: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)

    return log_comb(n1, k) + log_comb(n2, t - k) - log_comb(n1 + n2, t)


def two_sample_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact p value for k1 of n1 against k2 of n2 (equal rates under the null):
    the probability, given k1 + k2 successes in all, of a split at most as likely as the one seen."""
    t = k1 + k2
    lo, hi = max(0, t - n2), min(n1, t)
    seen = _log_hyper(k1, n1, n2, t)
    total = sum(math.exp(_log_hyper(k, n1, n2, t)) for k in range(lo, hi + 1)
                if _log_hyper(k, n1, n2, t) <= seen + 1e-9)
    return min(1.0, total)


def count(mask) -> int:
    """Successes in a boolean tensor or array, as a Python int."""
    return int(mask.sum())

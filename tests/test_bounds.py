"""The bounds of tests/bounds.py, against scipy and by their definitions."""

import pytest

from bounds import FALSE_ALARM, binom_cdf, fewest, most, paired_p, paired_p_greater, two_sample_p

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("n,p", [(10, 0.9), (24, 0.5), (40, 0.3), (100, 0.01), (360, 0.05), (360, 0.3), (397, 0.95)])
def test_fewest_and_most_are_the_binomial_quantiles(n, p):
    k = fewest(n, p)
    # below k: at most FALSE_ALARM; one more would exceed it (k is the tightest such count)
    assert scipy_stats.binom.cdf(k - 1, n, p) <= FALSE_ALARM < scipy_stats.binom.cdf(k, n, p) * (1 + 1e-9)
    assert binom_cdf(k - 1, n, p) == pytest.approx(scipy_stats.binom.cdf(k - 1, n, p), rel=1e-9, abs=1e-300)
    j = most(n, p)
    assert scipy_stats.binom.sf(j, n, p) <= FALSE_ALARM * (1 + 1e-9)
    assert j == n or scipy_stats.binom.sf(j - 1, n, p) > FALSE_ALARM


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (5, 1), (2, 2), (10, 50), (3, 40), (120, 80)])
def test_paired_p_is_exact_mcnemar(b, c):
    if b + c == 0:
        assert paired_p(b, c) == paired_p_greater(b, c) == 1.0
        return
    assert paired_p(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9, abs=1e-300)
    assert paired_p_greater(b, c) == pytest.approx(
        scipy_stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("k1,n1,k2,n2", [(291, 360, 287, 360), (3, 360, 30, 360), (0, 50, 0, 50), (10, 20, 2, 40)])
def test_two_sample_p_is_fishers_exact_test(k1, n1, k2, n2):
    expected = scipy_stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue
    assert two_sample_p(k1, n1, k2, n2) == pytest.approx(expected, rel=1e-6, abs=1e-300)

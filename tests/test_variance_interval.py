"""The exact (F-distribution) interval of the predicted noise ceiling: stats.f_quantile against
scipy, the ICC(1) interval against a direct computation with scipy's F quantiles, and its
coverage on simulated studies of 6 candidates, where the bootstrap's interval collapses."""
import math

import numpy as np
import pytest

from blockswap import stats
from blockswap.variance import (noise_warning, pearson_to_spearman, reliability_interval,
                                variance_components)


def test_f_quantile_and_cdf_match_scipy():
    f = pytest.importorskip("scipy.stats").f
    for q in (0.025, 0.5, 0.975):
        for d1 in (1, 2, 5, 11, 39):
            for d2 in (3, 6, 12, 40, 500):
                assert stats.f_quantile(q, d1, d2) == pytest.approx(f.ppf(q, d1, d2), rel=1e-9)
                assert stats.f_cdf(f.ppf(q, d1, d2), d1, d2) == pytest.approx(q, abs=1e-12)
    with pytest.raises(ValueError):
        stats.f_quantile(1.0, 2, 3)


def direct_interval(errors, level=0.95):
    """Shrout & Fleiss (1979) ICC(1) interval, written out with scipy's F quantiles."""
    f = pytest.importorskip("scipy.stats").f
    a, n = errors.shape
    grand = errors.mean()
    msb = n * ((errors.mean(1) - grand) ** 2).sum() / (a - 1)
    msw = ((errors - errors.mean(1, keepdims=True)) ** 2).sum() / (a * (n - 1))
    alpha = 1 - level
    fl = (msb / msw) / f.ppf(1 - alpha / 2, a - 1, a * (n - 1))
    fu = (msb / msw) * f.ppf(1 - alpha / 2, a * (n - 1), a - 1)
    return (fl - 1) / (fl + n - 1), (fu - 1) / (fu + n - 1)


@pytest.mark.parametrize("a, n, var_b", [(6, 2, 1.0), (12, 3, 0.3), (40, 2, 4.0)])
def test_reliability_interval_is_shrout_and_fleiss(a, n, var_b):
    rng = np.random.default_rng(a + n)
    errors = 50 + rng.normal(0, math.sqrt(var_b), (a, 1)) + rng.normal(0, 1, (a, n))
    lo, hi = direct_interval(errors)
    got = reliability_interval(errors)
    assert got == pytest.approx((max(0.0, lo), min(1.0, hi)), abs=1e-9)
    vc = variance_components(errors, n_boot=50)
    assert vc.ceiling_f_ci == pytest.approx(tuple(pearson_to_spearman(r) for r in got))
    assert vc.ceiling_f_ci[0] <= vc.ceiling <= vc.ceiling_f_ci[1]


def test_the_exact_interval_covers_the_truth_95_times_in_100_with_6_candidates():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(400):   # reliability 0.5: var_between 1, var_seed 1, 6 candidates x 2 seeds
        errors = rng.normal(0, 1, (6, 1)) + rng.normal(0, 1, (6, 2))
        lo, hi = reliability_interval(errors)
        covered += lo <= 0.5 <= hi
    assert 0.92 <= covered / 400 <= 0.98   # binomial sd 0.011


def test_where_the_bootstrap_says_0_0_the_exact_interval_stays_open():
    # 6 candidates whose seeds disagree more than the candidates differ (MSB < MSW): almost
    # every bootstrap resample sees no signal, so its interval is [0, 0]; the truth may still
    # be well above 0 with so few candidates, and the exact interval says so
    errors = np.array([[50.7, 49.4], [50.3, 48.9], [49.3, 51.2], [50.0, 52.1], [48.7, 50.1],
                       [50.0, 50.8]])
    vc = variance_components(errors, n_boot=1000)
    assert vc.var_between == 0.0 and vc.ceiling_ci == (0.0, 0.0)
    assert vc.ceiling_f_ci[0] == 0.0 and vc.ceiling_f_ci[1] > 0.5
    assert f"[+0.00, {vc.ceiling_f_ci[1]:+.2f}] (exact F interval; bootstrap [+0.00, +0.00])" \
        in vc.describe()
    assert "the interval still reaches above it" in noise_warning(vc)


def test_seeds_that_agree_exactly_give_a_ceiling_of_one():
    errors = np.array([[1.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    assert reliability_interval(errors) == (1.0, 1.0)
    assert math.isnan(reliability_interval(np.ones((3, 2)))[0])

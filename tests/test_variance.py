"""variance.py: ANOVA variance components and the noise ceiling they predict, against hand
computations and against simulated studies with known components."""
import math

import numpy as np
import pytest

from blockswap.stats import spearman
from blockswap.variance import (anova_components, early_check_at, is_noisy, noise_warning,
                      pearson_to_spearman, variance_components)


def simulate(n_arch, n_seeds, var_b, var_s, seed=0):
    """errors = 50 + architecture effect + seed noise, (n_arch x n_seeds)."""
    rng = np.random.default_rng(seed)
    b = rng.normal(0, math.sqrt(var_b), (n_arch, 1))
    return 50 + b + rng.normal(0, math.sqrt(var_s), (n_arch, n_seeds))


def test_anova_components_by_hand():
    # row means 2, 2, 7 (grand 11/3): MSB = 2 * (2 (5/3)^2 + (10/3)^2) / 2 = 150/9;
    # within-row variances 2, 0, 2: MSW = 4/3; var_between = (150/9 - 4/3) / 2 = 23/3
    vb, vs = anova_components(np.array([[1.0, 3.0], [2.0, 2.0], [6.0, 8.0]]))
    assert vb == pytest.approx(23 / 3) and vs == pytest.approx(4 / 3)
    # no architecture signal beyond the noise: clipped at 0, not negative
    vb, vs = anova_components(np.array([[0.0, 4.0], [4.0, 0.0], [1.0, 3.0]]))
    assert vb == 0.0 and vs == pytest.approx((8 + 8 + 2) / 3)


def test_known_components_are_recovered_and_predict_the_simulated_ceiling():
    errors = simulate(2000, 2, var_b=4.0, var_s=1.0)
    vc = variance_components(errors, n_boot=400)
    # standard errors here are about 3.5% (var_b) and 3% (var_s)
    assert vc.var_between == pytest.approx(4.0, rel=0.1)
    assert vc.var_seed == pytest.approx(1.0, rel=0.1)
    assert vc.var_between_ci[0] < 4.0 < vc.var_between_ci[1]
    assert vc.var_seed_ci[0] < 1.0 < vc.var_seed_ci[1]
    assert vc.reliability == pytest.approx(0.8, abs=0.02)
    # the predicted seed-to-seed Spearman is what study.py measures on the two replicas
    measured = spearman(errors[:, 0], errors[:, 1])
    assert vc.ceiling == pytest.approx(measured, abs=0.02)
    assert vc.ceiling_ci[0] < measured < vc.ceiling_ci[1]
    assert vc.ceiling == pytest.approx(6 / math.pi * math.asin(0.4), abs=0.02)   # 0.786
    assert np.corrcoef(errors.T)[0, 1] == pytest.approx(vc.reliability, abs=0.02)


def test_reliability_of_a_mean_of_seeds_matches_simulated_halves():
    errors = simulate(3000, 4, var_b=1.0, var_s=2.0, seed=1)
    vc = variance_components(errors, n_boot=50)
    halves = errors[:, :2].mean(1), errors[:, 2:].mean(1)
    assert vc.reliability_of_mean(2) == pytest.approx(np.corrcoef(halves)[0, 1], abs=0.03)
    assert vc.reliability_of_mean(2) == pytest.approx(1 / (1 + 2 / 2), abs=0.05)
    assert vc.ceiling_of_mean(2) == pytest.approx(spearman(*halves), abs=0.03)


def test_pearson_to_spearman_ends_and_middle():
    assert pearson_to_spearman(0.0) == 0.0 and pearson_to_spearman(1.0) == pytest.approx(1.0)
    rng = np.random.default_rng(3)
    x = rng.normal(size=20000)
    y = 0.5 * x + math.sqrt(0.75) * rng.normal(size=20000)   # Pearson 0.5
    assert pearson_to_spearman(0.5) == pytest.approx(spearman(x, y), abs=0.015)


def test_failed_trainings_are_dropped_and_bad_shapes_refused():
    errors = simulate(10, 2, 4.0, 1.0)
    with_nan = np.vstack([errors, [[np.nan, 50.0]]])
    assert variance_components(with_nan, n_boot=20) == variance_components(errors, n_boot=20)
    with pytest.raises(ValueError, match="seeds>=2"):
        variance_components(errors[:, :1])
    with pytest.raises(ValueError, match=">= 3 complete"):
        variance_components(errors[:2])


def test_the_early_warning_fires_on_noise_and_stays_quiet_on_signal():
    noisy = variance_components(simulate(200, 2, var_b=0.05, var_s=1.0, seed=4), n_boot=200)
    clean = variance_components(simulate(200, 2, var_b=4.0, var_s=1.0, seed=5), n_boot=200)
    assert is_noisy(noisy) and not is_noisy(clean)
    assert noise_warning(clean) is None
    text = noise_warning(noisy)
    assert text.startswith(f"WARNING: the predicted noise ceiling is {noisy.ceiling:+.2f}")
    assert "after 200 candidates, below 0.5 (even the interval's top" in text
    for flag in ("--epochs", "--train_subset", "--val_subset", "--tol"):
        assert flag in text
    assert "Predicted noise ceiling (variance components of 200 candidates x 2 seeds)" \
        in clean.describe()


def test_the_early_check_comes_within_the_first_15_percent():
    assert [early_check_at(n) for n in (4, 20, 40, 100, 1000)] == [4, 6, 6, 15, 150]

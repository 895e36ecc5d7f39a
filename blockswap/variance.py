"""How much of a study's spread in validation error is the architectures and how much is the
training seed: variance components, and the noise ceiling they predict.

Model (one-way random effects, balanced): the error of architecture i trained with seed j is
    y_ij = mu + b_i + e_ij,   b_i ~ (0, var_between),   e_ij ~ (0, var_seed), independent.
The ANOVA (method-of-moments) estimates, with a architectures and n seeds each, are
    MSB = n * sum_i (mean_i - mean)^2 / (a - 1),  MSW = sum_ij (y_ij - mean_i)^2 / (a (n - 1)),
    var_seed = MSW,  var_between = max(0, (MSB - MSW) / n),
unbiased before the clip at 0 (a negative estimate means: no architecture signal seen).

Two trainings of the same architectures with different seeds then correlate (Pearson) at
    reliability = var_between / (var_between + var_seed),
and, where b and e are normal, their Spearman correlation -- what study.py measures as its
noise ceiling (the mean seed-to-seed Spearman of the per-candidate errors) -- is
    ceiling = (6 / pi) * asin(reliability / 2).
Averaging r seeds per architecture gives the Spearman-Brown reliability
    var_between / (var_between + var_seed / r).
Intervals: percentile bootstrap over architectures (rows resampled with replacement, seeds
kept together), so they do not lean on normality and include the uncertainty of both
components; with few architectures they are wide, as they should be.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

CEILING_LOW = 0.5      # below this, two trainings disagree on the order too much to rank proxies
EARLY_FRACTION = 0.15  # check the noise after this fraction of a study's candidates ...
EARLY_LEAST = 6        # ... but not from fewer complete candidates than this


def anova_components(errors: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(var_between, var_seed) of errors shaped (..., architectures, seeds), over the last two
    axes (leading axes: bootstrap resamples); var_between clipped at 0."""
    a, n = errors.shape[-2:]
    row_mean = errors.mean(-1)                                   # (..., a)
    msb = n * row_mean.var(-1, ddof=1)
    msw = errors.var(-1, ddof=1).mean(-1)
    return np.maximum(0.0, (msb - msw) / n), msw


def pearson_to_spearman(r):
    """Spearman's rho of a bivariate normal pair with Pearson correlation r (Pearson 1907)."""
    return 6.0 / math.pi * np.arcsin(np.asarray(r) / 2.0)


def _reliability(var_between, var_seed, seeds: int = 1):
    """Pearson correlation between two means of `seeds` trainings each (nan if no variance)."""
    total = var_between + var_seed / seeds
    return np.where(total > 0, var_between / np.where(total > 0, total, 1.0), np.nan)


@dataclass(frozen=True)
class VarianceComponents:
    """Estimates from an (architectures x seeds) error table; the *_ci are 95% (by default)
    percentile-bootstrap intervals over architectures. Errors in points (%), variances in
    points squared."""
    n_arch: int
    n_seeds: int
    var_between: float
    var_seed: float
    var_between_ci: Tuple[float, float]
    var_seed_ci: Tuple[float, float]
    ceiling_ci: Tuple[float, float]

    @property
    def reliability(self) -> float:
        """Predicted Pearson correlation of one training's errors with another seed's."""
        return float(_reliability(self.var_between, self.var_seed))

    @property
    def ceiling(self) -> float:
        """Predicted seed-to-seed Spearman (study.py's measured noise ceiling)."""
        return float(pearson_to_spearman(self.reliability))

    def reliability_of_mean(self, seeds: int) -> float:
        """Predicted Pearson correlation between two means of `seeds` trainings each."""
        return float(_reliability(self.var_between, self.var_seed, seeds))

    def ceiling_of_mean(self, seeds: int) -> float:
        """Predicted Spearman between two means of `seeds` trainings each."""
        return float(pearson_to_spearman(self.reliability_of_mean(seeds)))

    def describe(self) -> str:
        """One summary line: the predicted ceiling and both components, with intervals."""
        (clo, chi), (blo, bhi), (slo, shi) = self.ceiling_ci, self.var_between_ci, self.var_seed_ci
        return (f"Predicted noise ceiling (variance components of {self.n_arch} candidates x "
                f"{self.n_seeds} seeds): {self.ceiling:+.2f} [{clo:+.2f}, {chi:+.2f}]; "
                f"between-architecture variance {self.var_between:.3g} [{blo:.3g}, {bhi:.3g}], "
                f"seed-to-seed {self.var_seed:.3g} [{slo:.3g}, {shi:.3g}] (points^2); the "
                f"mean of {self.n_seeds} seeds has reliability "
                f"{self.reliability_of_mean(self.n_seeds):.2f}.")


def complete_rows(errors) -> np.ndarray:
    """The (architectures x seeds) table without architectures that have a failed (nan)
    training; a ValueError unless >= 2 seeds and >= 3 complete architectures remain."""
    errors = np.asarray(errors, dtype=float)
    if errors.ndim != 2 or errors.shape[1] < 2:
        raise ValueError(f"variance components need (architectures x seeds>=2) errors, got "
                         f"shape {errors.shape}")
    errors = errors[np.isfinite(errors).all(1)]
    if len(errors) < 3:
        raise ValueError(f"variance components need >= 3 complete architectures, got "
                         f"{len(errors)}")
    return errors


def variance_components(errors, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> VarianceComponents:
    """The variance components of an (architectures x seeds) table of validation errors
    (rows with a nan are dropped), with percentile-bootstrap intervals over architectures."""
    errors = complete_rows(errors)
    vb, vs = anova_components(errors)
    rows = np.random.default_rng(seed).integers(0, len(errors), (n_boot, len(errors)))
    boot_b, boot_s = anova_components(errors[rows])              # (n_boot,) each
    boot_c = pearson_to_spearman(_reliability(boot_b, boot_s))
    q = [50 * (1 - level), 50 * (1 + level)]
    ci = lambda x: tuple(float(v) for v in np.nanpercentile(x, q))   # noqa: E731
    return VarianceComponents(len(errors), errors.shape[1], float(vb), float(vs),
                              ci(boot_b), ci(boot_s), ci(boot_c))


def early_check_at(n_candidates: int) -> int:
    """After how many complete candidates a study should estimate its noise: ~15% of them,
    at least EARLY_LEAST (fewer say nothing), at most all."""
    return min(n_candidates, max(EARLY_LEAST, math.ceil(EARLY_FRACTION * n_candidates)))


def is_noisy(vc: VarianceComponents, threshold: float = CEILING_LOW) -> bool:
    """The predicted ceiling is below the threshold (the point estimate; the interval in the
    warning text says how sure that is)."""
    return not vc.ceiling >= threshold   # nan (no variance at all) is noisy too


def noise_warning(vc: VarianceComponents, threshold: float = CEILING_LOW) -> Optional[str]:
    """The early warning (None when the predicted ceiling reaches the threshold): what the
    estimate says and what to change."""
    if not is_noisy(vc, threshold):
        return None
    lo, hi = vc.ceiling_ci
    sure = ("even the interval's top is below it" if hi < threshold else
            "the interval still reaches above it, so more candidates may revise this")
    return (f"WARNING: the predicted noise ceiling is {vc.ceiling:+.2f} [{lo:+.2f}, {hi:+.2f}] "
            f"after {vc.n_arch} candidates, below {threshold} ({sure}): the architectures of "
            f"this budget differ by less than two trainings of one architecture do "
            f"(between-architecture variance {vc.var_between:.3g} vs seed-to-seed "
            f"{vc.var_seed:.3g} points^2), so the study cannot rank proxies. Make the "
            "differences larger than the noise: train longer (--epochs), on more images "
            "(--train_subset), validate on the whole test split (--val_subset), or widen the "
            "budget window (--tol) so the candidates differ more.")

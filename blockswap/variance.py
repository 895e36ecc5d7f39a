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
Intervals, two kinds:
- the exact interval of the reliability, ICC(1) (Shrout and Fleiss 1979, case 1; McGraw and
  Wong 1996): with F = MSB / MSW and F_q(d1, d2) the F distribution's quantiles,
      F_L = F / F_{1-alpha/2}(a - 1, a (n - 1)),   F_U = F * F_{1-alpha/2}(a (n - 1), a - 1),
      reliability in [(F_L - 1) / (F_L + n - 1), (F_U - 1) / (F_U + n - 1)]   (clipped to [0, 1]),
  mapped to the ceiling by the formula above. It holds for normal effects at any number of
  architectures, so it is the one to read early, when few candidates are done;
- percentile bootstrap over architectures (rows resampled with replacement, seeds kept
  together), for both components and the ceiling: no normality needed, but with few
  architectures most resamples see no signal and the interval collapses (6 candidates gave
  [0, 0] for the ceiling where the exact interval reaches well above 0).
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from blockswap.stats import f_quantile

# Two thresholds on the noise ceiling (the seed-to-seed Spearman of the trained errors):
CEILING_CANNOT_RANK = 0.5  # predicted below this, early: the study cannot rank proxies at all
                           # (a warning; --stop_if_noisy stops there)
CEILING_TRUSTED = 0.7      # measured at the end: a study whose ceiling reaches this ranks
                           # proxies reliably; below it the summary warns
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
    ceiling_ci: Tuple[float, float]          # percentile bootstrap
    ceiling_f_ci: Tuple[float, float] = (math.nan, math.nan)   # exact (F distribution)

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
        """One summary line: the predicted ceiling (exact interval, the bootstrap's beside it)
        and both components, with intervals."""
        (clo, chi), (blo, bhi), (slo, shi) = self.ceiling_ci, self.var_between_ci, self.var_seed_ci
        flo, fhi = self.ceiling_f_ci
        return (f"Predicted noise ceiling (variance components of {self.n_arch} candidates x "
                f"{self.n_seeds} seeds): {self.ceiling:+.2f} [{flo:+.2f}, {fhi:+.2f}] (exact "
                f"F interval; bootstrap [{clo:+.2f}, {chi:+.2f}]); "
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


def reliability_interval(errors, level: float = 0.95) -> Tuple[float, float]:
    """The exact interval of the reliability ICC(1) of a complete (architectures x seeds) table
    (the module docstring's formula), clipped to [0, 1] as the point estimate is."""
    a, n = errors.shape
    msb, msw = n * errors.mean(1).var(ddof=1), errors.var(1, ddof=1).mean()
    if msw == 0:   # the seeds agree exactly: all of the spread is the architectures'
        return (1.0, 1.0) if msb > 0 else (math.nan, math.nan)
    f, q = msb / msw, 0.5 * (1 + level)
    f_lo = f / f_quantile(q, a - 1, a * (n - 1))
    f_hi = f * f_quantile(q, a * (n - 1), a - 1)
    icc = lambda v: min(1.0, max(0.0, (v - 1) / (v + n - 1)))   # noqa: E731
    return icc(f_lo), icc(f_hi)


def variance_components(errors, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> VarianceComponents:
    """The variance components of an (architectures x seeds) table of validation errors
    (rows with a nan are dropped), with percentile-bootstrap intervals over architectures and
    the exact interval of the ceiling."""
    errors = complete_rows(errors)
    vb, vs = anova_components(errors)
    rows = np.random.default_rng(seed).integers(0, len(errors), (n_boot, len(errors)))
    boot_b, boot_s = anova_components(errors[rows])              # (n_boot,) each
    boot_c = pearson_to_spearman(_reliability(boot_b, boot_s))
    q = [50 * (1 - level), 50 * (1 + level)]
    ci = lambda x: tuple(float(v) for v in np.nanpercentile(x, q))   # noqa: E731
    exact = tuple(float(pearson_to_spearman(r)) for r in reliability_interval(errors, level))
    return VarianceComponents(len(errors), errors.shape[1], float(vb), float(vs),
                              ci(boot_b), ci(boot_s), ci(boot_c), exact)


def early_check_at(n_candidates: int) -> int:
    """After how many complete candidates a study should estimate its noise: ~15% of them,
    at least EARLY_LEAST (fewer say nothing), at most all."""
    return min(n_candidates, max(EARLY_LEAST, math.ceil(EARLY_FRACTION * n_candidates)))


def is_noisy(vc: VarianceComponents, threshold: float = CEILING_CANNOT_RANK) -> bool:
    """The predicted ceiling is below the threshold (the point estimate; the interval in the
    warning text says how sure that is)."""
    return not vc.ceiling >= threshold   # nan (no variance at all) is noisy too


def noise_warning(vc: VarianceComponents, threshold: float = CEILING_CANNOT_RANK) -> Optional[str]:
    """The early warning (None when the predicted ceiling reaches the threshold): what the
    estimate says and what to change."""
    if not is_noisy(vc, threshold):
        return None
    lo, hi = vc.ceiling_f_ci
    sure = ("even the interval's top is below it" if hi < threshold else
            "the interval still reaches above it, so more candidates may revise this")
    return (f"WARNING: the predicted noise ceiling is {vc.ceiling:+.2f} [{lo:+.2f}, {hi:+.2f}] "
            f"(exact interval) after {vc.n_arch} candidates, below {threshold} ({sure}): the "
            f"architectures of this budget differ by less than two trainings of one "
            f"architecture do (between-architecture variance {vc.var_between:.3g} vs seed-to-seed "
            f"{vc.var_seed:.3g} points^2), so the study cannot rank proxies. Make the "
            "differences larger than the noise: train longer (--epochs), on more images "
            "(--train_subset), validate on the whole test split (--val_subset), or widen the "
            "budget window (--tol) so the candidates differ more.")

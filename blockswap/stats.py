"""Rank statistics shared by the proxy ensembles and the study: average ranks, Spearman and
Kendall (scipy's definitions, on numpy alone), batched over bootstrap resamples, intervals and
permutation p-values."""
import math

import numpy as np


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties given the average of the ranks they span (scipy's 'average')."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _pair(x, y, name):
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} x values but {len(y)} y values")
    return x[None], y[None]


def spearman(x, y) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks. NaN when either side is
    constant or there are fewer than two points (as scipy.stats.spearmanr)."""
    x, y = _pair(x, y, "spearman")
    return float(batch_spearman(x, y)[0]) if x.shape[1] >= 2 else float("nan")


def kendall(x, y) -> float:
    """Kendall's tau-b (ties in either variable corrected, as scipy.stats.kendalltau). NaN when
    either side is constant or there are fewer than two points."""
    x, y = _pair(x, y, "kendall")
    return float(batch_kendall(x, y)[0]) if x.shape[1] >= 2 else float("nan")


def batch_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair of two (B, n) arrays (NaN where a row is constant)."""
    rx, ry = (np.apply_along_axis(rankdata, 1, a) for a in (x, y))
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    denom = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(1) / denom, np.nan)


def batch_kendall(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair of two (B, n) arrays (each pair counted twice)."""
    dx = np.sign(x[:, :, None] - x[:, None, :])
    dy = np.sign(y[:, :, None] - y[:, None, :])
    denom = np.sqrt((dx != 0).sum((1, 2)) * (dy != 0).sum((1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (dx * dy).sum((1, 2)) / denom, np.nan)


def chunked(batch_stat, x, y, chunk=100) -> np.ndarray:
    """batch_stat over (B, n) arrays in chunks of rows (its memory grows as chunk * n^2)."""
    return np.concatenate([batch_stat(x[i:i + chunk], y[i:i + chunk])
                           for i in range(0, len(x), chunk)])


def bootstrap_ci(batch_stat, x, y, n_boot=1000, seed=0):
    """95% percentile interval of a statistic over n_boot resamples of the candidates."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    values = chunked(batch_stat, x[idx], y[idx])
    values = values[np.isfinite(values)]
    return tuple(np.percentile(values, [2.5, 97.5])) if len(values) else (math.nan, math.nan)


def permutation_pvalue(x, y, n_perm=2000, seed=0) -> float:
    """Two-sided p-value of Spearman's rho against shuffled pairings ((hits + 1) / (n + 1))."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    observed = abs(spearman(x, y))
    if not np.isfinite(observed):
        return math.nan
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(y) for _ in range(n_perm)])
    hits = (np.abs(chunked(batch_spearman, np.broadcast_to(x, shuffled.shape), shuffled))
            >= observed - 1e-12).sum()
    return float((hits + 1) / (n_perm + 1))


def top_hit(score, error, frac=0.1) -> bool:
    """Does the proxy's top `frac` (at least one candidate) contain the lowest-error one?"""
    score, error = np.asarray(score, float), np.asarray(error, float)
    k = max(1, math.ceil(frac * len(score)))
    top = np.argsort(-np.where(np.isnan(score), -np.inf, score), kind="stable")[:k]
    return bool(np.argmin(error) in top)


def top_hit_rate(score, error, frac=0.1, n_boot=1000, seed=0) -> float:
    """How often top_hit holds over bootstrap resamples (the distinct candidates drawn)."""
    score, error = np.asarray(score, float), np.asarray(error, float)
    rng = np.random.default_rng(seed)
    draws = (np.unique(rng.integers(0, len(score), len(score))) for _ in range(n_boot))
    return float(np.mean([top_hit(score[i], error[i], frac) for i in draws]))


# --------------------------------------------------------------------------------------------
# The F distribution (variance.py's exact interval), on math alone: the library needs no scipy.
# --------------------------------------------------------------------------------------------

def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical
    Recipes, betacf), which converges fast for x < (a + 1) / (a + b + 2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),              # even step
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function (the beta distribution's CDF)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    # the other side converges fast there: I_x(a, b) = 1 - I_(1-x)(b, a)
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def f_cdf(value: float, d1: float, d2: float) -> float:
    """P(F <= value) for F with (d1, d2) degrees of freedom."""
    if value <= 0.0:
        return 0.0
    return regularized_beta(d1 / 2.0, d2 / 2.0, d1 * value / (d1 * value + d2))


def f_quantile(q: float, d1: float, d2: float) -> float:
    """The q-quantile of F(d1, d2) (scipy.stats.f.ppf), by bisection on the beta variable
    x = d1 F / (d1 F + d2) in (0, 1), where the CDF is I_x(d1/2, d2/2)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"f_quantile: q must be in (0, 1), got {q}")
    lo, hi = 0.0, 1.0
    for _ in range(200):   # to the last bit of a double
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if regularized_beta(d1 / 2.0, d2 / 2.0, mid) < q else (lo, mid)
    x = 0.5 * (lo + hi)
    return d2 * x / (d1 * (1.0 - x))

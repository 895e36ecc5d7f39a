"""study.py's statistics (intervals, p-values, top-10% hits, noise ceiling, stability) and a
tiny end-to-end study with two training and two scoring seeds."""
import itertools
import math

import numpy as np
import pandas as pd
import pytest

import study
from blockswap import stats
from blockswap.variance import CEILING_TRUSTED
from blockswap.stats import kendall, spearman


def test_batch_statistics_equal_the_one_pair_versions():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 5, size=(7, 12)).astype(float)       # ties
    y = x + rng.normal(size=(7, 12))
    x[2] = 1.0                                              # a constant row: NaN
    for batch, one in ((stats.batch_spearman, spearman), (stats.batch_kendall, kendall)):
        expect = [one(a, b) for a, b in zip(x, y)]
        assert np.allclose(batch(x, y), expect, equal_nan=True)
        assert np.allclose(stats.chunked(batch, x, y, chunk=3), expect, equal_nan=True)


def test_bootstrap_ci_is_deterministic_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    lo, hi = stats.bootstrap_ci(stats.batch_spearman, x, y, 500, seed=1)
    assert lo < spearman(x, y) < hi and -1 <= lo and hi <= 1
    assert (lo, hi) == stats.bootstrap_ci(stats.batch_spearman, x, y, 500, seed=1)
    assert stats.bootstrap_ci(stats.batch_kendall, x, 2 * x, 200) == (1.0, 1.0)   # perfect: every resample


def test_permutation_pvalue_against_exact_enumeration():
    x = np.array([1.0, 2, 3, 4, 5, 6])
    y = np.array([2.0, 1, 4, 3, 6, 5])
    observed = abs(spearman(x, y))
    perms = list(itertools.permutations(y))
    exact = np.mean([abs(spearman(x, p)) >= observed - 1e-12 for p in perms])
    assert stats.permutation_pvalue(x, y, n_perm=4000) == pytest.approx(exact, abs=0.025)
    assert math.isnan(stats.permutation_pvalue(x, np.ones(6)))


def test_top_hit_and_its_bootstrap_rate():
    error = np.array([5.0, 1, 3, 4, 2, 6, 7, 8, 9, 10, 11])     # candidate 1 is the best
    assert stats.top_hit([0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 1], error)        # k = 2: 1 ranks first
    assert not stats.top_hit([9, 0, 8, 7, 6, 5, 4, 3, 2, 1, 0], error)
    assert stats.top_hit_rate(-error, error, n_boot=200) == 1.0           # a perfect proxy
    assert stats.top_hit_rate(error, error, n_boot=200) < 0.2             # an inverted one


def _cfg(folder, **kw):
    base = dict(dataset="cifar10", data_loc=folder, wrn_depth=10, wrn_width=1, epochs=1,
                train_subset=100, val_subset=5, train_seeds=2, score_seeds=2, bootstrap=60,
                proxies="snip,synflow,jacob_cov,params")
    return study.StudyConfig(**{**base, **kw})


def test_summary_states_images_used_noise_ceiling_warning_and_stability(tiny_imagefolder):
    rng = np.random.default_rng(0)
    truth = np.arange(20.0)
    df = pd.DataFrame({"val_error_0": truth + rng.normal(0, 8, 20),
                       "val_error_1": truth + rng.normal(0, 8, 20), "params": rng.random(20),
                       "snip": truth[::-1].copy(), "snip@1": truth[::-1] + 0.1,
                       "synflow": rng.random(20), "jacob_cov": rng.random(20),
                       "synflow@1": rng.random(20), "jacob_cov@1": rng.random(20)})
    df["val_error"] = (df["val_error_0"] + df["val_error_1"]) / 2
    ceiling = spearman(df["val_error_0"], df["val_error_1"])
    assert study.noise_ceiling(df, _cfg(tiny_imagefolder)) == pytest.approx(ceiling)
    text = study.report(df, _cfg(tiny_imagefolder), 60)
    assert "on 40 training images (asked 100), validation on 5" in text   # 40 in the folder
    assert f"Noise ceiling (seed-to-seed Spearman of the trained errors): {ceiling:+.2f}" in text
    assert ("WARNING" in text) == (ceiling < CEILING_TRUSTED) and CEILING_TRUSTED == 0.7
    assert "| vote |" in text                     # its three proxies are there: added
    rho = spearman(df["snip"], df["val_error"])
    assert f"| snip | {rho:+.2f} [" in text
    assert "Proxy stability over 2 initialisations" in text and "snip +1.00" in text
    quiet = study.report(df.assign(val_error_1=df["val_error_0"]),
                         _cfg(tiny_imagefolder, proxies="snip"), 60)
    assert "+1.00 measured." in quiet and "WARNING" not in quiet
    # the variance components of the whole study, beside the measured ceiling
    assert "Predicted noise ceiling (variance components of 20 candidates x 2 seeds)" in text
    assert "seed-to-seed 0 [0, 0]" in quiet
    # a seed whose candidates all tie (tiny data): the ceiling is undefined, said, and warned of
    tied = study.report(df.assign(val_error_1=50.0), _cfg(tiny_imagefolder, proxies="snip"), 60)
    assert "nan" not in tied.split("Predicted")[0] and "undefined (a training seed" in tied
    assert "WARNING: the noise ceiling" in tied


def test_study_with_two_training_and_two_scoring_seeds(tmp_path, tiny_imagefolder, capsys):
    argv = ["cifar10", "--data_loc", tiny_imagefolder, "--wrn_depth", "10", "--wrn_width", "1",
            "--candidates", "3", "--epochs", "1", "--batch_size", "8", "--train_subset", "16",
            "--val_subset", "10", "--out", str(tmp_path), "--proxies", "snip,params,rank:snip+params",
            "--train_seeds", "2", "--score_seeds", "2", "--bootstrap", "50"]
    df = study.main(study.get_args_parser().parse_args(argv))
    assert list(df.columns) == ["index", "convs", "params", "macs", "snip", "snip@1",
                                "val_error_0", "val_error_1", "val_error", "train_seconds"]
    assert np.allclose(df["val_error"], (df["val_error_0"] + df["val_error_1"]) / 2)
    assert (df["snip"] != df["snip@1"]).all()                 # another initialisation
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.t7")) == sorted(
        f"candidate_{i}{s}.t7" for i in range(3) for s in ("", "_seed1"))
    out = capsys.readouterr().out
    assert "| rank:snip+params |" in out and "Noise ceiling" in out
    assert "on 16 training images (asked 16)" in out

"""Exact uniform sampling within a budget window (funcs.sample_genotypes and kin), checked by
brute-force enumeration on small tables and at the extremes of the WRN-40-2 table."""
import itertools
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from blockswap.count_ops import CostTable, count_params
from blockswap.funcs import Budget, budget_window, count_genotypes, sample_codes, sample_genotypes
from models import Network, UserError, WideResNet


def toy_table(P=4, T=5, seed=1):
    """A duck-typed cost table small enough to enumerate (T^P genotypes)."""
    rng = np.random.default_rng(seed)
    return SimpleNamespace(params=rng.integers(1, 50, (P, T)) * 8, base_params=100,
                           macs=rng.integers(1, 50, (P, T)) * 3, base_macs=7,
                           names=[f"t{t}" for t in range(T)], n_positions=P)


def enumerate_all(table):
    P, T = table.params.shape
    codes = np.array(list(itertools.product(range(T), repeat=P)))
    pos = np.arange(P)
    return (codes, table.base_params + table.params[pos, codes].sum(1),
            table.base_macs + table.macs[pos, codes].sum(1))


def in_window(values, goal, tol):
    lo, hi = budget_window(goal, tol)
    return (values >= lo) & (values <= hi)


@pytest.fixture(scope="module")
def wrn40():
    return CostTable.for_network(Network("wrn", 40, 2, 10))


def test_budget_window_is_inclusive():
    assert budget_window(800_000) == (780_000, 820_000)
    assert budget_window(1000, 0.0) == (1000, 1000)


@pytest.mark.parametrize("quantile", [0.02, 0.5, 0.97])
def test_counts_and_support_equal_enumeration(quantile):
    table = toy_table()
    codes, params, _ = enumerate_all(table)
    goal = int(np.quantile(params, quantile))
    inside = in_window(params, goal, 0.05)
    assert count_genotypes(table, Budget(goal, tol=0.05)) == inside.sum()
    drawn = sample_codes(table, int(inside.sum()), Budget(goal, tol=0.05), seed=3)
    assert set(map(tuple, drawn)) == set(map(tuple, codes[inside]))   # all of them, no more


def test_draws_are_uniform_within_window():
    table = toy_table()
    codes, params, _ = enumerate_all(table)
    goal = int(np.median(params))
    inside = in_window(params, goal, 0.05)
    n = 200 * int(inside.sum())
    drawn = sample_codes(table, n, Budget(goal, tol=0.05), seed=0, distinct=False)
    counts = np.array(list(Counter(map(tuple, drawn)).values()))
    assert len(counts) == inside.sum()
    expected = n / inside.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    df = len(counts) - 1
    assert chi2 < df + 6 * np.sqrt(2 * df)     # fixed seed; a biased sampler is far above


def test_both_goals_sample_the_intersection():
    table = toy_table()
    codes, params, macs = enumerate_all(table)
    pgoal, mgoal = int(np.median(params)), int(np.median(macs))
    both = in_window(params, pgoal, 0.1) & in_window(macs, mgoal, 0.1)
    assert 0 < both.sum() < in_window(params, pgoal, 0.1).sum()
    drawn = sample_codes(table, int(both.sum()), Budget(pgoal, mgoal, tol=0.1), seed=5)
    assert set(map(tuple, drawn)) == set(map(tuple, codes[both]))


def test_prefix_stable_distinct_and_seeded():
    table = toy_table(6, 6)
    a = sample_codes(table, 60, Budget(1000, tol=0.1), seed=7)
    assert len(set(map(tuple, a))) == 60
    np.testing.assert_array_equal(sample_codes(table, 25, Budget(1000, tol=0.1), seed=7), a[:25])
    assert not np.array_equal(sample_codes(table, 25, Budget(1000, tol=0.1), seed=8), a[:25])


def test_too_few_distinct_is_an_error():
    table = toy_table()
    _, params, _ = enumerate_all(table)
    goal = int(np.median(params))
    n = int(in_window(params, goal, 0.05).sum())
    with pytest.raises(UserError, match=f"only {n} distinct genotypes"):
        sample_codes(table, n + 1, Budget(goal, tol=0.05))


@pytest.mark.parametrize("goal", [162_000, 800_000, 1_600_000])
def test_wrn40_samples_stay_in_window(wrn40, goal):
    genotypes = sample_genotypes(wrn40, 300, Budget(param_goal=goal), seed=1)
    params, macs = wrn40.cost_many(np.stack([wrn40.encode(g) for g in genotypes]))
    lo, hi = budget_window(goal)
    assert params.min() >= lo and params.max() <= hi
    assert len({tuple(g) for g in genotypes}) == 300
    assert count_params(WideResNet(40, 2, genotypes[0])) == params[0]   # table = real net


def test_wrn40_extremes_are_exact(wrn40):
    """At the cheapest and dearest network with a zero-width window the count is the number of
    genotypes attaining the extreme (types tied at every position multiply)."""
    for pick in (np.min, np.max):
        best = pick(wrn40.params, axis=1)
        goal = int(wrn40.base_params + best.sum())
        ties = int(np.prod((wrn40.params == best[:, None]).sum(1)))
        assert count_genotypes(wrn40, Budget(goal, tol=0.0)) == ties
        g = sample_genotypes(wrn40, ties, Budget(goal, tol=0.0))
        assert all(wrn40.cost(x)[0] == goal for x in g)
    # the 2.5% window at the smallest network: every draw in it
    smallest = int(wrn40.base_params + wrn40.params.min(1).sum())
    g = sample_genotypes(wrn40, 200, Budget(smallest))
    assert min(wrn40.cost(x)[0] for x in g) >= budget_window(smallest)[0]


def test_wrn40_mac_goal_and_both(wrn40):
    g = sample_genotypes(wrn40, 100, Budget(800_000, 100_000_000), seed=2)
    params, macs = wrn40.cost_many(np.stack([wrn40.encode(x) for x in g]))
    assert params.min() >= 780_000 and params.max() <= 820_000
    assert macs.min() >= 97_500_000 and macs.max() <= 102_500_000


def test_infeasible_budget_states_the_range(wrn40):
    lo = int(wrn40.base_params + wrn40.params.min(1).sum())
    with pytest.raises(UserError, match=f"range from {lo:,} to .* the goal must lie between"):
        sample_genotypes(wrn40, 10, Budget(param_goal=10_000))
    with pytest.raises(UserError, match="MACs"):
        sample_genotypes(wrn40, 10, Budget(mac_goal=10 ** 12))


def test_no_goal_is_uniform_over_everything(wrn40):
    g = sample_genotypes(wrn40, 500, seed=0)
    names = Counter(n for x in g for n in x)
    assert set(names) == set(wrn40.names)
    assert all(len(x) == 18 for x in g)

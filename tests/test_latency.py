"""Latency tables (latency.py) and latency goals in fisher_rank.py, on WRN-10-1.

Measuring is tested once with few repeats; the search tests read a synthetic table written
into the cache, so they are deterministic and need no timing."""
import itertools
import os

import numpy as np
import pandas as pd
import pytest
import torch

import fisher_rank
from conftest import run
from blockswap import latency
from blockswap.count_ops import CostTable
from blockswap.funcs import Budget, QuantisedLatency, budget_window, count_genotypes, sample_codes
from blockswap.cli import run_cli
from models import Network, UserError

NAMES = ["Conv", "DConv", "ConvB2", "G8B2"]
FAST = dict(show=False, calibration=2)


def fast_timing(batch=1):
    return latency.Timing("cpu", batch, threads=1, clock="cpu", warmup=1, repeats=2)


@pytest.fixture(scope="module")
def family():
    return latency.timed_network(Network("wrn", 10, 1))


@pytest.fixture(scope="module")
def ct():
    return CostTable.for_network(Network("wrn", 10, 1, 10), names=NAMES)


@pytest.fixture(autouse=True)
def cached_cost_table(monkeypatch, ct):
    """fisher_rank builds the same WRN-10-1 cost table in every run: reuse one (seconds)."""
    monkeypatch.setattr(fisher_rank, "cost_table", lambda cfg, num_classes: ct)


def synthetic_table(cache_dir, family, names=NAMES, threads=1, batch=1, seed=0):
    """A table with made-up times, written where load_or_measure looks for it."""
    key = latency.TableKey(family.label, latency.device_name(torch.device("cpu")),
                           torch.__version__, threads, batch, "wall")
    ms = np.random.default_rng(seed).uniform(0.1, 1.0, (len(family.slots), len(names)))
    table = latency.LatencyTable(key, names, ms, [("stem", 0.05), ("head", 0.02)], 1.1)
    os.makedirs(cache_dir, exist_ok=True)
    table.to_frame(family.slots).to_csv(os.path.join(cache_dir, key.file_name()), index=False)
    return table


def all_codes(table):
    return np.array(list(itertools.product(range(len(table.names)), repeat=table.n_positions)))


def test_measured_table_shape_and_cache(family, tmp_path, monkeypatch):
    t = latency.load_or_measure(family, NAMES, fast_timing(), cache_dir=str(tmp_path), **FAST)
    assert t.ms.shape == (3, len(NAMES)) and (t.ms > 0).all() and t.fixed_ms > 0
    assert t.scale > 0 and [p for p, _ in t.parts] == ["stem", "head"]
    path = tmp_path / t.key.file_name()
    df = pd.read_csv(path)
    assert (df["threads"] == 1).all() and (df["batch"] == 1).all()
    assert (df["torch"] == torch.__version__).all()
    assert (df["device"] == latency.device_name(torch.device("cpu"))).all()
    # Same key: read back, not measured again, and the same numbers.
    monkeypatch.setattr(latency, "measure_table", lambda *a, **k: pytest.fail("re-measured"))
    again = latency.load_or_measure(family, NAMES, fast_timing(), cache_dir=str(tmp_path), **FAST)
    np.testing.assert_allclose(again.ms, t.ms)
    assert again.identity() == t.identity()
    # Another batch size, or a file whose facts differ from its name: measured afresh.
    for tamper in (False, True):
        if tamper:
            df.assign(threads=2).to_csv(path, index=False)
        with pytest.raises(pytest.fail.Exception, match="re-measured"):
            latency.load_or_measure(family, NAMES, fast_timing(1 if tamper else 2),
                                    cache_dir=str(tmp_path), **FAST)


def test_quantised_window_matches_enumeration(family, ct, tmp_path):
    table = synthetic_table(str(tmp_path), family)
    codes = all_codes(table)                                   # 4^3 genotypes
    predicted = table.predict_many(codes)
    goal, tol = float(np.median(predicted)), 0.1
    q = QuantisedLatency(table, goal)
    # quantisation moves a prediction by under 1% of the goal
    assert np.abs(q.units_many(codes) * q.unit_ms - predicted).max() < 0.01 * goal
    inside = q.in_window(codes, tol)
    assert 0 < inside.sum() < len(codes)
    assert (np.abs(predicted[inside] - goal) <= goal * tol + 0.01 * goal).all()
    assert count_genotypes(ct, Budget(tol=tol, latency=q)) == inside.sum()
    drawn = sample_codes(ct, int(inside.sum()), Budget(tol=tol, latency=q), seed=2)
    assert set(map(tuple, drawn)) == set(map(tuple, codes[inside]))


def test_latency_and_param_goal_sample_the_intersection(family, ct, tmp_path):
    table = synthetic_table(str(tmp_path), family)
    codes = all_codes(table)
    params, _ = ct.cost_many(codes)
    pgoal, lgoal, tol = int(np.median(params)), float(np.median(table.predict_many(codes))), 0.2
    q = QuantisedLatency(table, lgoal)
    lo, hi = budget_window(pgoal, tol)
    both = q.in_window(codes, tol) & (params >= lo) & (params <= hi)
    assert 0 < both.sum() < q.in_window(codes, tol).sum()
    drawn = sample_codes(ct, int(both.sum()), Budget(pgoal, tol=tol, latency=q), seed=1)
    assert set(map(tuple, drawn)) == set(map(tuple, codes[both]))


# --------------------------------------------------------------------------------------------
# fisher_rank.py with --latency_goal
# --------------------------------------------------------------------------------------------

def argv(data, out, goal, *extra):
    return ["cifar10", f"--data_loc={data}", "--wrn_depth", "10", "--wrn_width", "1",
            "--latency_goal", str(goal), "--threads", "1", "--tol", "0.2", "--samples", "4",
            "--batch_size", "8", "--blocks", ",".join(NAMES), "--device", "cpu",
            "--results_dir", str(out / "results"), "--genotype_dir", str(out / "genotypes"),
            "--save_file", str(out / "archs.csv"), "--no-plot", *extra]


@pytest.fixture
def table_and_goal(family, tmp_path):
    table = synthetic_table(str(tmp_path / "results" / "latency"), family)
    return table, float(np.median(table.predict_many(all_codes(table))))


def check_rows(df, table, goal, tol=0.2):
    expected = [table.predict(eval(c)) for c in df["convs"]]
    np.testing.assert_allclose(df["latency_ms"], expected, rtol=1e-4)
    q = QuantisedLatency(table, goal)
    assert q.in_window(table.codes([eval(c) for c in df["convs"]]), tol).all()


def test_search_with_latency_goal_and_resume(tiny_imagefolder, tmp_path, table_and_goal):
    table, goal = table_and_goal
    s = run(fisher_rank, *argv(tiny_imagefolder, tmp_path, goal, "--save_file", "none"))
    df = pd.read_csv(s["results"])
    assert list(df.columns) == ["index", "convs", "params", "macs", "latency_ms", "fisher"]
    assert f"lat{goal:g}ms" in s["results"] and len(df) == 4
    check_rows(df, table, goal)
    from blockswap.plots import plot_search          # the search plot has a latency panel
    png = plot_search(s["results"], str(tmp_path / "search.png"))   # goal from the settings
    assert os.path.getsize(png) > 0
    text = open(s["results"]).read()
    with open(s["results"], "w") as f:          # killed after two candidates
        f.write("".join(text.splitlines(keepends=True)[:3]))
    again = run(fisher_rank, *argv(tiny_imagefolder, tmp_path, goal, "--save_file", "none"))
    assert again["n_scored"] == 2 and open(s["results"]).read() == text
    assert again["latency_ms"] == pytest.approx(table.predict(again["best_genotype"]), rel=1e-4)
    # a re-measured table is another table: resuming on it is refused
    synthetic_table(str(tmp_path / "results" / "latency"), latency.timed_network(Network("wrn", 10, 1)),
                    seed=5)
    with pytest.raises(UserError, match="latency_table"):
        run(fisher_rank, *argv(tiny_imagefolder, tmp_path, goal, "--save_file", "none"))


def test_generate_random_with_latency_and_param_goal(tiny_imagefolder, tmp_path, ct,
                                                     table_and_goal):
    table, goal = table_and_goal
    params, _ = ct.cost_many(all_codes(table))
    pgoal = int(np.median(params))
    s = run(fisher_rank, *argv(tiny_imagefolder, tmp_path, goal, "--generate_random", "--param_goal", str(pgoal),
            "--samples", "3"))
    df = pd.read_csv(s["save_file"])
    assert {"convs", "params", "macs", "latency_ms"} <= set(df.columns) and len(df) == 3
    check_rows(df, table, goal)
    lo, hi = budget_window(pgoal, 0.2)
    assert df["params"].between(lo, hi).all()
    # the archs file is then scored as it is (its rows meet both windows)
    scored = pd.read_csv(run(fisher_rank, *argv(tiny_imagefolder, tmp_path, goal, "--param_goal", str(pgoal),
                             "--samples", "3"))["results"])
    assert list(scored["convs"]) == list(df["convs"])


def test_infeasible_latency_goal_is_one_line(tiny_imagefolder, tmp_path, table_and_goal,
                                             capsys):
    table, _ = table_and_goal
    lo, hi = table.range_ms()
    with pytest.raises(SystemExit) as e:
        run_cli(fisher_rank.main, fisher_rank.get_args_parser(),
                argv(tiny_imagefolder, tmp_path, lo / 2, "--save_file", "none"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "predicted latency" in err[0] and f"{lo:.3g} to {hi:.3g} ms" in err[0]
    assert not os.path.exists(tmp_path / "results" / f"wrn10-1_fisher_at_lat{lo / 2:g}ms.csv")


def test_fastest_of_passes_keeps_each_items_fastest_pass():
    """Passes run one after another over all items (a slow spell hits one pass of an item),
    and each item keeps its minimum; an item whose two fastest passes disagree by more than
    `agree` gets more passes (only it), until two agree or max_passes is reached."""
    calls, times = [], iter([5.0, 9.0, 7.0,  4.1, 12.0, 7.1,  4.0, 3.0, 30.0,
                             9.0,               # b: 3.0 and 9.0 disagree: one more pass
                             3.05])             # b again: 3.0 and 3.05 agree

    def measure(item):
        calls.append(item)
        return next(times)
    assert latency.fastest_of_passes(measure, ["a", "b", "c"], passes=3, agree=0.05) == \
        [4.0, 3.0, 7.0]
    assert calls == ["a", "b", "c"] * 3 + ["b", "b"]
    calls.clear()
    times = iter([1.0, 2.0, 3.0, 4.0])          # never agree: stops at max_passes
    assert latency.fastest_of_passes(measure, ["x"], passes=2, agree=0.05, max_passes=4) == [1.0]
    assert calls == ["x"] * 4

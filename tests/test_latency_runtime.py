"""--latency_runtime: latency tables timed in onnxruntime (latency.RUNTIMES), on WRN-10-1."""
import dataclasses
import math
import os
import sys

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import torch.nn as nn

from blockswap import count_ops
from blockswap import latency
from models import Network, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["Conv", "DConv"]


def timing(runtime, batch=1):
    return latency.Timing("cpu", batch, threads=1, clock="cpu", warmup=1, repeats=2,
                          runtime=runtime)


@pytest.fixture(scope="module")
def family():
    return latency.timed_network(Network("wrn", 10, 1))


def test_the_key_names_the_runtime_and_its_version(family):
    torch_key = latency.table_key(family, timing("torch"), 1)
    ort_key = latency.table_key(family, timing("onnxruntime"), 1)
    assert torch_key.runtime == "torch" and ort_key.runtime == f"onnxruntime-{ort.__version__}"
    assert ort_key.file_name() != torch_key.file_name()
    assert ort_key.file_name().endswith(f"_b1_cpu_onnxruntime-{ort.__version__}.csv")
    # a torch table keeps the name it had before runtimes joined the key
    assert torch_key.file_name() == (f"wrn10-1-c10_{torch_key.file_name().split('_')[1]}_torch"
                                     f"{torch.__version__}_t1_b1_cpu.csv")
    assert ort.__version__ in ort_key.describe()


def test_a_torch_table_written_before_the_runtime_column_is_still_read(family, tmp_path):
    key = latency.table_key(family, timing("torch"), 1)
    ms = np.arange(1, 1 + len(family.slots) * 2, dtype=float).reshape(-1, 2)
    table = latency.LatencyTable(key, NAMES, ms, [("stem", 0.5), ("head", 0.25)], 1.5)
    path = tmp_path / key.file_name()
    table.to_frame(family.slots).drop(columns="runtime").to_csv(path, index=False)
    again = latency.read_table(str(path), key, NAMES, len(family.slots))
    assert again is not None and again.identity() == table.identity()
    other = latency.table_key(family, timing("onnxruntime"), 1)
    assert latency.read_table(str(path), other, NAMES, len(family.slots)) is None


@pytest.fixture(scope="module")
def ort_table(family, tmp_path_factory):
    """(cache folder, table): an onnxruntime table, measured once for the module (a dozen
    exports)."""
    folder = tmp_path_factory.mktemp("latency")
    return folder, latency.load_or_measure(family, NAMES, timing("onnxruntime"), str(folder),
                                           show=False, calibration=1)


def test_onnxruntime_table_predicts_and_is_cached(family, ort_table, monkeypatch):
    tmp_path, t = ort_table
    genotype = ["DConv", "Conv", "DConv"]
    assert math.isfinite(t.predict(genotype)) and t.predict(genotype) > 0
    # an item faster than an empty session call is clamped to 0 after the call cost is
    # taken off (CI saw a tiny DConv land there), so: non-negative, and not all zero
    assert (t.ms >= 0).all() and t.ms.sum() > 0 and t.fixed_ms > 0 and t.scale > 0
    df = pd.read_csv(tmp_path / t.key.file_name())
    assert (df["runtime"] == f"onnxruntime-{ort.__version__}").all()
    monkeypatch.setattr(latency, "measure_table", lambda *a, **k: pytest.fail("re-measured"))
    again = latency.load_or_measure(family, NAMES, timing("onnxruntime"), str(tmp_path),
                                    show=False, calibration=1)
    assert again.identity() == t.identity()
    with pytest.raises(pytest.fail.Exception, match="re-measured"):   # torch: another table
        latency.load_or_measure(family, NAMES, timing("torch"), str(tmp_path), show=False)


def test_each_item_is_prepared_once_for_all_its_passes(family, monkeypatch, tmp_path):
    made = []
    real = latency.RUNTIMES["torch"]
    monkeypatch.setitem(latency.RUNTIMES, "torch", latency.LatencyRuntime(
        lambda m, shape, t: made.append(shape) or real.prepare(m, shape, t), real.version))
    latency.measure_table(family, NAMES, timing("torch"), show=False, calibration=2)
    distinct = len(set(family.slots))
    assert len(made) == distinct * len(NAMES) + len(family.fixed) + 2


def test_onnxruntime_runs_on_the_cpu_only():
    with pytest.raises(UserError, match="--latency_device cpu"):
        latency.Timing("cuda", runtime="onnxruntime").prepare(nn.Conv2d(3, 3, 3), (3, 8, 8))
    with pytest.raises(UserError, match="unknown latency runtime"):
        latency.Timing("cpu", runtime="tensorrt")
    # the flag: a search on a GPU times its onnxruntime table on the CPU unless told otherwise
    args = count_ops.get_args_parser().parse_args(["--latency_runtime", "onnxruntime"])
    t = latency.timing_from_args(args, default_device="cuda")
    assert t.device == torch.device("cpu") and t.runtime == "onnxruntime"
    args = count_ops.get_args_parser().parse_args([])
    assert latency.timing_from_args(args, "cpu").runtime == "torch"


def test_count_ops_latency_in_onnxruntime(ort_table, capsys, monkeypatch):
    folder, table = ort_table
    args = count_ops.get_args_parser().parse_args(
        ["--wrn_depth", "10", "--wrn_width", "1", "--conv", "DConv", "--latency",
         "--latency_runtime", "onnxruntime", "--threads", "1", "--latency_clock", "cpu",
         "--latency_dir", str(folder)])
    # the module's table (two block types) is the one count_ops finds in the cache: the
    # family's search space made those two
    from models.archs import ARCHS
    monkeypatch.setitem(ARCHS, "wrn", dataclasses.replace(ARCHS["wrn"], space=tuple(NAMES)))
    monkeypatch.setattr(latency, "measure_table", lambda *a, **k: pytest.fail("re-measured"))
    count_ops.main(args)
    out = capsys.readouterr().out
    assert f"onnxruntime-{ort.__version__}: predicted {table.predict(['DConv'] * 3):.3f} ms" in out


def test_bench_latency_quick_in_onnxruntime(family, tmp_path, capsys):
    """bench_latency.py --quick --runtime onnxruntime, its table given (made-up times, where
    the bench looks for it), so only its six networks are exported and timed."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_latency as B
    key = latency.table_key(family, timing("onnxruntime"), 1)
    ms = np.random.default_rng(0).uniform(0.01, 0.1, (len(family.slots), len(B.QUICK_NAMES)))
    table = latency.LatencyTable(key, B.QUICK_NAMES, ms, [("stem", 0.01), ("head", 0.01)])
    table.to_frame(family.slots).to_csv(tmp_path / key.file_name(), index=False)
    B.main(B.get_args_parser().parse_args(
        ["--quick", "--runtime", "onnxruntime", "--threads", "1", "--clock", "cpu",
         "--cache_dir", str(tmp_path), "--out", str(tmp_path / "q.png")]))
    out = capsys.readouterr().out
    assert f"table {key.file_name()}" in out and "window calibrated: n 3" in out
    df = pd.read_csv(tmp_path / "q.csv")
    assert len(df) == 6 and (df["measured_ms"] > 0).all()


def test_onnxruntime_call_cost_is_counted_once_per_network(family, ort_table):
    """Each item of an onnxruntime table is timed in its own session call, a network runs in
    one: the per-call cost (an Identity session on the item's input) is taken off every item
    and counted once, as the fixed part 'call'; eager torch tables have no such part."""
    _, table = ort_table
    parts = dict(table.parts)
    assert latency.CALL_PART in parts and parts[latency.CALL_PART] > 0
    assert (table.ms >= 0).all()
    assert latency.RUNTIMES["torch"].call_cost is None
    fixed = [("stem", 1.0)]
    same = latency._without_call_cost(family, timing("torch"), fixed, {"x": 2.0})
    assert same == (fixed, {"x": 2.0})


def test_the_call_cost_is_taken_off_each_item_clamped_at_zero_and_added_once(family,
                                                                             monkeypatch):
    """Exact arithmetic of _without_call_cost, with a fake runtime whose per-call cost is
    0.5 ms on every shape: 1.0 -> 0.5, 2.0 -> 1.5, 0.3 -> 0 (never negative), plus one
    'call' part of 0.5."""
    seen = []
    fake = latency.LatencyRuntime(None, lambda: "fake",
                                  lambda shape, t: seen.append(tuple(shape)) or 0.5)
    monkeypatch.setitem(latency.RUNTIMES, "onnxruntime", fake)
    part = next(iter(family.fixed))
    slot = family.slots[0]
    fixed, per_slot = latency._without_call_cost(
        family, timing("onnxruntime"), [(part, 1.0)],
        {(slot, "Conv"): 2.0, (slot, "DConv"): 0.3})
    assert fixed == [(part, 0.5), (latency.CALL_PART, 0.5)]
    assert per_slot == {(slot, "Conv"): 1.5, (slot, "DConv"): 0.0}
    # one timing per distinct shape (the part's input, the slot's input, the image), cached
    image = (3, family.image_size, family.image_size)
    assert image in seen and len(seen) == len(set(seen)) >= 2

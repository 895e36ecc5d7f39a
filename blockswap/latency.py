"""Inference latency of genotypes from a measured lookup table (as FBNet and ProxylessNAS do).

A network's latency is predicted as its fixed parts (stem, head) plus one entry per residual
block, each the median time of that block type at that position measured alone, in place:
the residual block with the position's channels, stride and input size, in eval mode, without
gradients, at the table's batch size and thread count. Positions of one group past the first
share their geometry (models.blocks.BlockSlot), so each distinct slot is timed once.

A table is cached as a CSV named after, and holding, what it depends on: network family,
device name, torch version, threads, batch size, clock, and the runtime that ran the items
(RUNTIMES: eager torch, or each item exported to ONNX and run in onnxruntime, with its
version). It is reused when those match.

For the exact sampler (funcs.WindowCounts, which works on integers) the table is quantised to
a unit of goal / (100 (positions + 1)): rounding each of the positions + 1 entries moves a sum
by at most half a unit each, so a predicted latency is off by under 0.5% of the goal.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from blockswap.cli import at_least, progress as progress_bar
from blockswap.files import atomic_write
from models.archs import Network
from models.blocks import BlockSlot, UserError, build_block, get_block_type

WARMUP, REPEATS = 5, 25   # per timed module; the median of REPEATS after WARMUP calls
# Each item (block, fixed part, network) is timed in PASSES separate passes over all items and
# keeps its fastest median: this machine has slow spells (the same network, timed twice in a
# row, read 7.3 then 13.9 ms) that last longer than one item's timing, and they only add time.
PASSES = 3
# ... and an item whose two fastest passes differ by more than AGREE gets more passes, up to
# MAX_PASSES in all (a spell that outlasted one pass of it).
AGREE, MAX_PASSES = 0.05, 8
CALIBRATION = 16   # random whole networks the table's scale is fitted on

# 'wall': elapsed time, the latency a user sees. 'cpu': this process's CPU time, for a shared
# CPU: there a run longer than the scheduler's time slice waits for other processes, so
# wall times of whole networks grow with the machine's load while those of single blocks
# (shorter than a slice) do not, and the sum stops predicting the whole. With one thread,
# CPU time is the wall time an idle machine would show. CUDA is always timed by the wall.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# --------------------------------------------------------------------------------------------
# Runtimes: what runs a timed module
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LatencyRuntime:
    """What runs the timed modules. prepare(module, shape, timing) -> a callable of an input
    batch on timing.device (shape: the input without the batch dimension); made once per item
    and reused by every pass. version() names the runtime in a table's key ('torch': its
    version is the key's torch field)."""
    prepare: Callable
    version: Callable[[], str]
    # call_cost(shape, timing) -> ms: what every call of a prepared item costs beyond its
    # operators (None: nothing to take off). A table times each item in its own call, a
    # network runs in one: the cost is taken off every item and counted once, as a fixed part.
    call_cost: Optional[Callable] = None
    cpu_only: bool = False        # times on the CPU only (Timing refuses another device)


def _torch_prepare(module: nn.Module, shape, timing) -> Callable:
    return module.to(timing.device).eval()


def _onnxruntime_prepare(module: nn.Module, shape, timing) -> Callable:
    from blockswap.onnx_export import ort_callable   # here: onnx loads only for onnxruntime tables
    # torch's thread count when none is asked for, so both runtimes get the same threads
    return ort_callable(module, shape, timing.threads or torch.get_num_threads())


def _onnxruntime_call_cost(shape, timing) -> float:
    from blockswap.onnx_export import identity_callable
    return timing.time(identity_callable(shape, timing.threads or torch.get_num_threads()),
                       shape)


def _onnxruntime_version() -> str:
    import onnxruntime
    return f"onnxruntime-{onnxruntime.__version__}"


RUNTIMES: Dict[str, LatencyRuntime] = {
    "torch": LatencyRuntime(_torch_prepare, lambda: "torch"),
    "onnxruntime": LatencyRuntime(_onnxruntime_prepare, _onnxruntime_version,
                                  _onnxruntime_call_cost, cpu_only=True),
}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    """What the table is keyed by: the GPU's name, else the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return device.type


@contextlib.contextmanager
def thread_count(threads: Optional[int]):
    """Pin torch's intra-op threads for the body (None: leave the default)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_ms(fn: Callable, x: torch.Tensor, warmup: int = WARMUP, repeats: int = REPEATS,
            clock: str = "wall") -> float:
    """Median time of fn(x) in milliseconds on `clock` (CLOCKS), synchronised on CUDA."""
    now = CLOCKS["wall" if x.device.type == "cuda" else clock]
    for _ in range(warmup):
        fn(x)
    _sync(x.device)
    times = []
    for _ in range(repeats):
        t0 = now()
        fn(x)
        _sync(x.device)
        times.append(now() - t0)
    return 1000 * statistics.median(times)


def fastest_of_passes(measure: Callable, items: Sequence, passes: int = PASSES,
                      progress: Optional[Callable] = None, agree: float = AGREE,
                      max_passes: int = MAX_PASSES) -> List[float]:
    """[min over passes of measure(item)] per item. The passes run one after another over all
    items, so a slow spell of the machine hits one pass of an item, not all of them. An item
    whose fastest time is not confirmed by a second pass within `agree` (relative) was timed
    in a spell more than once: it gets more passes, up to `max_passes`, until two agree."""
    times: List[List[float]] = [[] for _ in items]

    def one_pass(indices, show):
        for i in indices:
            times[i].append(measure(items[i]))
            if progress and show:    # a bar counts the planned passes, not the extra ones
                progress()
    for _ in range(passes):
        one_pass(range(len(items)), True)
    for _ in range(max_passes - passes):
        unsettled = [i for i, t in enumerate(times) if not _confirmed(t, agree)]
        if not unsettled:
            break
        one_pass(unsettled, False)
    return [min(t) for t in times]


def _confirmed(times: Sequence[float], agree: float) -> bool:
    """The two fastest of `times` lie within `agree` of each other."""
    if len(times) < 2:
        return True
    first, second = sorted(times)[:2]
    return second <= first * (1 + agree)


@dataclass(frozen=True)
class Timing:
    """How latency is timed: on which device, at which batch size and thread count (None:
    torch's own), by which clock (CLOCKS), with how many warm-up and timed calls per item,
    in which runtime (RUNTIMES)."""
    device: torch.device
    batch: int = 1
    threads: Optional[int] = None
    clock: str = "wall"
    warmup: int = WARMUP
    repeats: int = REPEATS
    runtime: str = "torch"

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))
        if self.clock not in CLOCKS:
            raise UserError(f"unknown latency clock {self.clock!r}; valid: " + ", ".join(CLOCKS))
        if self.runtime not in RUNTIMES:
            raise UserError(f"unknown latency runtime {self.runtime!r}; valid: "
                            + ", ".join(RUNTIMES))
        if RUNTIMES[self.runtime].cpu_only and self.device.type != "cpu":
            raise UserError(f"--latency_runtime {self.runtime} times on the CPU (the installed "
                            f"{self.runtime} runs there), not on {self.device}; pass "
                            "--latency_device cpu")

    def prepare(self, module: nn.Module, shape: Sequence[int]) -> Callable:
        """`module` made ready to time in this runtime, on inputs of `shape` (no batch)."""
        return RUNTIMES[self.runtime].prepare(module, tuple(shape), self)

    def time(self, fn: Callable, shape: Sequence[int]) -> float:
        """Median ms of fn on a random batch of `shape` (without the batch dimension)."""
        return time_ms(fn, torch.randn(self.batch, *shape, device=self.device), self.warmup,
                       self.repeats, self.clock)

    def lighter(self) -> "Timing":
        """Fewer calls, for whole networks (each call already spans many blocks)."""
        return dataclasses.replace(self, warmup=max(1, self.warmup // 2),
                                   repeats=max(3, self.repeats // 3))


def measure_networks_ms(nets: Sequence[nn.Module], image_size: int, timing: Timing,
                        progress: Optional[Callable] = None) -> List[float]:
    """Measured latency (ms) of each whole network (eval mode, no grad): the median of
    timing.repeats calls, the fastest of agreeing passes (fastest_of_passes);
    each network is prepared for the runtime once, before its first pass."""
    shape = (3, image_size, image_size)
    with thread_count(timing.threads):
        run = _prepared(lambda i: timing.prepare(nets[i], shape))
        return fastest_of_passes(lambda i: timing.time(run(i), shape), range(len(nets)),
                                 progress=progress)


def time_side_by_side(runs: Dict[str, Callable], x: torch.Tensor,
                      timing: Timing) -> Dict[str, float]:
    """{name: ms} of callables that take the same input `x` (its batch is the one timed),
    with timing's threads, clock and calls, the fastest of agreeing passes over all of them
    in turn: how export.py sets eager torch beside onnxruntime."""
    names = list(runs)
    with thread_count(timing.threads):
        return dict(zip(names, fastest_of_passes(
            lambda n: time_ms(runs[n], x, timing.warmup, timing.repeats, timing.clock), names)))


def _prepared(prepare: Callable) -> Callable:
    """prepare(item), made on the first call for an item and reused by every later pass (an
    onnxruntime item is exported once, not once per pass)."""
    made = {}

    def get(item):
        if item not in made:
            made[item] = prepare(item)
        return made[item]
    return get


# --------------------------------------------------------------------------------------------
# A network as latency times it (models.archs): block slots, and the fixed parts around them
# --------------------------------------------------------------------------------------------

@dataclass
class TimedNetwork:
    """A registered network as latency sees it: its block slots, and its fixed parts (stem,
    head: the network's own modules) as name -> (input shape without batch, module)."""
    label: str                  # names the cache file: 'wrn40-2-c10', 'resnet34-c1000'
    slots: List[BlockSlot]
    image_size: int
    fixed: Dict[str, tuple]
    build: Callable             # build(genotype) -> network


def timed_network(net: Network) -> TimedNetwork:
    """The latency view of a registered network (models.archs.Network)."""
    model = net.build()
    slots = net.slots()
    last = slots[-1]
    label = (f"wrn{net.depth}-{net.width}" if net.family.sized else net.arch) + \
        f"-c{net.classes}"
    stem, head = model.fixed_parts()
    return TimedNetwork(label, slots, net.image_size,
                  {"stem": ((3, net.image_size, net.image_size), stem),
                   "head": ((last.out_planes, last.out_size, last.out_size), head)},
                  net.build)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TableKey:
    """What a latency table depends on; it names the cache file and is stored inside it."""
    family: str
    device: str
    torch: str
    threads: int
    batch: int
    clock: str = "wall"
    runtime: str = "torch"      # LatencyRuntime.version(): 'torch', 'onnxruntime-1.31.1'

    def file_name(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", self.device).strip("-")
        runtime = "" if self.runtime == "torch" else f"_{self.runtime}"   # torch: names as before
        return (f"{self.family}_{slug}_torch{self.torch}_t{self.threads}_b{self.batch}_"
                f"{self.clock}{runtime}.csv")

    def describe(self) -> str:
        return (f"{self.device}, batch {self.batch}, {self.threads} threads, {self.clock} clock"
                + ("" if self.runtime == "torch" else f", {self.runtime}"))


class LatencyTable:
    """raw_ms[i, t]: milliseconds of block type names[t] at position i, timed alone; parts:
    the fixed parts as ((name, ms), ...); scale: measured / summed over a few whole networks
    (see calibrate). predict(genotype) = scale * (fixed parts + sum over positions)."""

    def __init__(self, key: TableKey, names: Sequence[str], raw_ms: np.ndarray, parts,
                 scale: float = 1.0):
        self.key, self.names = key, list(names)
        self.index = {n: t for t, n in enumerate(self.names)}
        self.raw_ms, self.scale = np.asarray(raw_ms, float), float(scale)
        self.parts = tuple((str(p), float(v)) for p, v in parts)
        self.ms = self.scale * self.raw_ms                           # what predictions sum
        self.fixed_ms = self.scale * sum(v for _, v in self.parts)

    @property
    def n_positions(self) -> int:
        return self.ms.shape[0]

    def codes(self, genotypes) -> np.ndarray:
        return np.array([[self.index[n] for n in g] for g in genotypes], np.int64)

    def predict_many(self, codes: np.ndarray) -> np.ndarray:
        """Predicted ms of an (N, positions) array of type indices into `names`."""
        return self.fixed_ms + self.ms[np.arange(self.n_positions), codes].sum(1)

    def predict(self, genotype: Sequence[str]) -> float:
        return float(self.predict_many(self.codes([genotype]))[0])

    def digest(self) -> str:
        """A short hash of the measured values: a re-measured table is a different table."""
        text = ",".join(f"{v:.6f}" for v in [self.scale, self.fixed_ms, *self.ms.ravel()])
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def identity(self) -> str:
        return f"{os.path.splitext(self.key.file_name())[0]}@{self.digest()}"

    def range_ms(self):
        return (self.fixed_ms + self.ms.min(1).sum(), self.fixed_ms + self.ms.max(1).sum())

    # -- CSV: one row per (part, position, block type), the key's fields on every row --------

    def to_frame(self, slots: Sequence[BlockSlot]) -> pd.DataFrame:
        rows = [dict(part=p, position=-1, block="", ms=ms) for p, ms in self.parts]
        rows.append(dict(part="scale", position=-1, block="", ms=self.scale))
        for i, s in enumerate(slots):
            rows += [dict(part="block", position=i, in_planes=s.in_planes,
                          out_planes=s.out_planes, stride=s.stride, size=s.size, block=n,
                          ms=self.raw_ms[i, t]) for t, n in enumerate(self.names)]
        df = pd.DataFrame(rows)
        for k, v in vars(self.key).items():
            df[k] = v
        return df


def _block_shape(slot: BlockSlot):
    return slot.in_planes, slot.size, slot.size


def _prepare_block(name: str, slot: BlockSlot, timing: Timing) -> Callable:
    block = build_block(name, slot)
    return timing.prepare(block, _block_shape(slot))


def calibrate(table: LatencyTable, family: TimedNetwork, timing: Timing, n: int,
              seed: int = 0) -> float:
    """measured / summed latency, the median over n uniformly random whole networks.

    Blocks timed alone run with their weights and input hot in the caches; in a network
    each block's weights were last touched a whole pass earlier, and on a shared CPU a
    network spans more of other processes' time slices than one block does. Both make the
    whole slower than the sum of its parts by a roughly constant factor (bench_latency.py)."""
    if n < 1:
        return 1.0
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, len(table.names), (n, table.n_positions))
    summed = table.predict_many(codes)
    nets = [family.build([table.names[t] for t in row]) for row in codes]
    measured = measure_networks_ms(nets, family.image_size, timing.lighter())
    return float(np.median(np.array(measured) / summed))


CALL_PART = "call"   # the fixed part that counts a runtime's per-call cost once


def _without_call_cost(family: TimedNetwork, timing: Timing, fixed, per_slot):
    """(fixed parts, per-slot ms) with the runtime's per-call cost (LatencyRuntime.call_cost)
    taken off each item, timed on the item's own input shape, and counted once for the whole
    network (on its input image) as the fixed part CALL_PART. Unchanged for eager torch."""
    cost_of = RUNTIMES[timing.runtime].call_cost
    if cost_of is None:
        return fixed, per_slot
    cost = _prepared(lambda shape: cost_of(shape, timing))
    fixed = [(p, max(0.0, ms - cost(tuple(family.fixed[p][0])))) for p, ms in fixed]
    per_slot = {item: max(0.0, ms - cost(_block_shape(item[0])))
                for item, ms in per_slot.items()}
    image = (3, family.image_size, family.image_size)
    return fixed + [(CALL_PART, cost(image))], per_slot


def measure_table(family: TimedNetwork, names: Sequence[str], timing: Timing, show: bool = True,
                  calibration: int = CALIBRATION) -> LatencyTable:
    """Time every block type at every distinct slot, and the fixed parts; then fit the
    table's scale on `calibration` whole networks (0: plain summation)."""
    for n in names:
        get_block_type(n)
    distinct = list(dict.fromkeys(family.slots))
    with thread_count(timing.threads) as n_threads, \
            progress_bar(total=PASSES * (len(distinct) * len(names) + len(family.fixed)),
                         disable=not show, desc=f"latency table {family.label} b{timing.batch}") as bar:
        parts = list(family.fixed.items())
        part = _prepared(lambda p: timing.prepare(family.fixed[p][1], family.fixed[p][0]))
        fixed = list(zip([p for p, _ in parts], fastest_of_passes(
            lambda p: timing.time(part(p), family.fixed[p][0]), [p for p, _ in parts],
            progress=bar.update)))
        items = [(slot, n) for slot in distinct for n in names]
        block = _prepared(lambda item: _prepare_block(item[1], item[0], timing))
        per_slot = dict(zip(items, fastest_of_passes(
            lambda item: timing.time(block(item), _block_shape(item[0])), items,
            progress=bar.update)))
        fixed, per_slot = _without_call_cost(family, timing, fixed, per_slot)
        ms = np.array([[per_slot[s, n] for n in names] for s in family.slots])
        table = LatencyTable(table_key(family, timing, n_threads), names, ms, fixed)
        bar.set_postfix_str(f"calibrating on {calibration} networks")
        scale = calibrate(table, family, timing, calibration)
    return LatencyTable(table.key, names, ms, fixed, scale)


def table_key(family: TimedNetwork, timing: Timing, n_threads: int) -> TableKey:
    return TableKey(family.label, device_name(timing.device), torch.__version__, n_threads,
                    timing.batch, timing.clock, RUNTIMES[timing.runtime].version())


def read_table(path: str, key: TableKey, names: Sequence[str],
               n_positions: int) -> Optional[LatencyTable]:
    """The cached table at `path` if it holds `key` and every name; None otherwise."""
    if not os.path.isfile(path):
        return None
    try:
        df = pd.read_csv(path, keep_default_na=False)
        if "runtime" not in df:   # written before the runtime joined the key: eager torch
            df["runtime"] = "torch"
        if any(str(df[k].iloc[0]) != str(v) or df[k].nunique() != 1
               for k, v in vars(key).items()):
            return None
        blocks = df[df["part"] == "block"]
        grid = blocks.pivot(index="position", columns="block", values="ms")
        if len(grid) != n_positions or not set(names) <= set(grid.columns):
            return None
        fixed = df[~df["part"].isin(["block", "scale"])]
        scale = float(df.loc[df["part"] == "scale", "ms"].iloc[0])
        return LatencyTable(key, names, grid[list(names)].to_numpy(float),
                            zip(fixed["part"], fixed["ms"].astype(float)), scale)
    except (KeyError, ValueError, IndexError, pd.errors.ParserError):
        return None   # not one of ours, or torn: measure afresh


def load_or_measure(family: TimedNetwork, names: Sequence[str], timing: Timing,
                    cache_dir: str = "results/latency", show: bool = True,
                    calibration: int = CALIBRATION) -> LatencyTable:
    """The cached table for (family, device, torch, threads, batch, clock, runtime), measured
    if absent or if the cached file's facts differ."""
    with thread_count(timing.threads) as n_threads:
        pass
    key = table_key(family, timing, n_threads)
    path = os.path.join(cache_dir, key.file_name())
    table = read_table(path, key, names, len(family.slots))
    if table is not None:
        return table
    table = measure_table(family, names, dataclasses.replace(timing, threads=n_threads), show,
                          calibration)
    os.makedirs(cache_dir, exist_ok=True)
    text = table.to_frame(family.slots).to_csv(index=False)
    atomic_write(path, lambda f: f.write(text.encode()))
    return table


# --------------------------------------------------------------------------------------------
# Integer costs for the exact sampler
# --------------------------------------------------------------------------------------------

def parse_table_device(name: Optional[str], default: str) -> torch.device:
    """--latency_device: a torch device string, else the search device."""
    try:
        device = torch.device(name or default)
    except RuntimeError:
        raise UserError(f"--latency_device {name!r} is not a device (cpu, cuda, cuda:1, mps)") \
            from None
    if device.type == "cuda" and not (torch.cuda.is_available() and
                                      (device.index or 0) < torch.cuda.device_count()):
        raise UserError(f"--latency_device {name or default}: no such CUDA GPU is visible here; "
                        "time on this machine's CPU (--latency_device cpu), or run on the "
                        "machine whose GPU the table is for")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--latency_device {name or default}: MPS is not available on this "
                        "machine; pass --latency_device cpu")
    return device


def add_latency_args(p: argparse.ArgumentParser) -> None:
    """How latency is timed: the flags count_ops.py and fisher_rank.py share (defaults:
    Timing's)."""
    g = p.add_argument_group("latency")
    g.add_argument("--latency_device", default=None,
                   help="device whose latency table prices candidates (default: --device, "
                        "or cpu in count_ops.py)")
    g.add_argument("--latency_batch", default=Timing.batch, type=at_least(1),
                   help="batch size the latency is for")
    g.add_argument("--threads", default=Timing.threads, type=at_least(1),
                   help="torch threads while timing latency (default: torch's own count)")
    g.add_argument("--latency_clock", default=Timing.clock, choices=list(CLOCKS),
                   help="time latency by the wall, or by CPU time (steadier on a shared CPU)")
    g.add_argument("--latency_runtime", default=Timing.runtime, choices=list(RUNTIMES),
                   help="what runs the timed blocks: eager torch, or each block exported to "
                        "ONNX and run in onnxruntime (on the CPU; see docs/export.md)")


def timing_from_args(args, default_device: str = "cpu") -> Timing:
    """The Timing that --latency_device/--latency_batch/--threads/--latency_clock/
    --latency_runtime ask for. onnxruntime tables are timed on the CPU unless told otherwise
    (the search device, a GPU, is no default for them)."""
    if args.latency_runtime != "torch":
        default_device = "cpu"
    return Timing(parse_table_device(args.latency_device, default_device), args.latency_batch,
                  args.threads, args.latency_clock, runtime=args.latency_runtime)


def print_latency(args, net: Network, model: nn.Module, cache_dir: str) -> Dict[str, float]:
    """count_ops.py --latency: the table's prediction beside the measured latency of `model`
    (the same batch, threads, clock and device; the fastest of agreeing passes, as every item
    of the table), the table measured first if not cached."""
    timing = timing_from_args(args)
    names = list(net.space) + [n for n in dict.fromkeys(model.genotype) if n not in net.space]
    family = timed_network(net)
    table = load_or_measure(family, names, timing, cache_dir)
    predicted = table.predict(model.genotype)
    # timed as the table's items are: the fastest of passes that agree (slow spells only add)
    measured = measure_networks_ms([model], family.image_size, timing)[0]
    print(f"latency on {table.key.describe()}: predicted {predicted:.3f} ms  measured "
          f"{measured:.3f} ms  ({(predicted - measured) / measured:+.1%})")
    return {"predicted_ms": predicted, "measured_ms": measured}


def relative_errors(predicted, measured) -> np.ndarray:
    """(predicted - measured) / measured."""
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    return (predicted - measured) / measured


def summarise_errors(predicted, measured) -> Dict[str, float]:
    """Median and 90th percentile of |relative error|, and the share within +-10%."""
    err = np.abs(relative_errors(predicted, measured))
    return {"median": float(np.median(err)), "p90": float(np.quantile(err, 0.9)),
            "within10": float((err <= 0.10).mean()), "n": len(err)}

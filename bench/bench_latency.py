"""How well the latency table predicts whole-network latency (prints figures, asserts nothing).

    python bench/bench_latency.py      # WRN-40-2, batch 1 and 32, about 5 minutes idle
                                       # (much longer on a CPU shared with other jobs)
    python bench/bench_latency.py --quick     # WRN-10-1, a smoke test (plot in a temp folder)
    python bench/bench_latency.py --runtime onnxruntime --out docs/latency_wrn40_2_cpu_ort.png
                                       # every block exported to ONNX, timed in onnxruntime

For each batch size: the table (cached under --cache_dir), then --n genotypes (--n_large above batch 1) drawn
uniformly from the whole space and as many drawn uniformly within +-5% of the median predicted latency; each
network's measured latency (median of --repeats) against the plain sum of the table and against
the calibrated prediction (the sum times the table's scale, see latency.calibrate). The two
sets are measured interleaved, so a change in the machine's load hits both alike.
Writes a scatter plot (--out) and the measurements beside it (.csv).
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blockswap.count_ops import CostTable  # noqa: E402
from blockswap.funcs import sample_genotypes  # noqa: E402
from blockswap.latency import (CALIBRATION, PASSES, RUNTIMES, Timing, timed_network,  # noqa: E402
                     load_or_measure, measure_networks_ms, summarise_errors)
from blockswap.funcs import Budget, QuantisedLatency  # noqa: E402
from blockswap.files import format_convs  # noqa: E402
from models import SEARCH_SPACE, Network  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description="Latency table prediction against measurement.")
    p.add_argument("--wrn_depth", default=40, type=int)
    p.add_argument("--wrn_width", default=2, type=int)
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--n", default=50, type=int, help="genotypes per set (uniform, window)")
    p.add_argument("--n_large", default=25, type=int,
                   help="genotypes per set at batch sizes above 1 (slower to time)")
    p.add_argument("--repeats", default=None, type=int,
                   help="timed runs per network (default: 15 at batch 1, 3 above)")
    p.add_argument("--threads", default=1, type=int,
                   help="torch threads (1: on a shared CPU, more threads wait on each other)")
    p.add_argument("--clock", default="cpu", choices=["wall", "cpu"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache_dir", default="results/latency")
    p.add_argument("--out", default=None,
                   help="plot (default: docs/latency_wrn40_2_cpu.png; with --quick a temporary file)")
    p.add_argument("--seed", default=1, type=int)
    p.add_argument("--runtime", default="torch", choices=list(RUNTIMES),
                   help="what runs the table's blocks and the whole networks (latency.RUNTIMES)")
    p.add_argument("--quick", action="store_true",
                   help="WRN-10-1, 4 block types, 3 genotypes per set, batch 1")
    return p


# --quick: a smoke test of the whole path (with onnxruntime every item is an export)
QUICK_NAMES = ("Conv", "DConv", "ConvB2", "G8B2")


def genotype_sets(ct, table, n, seed):
    """{'uniform': ..., 'window': ...}: the window is +-5% of the uniform set's median."""
    uniform = sample_genotypes(ct, n, seed=seed)
    goal = float(np.median([table.predict(g) for g in uniform]))
    window = sample_genotypes(ct, n, Budget(tol=0.05, latency=QuantisedLatency(table, goal)), seed=seed + 1)
    return {"uniform": uniform, "window": window}


def measure_sets(family, table, sets, args, batch, repeats):
    """One row per network, measured in interleaved order."""
    jobs = [(name, g) for name, gs in sets.items() for g in gs]
    order = np.random.default_rng(args.seed).permutation(len(jobs))
    jobs = [jobs[j] for j in order]
    done = []

    def progress():
        done.append(1)
        print(f"\r  batch {batch}: {len(done)} of {PASSES * len(jobs)} planned timings (more "
              "for networks whose passes disagree)", end="", flush=True)
    # as the table's items: the fastest pass; each network built (exported) once
    measured = measure_networks_ms(
        [family.build(g) for _, g in jobs], family.image_size,
        Timing(args.device, batch, args.threads, args.clock, warmup=2, repeats=repeats,
               runtime=args.runtime), progress)
    print()
    return [{"batch": batch, "set": name, "measured_ms": ms, "predicted_ms": table.predict(g),
             "summed_ms": table.predict(g) / table.scale, **group_sums(family, table, g),
             "genotype": format_convs(g)} for (name, g), ms in zip(jobs, measured)]


def group_sums(family, table, genotype) -> dict:
    """The plain sum split by part: fixed parts, then the blocks of each group (positions of
    one output width), for studying where the prediction misses."""
    out = {"fixed_ms": table.fixed_ms / table.scale}
    for i, (slot, name) in enumerate(zip(family.slots, genotype)):
        key = f"group{slot.out_planes}_ms"
        out[key] = out.get(key, 0.0) + float(table.raw_ms[i, table.index[name]])
    return out


def report(df):
    for (batch, name), d in df.groupby(["batch", "set"]):
        for col, label in (("summed_ms", "plain sum "), ("predicted_ms", "calibrated")):
            e = summarise_errors(d[col], d["measured_ms"])
            bias = float(np.median(d[col] / d["measured_ms"]))
            print(f"batch {batch:>3} {name:>7} {label}: n {e['n']}, |rel. error| median "
                  f"{e['median']:.1%}, p90 {e['p90']:.1%}, within +-10% {e['within10']:.0%}, "
                  f"median predicted/measured {bias:.3f}")
    for batch, d in df.groupby("batch"):
        group_model_check(d, batch)


def group_model_check(d, batch):
    """Would one scale per group (and one for the fixed parts) predict better than one scale
    for the whole sum? Fitted (least squares on relative error) on one set of networks,
    tested on the other, both ways: an out-of-sample check of that model, printed only."""
    cols = ["fixed_ms"] + sorted((c for c in d.columns if c.startswith("group")),
                                 key=lambda c: int(c[5:-3]))
    for fit, test in (("uniform", "window"), ("window", "uniform")):
        a, b = d[d["set"] == fit], d[d["set"] == test]
        if len(a) < len(cols) or b.empty:
            continue
        x = a[cols].to_numpy() / a[["measured_ms"]].to_numpy()
        coef, *_ = np.linalg.lstsq(x, np.ones(len(a)), rcond=None)
        e = summarise_errors(b[cols].to_numpy() @ coef, b["measured_ms"])
        print(f"batch {batch:>3} {test:>7} per-group scales fitted on {fit}: |rel. error| "
              f"median {e['median']:.1%}, p90 {e['p90']:.1%}, within +-10% {e['within10']:.0%}"
              f" (scales {', '.join(f'{c:.2f}' for c in coef)})")


def plot(df, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = sorted(df["batch"].unique())
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.6), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        d = df[df["batch"] == batch]
        for (name, col), (c, m) in zip(
                [(n, col) for col in ("summed_ms", "predicted_ms") for n in ("uniform", "window")],
                [("0.6", "o"), ("0.6", "^"), ("C0", "o"), ("C3", "^")]):
            s = d[d["set"] == name]
            label = f"{name}, {'plain sum' if col == 'summed_ms' else 'calibrated'}"
            ax.scatter(s["measured_ms"], s[col], s=12, c=c, marker=m, alpha=0.7, label=label)
        lim = [0, 1.1 * max(d["measured_ms"].max(), d["predicted_ms"].max(),
                            d["summed_ms"].max())]
        ax.plot(lim, lim, "k-", lw=0.8)
        ax.fill_between(lim, [0.9 * v for v in lim], [1.1 * v for v in lim], color="C2",
                        alpha=0.12, label="+-10%")
        e = summarise_errors(d["predicted_ms"], d["measured_ms"])
        ax.set_title(f"batch {batch}: calibrated, {e['within10']:.0%} within +-10%")
        ax.set_xlabel("measured latency (ms)")
        ax.set_ylabel("predicted latency (ms)")
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)


def main(args):
    names, calibration = SEARCH_SPACE, CALIBRATION
    if args.quick:
        args.wrn_depth, args.wrn_width, args.n, args.batches = 10, 1, 3, "1"
        args.repeats = args.repeats or 3
        names, calibration = QUICK_NAMES, 2
        # a smoke test never replaces the documented plot
        args.out = args.out or os.path.join(tempfile.mkdtemp(), "latency_quick.png")
    args.out = args.out or "docs/latency_wrn40_2_cpu.png"
    family = timed_network(Network("wrn", args.wrn_depth, args.wrn_width))
    ct = CostTable.for_network(Network("wrn", args.wrn_depth, args.wrn_width, 10), names=names)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        repeats = args.repeats or (15 if batch == 1 else 3)
        timing = Timing(args.device, batch, args.threads, args.clock,
                        warmup=5 if batch == 1 else 1, repeats=25 if batch == 1 else 5,
                        runtime=args.runtime)
        table = load_or_measure(family, names, timing, args.cache_dir,
                                calibration=calibration)
        print(f"table {table.key.file_name()}: scale {table.scale:.3f}, predicted range "
              f"{table.range_ms()[0]:.3g} to {table.range_ms()[1]:.3g} ms")
        sets = genotype_sets(ct, table, args.n if batch == 1 else args.n_large, args.seed)
        rows += measure_sets(family, table, sets, args, batch, repeats)
        report(pd.DataFrame(rows)[lambda d: d["batch"] == batch])
    df = pd.DataFrame(rows)
    df.to_csv(os.path.splitext(args.out)[0] + ".csv", index=False)
    plot(df, args.out)
    print(f"-> {args.out}")
    return df


if __name__ == "__main__":
    main(get_args_parser().parse_args())

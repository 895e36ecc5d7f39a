"""Candidates trained per hour: the same 8 small candidates trained inline (one process, 2
threads) and with the local launcher (--launcher local --jobs 2, 1 thread each); prints, no
asserts. Each side trains into its own temporary folder, so neither reuses the other's results.

    nice python bench/bench_jobs.py [--data_loc ../shared/data/cifar10-jpeg] [--candidates 8]
                                    [--epochs 1] [--train_subset 1000] [--quick]

--quick: a smoke test in seconds (2 candidates of WRN-10-1 on a few generated images).
Last line: `jobs: inline A cand/h, local B cand/h, ratio Rx`.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blockswap.count_ops import CostTable  # noqa: E402
from device_bench import synthetic_cifar  # noqa: E402 (bench/, this script's folder)
from blockswap.engine import candidate_config, train_candidate  # noqa: E402
from blockswap.funcs import Budget, sample_genotypes  # noqa: E402
from blockswap.jobs import Job, LaunchSettings, run_jobs  # noqa: E402
from models import Network  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data", "cifar10-jpeg")


def jobs_for(args, folder: str):
    """The candidates' trainings (the same genotypes and seeds on both sides)."""
    net = Network("wrn", args.depth, args.width, 10)
    table = CostTable.for_network(net)
    genotypes = sample_genotypes(table, args.candidates, Budget(), seed=0)
    return [Job(f"candidate_{i}", candidate_config(
        g, folder, f"candidate_{i}", dataset="cifar10", data_loc=args.data_loc,
        wrn_depth=args.depth, wrn_width=args.width, epochs=args.epochs, batch_size=64,
        train_subset=args.train_subset, val_subset=args.val_subset, seed=i, subset_seed=0,
        device="cpu", workers=0)) for i, g in enumerate(genotypes)]


def per_hour(args, launcher: str, jobs: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        todo = jobs_for(args, folder)
        start = time.perf_counter()
        run_jobs(train_candidate, todo, LaunchSettings(
            launcher=launcher, jobs=jobs, threads=threads, log_dir=os.path.join(folder, "jobs")),
            progress=False)
        seconds = time.perf_counter() - start
    print(f"{launcher}: {len(todo)} candidates in {seconds:.1f} s ({threads} thread(s) each, "
          f"{jobs or 1} at a time)", flush=True)
    return len(todo) * 3600 / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_loc", default=SHARED)
    p.add_argument("--candidates", default=8, type=int)
    p.add_argument("--epochs", default=1, type=int)
    p.add_argument("--train_subset", default=1000, type=int)
    p.add_argument("--val_subset", default=1000, type=int)
    p.add_argument("--depth", default=16, type=int, help="WRN depth of the candidates")
    p.add_argument("--width", default=1, type=int)
    p.add_argument("--quick", action="store_true", help="a smoke test in seconds")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as data:
        if args.quick:
            args.data_loc, args.candidates, args.depth = synthetic_cifar(data, 40, 40), 2, 10
            args.train_subset, args.val_subset = 16, 16
        inline = per_hour(args, "inline", 0, 2)
        local = per_hour(args, "local", 2, 1)
    print(f"jobs: inline {inline:.0f} cand/h, local {local:.0f} cand/h, "
          f"ratio {local / inline:.2f}x")


if __name__ == "__main__":
    main()

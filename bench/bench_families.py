"""Search costs of the torchvision families (resnet50, mobilenet_v2): prints figures, asserts
nothing.

    python bench/bench_families.py [--image_size 224] [--batch_size 32] [--samples 1000] [--quick]

Per family: seconds to build its cost table; seconds to sample --samples distinct genotypes
within +-2.5% of 60% of the unmodified network's parameters (the middle of the reachable range
where 60% is outside it); and the Fisher potential of one sampled candidate (build + score, as
a search does per candidate, and the score alone) as a multiple of one training-mode forward
of the same network on the same batch. One thread (torch.set_num_threads(1)), timed by this
process's CPU time (on a shared machine the wall clock also counts other processes' turns;
with one thread CPU time is the wall time an idle machine shows), the fastest of --repeats
interleaved rounds. Goals (issue 24): sampling < 10 s per 1000, Fisher <= 2.5x.
Last line: `families: resnet50 fisher Ax fwd, mobilenet_v2 fisher Bx fwd`.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blockswap.count_ops import CostTable, count_params  # noqa: E402
from blockswap.funcs import Budget, fisher_scores, sample_genotypes  # noqa: E402
from models import Network  # noqa: E402

FAMILIES = ("resnet50", "mobilenet_v2")
QUICK_NAMES = {"resnet50": ("Conv", "DConv", "G8B2", "ConvB4"),
               "mobilenet_v2": ("MB1K3", "MB3K5", "MB6K3", "MB6K7")}


def fastest(tasks, repeats):
    """{name: fastest CPU seconds} over `repeats` interleaved rounds after one warm-up round
    (a shared machine's slow spells then disturb every task alike)."""
    best = {k: float("inf") for k in tasks}
    for round_ in range(repeats + 1):
        for k, fn in tasks.items():
            t = time.process_time()
            fn()
            if round_:
                best[k] = min(best[k], time.process_time() - t)
    return best


def budget_goal(table, plain_params: int) -> int:
    lo = table.base_params + table.params.min(1).sum()
    hi = table.base_params + table.params.max(1).sum()
    goal = int(0.6 * plain_params)
    return goal if lo * 1.03 <= goal <= hi * 0.97 else int((lo + hi) / 2)


def bench_family(arch, args):
    """(build + score, score alone) as multiples of one training-mode forward."""
    net = Network(arch, None, None, args.num_classes)
    names = QUICK_NAMES[arch] if args.quick else net.space
    t = time.perf_counter()
    plain = net.build()
    table = CostTable(net.family.slots(None, None, args.image_size), plain, args.image_size,
                      names)
    print(f"{arch}: cost table ({len(names)} types x {table.n_positions} positions, "
          f"{args.image_size} px) {time.perf_counter() - t:.1f} s")
    goal = budget_goal(table, count_params(plain))
    t = time.perf_counter()
    genotypes = sample_genotypes(table, args.samples, Budget(goal), seed=0)
    print(f"  sampling {args.samples} at {goal:,} params: {time.perf_counter() - t:.2f} s")
    genotype = genotypes[0]
    model = net.build(genotype).train()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    best = fastest({"fwd": lambda: model(x),
                    "build": lambda: net.build(genotype),
                    "score": lambda: fisher_scores(model, x, y)}, args.repeats)
    fwd, ours, score = best["fwd"], best["build"] + best["score"], best["score"]
    print(f"  candidate {table.cost(genotype)[0]:,} params, batch {args.batch_size}: forward "
          f"{fwd:.3f} s, build {best['build']:.3f} s, score {score:.3f} s "
          f"({score / fwd:.2f}x), build + score {ours / fwd:.2f}x forward")
    return ours / fwd, score / fwd


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--image_size", default=224, type=int)
    p.add_argument("--batch_size", default=32, type=int)
    p.add_argument("--samples", default=1000, type=int, help="genotypes per sampling timing")
    p.add_argument("--repeats", default=2, type=int)
    p.add_argument("--num_classes", default=1000, type=int)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 64 px, batch 4, 4 block types, 50 samples, 1 repeat")
    args = p.parse_args()
    if args.quick:
        args.image_size, args.batch_size, args.samples, args.repeats = 64, 4, 50, 1
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, cpu")
    ratios = {arch: bench_family(arch, args) for arch in FAMILIES}
    print("families: " + ", ".join(f"{arch} fisher {ratios[arch][0]:.2f}x fwd"
                                   for arch in FAMILIES))


if __name__ == "__main__":
    main()

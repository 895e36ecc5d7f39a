"""Fisher potential in fp32 with NCHW against channels_last on this machine: the largest
relative difference of any block's value, and the time of scoring (interleaved). Prints only.

    nice python bench/fisher_layout.py [--candidates 4] [--repeats 3] [--batch_size 128] [--quick]

Candidates: WRN-40-2 networks of random genotypes (seeded), one minibatch of random images.
The search keeps NCHW unless channels_last is both within 1e-4 on every block and faster.
"""
import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blockswap.funcs import fisher_scores  # noqa: E402
from models import WideResNet  # noqa: E402
from models.blocks import BLOCK_TYPES  # noqa: E402


def score(net, x, y, fmt):
    start = time.perf_counter()
    s = fisher_scores(net.to(memory_format=fmt), x.contiguous(memory_format=fmt), y)
    return s, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 candidate, 1 repeat, batch 4")
    args = p.parse_args()
    if args.quick:
        args.candidates, args.repeats, args.batch_size = 1, 1, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g)
    y = torch.randint(10, (args.batch_size,), generator=g)
    names, rng = sorted(BLOCK_TYPES), random.Random(0)
    worst, seconds = 0.0, {"nchw": 0.0, "channels_last": 0.0}
    for c in range(args.candidates):
        torch.manual_seed(c)
        net = WideResNet(40, 2, convs=[rng.choice(names) for _ in range(18)], num_classes=10)
        score(net, x, y, torch.contiguous_format)   # warm-up
        for _ in range(args.repeats):
            a, ta = score(net, x, y, torch.contiguous_format)
            b, tb = score(net, x, y, torch.channels_last)
            seconds["nchw"] += ta
            seconds["channels_last"] += tb
        worst = max(worst, ((a - b).abs() / a.abs().clamp_min(1e-30)).max().item())
    n = args.candidates * args.repeats
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.candidates} "
          f"WRN-40-2 candidates x {args.repeats}")
    print(f"fisher: nchw {seconds['nchw'] / n:.3f} s, channels_last "
          f"{seconds['channels_last'] / n:.3f} s per candidate, largest block relative "
          f"difference {worst:.2e}")


if __name__ == "__main__":
    main()

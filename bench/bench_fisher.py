"""Cost of Fisher-potential scoring and of budget sampling (prints figures, asserts nothing).

    python bench/bench_fisher.py [--batch_size 128] [--repeats 5] [--device cpu] [--quick]

Scoring: build + score one WRN-40-2 candidate as a multiple of one training-mode forward of
the same network on the same batch (the issue's target: <= 2.1x), beside the straightforward
approach (fresh net, an extra forward as the original's mask creation, full backward with
weight gradients). Proxies: every registered proxy (proxies.py) on the same network and
batch, as a multiple of the same forward (--proxies none skips them). Sampling: 1000 distinct
genotypes at 162K / 800K / 1.6M parameters.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blockswap.count_ops import CostTable  # noqa: E402
from blockswap.funcs import Budget, fisher_scores, sample_genotypes  # noqa: E402
from models import Network, WideResNet, residual_blocks  # noqa: E402
from blockswap.proxies import PROXIES, get_proxy  # noqa: E402


def timed(fn, repeats, device):
    """Fastest wall time of fn() over `repeats` runs after one warm-up: the least disturbed
    by other processes on a shared machine."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def naive_fisher(genotype, x, y, device):
    """Fresh net, a 1-image forward (the original built its masks so), then a full backward
    with weight gradients and retain_grad on the branch outputs."""
    net = WideResNet(40, 2, genotype).to(device).train()
    net(torch.rand(1, 3, 32, 32, device=device))
    kept = []

    def keep(module, inp, out):
        out.retain_grad()
        kept.append(out)
    for b in residual_blocks(net):
        b.branch_end.register_forward_hook(keep)
    F.cross_entropy(net(x)[0], y).backward()
    return sum(float(0.5 * (a.detach() * a.grad).sum((2, 3)).pow(2).mean(0).sum()) for a in kept)


def proxy_costs(args, net, x, y, fwd, device):
    """Each proxy on the built network (fastest of --repeats), as a multiple of one forward."""
    names = [] if args.proxies == "none" else [n for n in args.proxies.split(",") if n]
    for name in names:
        fn = get_proxy(name)
        t = timed(lambda: fn(net, x, y), args.repeats, device)
        print(f"  proxy {name:<22} {t * 1e3:8.1f} ms   {t / fwd:5.2f}x forward")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch_size", default=128, type=int)
    p.add_argument("--repeats", default=5, type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--proxies", default=",".join(PROXIES),
                   help="comma-separated proxies to time beside Fisher ('none': skip)")
    p.add_argument("--samples", default=1000, type=int, help="genotypes per sampling timing")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: batch 4, 1 repeat, 20 samples")
    args = p.parse_args()
    if args.quick:
        args.batch_size, args.repeats, args.samples = 4, 1, 20
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")

    t = time.perf_counter()
    table = CostTable.for_network(Network("wrn", 40, 2, 10))
    print(f"cost table WRN-40-2 (24 types x 18 positions): {time.perf_counter() - t:.2f} s")
    genotype = sample_genotypes(table, 1, Budget(800_000), seed=0)[0]
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    net = WideResNet(40, 2, genotype).to(device).train()

    # Interleaved rounds, fastest of each: other processes on a shared machine disturb all
    # methods alike instead of whichever happened to run during a burst.
    tasks = {"fwd": lambda: net(x),
             "build": lambda: WideResNet(40, 2, genotype).to(device),
             "score_only": lambda: fisher_scores(net, x, y),
             "ours": lambda: fisher_scores(WideResNet(40, 2, genotype).to(device), x, y),
             "naive": lambda: naive_fisher(genotype, x, y, device)}
    best = {k: float("inf") for k in tasks}
    for _ in range(args.repeats):
        for k, fn in tasks.items():
            best[k] = min(best[k], timed(fn, 1, device))
    with torch.no_grad():
        fwd_ng = timed(lambda: net(x), args.repeats, device)
    fwd, build, score_only, ours, naive = (best[k] for k in tasks)
    print(f"WRN-40-2 candidate at {table.cost(genotype)[0]:,} params, batch {args.batch_size}")
    print(f"  training-mode forward        {fwd * 1e3:8.1f} ms   (no_grad forward "
          f"{fwd_ng * 1e3:.1f} ms)")
    print(f"  build net                    {build * 1e3:8.1f} ms   {build / fwd:5.2f}x forward")
    print(f"  score (fisher_scores)        {score_only * 1e3:8.1f} ms   {score_only / fwd:5.2f}x")
    print(f"  build + score (ours)         {ours * 1e3:8.1f} ms   {ours / fwd:5.2f}x forward"
          f"   -> {1 / ours:.2f} candidates/s")
    print(f"  naive (fresh, 2 fwd, full bwd) {naive * 1e3:6.1f} ms   {naive / fwd:5.2f}x forward")

    proxy_costs(args, net, x, y, fwd, device)

    for goal in (162_000, 800_000, 1_600_000):
        t = time.perf_counter()
        g = sample_genotypes(table, args.samples, Budget(goal), seed=1)
        dt = time.perf_counter() - t
        print(f"  sampling {args.samples} distinct at {goal:>9,} params: {dt * 1e3:7.1f} ms "
              f"({len({tuple(x) for x in g})} distinct)")
    t = time.perf_counter()
    sample_genotypes(table, args.samples, Budget(800_000, 100_000_000), seed=1)
    print(f"  sampling {args.samples} at 800K params and 100M MACs: "
          f"{(time.perf_counter() - t) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

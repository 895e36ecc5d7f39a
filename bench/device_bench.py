"""Timings for bench/device_check.sh: training images/s per network x AMP x compile x loader,
seconds per full CIFAR-10 epoch of the WRN-40-2 teacher, seconds for a 1000-candidate Fisher
search at 800K. Prints a markdown table; asserts nothing.

    python bench/device_bench.py [--data_loc DIR] [--budget_s 330]     (a GPU machine)
    python bench/device_bench.py --quick                                (CPU, tiny, a smoke test)

Every figure comes from a fresh `python main.py` / `python fisher_rank.py` process, as a user
runs them: images/s is the last of 2 epochs as main.py prints it (the first epoch pays for
start-up and compilation). Without --data_loc (or when it is missing) a synthetic CIFAR-sized
image folder is written first: the timing, not the accuracy, is measured. Rows are run in order
of importance until --budget_s is spent (the rest say 'not run'): each network with the first
--amps and --loaders (eager), the full epoch, the search, the other eager rows, then compiled
rows. --json also writes the figures, with each row's wall time (bench/device_check.py sizes
its study from them).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORKS = {   # name -> main.py arguments (the student needs the WRN-40-2 teacher `t40`)
    "WRN-40-2 teacher": ["teacher", "-t", "t40", "--wrn_depth", "40", "--wrn_width", "2"],
    "WRN-16-2 teacher": ["teacher", "-t", "t16", "--wrn_depth", "16", "--wrn_width", "2"],
    "bs800k student of WRN-40-2": ["student", "-t", "t40", "-s", "s800",
                                   "--from_genotype", os.path.join(ROOT, "genotypes",
                                                                   "bs800k.csv")],
}
SPEED = re.compile(r"epoch \d+/\d+ .* ([0-9.]+) img/s \(train\)")
SIZES = {"full": dict(train=50_000, test=10_000, subset=10_240, val=1024, samples=1000),
         "quick": dict(train=256, test=64, subset=128, val=32, samples=8)}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_loc", default=None, help="CIFAR-10 (folder main.py reads)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="CPU, tiny sizes: a smoke test")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --quick)")
    p.add_argument("--budget_s", default=330.0, type=float, help="stop starting rows after this")
    p.add_argument("--row_s", default=240.0, type=float, help="time limit of one row")
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--amps", nargs="+", default=["off", "bf16"])
    p.add_argument("--compiles", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--loaders", nargs="+", default=["tensor", "pil"])
    p.add_argument("--no_epoch", action="store_true", help="skip the full-epoch row")
    p.add_argument("--no_search", action="store_true", help="skip the search row")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p


def _write_images(job):
    from PIL import Image
    folder, start, labels, seed = job
    rng = np.random.default_rng(seed)
    for i, y in enumerate(labels):
        img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(folder, str(y), f"{start + i:05d}.png"))


def synthetic_cifar(root: str, n_train: int, n_test: int) -> str:
    """train/<0..9>/*.png and test/<0..9>/*.png of random 32x32 images, written in parallel."""
    jobs = []
    for split, n in (("train", n_train), ("test", n_test)):
        for y in range(10):
            os.makedirs(os.path.join(root, split, str(y)), exist_ok=True)
        labels = np.arange(n) % 10
        for k, start in enumerate(range(0, n, 1000)):
            jobs.append((os.path.join(root, split), start, labels[start:start + 1000],
                         hash((split, k)) % 2 ** 32))
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_images, jobs))
    return root


def has_loader_flag() -> bool:
    sys.path.insert(0, ROOT)
    import main
    return "--loader" in main.get_args_parser().format_help()


def run(argv, timeout):
    """(returncode, stdout+stderr, seconds) of a command in the repository root."""
    start = time.perf_counter()
    try:
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired:
        return -1, "timeout", time.perf_counter() - start


def train_speed(ctx, network, amp, compile, loader, train_subset, timeout):
    """img/s of main.py's last epoch (of 2), or a short reason it has none."""
    if loader != "pil" and not ctx["loader_flag"]:
        return "n/a (no --loader)"
    argv = [sys.executable, "main.py", "cifar10", *NETWORKS[network],
            "--data_loc", ctx["data"], "--checkpoint_dir", ctx["ckdir"], "--epochs", "2",
            "--val_subset", str(ctx["size"]["val"]), "--workers", str(ctx["workers"]),
            "--device", ctx["device"], "--amp", amp, "--no-plot", "--overwrite"]
    argv += ["--train_subset", str(train_subset)] if train_subset else []
    argv += ["--compile"] if compile == "on" else []
    argv += ["--loader", loader] if ctx["loader_flag"] else []
    rc, out, seconds = run(argv, timeout)
    ctx["last_wall"] = seconds   # the whole process: start-up, data, 2 epochs, validation
    speeds = SPEED.findall(out)
    if rc != 0 or not speeds:
        return f"failed ({out.strip().splitlines()[-1][:60] if out.strip() else rc})"
    return float(speeds[-1])


def search_seconds(ctx, timeout):
    out_dir = os.path.join(ctx["work"], "search")
    rc, out, seconds = run([sys.executable, "fisher_rank.py", "cifar10", "--data_loc", ctx["data"],
                            "--param_goal", "800000", "--samples", str(ctx["size"]["samples"]),
                            "--results_dir", out_dir, "--genotype_dir", out_dir,
                            "--device", ctx["device"], "--no-plot"], timeout)
    return seconds if rc == 0 else f"failed ({out.strip().splitlines()[-1][:60]})"


def rows_in_order(args):
    """The (network, amp, compile, loader) rows and the 'epoch' and 'search' rows, most
    important first (see the module docstring)."""
    eager = [(n, a, "off", l) for n in args.networks for a in args.amps for l in args.loaders]
    first = [r for r in eager if r[1] == args.amps[0] and r[3] == args.loaders[0]]
    rest = [r for r in eager if r not in first]
    compiled = [(n, a, "on", l) for n in args.networks for a in args.amps for l in args.loaders]
    extra = ["epoch"] * (not args.no_epoch) + ["search"] * (not args.no_search)
    return first + extra + rest + (compiled if "on" in args.compiles else [])


def measure(ctx, args):
    """{(network, amp, compile, loader): img/s or reason}, epoch seconds, search seconds."""
    deadline = time.perf_counter() + args.budget_s
    left = lambda: deadline - time.perf_counter()  # noqa: E731
    speeds, epoch, search = {}, "not run", "not run"
    best = "tensor" if ctx["loader_flag"] else "pil"
    for row in rows_in_order(args):
        if left() < 20:
            break
        limit = min(left(), args.row_s)
        if row == "epoch":
            s = train_speed(ctx, "WRN-40-2 teacher", args.amps[-1], "off", best, None, limit)
            epoch = (ctx["size"]["train"] / s, args.amps[-1], best) if isinstance(s, float) else s
        elif row == "search":
            search = search_seconds(ctx, limit)
        else:
            speeds[row] = train_speed(ctx, *row, ctx["size"]["subset"], limit)
            ctx.setdefault("walls", {})[row] = ctx["last_wall"]
        print(f"  {row}: {speeds.get(row, epoch if row == 'epoch' else search)}",
              file=sys.stderr, flush=True)
    return speeds, epoch, search


def figures(speeds, epoch, search, ctx) -> dict:
    """The measured figures as JSON data: one entry per row run, with its wall seconds."""
    walls = ctx.get("walls", {})
    rows = [dict(zip(("network", "amp", "compile", "loader"), k), img_s=v,
                 wall_s=walls.get(k), images=ctx["size"]["subset"], epochs=2,
                 val_images=ctx["size"]["val"])
            for k, v in speeds.items() if isinstance(v, float)]
    return {"rows": rows, "device": ctx["device"], "synthetic": ctx["synthetic"],
            "epoch_s": epoch[0] if isinstance(epoch, tuple) else None,
            "search_s": search if isinstance(search, float) else None}


def table(speeds, epoch, search, ctx, args) -> str:
    cell = lambda v: f"{v:,.0f}" if isinstance(v, float) else v  # noqa: E731
    lines = [f"| network | AMP | compile | {' | '.join(f'{l} img/s' for l in args.loaders)} |",
             "|---|---|---|" + "---|" * len(args.loaders)]
    for compile in args.compiles:
        for network in args.networks:
            for amp in args.amps:
                row = [cell(speeds.get((network, amp, compile, l), "not run"))
                       for l in args.loaders]
                lines.append(f"| {network} | {amp} | {compile} | {' | '.join(row)} |")
    n, size = ctx["size"]["train"], ctx["size"]
    if isinstance(epoch, tuple):
        lines.append(f"\nWRN-40-2 teacher, one epoch of {n:,} images ({epoch[1]}, {epoch[2]} "
                     f"loader, eager): {epoch[0]:.1f} s")
    else:
        lines.append(f"\nWRN-40-2 teacher, one epoch of {n:,} images: {epoch}")
    search = f"{search:.1f} s" if isinstance(search, float) else search
    lines.append(f"Fisher search, {size['samples']} candidates at 800K (whole fisher_rank.py "
                 f"run): {search}")
    lines.append(f"(batch 128; images/s of the 2nd of 2 epochs on {size['subset']:,} images; "
                 f"{ctx['workers']} data workers; device {ctx['device']}"
                 f"{'; synthetic data' if ctx['synthetic'] else ''})")
    return "\n".join(lines)


def main(args):
    size = SIZES["quick" if args.quick else "full"]
    work = args.work or tempfile.mkdtemp(prefix="device_bench_")
    synthetic = not (args.data_loc and os.path.isdir(args.data_loc))
    data = args.data_loc
    if synthetic:
        start = time.perf_counter()
        data = synthetic_cifar(os.path.join(work, "data"), size["train"], size["test"])
        print(f"synthetic CIFAR-sized data in {data} ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr)
    ctx = {"data": data, "work": work, "ckdir": os.path.join(work, "checkpoints"),
           "size": size, "synthetic": synthetic, "loader_flag": has_loader_flag(),
           "device": args.device or ("cpu" if args.quick else "cuda"),
           "workers": 1 if args.quick else os.cpu_count()}
    speeds, epoch, search = measure(ctx, args)
    print(table(speeds, epoch, search, ctx, args))
    if args.json:
        tmp = args.json + ".tmp"   # whole or absent: device_check.py reads it as 'bench done'
        with open(tmp, "w") as f:
            json.dump(figures(speeds, epoch, search, ctx), f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

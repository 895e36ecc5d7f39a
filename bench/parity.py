"""Is the fast CPU default (--amp auto: bf16 autocast + channels_last on a CPU with native bf16)
as accurate as fp32? Trains the same networks with the same seeds both ways on a CIFAR-10 subset.

    nice python bench/parity.py [--epochs 8 --train_subset 8000 --seeds 0 1] [--table parity.md]

Steps: a small Fisher search (fisher_rank.py) picks one BlockSwap student of WRN-16-2; then, per
seed, a WRN-16-2 teacher in fp32 and in the default, and that student in fp32 and in the default
(both students learn from the seed's fp32 teacher, so only the student's precision differs).
Every run is `python main.py ...` in a subprocess (cosine schedule); the markdown table of
validation errors (mean, spread = max - min over seeds) and wall times is rewritten after each
run, so a partial table is there while it runs. Finished runs are reused on a rerun.
The default sizes take about 40 minutes on an idle 2-core CPU with native bf16; --quick, a
smoke test on generated images in a temporary folder, about a minute.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = {"fp32": ["--amp", "off", "--no_channels_last"], "default": []}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_loc", default=os.path.join(ROOT, "..", "shared", "data",
                                                      "cifar10-jpeg"))
    p.add_argument("--out", default=os.path.join(ROOT, "results", "parity"))
    p.add_argument("--table", default=None, help="markdown table file (default: OUT/parity.md)")
    p.add_argument("--seeds", default=[0, 1], type=int, nargs="+")
    p.add_argument("--epochs", default=8, type=int)
    p.add_argument("--train_subset", default=8000, type=int)
    p.add_argument("--val_subset", default=2000, type=int)
    p.add_argument("--workers", default=2, type=int)
    p.add_argument("--param_goal", default=350_000, type=int, help="student budget (search)")
    p.add_argument("--samples", default=50, type=int, help="search candidates")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: generated images, 1 seed, 1 epoch of 20 images, 3 "
                        "candidates, all in a temporary folder")
    return p


def quick(args):
    """--quick's tiny settings: generated images and the outputs in a temporary folder."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import write_imagefolder
    tmp = tempfile.mkdtemp(prefix="parity_quick_")
    args.data_loc = write_imagefolder(os.path.join(tmp, "data"), n_train=20, n_test=10)
    args.out, args.seeds, args.epochs = os.path.join(tmp, "out"), [0], 1
    args.train_subset, args.val_subset, args.samples, args.workers = 20, 10, 3, 0


def call(argv, log):
    """Run a command, its output appended to `log`; seconds it took."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def search_student(args, log) -> str:
    best = os.path.join(args.out, "student_genotype.csv")
    if not os.path.isfile(best):
        call([sys.executable, "fisher_rank.py", "cifar10", "--data_loc", args.data_loc,
              "--wrn_depth", "16", "--wrn_width", "2", "--param_goal", str(args.param_goal),
              "--samples", str(args.samples), "--results_dir", os.path.join(args.out, "search"),
              "--genotype_dir", os.path.join(args.out, "search"), "--best_file", best,
              "--no-plot"], log)
    return best


def train(args, log, mode, name, precision, seed, extra=()):
    """(final val error %, wall seconds, precision the run recorded) of one main.py run."""
    ckdir = os.path.join(args.out, "checkpoints")
    path = os.path.join(ckdir, name + ".t7")
    seconds = None
    if not os.path.isfile(path):
        seconds = call([sys.executable, "main.py", "cifar10", mode, "--data_loc", args.data_loc,
                        "--checkpoint_dir", ckdir, "--wrn_depth", "16", "--wrn_width", "2",
                        "--epochs", str(args.epochs), "--cosine", "--seed", str(seed),
                        "--train_subset", str(args.train_subset),
                        "--val_subset", str(args.val_subset), "--workers", str(args.workers),
                        "--no-plot", *PRECISIONS[precision], *extra], log)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if seconds is None:   # reused: the epochs' own times
        seconds = sum(float(r["seconds"]) for r in ckpt["log"])
    used = f"{ckpt['args'].get('amp', 'off')}" \
           f"{', channels_last' if ckpt['args'].get('channels_last') else ''}"
    return ckpt["val_errors"][-1], seconds, used


def table(rows, args) -> str:
    """rows: {(network, precision): [(seed, err, seconds, used), ...]}."""
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    lines = [f"CIFAR-10 subset: {args.train_subset} train / {args.val_subset} val images, "
             f"{args.epochs} epochs (cosine), batch 128, {torch.get_num_threads()} threads.\n",
             f"| network | precision | val error % ({seeds}) | mean | spread | wall s per run |",
             "|---|---|---|---|---|---|"]
    for (network, precision), runs in rows.items():
        errs = [r[1] for r in runs]
        spread = max(errs) - min(errs) if len(errs) > 1 else float("nan")
        lines.append(f"| {network} | {precision} ({runs[0][3]}) | "
                     f"{' / '.join(f'{e:.2f}' for e in errs)} | {statistics.mean(errs):.2f} | "
                     f"{spread:.2f} | {statistics.mean(r[2] for r in runs):.0f} |")
    return "\n".join(lines) + "\n"


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    print(text, flush=True)


def main(args):
    if args.quick:
        quick(args)
    os.makedirs(args.out, exist_ok=True)
    table_path = args.table or os.path.join(args.out, "parity.md")
    log = os.path.join(args.out, "runs.log")
    genotype = search_student(args, log)
    rows = {}
    for seed in args.seeds:
        teacher = f"t16_fp32_s{seed}"
        for precision in PRECISIONS:
            t = f"t16_{precision}_s{seed}"
            rows.setdefault(("WRN-16-2 teacher", precision), []).append(
                (seed, *train(args, log, "teacher", t, precision, seed, ["-t", t])))
            write(table_path, table(rows, args))
        for precision in PRECISIONS:
            s = f"s16_{precision}_s{seed}"
            rows.setdefault(("BlockSwap student of it", precision), []).append(
                (seed, *train(args, log, "student", s, precision, seed,
                              ["-t", teacher, "-s", s, "--from_genotype", genotype])))
            write(table_path, table(rows, args))
    with open(genotype) as f:
        write(table_path, table(rows, args) + f"\nstudent genotype file:\n{f.read().strip()}\n")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

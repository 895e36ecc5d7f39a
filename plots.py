"""Plot BlockSwap searches, training logs, sweeps and studies (the pictures live in
blockswap/plots.py; this is their command line).

    python plots.py search results/fisher_at_800k.csv
    python plots.py training checkpoints/<name>.log.csv
    python plots.py sweep checkpoints/          # also writes checkpoints/sweep.csv
    python plots.py study results/study/<name>/study.csv
"""
import argparse
import os

from blockswap.cli import HelpFormatter, run_cli
from blockswap.files import atomic_write
from blockswap.plots import (GOALS, collect_sweep, image_format, plot_search, plot_study,
                             plot_sweep, plot_training, warn_unfinished)

def get_args_parser():
    parser = argparse.ArgumentParser(description="Plot BlockSwap searches, logs, sweeps, studies")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("search", help="score vs params/MACs of a results/fisher_at_<goal>.csv")
    p.add_argument("path")
    p.add_argument("--param_goal", type=float, default=None,
                   help="shade this parameter window (default: the search's, from its .json)")
    p.add_argument("--mac_goal", type=float, default=None)
    p.add_argument("--latency_goal", type=float, default=None)
    p.add_argument("--tol", type=float, default=None, help="budget window, +-fraction")
    p.add_argument("--score", default=None,
                   help="score column (default: the search's proxy, from its .json)")
    p = sub.add_parser("training", help="curves from a checkpoints/<name>.log.csv")
    p.add_argument("path")
    p = sub.add_parser("sweep", help="error vs params from a CSV (name, params, error[, method]) "
                                     "or a checkpoint folder (also writes its sweep.csv)")
    p.add_argument("path")
    p = sub.add_parser("study", help="proxy score vs trained error from a study CSV")
    p.add_argument("path")
    p.add_argument("--error", default="val_error", help="column of trained errors")
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
        p.add_argument("-o", "--out", default=None,
                       help="picture to write, in the format its suffix names (default: PATH.png)")
    return parser


def default_out(what: str, path: str) -> str:
    """The picture beside the input: <name>.png for a training log <name>.log.csv (main.py's
    own name for it), <folder>/sweep.png for a checkpoint folder, else PATH with .png."""
    if what == "sweep" and os.path.isdir(path):
        return os.path.join(path, "sweep.png")
    if what == "training" and path.endswith(".log.csv"):
        return path[:-len(".log.csv")] + ".png"
    return os.path.splitext(path)[0] + ".png"


def main(args):
    out = args.out or default_out(args.what, args.path)
    image_format(out)   # a bad -o suffix fails before anything is written
    if args.what == "search":
        path = plot_search(args.path, out, args.score, {k: getattr(args, k) for k in GOALS})
    elif args.what == "training":
        path = plot_training(args.path, out)
    elif args.what == "sweep":
        table = args.path
        if os.path.isdir(args.path):
            table = collect_sweep(args.path)
            csv_path = os.path.join(args.path, "sweep.csv")
            atomic_write(csv_path, lambda f: f.write(table.to_csv(index=False).encode()))
            print(table.to_string(index=False))
            print(f"wrote {csv_path}")
            warn_unfinished(table)
        path = plot_sweep(table, out)
    else:
        path = plot_study(args.path, out, error=args.error)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_cli(main, get_args_parser())

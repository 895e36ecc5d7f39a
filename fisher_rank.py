"""BlockSwap's search: sample mixed-block networks that meet a budget, score each by Fisher
potential after one minibatch at random initialisation, keep the best.

    # 1000 random genotypes (uniform; exactly uniform within the window when a goal is given)
    python fisher_rank.py cifar10 --generate_random --samples 1000 --save_file archs/master_arch.csv
    # score candidates within +-2.5% of 800K params
    python fisher_rank.py cifar10 --data_loc=../cifar10 --param_goal 800000 --samples 1000
    # the same, sharded over 4 processes (each scores every 4th candidate, rank 0 merges)
    torchrun --standalone --nproc_per_node 4 fisher_rank.py cifar10 --data_loc=../cifar10 ...
    # then train the top 50 briefly and rank them by validation error, 8 at a time
    python fisher_rank.py cifar10 --data_loc=../cifar10 ... --rerank 50 --launcher local --jobs 8

This script parses flags and calls the library: search.py (candidates, scoring, the results
store, genotype files), engine.py (the re-rank's trainings) and funcs.py (sampling).
"""
import argparse
import contextlib
import os

import numpy as np
import pandas as pd

from blockswap.cli import HelpFormatter, at_least, positive, progress, run_cli
from blockswap.engine import TrainConfig, candidate_config, train_candidate
from blockswap.files import atomic_write, check_writable, format_convs, pid_lock, save_genotype
from blockswap.funcs import Budget, budget_args, sample_genotypes
from blockswap.jobs import Job, launch_settings, launcher_args, run_jobs
from blockswap.latency import add_latency_args, timing_from_args
from blockswap.loaders import NUM_CLASSES, data_args, get_datasets
from models import Network, UserError, network_args
from blockswap.proxies import PROXIES, proxy_arg, proxy_spec
from blockswap.runtime import AMP_CHOICES, device_args, distributed_teardown, pick_device, start_runtime
from blockswap.search import (DEFAULT_ARCHS, ResultsWriter, Search, SearchPaths, check_genotype_files,
                    check_settings, cost_table, genotype_stem, get_candidates, latency_row,
                    rank_rows, read_rows, run_search, search_settings, search_space,
                    training_images, with_latency)

DEFAULT_PARAM_GOAL = 800_000   # the original's default when no goal is given


def get_args_parser():
    p = argparse.ArgumentParser(description="BlockSwap: rank budget-meeting networks by "
                                            "Fisher potential at initialisation.",
                                formatter_class=HelpFormatter,
                                parents=[data_args(), network_args(), budget_args(),
                                         device_args(), launcher_args()])
    p.add_argument("--latency_goal", default=None, type=positive(),
                   help="predicted inference latency budget in ms (may join params/MACs)")
    add_latency_args(p)
    p.add_argument("--samples", default=1000, type=at_least(1),
                   help="candidates to score / generate")
    p.add_argument("--seed", default=0, type=int, help="sampling, minibatch and init seed")
    p.add_argument("--batch_size", default=128, type=at_least(1),
                   help="images per scoring minibatch")
    p.add_argument("--minibatches", default=1, type=at_least(1),
                   help="scores summed over this many")
    p.add_argument("--resample_batch", action="store_true",
                   help="a different minibatch per candidate (off: one shared, fair)")
    p.add_argument("--proxy", default="fisher", type=proxy_arg,
                   help="scoring function (proxies.py; higher is better): "
                        f"{', '.join(PROXIES)}; an ensemble 'vote' or 'rank:a+b+c'; or a "
                        "comma-separated list, one column each, ranked by the first")
    p.add_argument("--top_n", default=1, type=at_least(1),
                   help="genotype files kept for the best n")
    p.add_argument("--blocks", default=None,
                   help="comma-separated search space (None: the paper's 24 + --module's)")
    p.add_argument("--generate_random", action="store_true",
                   help="write --samples random genotypes to --save_file and stop")
    p.add_argument("--save_file", default=DEFAULT_ARCHS,
                   help="archs file: written by --generate_random; when scoring, the candidates "
                        "are its rows within the budget if at least --samples of them are "
                        f"({DEFAULT_ARCHS} is skipped with a message when it does not fit, a "
                        "file you name is an error); 'none': exact samples")
    p.add_argument("--overwrite", action="store_true", help="let --generate_random replace it")
    p.add_argument("--results_dir", default="results",
                   help="<proxy>_at_<goal>.csv/.json/.png and _best.csv (the best genotype)")
    p.add_argument("--genotype_dir", default="genotypes",
                   help="<goal>_<index>.csv of each new best and of the top --top_n")
    p.add_argument("--best_file", default=None,
                   help="also write the best genotype here (a fixed name for sweep scripts)")
    p.add_argument("--plot", default=True, action=argparse.BooleanOptionalAction,
                   help="draw results/<proxy>_at_<goal>.png: score against params and MACs")
    p.add_argument("--rerank", default=0, type=at_least(0),
                   help="then train the top K for --rerank_epochs (engine.py, as main.py) and "
                        "rank them by validation error (results/<proxy>_at_<goal>_rerank.csv); "
                        "--launcher says where the trainings run")
    p.add_argument("--rerank_epochs", default=2, type=at_least(1),
                   help="epochs per re-ranked candidate")
    p.add_argument("--rerank_lr", default=0.1, type=positive(),
                   help="learning rate of the re-rank (cosine schedule)")
    p.add_argument("--rerank_train_subset", default=None, type=at_least(1),
                   help="train each re-ranked candidate on N fixed images (default: all)")
    p.add_argument("--rerank_val_subset", default=None, type=at_least(1),
                   help="validate them on N fixed images (default: all)")
    p.add_argument("--amp", default="auto", choices=sorted(AMP_CHOICES),
                   help="the re-rank's training precision (as main.py --amp)")
    return p




def resolve(args) -> argparse.Namespace:
    """The search's settings record: the flags with the defaults that depend on other flags
    filled in, and `spec`, the --proxy list parsed once. `args` itself is left as it was."""
    args = argparse.Namespace(**vars(args))
    net = Network.from_args(args)     # fills --arch, and WRN's depth and width
    args.arch, args.wrn_depth, args.wrn_width = net.arch, net.depth, net.width
    if not args.generate_random and args.param_goal is None and args.mac_goal is None \
            and args.latency_goal is None:
        args.param_goal = DEFAULT_PARAM_GOAL
    # "auto" becomes a device type (cuda, mps, cpu), validated; a plain "cuda" stays plain so
    # that each torchrun process takes its own GPU (runtime.start_runtime)
    device = pick_device(args.device)
    args.device = device.type if args.device in (None, "auto") else args.device
    args.spec = proxy_spec(args.proxy)
    if args.latency_goal is not None:
        timing_from_args(args, args.device)   # a bad --latency_device, before any work
    return args


def main(args):
    with distributed_teardown():   # a no-op without torchrun
        return search(args)


def check_outputs(args) -> None:
    """Every output folder and file name, before any work."""
    check_writable(args.results_dir, "--results_dir")
    check_writable(args.genotype_dir, "--genotype_dir")
    if args.best_file:
        if os.path.isdir(args.best_file):
            raise UserError(f"--best_file {args.best_file} is a folder: give a file name such "
                            "as genotypes/best.csv")
        check_writable(os.path.dirname(args.best_file) or ".", "--best_file")
    if args.rerank and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--rerank trains in this process: run it without torchrun (the scores "
                        "already in the results file are reused)")


def search(args):
    args = resolve(args)
    names = search_space(args)
    if args.generate_random:
        return generate_random(args, names)
    if not args.data_loc:
        raise UserError("pass --data_loc (a CIFAR folder or an image folder) to score "
                        "candidates, or --generate_random to only write genotypes")
    check_outputs(args)
    rt = start_runtime(args.device)
    train_set, _, num_classes = get_datasets(args.dataset, args.data_loc, args.download)
    table = with_latency(args, cost_table(args, num_classes, names), num_classes, names)
    genotypes, source = get_candidates(args, table)
    paths = SearchPaths.of(args)
    settings = search_settings(args, names, num_classes, source, train_set, table)
    if rt.main and os.path.isfile(paths.settings):   # a resumed search: compare, before decoding
        check_settings(paths.settings, settings)
    run = Search(args, genotypes, table, num_classes,
                 training_images(args, train_set, rt.device), paths, rt)
    if not rt.main:
        return run_search(run, settings)
    check_genotype_files(args, genotypes)
    os.makedirs(args.results_dir, exist_ok=True)
    with pid_lock(paths.lock, paths.results):
        result, rows = run_search(run, settings)
        if args.rerank:
            result["rerank"] = rerank(args, rows, paths)
        return result


# --------------------------------------------------------------------------------------------
# Re-rank: train the top K briefly (engine.py), rank by validation error
# --------------------------------------------------------------------------------------------

RERANK_COLUMNS = ["index", "convs", "params", "macs", "score", "val_error"]


def rerank_config(args, row, folder) -> TrainConfig:
    """The short training of one candidate: main.py's teacher training (cross-entropy, cosine
    schedule) on the search's data path and precision."""
    return candidate_config(
        row["convs"], folder, f"candidate_{row['index']}", dataset=args.dataset,
        data_loc=args.data_loc, arch=args.arch, wrn_depth=args.wrn_depth,
        wrn_width=args.wrn_width, module=args.module, epochs=args.rerank_epochs,
        lr=args.rerank_lr, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
        device=args.device, train_subset=args.rerank_train_subset,
        val_subset=args.rerank_val_subset, loader=args.loader, cache_dir=args.cache_dir,
        amp=args.amp)


def read_rerank(path):
    """{index: row} of a re-rank CSV (a torn last line cut off, as read_rows)."""
    return read_rows(path, ["score", "val_error"])


def rerank(args, rows, paths: SearchPaths):
    """Train the top --rerank candidates by the proxy (appending each to <results>_rerank.csv
    as it finishes, so a rerun resumes), then write the lowest-error one as a genotype file."""
    top = rank_rows(args.spec, rows)[:args.rerank]
    path, folder = paths.rerank, paths.rerank_dir
    check_settings(paths.rerank_settings, {
        "epochs": args.rerank_epochs, "lr": args.rerank_lr, "batch_size": args.batch_size,
        "seed": args.seed, "train_subset": args.rerank_train_subset,
        "val_subset": args.rerank_val_subset, "proxy": args.proxy})
    done = read_rerank(path)
    todo = {f"candidate_{r['index']}": r for r in top if r["index"] not in done}
    writer = ResultsWriter(path, RERANK_COLUMNS)

    def collect(name, result):   # appended as each training ends, so a rerun resumes
        r = todo[name]
        row = {k: r[k] for k in ("index", "convs", "params", "macs")}
        row.update(score=r[args.spec.ranker], val_error=result["val_error"])
        writer.write_row(row)
        done[r["index"]] = row
    try:
        run_jobs(train_candidate, [Job(n, rerank_config(args, r, folder)) for n, r in todo.items()],
                 launch_settings(args, os.path.join(folder, "jobs"), args.device),
                 on_result=collect)
    finally:
        writer.close()
    trained = [done[r["index"]] for r in top]
    best = min(trained, key=lambda r: (r["val_error"], r["index"]))
    geno = os.path.join(args.genotype_dir, f"{genotype_stem(args)}rerank_{best['index']}.csv")
    save_genotype(geno, best["convs"], best["score"], best["index"])
    print(f"re-rank of the top {len(top)} after {args.rerank_epochs} epochs: #{best['index']} "
          f"val error {best['val_error']:.2f}% (proxy's #1: #{top[0]['index']}, "
          f"{done[top[0]['index']]['val_error']:.2f}%) -> {geno}")
    return {"results": path, "genotype": geno, "best_index": best["index"],
            "ranking": [r["index"] for r in sorted(trained, key=lambda r: (r["val_error"],
                                                                            r["index"]))]}


def generate_random(args, names):
    """Write --samples genotypes (convs, params, macs) to --save_file, atomically."""
    if args.save_file.lower() == "none" or os.path.isdir(args.save_file):
        raise UserError(f"--generate_random writes an archs file: --save_file {args.save_file} "
                        "is not a file name")
    if os.path.exists(args.save_file) and not args.overwrite:
        raise UserError(f"{args.save_file} exists: pass --overwrite to replace it, or another "
                        "--save_file")
    check_writable(os.path.dirname(args.save_file) or ".", "--save_file")
    num_classes = NUM_CLASSES[args.dataset]
    table = with_latency(args, cost_table(args, num_classes, names), num_classes, names)
    with contextlib.closing(progress(total=args.samples, desc="genotypes")) as bar:
        genotypes = sample_genotypes(table, args.samples, Budget.from_args(args, table.latency),
                                     args.seed, progress=bar.update)
    params, macs = table.cost_many(np.stack([table.encode(g) for g in genotypes]))
    df = pd.DataFrame({"convs": [format_convs(g) for g in genotypes], "params": params,
                       "macs": macs})
    if table.latency is not None:
        df["latency_ms"] = [latency_row(table, g)["latency_ms"] for g in genotypes]
    atomic_write(args.save_file, lambda f: f.write(df.to_csv().encode()))
    print(f"{len(df)} genotypes, params {params.min():,} to {params.max():,} -> {args.save_file}"
          f"\nsearches with --save_file {args.save_file} score its rows within their budget "
          "(--save_file none: exact samples)")
    return {"save_file": args.save_file, "n": len(df)}


if __name__ == "__main__":
    run_cli(main, get_args_parser())

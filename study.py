"""Does the proxy predict trained accuracy on *your* data? A small rank-correlation study.

Samples K genotypes at a budget, scores each with every zero-cost proxy on one fixed minibatch
(same initialisation for every proxy), trains each for a few epochs with main.py, then reports
the Spearman rank correlation between each proxy and the trained validation error (negative
is good: a higher score should mean a lower error) and draws one scatter panel per proxy.

    python study.py cifar10 --data_loc ../shared/data/cifar10-jpeg --wrn_depth 16 --wrn_width 2 \
        --param_goal 300000 --candidates 24 --epochs 3 --train_subset 5000 --val_subset 2000

Everything goes to --out (default results/study_<goal>): study.csv (one row per candidate:
index, convs, params, macs, one column per proxy, val_error, train_seconds; appended and
flushed as it goes, so re-running the same command resumes), study.png, genotypes/ and
checkpoints/ of the trained candidates, and summary.md (the table printed at the end).
"""
import argparse
import csv
import os
import time

import pandas as pd
import torch
from tqdm import tqdm

import fisher_rank
import main as trainer
from count_ops import CostTable
from funcs import (HelpFormatter, atomic_write, check_writable, get_datasets, pick_device,
                   run_cli, sample_genotypes, save_genotype, subset, subset_indices)
from loaders import Augment, add_loader_args, augmented_batches, choose_loader, tensor_images
from models import SEARCH_SPACE, UserError, WideResNet, load_block_module
from proxies import PROXIES, get_proxy, spearman


def get_args_parser():
    p = argparse.ArgumentParser(description="Rank correlation of zero-cost proxies with "
                                "trained error", formatter_class=HelpFormatter)
    p.add_argument("dataset", choices=["cifar10", "cifar100"])
    p.add_argument("--data_loc", required=True, help="CIFAR folder or ImageFolder root")
    p.add_argument("--wrn_depth", default=16, type=int)
    p.add_argument("--wrn_width", default=2, type=int)
    p.add_argument("--param_goal", default=None, type=int, help="budget (+-2.5%%); none: any size")
    p.add_argument("--mac_goal", default=None, type=int)
    p.add_argument("--candidates", default=24, type=int, help="K genotypes to score and train")
    p.add_argument("--proxies", default=",".join(PROXIES), help="comma-separated proxy names")
    p.add_argument("--batch_size", default=128, type=int, help="scoring and training batch")
    p.add_argument("--epochs", default=3, type=int, help="training epochs per candidate")
    p.add_argument("--lr", default=0.1, type=float)
    p.add_argument("--train_subset", default=5000, type=int)
    p.add_argument("--val_subset", default=2000, type=int)
    p.add_argument("--workers", default=0, type=int)
    add_loader_args(p)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output folder (default results/study_<goal>)")
    p.add_argument("--module", default=None, help="Python file that calls register_block()")
    return p


def out_dir(args) -> str:
    if args.out:
        return args.out
    goal = args.param_goal or args.mac_goal or "any"
    return os.path.join("results", f"study_{goal}")


def fixed_minibatch(args, device, data=None):
    """One seeded training minibatch: every candidate and proxy sees the same images.
    `data`: get_datasets' answer, when already read."""
    train_set, _, num_classes = data or get_datasets(args.dataset, args.data_loc)
    if choose_loader(args.loader, args.dataset, [train_set]) == "tensor":
        data = tensor_images(train_set, args.workers, args.cache_dir)
        data = data.subset(subset_indices(len(data), args.train_subset, args.seed)).to(device)
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(data), generator=g)[:args.batch_size]
        (x, y), = augmented_batches(data, idx, args.batch_size,
                                    Augment.for_dataset(args.dataset), g)
        return x, y, num_classes
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(subset(train_set, args.train_subset, args.seed),
                                         batch_size=args.batch_size, shuffle=True, generator=g)
    torch.manual_seed(args.seed)          # the random crops and flips of that batch
    x, y = next(iter(loader))
    return x.to(device), y.to(device), num_classes


def score(args, genotype, index, names, batch, device) -> dict:
    """Each proxy on the same random initialisation of the candidate."""
    x, y, num_classes = batch
    scores = {}
    for name in names:
        torch.manual_seed(args.seed + index)
        net = WideResNet(args.wrn_depth, args.wrn_width, genotype, num_classes).to(device)
        scores[name] = get_proxy(name)(net, x, y)
    return scores


def train(args, genotype, index, folder) -> float:
    """Train one candidate with main.py (cross-entropy, cosine schedule); its val error (%)."""
    geno_csv = os.path.join(folder, "genotypes", f"candidate_{index}.csv")
    save_genotype(geno_csv, genotype, index=index)
    name = f"candidate_{index}"
    argv = [args.dataset, "teacher", "--data_loc", args.data_loc, "--from_genotype", geno_csv,
            "--wrn_depth", str(args.wrn_depth), "--wrn_width", str(args.wrn_width),
            "-t", name, "--checkpoint_dir", os.path.join(folder, "checkpoints"),
            "--epochs", str(args.epochs), "--lr", str(args.lr), "--cosine",
            "--batch_size", str(args.batch_size), "--train_subset", str(args.train_subset),
            "--val_subset", str(args.val_subset), "--workers", str(args.workers),
            "--seed", str(args.seed + index), "--device", args.device, "--overwrite",
            "--loader", args.loader,
            *(["--cache_dir", args.cache_dir] if args.cache_dir else []),
            *(["--module", args.module] if args.module else [])]
    trainer.main(trainer.get_args_parser().parse_args(argv))
    ckpt = trainer.load_checkpoint(os.path.join(folder, "checkpoints", name + ".t7"))
    return float(ckpt["val_errors"][-1])


def read_done(path, columns):
    """{index: row} of the candidates already in study.csv. A file that is missing or empty
    (killed before its first row) starts afresh with the header; a torn last line (killed
    mid-write) is dropped. The file then holds the header and whole rows only."""
    text = open(path).read() if os.path.isfile(path) else ""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    if not lines:
        lines = [",".join(columns) + "\n"]
    if "".join(lines) != text:
        atomic_write(path, lambda f: f.write("".join(lines).encode()))
    rows = list(csv.reader(lines))
    if rows[0] != columns:
        raise UserError(f"{path} has columns {rows[0]}, this study writes {columns}; "
                        "use another --out")
    bad = [k + 2 for k, r in enumerate(rows[1:]) if len(r) != len(columns)]
    if bad:
        raise UserError(f"{path}: line {bad[0]} does not have {len(columns)} fields; "
                        "remove it to resume")
    return {int(r[0]): dict(zip(columns, r)) for r in rows[1:]}


def validate(args) -> None:
    """Refuse out-of-range numbers before anything is written."""
    for key in ("candidates", "epochs", "batch_size", "train_subset", "val_subset"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} {getattr(args, key)}: must be at least 1")
    if not args.lr > 0:
        raise UserError(f"--lr {args.lr}: must be a positive number")


def check_settings(folder, args):
    """A resumed study must use the settings it started with (settings.json beside it)."""
    os.makedirs(folder, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()
                if k not in ("workers", "device", "out", "cache_dir")}
    fisher_rank.check_settings(os.path.join(folder, "settings.json"), settings)


def summarise(df, names, args, seconds) -> str:
    lines = ["| proxy | Spearman rho vs val error | n |", "|---|---|---|"]
    for name in names:
        rho = spearman(df[name].to_numpy(float), df["val_error"].to_numpy(float))
        lines.append(f"| {name} | {rho:+.2f} | {len(df)} |")
    lines.append("")
    lines.append(f"WRN-{args.wrn_depth}-{args.wrn_width} space, goal "
                 f"{args.param_goal or args.mac_goal or 'any'}, {len(df)} candidates, "
                 f"{args.epochs} epochs on {args.train_subset} images, validation on "
                 f"{args.val_subset}; val error {df['val_error'].min():.1f}-"
                 f"{df['val_error'].max():.1f}%; {seconds / 60:.1f} min wall this run.")
    return "\n".join(lines)


def main(args):
    # Everything that can fail on bad input comes before settings.json is written.
    validate(args)
    if args.module:
        load_block_module(args.module)
    names = [n.strip() for n in args.proxies.split(",") if n.strip()]
    for n in names:
        get_proxy(n)
    folder = out_dir(args)
    device = pick_device(args.device)
    table = CostTable.for_wrn(args.wrn_depth, args.wrn_width, names=SEARCH_SPACE)
    genotypes = sample_genotypes(table, args.candidates, args.param_goal, args.mac_goal,
                                 seed=args.seed)
    data = get_datasets(args.dataset, args.data_loc)
    check_writable(folder, "--out")
    check_settings(folder, args)
    base = ["index", "convs", "params", "macs"]
    extra = [n for n in names if n not in base]   # the `params` proxy is the params column
    columns = [*base, *extra, "val_error", "train_seconds"]
    path = os.path.join(folder, "study.csv")
    done = read_done(path, columns)
    batch = None
    start = time.time()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        for i, genotype in enumerate(tqdm(genotypes, desc="study")):
            if i in done:
                continue
            batch = batch or fixed_minibatch(args, device, data)
            scores = score(args, genotype, i, names, batch, device)
            t0 = time.time()
            error = train(args, genotype, i, folder)
            params, macs = table.cost(genotype)
            writer.writerow([i, str(genotype), params, macs, *[scores[n] for n in extra],
                             error, round(time.time() - t0, 1)])
            f.flush()
    df = pd.read_csv(path)
    from plots import plot_study
    png = plot_study(df, os.path.join(folder, "study.png"), proxies=names)
    text = summarise(df, names, args, time.time() - start)
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"study: {path}, {png}")
    return df


if __name__ == "__main__":
    run_cli(main, get_args_parser())

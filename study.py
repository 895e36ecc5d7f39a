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
import math
import os
import time

import numpy as np

import pandas as pd
import torch
from tqdm import tqdm

import fisher_rank
import main as trainer
from count_ops import CostTable
from funcs import (Budget, HelpFormatter, atomic_write, budget_args, check_writable,
                   format_convs, get_datasets,
                   run_cli, sample_genotypes, subset, subset_indices)
from loaders import Augment, augmented_batches, choose_loader, data_args, tensor_images
from models import SEARCH_SPACE, Network, UserError, load_block_module, network_args
from runtime import device_args, pick_device
from proxies import PROXIES, VOTE, ProxySpec, get_proxy, kendall, spearman


def get_args_parser():
    p = argparse.ArgumentParser(description="Rank correlation of zero-cost proxies with "
                                "trained error", formatter_class=HelpFormatter,
                                parents=[data_args(), network_args(), budget_args(),
                                         device_args()])
    # A study trains every candidate: a WRN-16-2 space by default, small enough for a CPU.
    p.set_defaults(wrn_depth=16, wrn_width=2)
    p.add_argument("--candidates", default=24, type=int, help="K genotypes to score and train")
    p.add_argument("--proxies", default=",".join(PROXIES), help="comma-separated proxy names")
    p.add_argument("--batch_size", default=128, type=int, help="scoring and training batch")
    p.add_argument("--epochs", default=3, type=int, help="training epochs per candidate")
    p.add_argument("--lr", default=0.1, type=float)
    p.add_argument("--train_subset", default=5000, type=int)
    p.add_argument("--val_subset", default=2000, type=int)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--out", default=None, help="output folder (default results/study_<goal>)")
    p.add_argument("--train_seeds", default=1, type=int,
                   help="train every candidate this many times; the mean error is the truth and "
                        "the seed-to-seed rank correlation the noise ceiling")
    p.add_argument("--score_seeds", default=1, type=int,
                   help="score every proxy on this many initialisations (proxy stability)")
    p.add_argument("--bootstrap", default=1000, type=int, help="resamples for the intervals")
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


def score(args, genotype, index, names, batch, device, replica=0) -> dict:
    """Each proxy on the same random initialisation of the candidate (replica r > 0: another
    initialisation, for --score_seeds)."""
    x, y, num_classes = batch
    scores = {}
    for name in names:
        torch.manual_seed(args.seed + index + REPLICA_STRIDE * replica)
        net = Network.from_args(args, num_classes).build(genotype).to(device)
        scores[name] = get_proxy(name)(net, x, y)
    return scores


def train(args, genotype, index, folder, replica=0) -> float:
    """Train one candidate with main.py (cross-entropy, cosine schedule); its val error (%).
    Replica r > 0 (--train_seeds): the same candidate with another training seed."""
    name = f"candidate_{index}" + (f"_seed{replica}" if replica else "")
    return trainer.train_genotype(genotype, folder, name, dict(
        dataset=args.dataset, data_loc=args.data_loc, arch=args.arch,
        wrn_depth=args.wrn_depth, wrn_width=args.wrn_width, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, train_subset=args.train_subset,
        val_subset=args.val_subset, workers=args.workers,
        seed=args.seed + index + REPLICA_STRIDE * replica,
        subset_seed=args.seed,      # every candidate and seed: the same images
        device=args.device, loader=args.loader, cache_dir=args.cache_dir, module=args.module))


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
    for key in ("candidates", "epochs", "batch_size", "train_subset", "val_subset",
                "train_seeds", "score_seeds", "bootstrap"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} {getattr(args, key)}: must be at least 1")
    if not args.lr > 0:
        raise UserError(f"--lr {args.lr}: must be a positive number")
    if not 0 < args.tol < 1:
        raise UserError(f"--tol {args.tol}: must be strictly between 0 and 1")


def check_settings(folder, args):
    """A resumed study must use the settings it started with (settings.json beside it)."""
    os.makedirs(folder, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()
                if k not in ("workers", "device", "out", "cache_dir", "bootstrap", "download")
                and not (k in ("train_seeds", "score_seeds") and v == 1)   # old studies resume
                and not (k == "tol" and v == 0.025)}
    fisher_rank.check_settings(os.path.join(folder, "settings.json"), settings)


REPLICA_STRIDE = 1000            # seed offset of training/scoring replica r: seed + index + 1000 r
LOW_CEILING = 0.7                # a seed-to-seed rank correlation below this: ranking on noise


def batch_ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks (1..n, ties averaged) of every row of a (B, n) array, by pairwise counts."""
    below = (a[:, None, :] < a[:, :, None]).sum(-1)
    same = (a[:, None, :] == a[:, :, None]).sum(-1)
    return below + (same + 1) / 2


def batch_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair of two (B, n) arrays (NaN where a row is constant)."""
    rx, ry = batch_ranks(x), batch_ranks(y)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    denom = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(1) / denom, np.nan)


def batch_kendall(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair of two (B, n) arrays (each pair counted twice)."""
    dx = np.sign(x[:, :, None] - x[:, None, :])
    dy = np.sign(y[:, :, None] - y[:, None, :])
    denom = np.sqrt((dx != 0).sum((1, 2)) * (dy != 0).sum((1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (dx * dy).sum((1, 2)) / denom, np.nan)


def chunked(batch_stat, x, y, chunk=100) -> np.ndarray:
    """batch_stat over (B, n) arrays in chunks of rows (its memory grows as chunk * n^2)."""
    return np.concatenate([batch_stat(x[i:i + chunk], y[i:i + chunk])
                           for i in range(0, len(x), chunk)])


def bootstrap_ci(batch_stat, x, y, n_boot=1000, seed=0):
    """95% percentile interval of a statistic over n_boot resamples of the candidates."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    values = chunked(batch_stat, x[idx], y[idx])
    values = values[np.isfinite(values)]
    return tuple(np.percentile(values, [2.5, 97.5])) if len(values) else (math.nan, math.nan)


def permutation_pvalue(x, y, n_perm=2000, seed=0) -> float:
    """Two-sided p-value of Spearman's rho against shuffled pairings ((hits + 1) / (n + 1))."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    observed = abs(spearman(x, y))
    if not np.isfinite(observed):
        return math.nan
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(y) for _ in range(n_perm)])
    hits = (np.abs(chunked(batch_spearman, np.broadcast_to(x, shuffled.shape), shuffled))
            >= observed - 1e-12).sum()
    return float((hits + 1) / (n_perm + 1))


def top_hit(score, error, frac=0.1) -> bool:
    """Does the proxy's top `frac` (at least one candidate) contain the lowest-error one?"""
    score, error = np.asarray(score, float), np.asarray(error, float)
    k = max(1, math.ceil(frac * len(score)))
    top = np.argsort(-np.where(np.isnan(score), -np.inf, score), kind="stable")[:k]
    return bool(np.argmin(error) in top)


def top_hit_rate(score, error, frac=0.1, n_boot=1000, seed=0) -> float:
    """How often top_hit holds over bootstrap resamples (the distinct candidates drawn)."""
    score, error = np.asarray(score, float), np.asarray(error, float)
    rng = np.random.default_rng(seed)
    draws = (np.unique(rng.integers(0, len(score), len(score))) for _ in range(n_boot))
    return float(np.mean([top_hit(score[i], error[i], frac) for i in draws]))


def proxy_row(name, score, error, n_boot, seed=0) -> str:
    """One table row: Spearman and Kendall (each with its bootstrap interval), p, top-10%."""
    rho, tau = spearman(score, error), kendall(score, error)
    score = np.where(np.isnan(np.asarray(score, float)), -np.inf, score)   # failed: last
    (rlo, rhi), (tlo, thi) = (bootstrap_ci(f, score, error, n_boot, seed)
                              for f in (batch_spearman, batch_kendall))
    p = permutation_pvalue(score, error, 2 * n_boot, seed)
    hit = "yes" if top_hit(score, error) else "no"
    return (f"| {name} | {rho:+.2f} [{rlo:+.2f}, {rhi:+.2f}] | {tau:+.2f} [{tlo:+.2f}, "
            f"{thi:+.2f}] | {p:.3f} | {hit}, {top_hit_rate(score, error, 0.1, n_boot, seed):.2f} |")


def replica_columns(args, extra):
    """(score replica columns, per-seed error columns) of --score_seeds/--train_seeds > 1."""
    scores = [f"{n}@{r}" for r in range(1, args.score_seeds) for n in extra]
    errors = [f"val_error_{r}" for r in range(args.train_seeds)] if args.train_seeds > 1 else []
    return scores, errors


def noise_ceiling(df, args):
    """Mean seed-to-seed Spearman of the trained errors over pairs of training seeds (None
    with one seed): no proxy can rank better than the training agrees with itself."""
    cols = replica_columns(args, [])[1]
    pairs = [(a, b) for i, a in enumerate(cols) for b in cols[i + 1:]]
    return float(np.mean([spearman(df[a], df[b]) for a, b in pairs])) if pairs else None


def stability(df, name, args):
    """Mean Spearman between a proxy's scores on initialisation 0 and on each other one."""
    if args.score_seeds < 2 or name == "params":
        return None
    return float(np.mean([spearman(df[name], df[f"{name}@{r}"])
                          for r in range(1, args.score_seeds)]))


def data_used(args):
    """(training images, validation images) main.py really used: a subset is capped by the
    folder's size (main.py's funcs.subset)."""
    train_set, val_set, _ = get_datasets(args.dataset, args.data_loc)
    cap = lambda n, ds: len(ds) if not n else min(n, len(ds))   # noqa: E731
    return cap(args.train_subset, train_set), cap(args.val_subset, val_set)


def summarise(df, spec, args, seconds) -> str:
    """The study table (every proxy and ensemble against the mean trained error), the noise
    ceiling and what was really used."""
    error = df["val_error"].to_numpy(float)
    items = list(spec.items) + (["vote"] if "vote" not in spec.items
                                and all(v in spec.columns for v in VOTE) else [])
    table = {c: df[c].to_numpy(float) for c in spec.columns}
    lines = ["| proxy | Spearman rho vs val error [95% CI] | Kendall tau [95% CI] | p | "
             "top-10% has the best (this sample, bootstrap rate) |", "|---|---|---|---|---|"]
    for item in items:
        lines.append(proxy_row(item, spec.scores(item, table), error, args.bootstrap))
    n_train, n_val = data_used(args)
    goal = args.param_goal or args.mac_goal
    lines += ["", f"{Network.from_args(args).name} space, goal "
              f"{f'{goal} +-{args.tol:.1%}' if goal else 'any'}, {len(df)} candidates, "
              f"{args.epochs} epochs on {n_train} training images (asked {args.train_subset}), "
              f"validation on {n_val}, {args.train_seeds} training seed(s) per candidate "
              f"(truth: their mean error); val error {error.min():.1f}-{error.max():.1f}% "
              f"(spread {error.max() - error.min():.1f} points); negative rho is good; "
              f"{seconds / 60:.1f} min wall this run."]
    ceiling = noise_ceiling(df, args)
    if ceiling is not None:
        lines.append(f"Noise ceiling (seed-to-seed Spearman of the trained errors): "
                     f"{ceiling:+.2f}.")
        if ceiling < LOW_CEILING:
            lines.append(f"WARNING: the noise ceiling is below {LOW_CEILING}: two trainings of "
                         "the same candidates disagree about their order about as much as the "
                         "proxies do, so this study cannot rank proxies. Train longer (--epochs) "
                         "or on more images (--train_subset) until it reaches 0.7.")
    stable = {n: stability(df, n, args) for n in spec.columns}
    if any(v is not None for v in stable.values()):
        lines.append(f"Proxy stability over {args.score_seeds} initialisations (Spearman "
                     "between seeds): " + ", ".join(f"{n} {v:+.2f}" for n, v in stable.items()
                                                    if v is not None) + ".")
    return "\n".join(lines)


def main(args):
    # Everything that can fail on bad input comes before settings.json is written.
    validate(args)
    if args.module:
        load_block_module(args.module)
    spec = ProxySpec(args.proxies)   # proxies and ensembles (vote, rank:a+b)
    names = spec.columns
    folder = out_dir(args)
    device = pick_device(args.device)
    table = CostTable.for_network(Network.from_args(args), names=SEARCH_SPACE)
    genotypes = sample_genotypes(table, args.candidates, Budget.from_args(args),
                                 seed=args.seed)
    data = get_datasets(args.dataset, args.data_loc)
    check_writable(folder, "--out")
    check_settings(folder, args)
    base = ["index", "convs", "params", "macs"]
    extra = [n for n in names if n not in base]   # the `params` proxy is the params column
    score_cols, error_cols = replica_columns(args, extra)
    columns = [*base, *extra, *score_cols, *error_cols, "val_error", "train_seconds"]
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
            for r in range(1, args.score_seeds):
                more = score(args, genotype, i, extra, batch, device, replica=r)
                scores.update({f"{n}@{r}": more[n] for n in extra})
            t0 = time.time()
            errors = [train(args, genotype, i, folder, r) for r in range(args.train_seeds)]
            params, macs = table.cost(genotype)
            writer.writerow([i, format_convs(genotype), params, macs,
                             *[scores[n] for n in extra + score_cols],
                             *(errors if error_cols else []), float(np.mean(errors)),
                             round(time.time() - t0, 1)])
            f.flush()
    df = pd.read_csv(path)
    from plots import plot_study
    png = plot_study(df, os.path.join(folder, "study.png"), proxies=names)
    text = summarise(df, spec, args, time.time() - start)
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"study: {path}, {png}")
    return df


if __name__ == "__main__":
    run_cli(main, get_args_parser())

"""Does the proxy predict trained accuracy on *your* data? A small rank-correlation study.

Samples K genotypes at a budget, scores each with every zero-cost proxy on one fixed minibatch
(same initialisation for every proxy), trains each for a few epochs (engine.py), then reports
the Spearman rank correlation between each proxy and the trained validation error (negative
is good: a higher score should mean a lower error) and draws one scatter panel per proxy.

    python study.py cifar10 --data_loc ../shared/data/cifar10-jpeg --wrn_depth 16 --wrn_width 2 \
        --param_goal 300000 --candidates 24 --epochs 3 --train_subset 5000

Everything goes to --out (default results/study_<goal>): study.csv (one row per candidate:
index, convs, params, macs, one column per proxy, val_error, train_seconds; appended and
flushed as it goes, so re-running the same command resumes), study.png, checkpoints/ of the
trained candidates, jobs/ (a result file per training: --launcher, docs/scale.md), and
summary.md (the table printed at the end).
"""
import argparse
import csv
import os
import time

import numpy as np
import pandas as pd
import torch

from blockswap.cli import HelpFormatter, at_least, positive, progress, run_cli
from blockswap.count_ops import CostTable
from blockswap.engine import candidate_config, train_candidate
from blockswap.ensembles import VOTE, finite
from blockswap.files import atomic_write, check_writable, format_convs, pid_lock, whole_lines
from blockswap.funcs import Budget, budget_args, sample_genotypes
from blockswap.jobs import Job, launch_settings, launcher_args, run_jobs
from blockswap.loaders import TensorImages, data_args, get_datasets, subset, subset_indices
from models import SEARCH_SPACE, Network, UserError, load_block_module, network_args
from blockswap.plots import plot_study
from blockswap.proxies import PROXIES, get_proxy, proxy_arg, proxy_spec
from blockswap.runtime import device_args, pick_device
from blockswap.search import ResultsWriter, check_settings as check_search_settings, load_batches, \
    training_images
from blockswap.variance import early_check_at, noise_warning, variance_components
from blockswap.stats import (batch_kendall, batch_spearman, bootstrap_ci, kendall, permutation_pvalue,
                   spearman, top_hit, top_hit_rate)

MIN_CANDIDATES = 3       # a rank correlation of fewer is +-1 or undefined
FEW_CANDIDATES = 10      # below this the intervals are too wide to tell proxies apart


def get_args_parser():
    p = argparse.ArgumentParser(description="Rank correlation of zero-cost proxies with "
                                "trained error", formatter_class=HelpFormatter,
                                parents=[data_args(), network_args(), budget_args(),
                                         device_args(), launcher_args()])
    # A study trains every candidate: a WRN-16-2 space by default, small enough for a CPU.
    p.set_defaults(wrn_depth=16, wrn_width=2)
    p.add_argument("--candidates", default=24, type=at_least(MIN_CANDIDATES),
                   help="K genotypes to score and train")
    p.add_argument("--proxies", default=",".join(PROXIES), type=proxy_arg,
                   help="comma-separated proxy names")
    p.add_argument("--batch_size", default=128, type=at_least(1),
                   help="scoring and training batch")
    p.add_argument("--epochs", default=3, type=at_least(1), help="training epochs per candidate")
    p.add_argument("--lr", default=0.1, type=positive())
    p.add_argument("--train_subset", default=5000, type=at_least(1))
    p.add_argument("--val_subset", default=None, type=at_least(1),
                   help="validate on N fixed images (default: the whole test split; at errors "
                        "near 50%% its own sampling noise is 0.7 points at 5,000 images)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--out", default=None, help="output folder (default results/study_<goal>)")
    p.add_argument("--train_seeds", default=1, type=at_least(1),
                   help="train every candidate this many times; the mean error is the truth and "
                        "the seed-to-seed rank correlation the noise ceiling")
    p.add_argument("--score_seeds", default=1, type=at_least(1),
                   help="score every proxy on this many initialisations (proxy stability)")
    p.add_argument("--stop_if_noisy", action="store_true",
                   help="with --train_seeds >= 2: stop when the early noise estimate predicts a "
                        "noise ceiling below 0.5 (the study could not rank proxies)")
    p.add_argument("--bootstrap", default=1000, type=at_least(1),
                   help="resamples for the intervals")
    return p


def out_dir(args) -> str:
    if args.out:
        return args.out
    goal = args.param_goal or args.mac_goal or "any"
    return os.path.join("results", f"study_{goal}")


def fixed_minibatch(args, device, data=None):
    """One seeded training minibatch of the study's training images (the --train_subset the
    candidates train on): every candidate and proxy sees the same images (search.load_batches,
    the search's own rule). `data`: get_datasets' answer, when already read."""
    train_set, _, num_classes = data or get_datasets(args.dataset, args.data_loc)
    images = training_images(args, train_set, torch.device("cpu"))
    if isinstance(images, TensorImages):   # the subset only, not the whole split, on the device
        images = images.subset(subset_indices(len(images), args.train_subset, args.seed))
        images = images.to(device)
    else:
        images = subset(images, args.train_subset, args.seed)
    (x, y), = load_batches(images, args, args.seed, device)
    return x, y, num_classes


def score(args, genotype, index, names, batch, device, replica=0) -> dict:
    """Each proxy on the same random initialisation of the candidate (replica r > 0: another
    initialisation, for --score_seeds)."""
    x, y, num_classes = batch
    scores = {}
    for name in names:
        torch.manual_seed(replica_seed(args, index, replica))
        net = Network.from_args(args, num_classes).build(genotype).to(device)
        scores[name] = get_proxy(name)(net, x, y)
    return scores


def replica_seed(args, index, replica=0) -> int:
    """The seed of candidate `index`'s initialisation and training, replica r (--score_seeds,
    --train_seeds): seed + index + 1000 r."""
    return args.seed + index + REPLICA_STRIDE * replica


def train_config(args, genotype, index, folder, replica=0):
    """The training of one candidate (cross-entropy, cosine schedule, as main.py's teacher).
    Replica r > 0 (--train_seeds): the same candidate with another training seed."""
    return candidate_config(
        genotype, folder, train_name(index, replica), dataset=args.dataset, data_loc=args.data_loc, arch=args.arch,
        wrn_depth=args.wrn_depth, wrn_width=args.wrn_width, module=args.module,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        train_subset=args.train_subset, val_subset=args.val_subset, workers=args.workers,
        seed=replica_seed(args, index, replica),
        subset_seed=args.seed,      # every candidate and seed: the same images
        device=args.device, loader=args.loader, cache_dir=args.cache_dir)


def read_done(path, columns):
    """{index: row} of the candidates already in study.csv. A file that is missing or empty
    (killed before its first row) starts afresh with the header; a torn last line (killed
    mid-write) is dropped. The file then holds the header and whole rows only."""
    lines = whole_lines(path).splitlines(keepends=True)
    if not lines:   # missing or empty (killed before its first row): the header, atomically
        lines = [",".join(columns) + "\n"]
        atomic_write(path, lambda f: f.write(lines[0].encode()))
    rows = list(csv.reader(lines))
    if rows[0] != columns:
        raise UserError(f"{path} has columns {rows[0]}, this study writes {columns}; "
                        "use another --out")
    bad = [k + 2 for k, r in enumerate(rows[1:]) if len(r) != len(columns)]
    if bad:
        raise UserError(f"{path}: line {bad[0]} does not have {len(columns)} fields; "
                        "remove it to resume")
    return {int(r[0]): dict(zip(columns, r)) for r in rows[1:]}   # unique by index


def check_settings(folder, args):
    """A resumed study must use the settings it started with (settings.json beside it)."""
    os.makedirs(folder, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()
                if k not in ("workers", "device", "out", "cache_dir", "bootstrap", "download",
                             "stop_if_noisy", *LAUNCH_FLAGS)   # where it runs, not what
                and not (k in ("train_seeds", "score_seeds") and v == 1)   # old studies resume
                and not (k == "tol" and v == 0.025)}
    check_search_settings(os.path.join(folder, "settings.json"), settings)


LAUNCH_FLAGS = [a.dest for a in launcher_args()._actions]   # --launcher, --jobs, --slurm_*, ...
REPLICA_STRIDE = 1000            # seed offset of training/scoring replica r: seed + index + 1000 r
LOW_CEILING = 0.7                # a seed-to-seed rank correlation below this: ranking on noise


def proxy_row(name, score, error, n_boot, seed=0) -> str:
    """One table row: Spearman and Kendall (each with its bootstrap interval), p, top-10%."""
    rho, tau = spearman(score, error), kendall(score, error)
    score = finite(score)   # a failed score ranks last
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


def noise_lines(df, args, predicted) -> list:
    """The variance components of the whole study beside the early prediction, if any."""
    if len(df) < 3:
        return []
    final = variance_components(df[replica_columns(args, [])[1]].to_numpy(float),
                                args.bootstrap, args.seed)
    lines = [final.describe()]
    if predicted is not None:
        lines.append(f"Early prediction (after {predicted.n_arch} candidates): "
                     f"{predicted.ceiling:+.2f}.")
    return lines


def stability(df, name, args):
    """Mean Spearman between a proxy's scores on initialisation 0 and on each other one."""
    if args.score_seeds < 2 or name == "params":
        return None
    return float(np.mean([spearman(df[name], df[f"{name}@{r}"])
                          for r in range(1, args.score_seeds)]))


def data_used(args, data=None):
    """(training images, validation images) main.py really used: a subset is capped by the
    folder's size (main.py's funcs.subset). `data`: get_datasets' answer, when already read."""
    train_set, val_set, _ = data or get_datasets(args.dataset, args.data_loc)
    cap = lambda n, ds: len(ds) if not n else min(n, len(ds))   # noqa: E731
    return cap(args.train_subset, train_set), cap(args.val_subset, val_set)


def summarise(df, spec, args, seconds, predicted=None, data=None) -> str:
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
    n_train, n_val = data_used(args, data)
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
                     f"{ceiling:+.2f} measured.")
        lines += noise_lines(df, args, predicted)
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
    # Everything that can fail on bad input comes before anything is written.
    if args.module:
        load_block_module(args.module)
    spec = proxy_spec(args.proxies)   # proxies and ensembles (vote, rank:a+b)
    if args.candidates < FEW_CANDIDATES:
        print(f"note: {args.candidates} candidates: the rank correlations' intervals will be "
              f"wide (use {FEW_CANDIDATES} or more to tell proxies apart)")
    folder = out_dir(args)
    device = pick_device(args.device)
    table = CostTable.for_network(Network.from_args(args), names=SEARCH_SPACE)
    genotypes = sample_genotypes(table, args.candidates, Budget.from_args(args),
                                 seed=args.seed)
    data = get_datasets(args.dataset, args.data_loc)
    check_writable(folder, "--out")
    os.makedirs(folder, exist_ok=True)
    with pid_lock(os.path.join(folder, "study.lock"), os.path.join(folder, "study.csv")):
        check_settings(folder, args)
        return run_study(args, spec, folder, (device, table, genotypes, data))


def run_study(args, spec, folder, prepared):
    """Score every candidate not yet in study.csv, hand their trainings to the job layer (a row
    is appended as soon as all seeds of a candidate are in), then summarise (under the lock)."""
    device, table, genotypes, data = prepared
    names = spec.columns
    base = ["index", "convs", "params", "macs"]
    extra = [n for n in names if n not in base]   # the `params` proxy is the params column
    score_cols, error_cols = replica_columns(args, extra)
    columns = [*base, *extra, *score_cols, *error_cols, "val_error", "train_seconds"]
    path = os.path.join(folder, "study.csv")
    done = read_done(path, columns)
    start = time.time()
    todo = [i for i in range(len(genotypes)) if i not in done]
    scores = score_all(args, genotypes, todo, names, extra, device, data)
    jobs = [Job(train_name(i, r), train_config(args, genotypes[i], i, folder, r))
            for i in todo for r in range(args.train_seeds)]
    noise = EarlyNoise(args, done)
    out = ResultsWriter(path, columns)   # read_done has written the header
    rows = RowWriter(out, done, noise)
    collect = lambda name, result: rows.add(   # noqa: E731
        *parse_name(name), result, genotypes, table, scores, extra + score_cols)
    try:
        run_jobs(train_candidate, jobs, launch_settings(args, os.path.join(folder, "jobs"),
                                                        device.type), on_result=collect)
    except StopStudy as stop:
        print(stop)
    finally:
        out.close()
    df = study_table(done, columns)
    png = plot_study(df, os.path.join(folder, "study.png"), proxies=names)
    text = summarise(df, spec, args, time.time() - start, noise.predicted, data)
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"study: {path}, {png}")
    return df


def score_all(args, genotypes, todo, names, extra, device, data) -> dict:
    """{index: {proxy: score}} of the candidates `todo` (replicas 'name@r' with
    --score_seeds), all on one fixed minibatch."""
    if not todo:
        return {}
    batch = fixed_minibatch(args, device, data)
    out = {}
    for i in progress(todo, desc="scoring"):
        out[i] = score(args, genotypes[i], i, names, batch, device)
        for r in range(1, args.score_seeds):
            more = score(args, genotypes[i], i, extra, batch, device, replica=r)
            out[i].update({f"{n}@{r}": more[n] for n in extra})
    return out


def train_name(index: int, replica: int) -> str:
    """A training's job and checkpoint name (replica r > 0: --train_seeds)."""
    return f"candidate_{index}" + (f"_seed{replica}" if replica else "")


def parse_name(name: str):
    """(index, replica) of train_name's answer."""
    stem, _, seed = name.partition("_seed")
    return int(stem[len("candidate_"):]), int(seed or 0)


class StopStudy(Exception):
    """--stop_if_noisy: the early noise estimate says the study cannot rank proxies."""


class RowWriter:
    """Collects the trainings of each candidate as the job layer reports them; a candidate's
    row is appended (flushed, fsynced) once all its seeds are in, then the noise is checked."""

    def __init__(self, out, done, noise):
        self.out, self.done, self.noise = out, done, noise   # out: a search.ResultsWriter
        self.pending = {}

    def add(self, index, replica, result, genotypes, table, scores, score_names):
        got = self.pending.setdefault(index, {})
        got[replica] = result
        if len(got) < self.noise.seeds or index in self.done:
            return
        errors = [got[r]["val_error"] for r in range(self.noise.seeds)]
        params, macs = table.cost(genotypes[index])
        row = [index, format_convs(genotypes[index]), params, macs,
               *[scores[index][n] for n in score_names],
               *(errors if self.noise.seeds > 1 else []), float(np.mean(errors)),
               round(sum(r["seconds"] for r in got.values()), 1)]
        row = dict(zip(self.out.columns, row))
        self.out.write_row(row)
        self.done[index] = {c: str(v) for c, v in row.items()}
        self.noise.check(self.done)


class EarlyNoise:
    """With --train_seeds >= 2: once ~15% of the candidates are trained (variance.early_check_at),
    estimate the variance components and print the noise ceiling they predict for the study;
    below 0.5, say so and what to change, and with --stop_if_noisy stop the study there."""

    def __init__(self, args, done):
        self.seeds, self.args = args.train_seeds, args
        self.at = early_check_at(args.candidates)
        self.predicted = None
        self.checked = self.seeds < 2 or len(done) >= self.at   # a resumed study: at the end

    def check(self, done) -> None:
        if self.checked or len(done) < self.at:
            return
        self.checked = True
        self.predicted = variance_components(seed_errors(done, self.seeds),
                                             self.args.bootstrap, self.args.seed)
        print(f"after {len(done)} of {self.args.candidates} candidates: "
              f"{self.predicted.describe()}", flush=True)
        warning = noise_warning(self.predicted)
        if warning:
            print(warning, flush=True)
            if self.args.stop_if_noisy:
                raise StopStudy(f"--stop_if_noisy: stopped after {len(done)} candidates (rerun "
                                "without it, or with other settings in another --out)")


def seed_errors(done, seeds) -> np.ndarray:
    """The (candidates x seeds) validation errors of the finished candidates."""
    return np.array([[float(done[i][f"val_error_{r}"]) for r in range(seeds)]
                     for i in sorted(done)])


def study_table(done: dict, columns) -> pd.DataFrame:
    """The study's rows, one per candidate index (as read back), numbers as numbers."""
    df = pd.DataFrame([done[i] for i in sorted(done)], columns=columns)
    for c in columns:
        if c != "convs":
            df[c] = pd.to_numeric(df[c])
    return df


if __name__ == "__main__":
    run_cli(main, get_args_parser())

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

The flags become a StudyConfig once; its scoring is a search's (search.py: the same minibatch
rule, candidate_key's initial weights, score_genotype, the results store and settings check).
"""
import argparse
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
import torch

from blockswap.cli import HelpFormatter, at_least, positive, progress, run_cli
from blockswap.engine import TrainConfig, candidate_config, train_candidate
from blockswap.ensembles import VOTE, finite
from blockswap.files import check_writable, format_convs, pid_lock
from blockswap.funcs import Budget, budget_args, sample_codes
from blockswap.jobs import Job, LaunchSettings, launch_settings, launcher_args, run_jobs
from blockswap.loaders import (BATCH_SIZE, LOADER, WORKERS, TensorImages, data_args, get_datasets,
                               subset, subset_indices)
from models import load_block_module, network_args
from blockswap.plots import plot_study
from blockswap.proxies import PROXIES, get_proxy, proxy_arg
from blockswap.runtime import AMP, AMP_CHOICES, DEVICE, device_args, pick_device
from blockswap.search import (SearchConfig, cost_table, load_batches, score_genotype,
                              training_images)
from blockswap.store import (INIT_RULE, STUDY_INIT_RULE, Candidates, ResultsWriter,
                             candidate_key, check_settings, read_rows, stored_rule)
from blockswap.variance import CEILING_TRUSTED, early_check_at, noise_warning, variance_components
from blockswap.stats import (batch_kendall, batch_spearman, bootstrap_ci, kendall,
                             permutation_pvalue, spearman, top_hit, top_hit_rate)

MIN_CANDIDATES = 3       # a rank correlation of fewer is +-1 or undefined
FEW_CANDIDATES = 10      # below this the intervals are too wide to tell proxies apart


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines a study: study.py's flags of the same names, each default stated
    here once (the parser reads them from this class). `search` is the study's scoring as a
    search's settings (the data, network, budget, seed, batch and --proxies)."""
    dataset: str = "cifar10"
    data_loc: Optional[str] = None
    download: bool = False
    workers: int = WORKERS
    loader: str = LOADER
    cache_dir: Optional[str] = None
    image_size: Optional[int] = None  # None: the data set's (a folder's: the family's)
    arch: Optional[str] = None
    wrn_depth: Optional[int] = 16     # a study trains every candidate: a WRN-16-2 space by
    wrn_width: Optional[int] = 2      # default, small enough for a CPU
    module: Optional[str] = None
    param_goal: Optional[int] = None
    mac_goal: Optional[int] = None
    tol: float = Budget.tol
    candidates: int = 24              # K genotypes to score and train
    proxies: str = ",".join(PROXIES)
    batch_size: int = BATCH_SIZE      # scoring and training batch
    epochs: int = 3                   # training epochs per candidate
    lr: float = TrainConfig.lr
    train_subset: Optional[int] = 5000
    val_subset: Optional[int] = None
    seed: int = 0
    init_rule: int = INIT_RULE        # search.candidate_key's rule; a resumed study: its own
    train_seeds: int = 1
    score_seeds: int = 1
    stop_if_noisy: bool = False
    bootstrap: int = 1000             # resamples for the intervals
    out: Optional[str] = None         # None: results/study_<goal>
    device: str = DEVICE
    amp: str = AMP                    # the trainings' precision (as main.py --amp)
    launch: LaunchSettings = LaunchSettings()
    search: SearchConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "search", SearchConfig(
            dataset=self.dataset, data_loc=self.data_loc, workers=self.workers,
            loader=self.loader, cache_dir=self.cache_dir, image_size=self.image_size,
            arch=self.arch, wrn_depth=self.wrn_depth, wrn_width=self.wrn_width,
            module=self.module, param_goal=self.param_goal, mac_goal=self.mac_goal, tol=self.tol,
            seed=self.seed, init_rule=self.init_rule, batch_size=self.batch_size,
            proxy=self.proxies, device=self.device))

    @classmethod
    def from_args(cls, args) -> "StudyConfig":
        """study.py's parsed flags as a record (the launcher flags as a LaunchSettings)."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        values = {k: v for k, v in vars(args).items() if k in known}
        values["launch"] = launch_settings(args, LaunchSettings.log_dir,
                                           pick_device(args.device).type)
        return cls(**values)

    def replace(self, **changes) -> "StudyConfig":
        return dataclasses.replace(self, **changes)

    @property
    def spec(self):
        return self.search.spec


# What a resumed study must share with the run that started it (not where it runs: workers,
# device, the launcher, the output folder; not how it reports: --bootstrap, --stop_if_noisy).
STUDY_SETTINGS = ("dataset", "data_loc", "loader", "image_size", "arch", "wrn_depth", "wrn_width", "module",
                  "param_goal", "mac_goal", "tol", "candidates", "proxies", "batch_size",
                  "epochs", "lr", "train_subset", "val_subset", "seed", "train_seeds",
                  "score_seeds", "amp", "init_rule")
# Recorded since a later version: what a settings file written before then implies.
STUDY_ADDED = {"tol": Budget.tol, "train_seeds": 1, "score_seeds": 1, "amp": AMP,
               "init_rule": STUDY_INIT_RULE, "image_size": None}


def get_args_parser():
    D = StudyConfig()
    p = argparse.ArgumentParser(description="Rank correlation of zero-cost proxies with "
                                "trained error", formatter_class=HelpFormatter,
                                parents=[data_args(), network_args(), budget_args(),
                                         device_args(), launcher_args()])
    p.set_defaults(wrn_depth=D.wrn_depth, wrn_width=D.wrn_width)
    for a in p._actions:   # the shared help names a search's default (WRN-40-2), not the study's
        if a.dest in ("wrn_depth", "wrn_width"):
            a.help = a.help.split(" (default")[0] + f" (default: {getattr(D, a.dest)})"
    p.add_argument("--candidates", default=D.candidates, type=at_least(MIN_CANDIDATES),
                   help="K genotypes to score and train")
    p.add_argument("--proxies", default=D.proxies, type=proxy_arg,
                   help="comma-separated proxy names")
    p.add_argument("--batch_size", default=D.batch_size, type=at_least(1),
                   help="scoring and training batch")
    p.add_argument("--epochs", default=D.epochs, type=at_least(1),
                   help="training epochs per candidate")
    p.add_argument("--lr", default=D.lr, type=positive())
    p.add_argument("--amp", default=D.amp, choices=sorted(AMP_CHOICES),
                   help="the trainings' precision (as main.py --amp)")
    p.add_argument("--train_subset", default=D.train_subset, type=at_least(1))
    p.add_argument("--val_subset", default=D.val_subset, type=at_least(1),
                   help="validate on N fixed images (default: the whole test split; at errors "
                        "near 50%% its own sampling noise is 0.7 points at 5,000 images)")
    p.add_argument("--seed", default=D.seed, type=int)
    p.add_argument("--out", default=D.out, help="output folder (default results/study_<goal>)")
    p.add_argument("--train_seeds", default=D.train_seeds, type=at_least(1),
                   help="train every candidate this many times; the mean error is the truth and "
                        "the seed-to-seed rank correlation the noise ceiling")
    p.add_argument("--score_seeds", default=D.score_seeds, type=at_least(1),
                   help="score every proxy on this many initialisations (proxy stability)")
    p.add_argument("--stop_if_noisy", action="store_true",
                   help="with --train_seeds >= 2: stop when the early noise estimate predicts a "
                        "noise ceiling below 0.5 (the study could not rank proxies)")
    p.add_argument("--bootstrap", default=D.bootstrap, type=at_least(1),
                   help="resamples for the intervals")
    return p


def out_dir(cfg: StudyConfig) -> str:
    if cfg.out:
        return cfg.out
    goal = cfg.param_goal or cfg.mac_goal or "any"
    return os.path.join("results", f"study_{goal}")


def fixed_minibatch(cfg: StudyConfig, device, data=None):
    """One seeded training minibatch of the study's training images (the --train_subset the
    candidates train on): every candidate and proxy sees the same images (search.load_batches,
    the search's own rule). `data`: get_datasets' answer, when already read."""
    train_set, _, num_classes = data or get_datasets(cfg.dataset, cfg.data_loc,
                                                     spec=cfg.search.data_spec())
    images = training_images(cfg.search, train_set, torch.device("cpu"))
    if isinstance(images, TensorImages):   # the subset only, not the whole split, on the device
        images = images.subset(subset_indices(len(images), cfg.train_subset, cfg.seed))
        images = images.to(device)
    else:
        images = subset(images, cfg.train_subset, cfg.seed)
    (x, y), = load_batches(images, cfg.search, cfg.seed, device)
    return x, y, num_classes


def train_config(cfg: StudyConfig, genotype, index, folder, replica=0) -> TrainConfig:
    """The training of one candidate (cross-entropy, cosine schedule, as main.py's teacher),
    from the initialisation it was scored on (candidate_key). Replica r > 0 (--train_seeds):
    the same candidate with another seed."""
    return candidate_config(
        genotype, folder, train_name(index, replica), dataset=cfg.dataset,
        data_loc=cfg.data_loc, image_size=cfg.image_size, arch=cfg.arch,
        wrn_depth=cfg.wrn_depth, wrn_width=cfg.wrn_width,
        module=cfg.module, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
        train_subset=cfg.train_subset, val_subset=cfg.val_subset, workers=cfg.workers,
        seed=candidate_key(cfg.seed, index, replica, cfg.init_rule),
        subset_seed=cfg.seed,      # every candidate and seed: the same images
        device=cfg.device, loader=cfg.loader, cache_dir=cfg.cache_dir, amp=cfg.amp)


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


def replica_columns(cfg: StudyConfig, extra):
    """(score replica columns, per-seed error columns) of --score_seeds/--train_seeds > 1."""
    scores = [f"{n}@{r}" for r in range(1, cfg.score_seeds) for n in extra]
    errors = [f"val_error_{r}" for r in range(cfg.train_seeds)] if cfg.train_seeds > 1 else []
    return scores, errors


def noise_ceiling(df, cfg: StudyConfig):
    """Mean seed-to-seed Spearman of the trained errors over pairs of training seeds (None
    with one seed): no proxy can rank better than the training agrees with itself."""
    cols = replica_columns(cfg, [])[1]
    pairs = [(a, b) for i, a in enumerate(cols) for b in cols[i + 1:]]
    return float(np.mean([spearman(df[a], df[b]) for a, b in pairs])) if pairs else None


def noise_lines(df, cfg: StudyConfig, predicted) -> list:
    """The variance components of the whole study beside the early prediction, if any."""
    if len(df) < 3:
        return []
    final = variance_components(df[replica_columns(cfg, [])[1]].to_numpy(float),
                                cfg.bootstrap, cfg.seed)
    lines = [final.describe()]
    if predicted is not None:
        lines.append(f"Early prediction (after {predicted.n_arch} candidates): "
                     f"{predicted.ceiling:+.2f}.")
    return lines


def stability(df, name, cfg: StudyConfig):
    """Mean Spearman between a proxy's scores on initialisation 0 and on each other one."""
    if cfg.score_seeds < 2 or name == "params":
        return None
    return float(np.mean([spearman(df[name], df[f"{name}@{r}"])
                          for r in range(1, cfg.score_seeds)]))


def data_used(cfg: StudyConfig, data=None):
    """(training images, validation images) main.py really used: a subset is capped by the
    folder's size (main.py's funcs.subset). `data`: get_datasets' answer, when already read."""
    train_set, val_set, _ = data or get_datasets(cfg.dataset, cfg.data_loc,
                                                 spec=cfg.search.data_spec())
    cap = lambda n, ds: len(ds) if not n else min(n, len(ds))   # noqa: E731
    return cap(cfg.train_subset, train_set), cap(cfg.val_subset, val_set)


def report(df, cfg: StudyConfig, seconds, predicted=None, data=None) -> str:
    """The study table (every proxy and ensemble against the mean trained error), the noise
    ceiling and what was really used."""
    spec, error = cfg.spec, df["val_error"].to_numpy(float)
    items = list(spec.items) + (["vote"] if "vote" not in spec.items
                                and all(v in spec.columns for v in VOTE) else [])
    table = {c: df[c].to_numpy(float) for c in spec.columns}
    lines = ["| proxy | Spearman rho vs val error [95% CI] | Kendall tau [95% CI] | p | "
             "top-10% has the best (this sample, bootstrap rate) |", "|---|---|---|---|---|"]
    for item in items:
        lines.append(proxy_row(item, spec.scores(item, table), error, cfg.bootstrap))
    n_train, n_val = data_used(cfg, data)
    goal = cfg.param_goal or cfg.mac_goal
    lines += ["", f"{cfg.search.network().name} space, goal "
              f"{f'{goal} +-{cfg.tol:.1%}' if goal else 'any'}, {len(df)} candidates, "
              f"{cfg.epochs} epochs on {n_train} training images (asked {cfg.train_subset}), "
              f"validation on {n_val}, {cfg.train_seeds} training seed(s) per candidate "
              f"(truth: their mean error); val error {error.min():.1f}-{error.max():.1f}% "
              f"(spread {error.max() - error.min():.1f} points); negative rho is good; "
              f"{seconds / 60:.1f} min wall this run."]
    lines += ceiling_lines(df, cfg, predicted)
    stable = {n: stability(df, n, cfg) for n in spec.columns}
    if any(v is not None for v in stable.values()):
        lines.append(f"Proxy stability over {cfg.score_seeds} initialisations (Spearman "
                     "between seeds): " + ", ".join(f"{n} {v:+.2f}" for n, v in stable.items()
                                                    if v is not None) + ".")
    return "\n".join(lines)


def ceiling_lines(df, cfg: StudyConfig, predicted) -> list:
    """The measured noise ceiling, the variance components, and a warning below
    CEILING_TRUSTED (none with one training seed)."""
    ceiling = noise_ceiling(df, cfg)
    if ceiling is None:
        return []
    measured = (f"{ceiling:+.2f} measured." if np.isfinite(ceiling) else
                "undefined (a training seed gave every candidate the same error: no order "
                "to compare).")
    lines = [f"Noise ceiling (seed-to-seed Spearman of the trained errors): {measured}",
             *noise_lines(df, cfg, predicted)]
    if not ceiling >= CEILING_TRUSTED:     # NaN too: an undefined ceiling is not a trusted one
        lines.append(f"WARNING: the noise ceiling is below {CEILING_TRUSTED}: two trainings of "
                     "the same candidates disagree about their order about as much as the "
                     "proxies do, so this study cannot rank proxies. Train longer (--epochs) "
                     f"or on more images (--train_subset) until it reaches {CEILING_TRUSTED}.")
    return lines


def main(args):
    cfg = StudyConfig.from_args(args)
    # Everything that can fail on bad input comes before anything is written.
    if cfg.module:
        load_block_module(cfg.module)
    if cfg.candidates < FEW_CANDIDATES:
        print(f"note: {cfg.candidates} candidates: the rank correlations' intervals will be "
              f"wide (use {FEW_CANDIDATES} or more to tell proxies apart)")
    folder = out_dir(cfg)
    device = pick_device(cfg.device)
    table = cost_table(cfg.search, None)
    candidates = Candidates.of_codes(
        table, sample_codes(table, cfg.candidates, cfg.search.budget(), seed=cfg.seed), "sampled")
    data = get_datasets(cfg.dataset, cfg.data_loc, spec=cfg.search.data_spec())
    check_writable(folder, "--out")
    os.makedirs(folder, exist_ok=True)
    with pid_lock(os.path.join(folder, "study.lock"), os.path.join(folder, "study.csv")):
        settings = os.path.join(folder, "settings.json")
        cfg = cfg.replace(init_rule=stored_rule(settings, STUDY_INIT_RULE))   # a resumed study
        check_settings(settings, {k: getattr(cfg, k) for k in STUDY_SETTINGS}, STUDY_ADDED)
        return run_study(cfg, folder, (device, candidates, data))


def run_study(cfg: StudyConfig, folder, prepared):
    """Score every candidate not yet in study.csv, hand their trainings to the job layer (a row
    is appended as soon as all seeds of a candidate are in), then summarise (under the lock)."""
    device, candidates, data = prepared
    names = cfg.spec.columns
    base = ["index", "convs", "params", "macs"]
    extra = [n for n in names if n not in base]   # the `params` proxy is the params column
    score_cols, error_cols = replica_columns(cfg, extra)
    columns = [*base, *extra, *score_cols, *error_cols, "val_error", "train_seconds"]
    path = os.path.join(folder, "study.csv")
    done = read_rows(path, columns[len(base):], columns)
    start = time.time()
    todo = [i for i in range(len(candidates)) if i not in done]
    scores = score_all(cfg, candidates, todo, extra, device, data)
    jobs = [Job(train_name(i, r), train_config(cfg, candidates.genotypes[i], i, folder, r))
            for i in todo for r in range(cfg.train_seeds)]
    noise = EarlyNoise(cfg, done)
    out = ResultsWriter(path, columns)
    rows = RowWriter(out, done, noise)
    collect = lambda name, result: rows.add(   # noqa: E731
        *parse_name(name), result, candidates.row, scores)
    try:
        run_jobs(train_candidate, jobs, dataclasses.replace(
            cfg.launch, log_dir=os.path.join(folder, "jobs")), on_result=collect)
    except StopStudy as stop:
        print(stop)
    finally:
        out.close()
    df = study_table(done, columns)
    png = plot_study(df, os.path.join(folder, "study.png"), proxies=names)
    text = report(df, cfg, time.time() - start, noise.predicted, data)
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"study: {path}, {png}")
    return df


def score_all(cfg: StudyConfig, candidates: Candidates, todo, extra, device, data) -> dict:
    """{index: {proxy: score}} of the candidates `todo` (replicas 'name@r' with
    --score_seeds), all on one fixed minibatch: search.score_genotype, each initialisation
    seeded by search.candidate_key."""
    if not todo:
        return {}
    x, y, num_classes = fixed_minibatch(cfg, device, data)
    net, batches = cfg.search.network(num_classes), [(x, y)]
    proxies = {n: get_proxy(n) for n in extra}   # not `params`: that is the params column
    out = {}
    for i in progress(todo, desc="scoring"):
        for r in range(cfg.score_seeds):
            key = candidate_key(cfg.seed, i, r, cfg.init_rule)
            got = score_genotype(net, candidates.genotypes[i], key, batches, proxies, device)
            out.setdefault(i, {}).update({(f"{n}@{r}" if r else n): v for n, v in got.items()})
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

    def add(self, index, replica, result, candidate_row, scores):
        """One training's result; candidate_row(i): the candidate's index, convs and costs."""
        got = self.pending.setdefault(index, {})
        got[replica] = result
        if len(got) < self.noise.seeds or index in self.done:
            return
        errors = [got[r]["val_error"] for r in range(self.noise.seeds)]
        row = {**candidate_row(index), **scores[index],
               **({f"val_error_{r}": e for r, e in enumerate(errors)} if self.noise.seeds > 1
                  else {}),
               "val_error": float(np.mean(errors)),
               "train_seconds": round(sum(r["seconds"] for r in got.values()), 1)}
        self.out.write_row(row)
        self.done[index] = row
        self.noise.check(self.done)


class EarlyNoise:
    """With --train_seeds >= 2: once ~15% of the candidates are trained (variance.early_check_at),
    estimate the variance components and print the noise ceiling they predict for the study;
    below variance.CEILING_CANNOT_RANK, say so and what to change, and with --stop_if_noisy
    stop the study there."""

    def __init__(self, cfg: StudyConfig, done):
        self.seeds, self.cfg = cfg.train_seeds, cfg
        self.at = early_check_at(cfg.candidates)
        self.predicted = None
        self.checked = self.seeds < 2 or len(done) >= self.at   # a resumed study: at the end

    def check(self, done) -> None:
        if self.checked or len(done) < self.at:
            return
        self.checked = True
        self.predicted = variance_components(seed_errors(done, self.seeds),
                                             self.cfg.bootstrap, self.cfg.seed)
        print(f"after {len(done)} of {self.cfg.candidates} candidates: "
              f"{self.predicted.describe()}", flush=True)
        warning = noise_warning(self.predicted)
        if warning:
            print(warning, flush=True)
            if self.cfg.stop_if_noisy:
                raise StopStudy(f"--stop_if_noisy: stopped after {len(done)} candidates (rerun "
                                "without it, or with other settings in another --out)")


def seed_errors(done, seeds) -> np.ndarray:
    """The (candidates x seeds) validation errors of the finished candidates."""
    return np.array([[float(done[i][f"val_error_{r}"]) for r in range(seeds)]
                     for i in sorted(done)])


def study_table(done: dict, columns) -> pd.DataFrame:
    """The study's rows, one per candidate index, as study.csv holds them (convs as its
    cell text, numbers as numbers)."""
    df = pd.DataFrame([{**done[i], "convs": format_convs(done[i]["convs"])}
                       for i in sorted(done)], columns=columns)
    for c in columns:
        if c != "convs":
            df[c] = pd.to_numeric(df[c])
    return df


if __name__ == "__main__":
    run_cli(main, get_args_parser())

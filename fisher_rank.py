"""BlockSwap's search: sample mixed-block networks that meet a budget, score each by Fisher
potential after one minibatch at random initialisation, keep the best.

    # 1000 random genotypes (uniform; exactly uniform within the window when a goal is given)
    python fisher_rank.py cifar10 --generate_random --samples 1000 --save_file archs/master_arch.csv
    # score candidates within +-2.5% of 800K params
    python fisher_rank.py cifar10 --data_loc=../cifar10 --param_goal 800000 --samples 1000
    # the same, sharded over 4 processes (each scores every 4th candidate, rank 0 merges)
    torchrun --standalone --nproc_per_node 4 fisher_rank.py cifar10 --data_loc=../cifar10 ...

Every scored candidate is appended (and flushed) to results/<proxy>_at_<goal>.csv; re-running
the same command resumes where it stopped. The best is always in
results/<proxy>_at_<goal>_best.csv; each new best and, at the end, the top --top_n are also
written to genotypes/<goal>_<index>.csv with their rank (a file of another search is never
overwritten).

Candidates: the rows of the archs file (--save_file, default archs/master_arch.csv) that meet the
budget, when it has at least --samples of them; else exact samples. Every search prints which.
"""
import argparse
import copy
import csv
import datetime
import glob
import hashlib
import io
import json
import os
import re
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from count_ops import CostTable
from funcs import (NUM_CLASSES, atomic_write, budget_window, check_writable, count_genotypes,
                   dataset_identity, distributed_teardown, get_datasets,
                   load_genotype, parse_convs, pick_device, pid_lock, run_cli, sample_genotypes,
                   save_genotype)
from loaders import (Augment, TensorImages, add_loader_args, augmented_batches, choose_loader,
                     tensor_images)
from latency import load_or_measure, parse_table_device, resnet_family, wrn_family
from models import (BLOCK_TYPES, SEARCH_SPACE, ResNet, UserError, WideResNet, default_arch,
                    load_block_module)
from models.resnet import LAYERS

from proxies import PROXIES, ProxySpec, finite, get_proxy

DEFAULT_PARAM_GOAL = 800_000   # the original's default when no goal is given
DEFAULT_ARCHS = "archs/master_arch.csv"   # --generate_random's file; used when it fits


def proxy_arg(text: str) -> str:
    """argparse type of --proxy: checks names and ensembles at parse time (ProxySpec)."""
    try:
        ProxySpec(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def get_args_parser():
    p = argparse.ArgumentParser(description="BlockSwap: rank budget-meeting networks by "
                                            "Fisher potential at initialisation.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset", choices=["cifar10", "cifar100", "imagenet"])
    p.add_argument("--data_loc", default=None,
                   help="torchvision CIFAR folder or an image folder train/ + test|val/")
    p.add_argument("--download", action="store_true", help="fetch CIFAR into --data_loc")
    p.add_argument("--arch", default=None, choices=["wrn", *LAYERS],
                   help="network family (None: wrn for CIFAR, resnet34 for imagenet)")
    p.add_argument("--wrn_depth", default=40, type=int, help="WRN depth, 6n+4")
    p.add_argument("--wrn_width", default=2, type=int, help="WRN width factor")
    p.add_argument("--param_goal", default=None, type=int,
                   help=f"parameter budget (scoring defaults to {DEFAULT_PARAM_GOAL:,})")
    p.add_argument("--mac_goal", default=None, type=int, help="MAC budget (may join params)")
    p.add_argument("--latency_goal", default=None, type=float,
                   help="predicted inference latency budget in ms (may join params/MACs)")
    p.add_argument("--latency_device", default=None,
                   help="device whose latency table prices candidates (default: --device)")
    p.add_argument("--latency_batch", default=1, type=int, help="batch size the latency is for")
    p.add_argument("--threads", default=None, type=int,
                   help="torch threads while timing latency (default: torch's own count)")
    p.add_argument("--latency_clock", default="wall", choices=["wall", "cpu"],
                   help="time latency by the wall, or by CPU time (steadier on a shared CPU)")
    p.add_argument("--tol", default=0.025, type=float,
                   help="window half-width, a fraction between 0 and 1 (0.025: +-2.5%%)")
    p.add_argument("--samples", default=1000, type=int, help="candidates to score / generate")
    p.add_argument("--seed", default=0, type=int, help="sampling, minibatch and init seed")
    p.add_argument("--batch_size", default=128, type=int, help="images per scoring minibatch")
    p.add_argument("--minibatches", default=1, type=int, help="scores summed over this many")
    p.add_argument("--resample_batch", action="store_true",
                   help="a different minibatch per candidate (off: one shared, fair)")
    p.add_argument("--proxy", default="fisher", type=proxy_arg,
                   help="scoring function (proxies.py; higher is better): "
                        f"{', '.join(PROXIES)}; an ensemble 'vote' or 'rank:a+b+c'; or a "
                        "comma-separated list, one column each, ranked by the first")
    p.add_argument("--top_n", default=1, type=int, help="genotype files kept for the best n")
    p.add_argument("--workers", default=0, type=int, help="data loading processes")
    add_loader_args(p)
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1 or mps (auto: cuda, else mps, else cpu)")
    p.add_argument("--module", default=None, help="Python file that registers block types")
    p.add_argument("--blocks", default=None,
                   help="comma-separated search space (None: the paper's 24 + --module's)")
    p.add_argument("--generate_random", action="store_true",
                   help="write --samples random genotypes to --save_file and stop")
    p.add_argument("--save_file", default=DEFAULT_ARCHS,
                   help="archs file: written by --generate_random; when scoring, the candidates "
                        "are its rows within the budget if at least --samples of them are (the "
                        "default file is skipped with a message when it does not fit, a named "
                        "one is an error); 'none': exact samples")
    p.add_argument("--overwrite", action="store_true", help="let --generate_random replace it")
    p.add_argument("--results_dir", default="results",
                   help="<proxy>_at_<goal>.csv/.json/.png and _best.csv (the best genotype)")
    p.add_argument("--genotype_dir", default="genotypes",
                   help="<goal>_<index>.csv of each new best and of the top --top_n")
    p.add_argument("--best_file", default=None,
                   help="also write the best genotype here (a fixed name for sweep scripts)")
    p.add_argument("--plot", default=True, action=argparse.BooleanOptionalAction,
                   help="draw results/<proxy>_at_<goal>.png: score against params and MACs")
    p.add_argument("--rerank", default=0, type=int,
                   help="then train the top K for --rerank_epochs with main.py and rank them by "
                        "validation error (results/<proxy>_at_<goal>_rerank.csv)")
    p.add_argument("--rerank_epochs", default=2, type=int, help="epochs per re-ranked candidate")
    p.add_argument("--rerank_lr", default=0.1, type=float, help="main.py --lr (cosine schedule)")
    p.add_argument("--rerank_train_subset", default=None, type=int,
                   help="main.py --train_subset for the re-rank (default: all images)")
    p.add_argument("--rerank_val_subset", default=None, type=int,
                   help="main.py --val_subset for the re-rank (default: all images)")
    return p


# --------------------------------------------------------------------------------------------
# Networks, budgets, candidates
# --------------------------------------------------------------------------------------------

def resolve(args):
    """Fill the defaults that depend on other arguments (in place); returns args."""
    args.arch = args.arch or default_arch(args.dataset)
    if not args.generate_random and args.param_goal is None and args.mac_goal is None \
            and args.latency_goal is None:
        args.param_goal = DEFAULT_PARAM_GOAL
    args.device = str(pick_device(None if args.device == "auto" else args.device))
    for name in ("samples", "batch_size", "minibatches", "top_n"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.tol < 1:
        raise UserError(f"--tol must lie strictly between 0 and 1 (a fraction of the goal: "
                        f"0.025 is +-2.5%), got {args.tol:g}")
    return args


def search_space(args):
    """Block names searched over: --blocks, else the paper's 24 plus what --module adds."""
    before = set(BLOCK_TYPES)
    if args.module:
        load_block_module(args.module)
    if args.blocks:
        names = [n.strip() for n in args.blocks.split(",") if n.strip()]
        if not names:
            raise UserError(f"--blocks {args.blocks!r} names no block type: give "
                            "comma-separated names such as Conv,DConvA4,G8B2")
        return names
    return list(SEARCH_SPACE) + [n for n in BLOCK_TYPES if n not in before]


def build_net(args, genotype, num_classes):
    if args.arch == "wrn":
        return WideResNet(args.wrn_depth, args.wrn_width, genotype, num_classes)
    return ResNet(LAYERS[args.arch], genotype, num_classes)


def cost_table(args, num_classes, names) -> CostTable:
    if args.arch == "wrn":
        return CostTable.for_wrn(args.wrn_depth, args.wrn_width, num_classes, names)
    return CostTable.for_resnet(args.arch, num_classes, names)


def goal_label(args) -> str:
    """'800000', 'macs100000000' or '800000_macs100000000': names the results and genotypes."""
    parts = ([str(args.param_goal)] if args.param_goal is not None else []) + \
            ([f"macs{args.mac_goal}"] if args.mac_goal is not None else []) + \
            ([f"lat{args.latency_goal:g}ms"] if args.latency_goal is not None else [])
    return "_".join(parts)


def in_budget(args, params: np.ndarray, macs: np.ndarray) -> np.ndarray:
    ok = np.ones(len(params), bool)
    for goal, value in ((args.param_goal, params), (args.mac_goal, macs)):
        if goal is not None:
            lo, hi = budget_window(goal, args.tol)
            ok &= (value >= lo) & (value <= hi)
    return ok


# --------------------------------------------------------------------------------------------
# Latency goals (latency.py): a measured table, quantised for the exact sampler
# --------------------------------------------------------------------------------------------

def latency_family(args, num_classes):
    if args.arch == "wrn":
        return wrn_family(args.wrn_depth, args.wrn_width, num_classes)
    return resnet_family(args.arch, num_classes)


def with_latency(args, table, num_classes, names):
    """`table`, or a copy carrying .latency (integer costs) when --latency_goal is given.
    The latency table is cached under <results_dir>/latency/ (measured on first use)."""
    if args.latency_goal is None:
        return table
    if not args.latency_goal > 0:   # before minutes of measuring
        raise UserError(f"--latency_goal must be a positive number of ms, got {args.latency_goal}")
    for name in ("latency_batch", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    device = parse_table_device(args.latency_device, args.device)
    lat = load_or_measure(latency_family(args, num_classes), names, device,
                          args.latency_batch, args.threads,
                          cache_dir=os.path.join(args.results_dir, "latency"),
                          clock=args.latency_clock)
    table = copy.copy(table)   # the caller's table stays latency-free
    table.latency = lat.quantise(args.latency_goal)
    return table


def in_latency_budget(args, table, codes: np.ndarray) -> np.ndarray:
    """The latency window on the same quantised costs the sampler uses."""
    if table.latency is None:
        return np.ones(len(codes), bool)
    return table.latency.in_window(codes, args.tol)


def latency_row(table, genotype):
    """{'latency_ms': predicted} for a results row ({} without a latency goal); with
    genotype None, the column names."""
    if table.latency is None:
        return {}
    if genotype is None:
        return {"latency_ms": None}
    return {"latency_ms": round(table.latency.table.predict(genotype), 5)}


def latency_settings(table):
    """What a resumed run must share: the latency table's identity (key and content hash)."""
    if table.latency is None:
        return {}
    return {"latency_table": table.latency.table.identity()}


def read_archs(path):
    """(genotypes, sha256 of the file) of an archs file; a file that cannot be one is an error."""
    if os.path.isdir(path):
        raise UserError(f"--save_file {path} is a directory, not an archs file (a CSV from "
                        "--generate_random)")
    with open(path, "rb") as f:
        data = f.read()
    try:
        df = pd.read_csv(io.BytesIO(data))
    except pd.errors.EmptyDataError:
        raise UserError(f"archs file {path} is empty: write it again with --generate_random, "
                        "or pass --save_file none for exact samples") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    if "convs" not in df.columns:
        raise UserError(f"{path}: expected a 'convs' column (an archs file from "
                        "--generate_random)")
    if df.empty:
        raise UserError(f"archs file {path} has no rows: write it again with "
                        "--generate_random, or pass --save_file none for exact samples")
    return list(df["convs"]), hashlib.sha256(data).hexdigest()


def candidates_from_file(args, table):
    """(genotypes, source) from the archs file's rows that meet the budget, in file order, or
    None for exact samples. The default file is skipped with a message when it does not fit
    (another network, too few rows in budget); a file named with --save_file must fit."""
    path = args.save_file
    named = path != DEFAULT_ARCHS
    if not named and not os.path.lexists(path):
        print(f"candidates: exact samples ({path} absent)")
        return None
    if named and not os.path.lexists(path):
        raise UserError(f"archs file {path} not found: write it with --generate_random, or "
                        "pass --save_file none for exact samples")
    cells, digest = read_archs(path)
    try:
        genotypes = [parse_convs(c, where=f"{path}, convs") for c in cells]
        codes = np.stack([table.encode(g) for g in genotypes])
        params, macs = table.cost_many(codes)
    except UserError as e:   # written for another network or search space
        if named:
            raise UserError(f"{path} does not fit this search ({e}): pass the archs file of "
                            "this network, or --save_file none for exact samples") from None
        print(f"candidates: exact samples ({path} skipped, written for another network: {e})")
        return None
    ok = in_budget(args, params, macs) & in_latency_budget(args, table, codes)
    fit = [g for g, keep in zip(genotypes, ok) if keep]
    counts = f"{len(fit)} of its {len(genotypes)} rows meet this budget"
    if len(fit) < args.samples:
        if named:
            raise UserError(f"{path}: {counts}, fewer than --samples {args.samples}: lower "
                            "--samples, or pass --save_file none for exact samples")
        print(f"candidates: exact samples ({path} skipped: {counts}, fewer than --samples "
              f"{args.samples})")
        return None
    print(f"candidates: {path} (sha256 {digest[:12]}): {counts}; scoring the first "
          f"{args.samples}")
    return fit[:args.samples], f"sha256:{digest}"


def get_candidates(args, table):
    """(genotypes, source): the archs file's in-budget rows when it fits (see
    candidates_from_file), else exactly uniform samples within the budget window ("sampled")."""
    if args.save_file.lower() == "none":
        print("candidates: exact samples (--save_file none)")
    else:
        from_file = candidates_from_file(args, table)
        if from_file is not None:
            return from_file
    n = args.samples
    available = count_genotypes(table, args.param_goal, args.mac_goal, args.tol,
                                latency=table.latency)
    if available < n:
        print(f"only {int(available)} genotypes meet this budget: scoring all of them")
        n = int(available)
    return sample_genotypes(table, n, args.param_goal, args.mac_goal, args.tol,
                            args.seed, latency=table.latency), "sampled"


# --------------------------------------------------------------------------------------------
# Minibatches and scoring
# --------------------------------------------------------------------------------------------

def training_images(args, train_set, device):
    """The search's training images: decoded once onto `device` (the tensor loader, see
    loaders.py) or, on the PIL path, `train_set` itself."""
    if choose_loader(args.loader, args.dataset, [train_set]) == "pil":
        return train_set
    return tensor_images(train_set, args.workers, args.cache_dir).to(device)


def load_batches(train_set, args, key: int, device):
    """`--minibatches` batches of `--batch_size` training images chosen and augmented by the
    seed `key` alone, so every process and every resumed run sees the same pixels.
    train_set: a TensorImages (augmented on its device) or a dataset of PIL transforms."""
    g = torch.Generator().manual_seed(key)
    idx = torch.randperm(len(train_set), generator=g)[:args.batch_size * args.minibatches]
    if isinstance(train_set, TensorImages):
        batches = augmented_batches(train_set, idx, args.batch_size,
                                    Augment.for_dataset(args.dataset), g)
        return [(x.to(device), y.to(device)) for x, y in batches]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_set, idx.tolist()),
                                         batch_size=args.batch_size,
                                         num_workers=args.workers, generator=g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)   # the augmentations draw from torch's global generator
        return [(x.to(device), y.to(device)) for x, y in loader]


def candidate_key(seed: int, index: int) -> int:
    """The seed of candidate `index`: its weights depend on (seed, index) only."""
    return seed * 1_000_003 + index + 1


def score_candidate(net, batches, proxy) -> float:
    """The one place a candidate is scored: proxy(net, inputs, targets) summed over batches."""
    return float(sum(proxy(net, x, y) for x, y in batches))


def make_candidate(args, genotype, num_classes, key, device):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)
        return build_net(args, genotype, num_classes).to(device)


# --------------------------------------------------------------------------------------------
# Results file: appended and flushed per candidate, with its settings beside it
# --------------------------------------------------------------------------------------------

def read_rows(path, score_col):
    """{index: row} of a results CSV; a torn last line (a kill mid-write) is cut off."""
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        atomic_write(path, lambda f: f.write(text.encode()))
    rows = {}
    score_cols = [score_col] if isinstance(score_col, str) else score_col
    for r in csv.DictReader(text.splitlines()):
        rows[int(r["index"])] = {"index": int(r["index"]), "convs": parse_convs(r["convs"]),
                                 "params": int(r["params"]), "macs": int(r["macs"]),
                                 **{c: float(r[c]) for c in score_cols}}
        if "latency_ms" in r:
            rows[int(r["index"])]["latency_ms"] = float(r["latency_ms"])
    return rows


class ResultsWriter:
    """Appends one CSV line per candidate, flushed and fsynced: a kill loses at most the
    candidate in flight."""

    def __init__(self, path, columns):
        self.columns = columns
        new = not os.path.isfile(path) or os.path.getsize(path) == 0
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "a", newline="")
        self.writer = csv.writer(self.f, lineterminator="\n")
        if new:
            self.write_row(dict(zip(columns, columns)))

    def write_row(self, row):
        self.writer.writerow([row[c] if c != "convs" or isinstance(row[c], str)
                              else repr(list(row[c])) for c in self.columns])
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def write_rows(path, rows, columns):
    """Rewrite a results file atomically, rows in index order (used by the merge)."""
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(columns)
    for r in sorted(rows.values(), key=lambda r: r["index"]):
        w.writerow([repr(list(r[c])) if c == "convs" else r[c] for c in columns])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def check_settings(path, settings):
    """Write the run's settings beside its results, or check that a resumed run matches."""
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            text = ", ".join(f"{k} {a!r} then, {b!r} now" for k, (a, b) in diff.items())
            raise UserError(f"{path} records different settings ({text}): rerun with the same "
                            "settings to resume, or move the results file away to start afresh")
    else:
        atomic_write(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))


# --------------------------------------------------------------------------------------------
# Distributed: each rank scores every world-th candidate into its own shard file; rank 0 merges
# --------------------------------------------------------------------------------------------

def init_distributed(args):
    """(rank, world, device). torchrun sets WORLD_SIZE; gloo on CPU, nccl on GPU."""
    device = torch.device(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=12))
    return dist.get_rank(), world, device


def shard_path(path, rank):
    return f"{path[:-4]}.rank{rank}.csv"


def read_done(path, score_col):
    """Every candidate already scored: the main file and any shard files."""
    rows = read_rows(path, score_col)
    for s in sorted(glob.glob(f"{glob.escape(path[:-4])}.rank*.csv")):
        rows.update(read_rows(s, score_col))
    return rows


def merge_shards(path, score_col, columns):
    """Fold every shard file into the main results file (index order), then remove them."""
    shards = sorted(glob.glob(f"{glob.escape(path[:-4])}.rank*.csv"))
    if not shards:
        return read_rows(path, score_col)
    rows = read_rows(path, score_col)
    for s in shards:
        rows.update(read_rows(s, score_col))
    write_rows(path, rows, columns)
    for s in shards:
        os.remove(s)
    return rows


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------

def score_all(args, todo, genotypes, table, num_classes, train_set, device, out_path,
              columns, best, on_new_best, show):
    """Score candidates `todo` (indices), appending each to out_path. Returns the count."""
    spec = ProxySpec(args.proxy)
    # the `params` proxy is the params column (count_ops), not a second one
    fns = {name: get_proxy(name) for name in spec.columns if name != "params"}
    score_col = spec.ranker if spec.ranker in spec.columns else None   # ensembles rank last
    shared = None if args.resample_batch else load_batches(train_set, args, args.seed, device)
    writer = ResultsWriter(out_path, columns)
    bar = tqdm(todo, disable=not show, desc=f"{args.proxy} at {goal_label(args)}")
    try:
        for i in bar:
            key = candidate_key(args.seed, i)
            batches = shared or load_batches(train_set, args, key, device)
            net = make_candidate(args, genotypes[i], num_classes, key, device)
            params, macs = table.cost(genotypes[i])
            row = {"index": i, "convs": genotypes[i], "params": params, "macs": macs,
                   **{name: score_candidate(net, batches, fn) for name, fn in fns.items()},
                   **latency_row(table, genotypes[i])}
            writer.write_row(row)
            if score_col is None:
                continue
            if best is None or row[score_col] > best[score_col]:
                best = row
                on_new_best(row)
            bar.set_postfix(best=f"#{best['index']} {best[score_col]:.4g}", refresh=False)
    finally:
        writer.close()
    return len(todo)


def genotype_path(args, row):
    """genotypes/<goal>_<index>.csv as the original; other proxies prefix their name, so a
    comparison run never overwrites the Fisher search's files."""
    prefix = "" if args.proxy == "fisher" else f"{ProxySpec(args.proxy).label}_"
    return os.path.join(args.genotype_dir, f"{prefix}{goal_label(args)}_{row['index']}.csv")


def best_path(out_path):
    """results/<proxy>_at_<goal>_best.csv: the best genotype of this search, always."""
    return out_path[:-4] + "_best.csv"


def save_best(args, row, out_path):
    """A new best: its genotype file (rank 1) and the fixed best file."""
    score = row[ProxySpec(args.proxy).ranker]
    save_genotype(genotype_path(args, row), row["convs"], score, row["index"], rank=1)
    save_genotype(best_path(out_path), row["convs"], score, row["index"], rank=1)


def genotype_files(args):
    """{index: path} of the genotype files of this proxy and goal in --genotype_dir."""
    if not os.path.isdir(args.genotype_dir):
        return {}
    pattern = re.compile(re.escape(os.path.basename(genotype_path(args, {"index": 0}))[:-5])
                         + r"(\d+)\.csv")
    return {int(m.group(1)): os.path.join(args.genotype_dir, m.group(0))
            for m in map(pattern.fullmatch, sorted(os.listdir(args.genotype_dir))) if m}


def check_genotype_files(args, genotypes):
    """Refuse (before any work) when genotypes/<goal>_<i>.csv holds another genotype than
    candidate i: it belongs to another search, which this one would overwrite."""
    for i, path in genotype_files(args).items():
        if i < len(genotypes) and load_genotype(path) != genotypes[i]:
            raise UserError(f"{path} holds another search's genotype (not candidate {i} of this "
                            "one): pass another --genotype_dir, or move that file away")


def select_rows(rows, n, out_path):
    """The stored candidates this run ranks: the first n (--samples); says so when more are
    stored (a search that scored more before)."""
    if max(rows, default=-1) < n:
        return rows
    print(f"{out_path} holds {len(rows)} candidates; ranking the first {n} (--samples "
          f"{n}; rerun with --samples {max(rows) + 1} to rank them all)")
    return {i: r for i, r in rows.items() if i < n}


def main(args):
    with distributed_teardown():   # a no-op without torchrun
        return search(args)


def search_settings(args, names, num_classes, source, train_set, table):
    """What a resumed search must share with the run that started it."""
    settings = {k: getattr(args, k) for k in (
        "dataset", "arch", "param_goal", "mac_goal", "tol", "seed", "batch_size",
        "minibatches", "resample_batch", "proxy", "latency_goal")}
    settings.update(num_classes=num_classes, blocks=names, candidates=source,
                    **latency_settings(table),
                    data=dataset_identity(train_set),
                    loader=choose_loader(args.loader, args.dataset, [train_set]))
    if args.arch == "wrn":
        settings.update(wrn_depth=args.wrn_depth, wrn_width=args.wrn_width)
    return settings


def search(args):
    args = resolve(args)
    check_rerank_args(args)
    names = search_space(args)
    if args.generate_random:
        return generate_random(args, names)
    if not args.data_loc:
        raise UserError("pass --data_loc (a CIFAR folder or an image folder) to score "
                        "candidates, or --generate_random to only write genotypes")
    check_writable(args.results_dir, "--results_dir")
    check_writable(args.genotype_dir, "--genotype_dir")
    if args.best_file:
        check_writable(os.path.dirname(args.best_file) or ".", "--best_file")
    rank, world, device = init_distributed(args)
    train_set, _, num_classes = get_datasets(args.dataset, args.data_loc, args.download)
    table = with_latency(args, cost_table(args, num_classes, names), num_classes, names)
    genotypes, source = get_candidates(args, table)
    out_path = os.path.join(args.results_dir,
                            f"{ProxySpec(args.proxy).label}_at_{goal_label(args)}.csv")
    settings = search_settings(args, names, num_classes, source, train_set, table)
    train_set = training_images(args, train_set, device)
    if rank != 0:
        return run_search(args, genotypes, settings, table, num_classes, train_set, out_path,
                          rank, world, device)
    if os.path.isfile(out_path[:-4] + ".json"):   # a resumed search: compare only, first
        check_settings(out_path[:-4] + ".json", settings)
    check_genotype_files(args, genotypes)
    os.makedirs(args.results_dir, exist_ok=True)
    with pid_lock(out_path[:-4] + ".lock", out_path):
        return run_search(args, genotypes, settings, table, num_classes, train_set, out_path,
                          rank, world, device)


def run_search(args, genotypes, settings, table, num_classes, train_set, out_path, rank, world,
               device):
    """Check or write the settings, score what is not yet scored, merge, summarise."""
    spec = ProxySpec(args.proxy)
    score_col = [c for c in spec.columns if c != "params"]   # params: its own column
    columns = ["index", "convs", "params", "macs", *latency_row(table, None), *score_col]
    if rank == 0:
        check_settings(out_path[:-4] + ".json", settings)
    if world > 1:
        dist.barrier()
        check_settings(out_path[:-4] + ".json", settings)

    done = read_done(out_path, score_col) if rank == 0 else None
    if world > 1:   # rank 0 reads (and repairs) every file; the others learn from it
        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    done = {i: r for i, r in done.items() if i < len(genotypes)}   # beyond --samples: kept
    for i, r in done.items():
        if r["convs"] != genotypes[i]:
            raise UserError(f"{out_path}: candidate {i} there is not candidate {i} now (the "
                            "candidates changed): rerun with the same settings and archs "
                            "file, or move the results file away")

    todo = [i for i in range(rank, len(genotypes), world) if i not in done]
    best = (max(done.values(), key=lambda r: r[spec.ranker], default=None)
            if spec.ranker in spec.columns else None)
    single = world == 1
    start = time.time()
    n = score_all(args, todo, genotypes, table, num_classes, train_set, device,
                  out_path if single else shard_path(out_path, rank), columns, best,
                  (lambda row: save_best(args, row, out_path)) if single else (lambda row: None),
                  show=rank == 0)
    seconds = time.time() - start
    if world > 1:   # also the barrier before the merge
        total = torch.tensor([n], device=device)
        dist.all_reduce(total)
        n = int(total)
    if rank != 0:
        return None
    rows = select_rows(merge_shards(out_path, score_col, columns), len(genotypes), out_path)
    result = summarise(args, rows, out_path, n, seconds)
    if args.rerank:
        result["rerank"] = rerank(args, result, rows, out_path)
    return result


def write_ranked(args, ranked, out_path, ranker):
    """Genotype files with their rank: the top --top_n, and every file of this search already
    in --genotype_dir (an earlier best) with its rank now; the best last, so the newest file is
    the best. The best also goes to the fixed results/<proxy>_at_<goal>_best.csv."""
    existing = genotype_files(args)
    for k, r in reversed(list(enumerate(ranked, 1))):
        if k <= args.top_n or r["index"] in existing:
            save_genotype(genotype_path(args, r), r["convs"], r[ranker], r["index"], rank=k)
    b = ranked[0]
    save_genotype(best_path(out_path), b["convs"], b[ranker], b["index"], rank=1)


def summarise(args, rows, out_path, n_scored, seconds):
    """Write the genotype files of the top n, ranked, and print and return the summary."""
    if not rows:
        raise UserError("no candidates were scored")
    spec = ProxySpec(args.proxy)
    ranked = rank_rows(spec, rows)
    write_ranked(args, ranked, out_path, spec.ranker)
    b = ranked[0]
    if args.best_file:
        save_genotype(args.best_file, b["convs"], b[spec.ranker], b["index"])
    if args.plot:
        from plots import plot_search
        plot_search(out_path, out_path[:-4] + ".png", args.param_goal, args.mac_goal, args.tol,
                    score=spec.columns[0], latency_goal=args.latency_goal)
    per = seconds / n_scored if n_scored else float("nan")
    lat = f"latency {b['latency_ms']:.3g} ms  " if "latency_ms" in b else ""
    print(f"best of {len(rows)}: #{b['index']}  params {b['params']:,}  MACs {b['macs']:,}  {lat}"
          f"{spec.ranker} {b[spec.ranker]:.6g}  ({n_scored} scored now, {per:.3f} s each)  "
          f"-> {best_path(out_path)}")
    for k, r in enumerate(ranked[:args.top_n], 1):
        print(f"  rank {k}: #{r['index']}  {spec.ranker} {r[spec.ranker]:.6g}  "
              f"-> {genotype_path(args, r)}")
    return {"best_index": b["index"], "best_genotype": b["convs"], "params": b["params"],
            "macs": b["macs"], "latency_ms": b.get("latency_ms"), "score": b[spec.ranker],
            args.proxy: b[spec.ranker], **{item: b[item] for item in spec.items + spec.columns},
            "proxy": args.proxy, "results": out_path, "genotype": genotype_path(args, b),
            "best_file": best_path(out_path),
            "n_candidates": len(rows), "n_scored": n_scored, "seconds_per_candidate": per,
            "ranking": [r["index"] for r in ranked]}


def rank_rows(spec, rows):
    """The rows, best first by spec.ranker (ties by index; NaN last). An ensemble's score is
    computed here over all scored candidates (it ranks a set) and added to each row."""
    rows = sorted(rows.values(), key=lambda r: r["index"])
    table = {c: [r[c] for r in rows] for c in spec.columns}
    for item in spec.items:
        if item not in spec.columns:
            for r, v in zip(rows, spec.scores(item, table)):
                r[item] = float(v)
    return sorted(rows, key=lambda r: (-finite([r[spec.ranker]])[0], r["index"]))


# --------------------------------------------------------------------------------------------
# Re-rank: train the top K briefly with main.py, rank by validation error
# --------------------------------------------------------------------------------------------

RERANK_COLUMNS = ["index", "convs", "params", "macs", "score", "val_error"]


def check_rerank_args(args):
    """Before anything is scored: --rerank's numbers, and a network main.py can train."""
    if args.rerank < 0 or args.rerank_epochs < 1:
        raise UserError(f"--rerank must be >= 0 and --rerank_epochs >= 1 (got {args.rerank} and "
                        f"{args.rerank_epochs})")
    if args.rerank and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--rerank trains in this process: run it without torchrun (the scores "
                        "already in the results file are reused)")
    if args.rerank and not args.generate_random:
        main_arch = default_arch(args.dataset)
        if args.arch != main_arch:
            raise UserError(f"--rerank trains with main.py, which builds {main_arch} networks "
                            f"for {args.dataset}: --arch {args.arch} cannot be re-ranked")


def train_candidate(args, row, folder) -> float:
    """Train one candidate with main.py's teacher training (cross-entropy, cosine schedule,
    same data path); returns its final validation error (%)."""
    import main as trainer   # a script, imported only when re-ranking
    name = f"candidate_{row['index']}"
    geno_csv = os.path.join(folder, "genotypes", name + ".csv")
    save_genotype(geno_csv, row["convs"], index=row["index"])
    argv = [args.dataset, "teacher", "--data_loc", args.data_loc, "--from_genotype", geno_csv,
            "-t", name, "--checkpoint_dir", os.path.join(folder, "checkpoints"),
            "--epochs", str(args.rerank_epochs), "--lr", str(args.rerank_lr), "--cosine",
            "--batch_size", str(args.batch_size), "--workers", str(args.workers),
            "--seed", str(args.seed), "--device", args.device, "--overwrite", "--no-plot"]
    if args.arch == "wrn":
        argv += ["--wrn_depth", str(args.wrn_depth), "--wrn_width", str(args.wrn_width)]
    for flag, value in (("--train_subset", args.rerank_train_subset),
                        ("--val_subset", args.rerank_val_subset), ("--module", args.module)):
        if value is not None:
            argv += [flag, str(value)]
    trainer.main(trainer.get_args_parser().parse_args(argv))
    ckpt = trainer.load_checkpoint(os.path.join(folder, "checkpoints", name + ".t7"))
    return float(ckpt["val_errors"][-1])


def read_rerank(path):
    """{index: row} of a re-rank CSV (a torn last line cut off, as read_rows)."""
    rows = read_rows(path, "score")
    if rows:
        df = pd.read_csv(path)
        for i, err in zip(df["index"], df["val_error"]):
            rows[int(i)]["val_error"] = float(err)
    return rows


def rerank(args, summary, rows, out_path):
    """Train the top --rerank candidates by the proxy (appending each to <results>_rerank.csv
    as it finishes, so a rerun resumes), then write the lowest-error one as a genotype file."""
    spec = ProxySpec(args.proxy)
    top = rank_rows(spec, rows)[:args.rerank]
    path = out_path[:-4] + "_rerank.csv"
    folder = path[:-4]
    check_settings(path[:-4] + ".json", {
        "epochs": args.rerank_epochs, "lr": args.rerank_lr, "batch_size": args.batch_size,
        "seed": args.seed, "train_subset": args.rerank_train_subset,
        "val_subset": args.rerank_val_subset, "proxy": args.proxy})
    done = read_rerank(path)
    writer = ResultsWriter(path, RERANK_COLUMNS)
    try:
        for r in tqdm([r for r in top if r["index"] not in done], desc="re-rank"):
            row = {k: r[k] for k in ("index", "convs", "params", "macs")}
            row.update(score=r[spec.ranker], val_error=train_candidate(args, r, folder))
            writer.write_row(row)
            done[r["index"]] = row
    finally:
        writer.close()
    trained = [done[r["index"]] for r in top]
    best = min(trained, key=lambda r: (r["val_error"], r["index"]))
    prefix = "" if args.proxy == "fisher" else f"{spec.label}_"
    geno = os.path.join(args.genotype_dir, f"{prefix}{goal_label(args)}_rerank_{best['index']}.csv")
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
    with tqdm(total=args.samples, desc="genotypes") as bar:
        genotypes = sample_genotypes(table, args.samples, args.param_goal, args.mac_goal,
                                     args.tol, args.seed, progress=bar.update,
                                     latency=table.latency)
    params, macs = table.cost_many(np.stack([table.encode(g) for g in genotypes]))
    df = pd.DataFrame({"convs": [repr(g) for g in genotypes], "params": params, "macs": macs})
    if table.latency is not None:
        df["latency_ms"] = [latency_row(table, g)["latency_ms"] for g in genotypes]
    atomic_write(args.save_file, lambda f: f.write(df.to_csv().encode()))
    print(f"{len(df)} genotypes, params {params.min():,} to {params.max():,} -> {args.save_file}"
          f"\nsearches with --save_file {args.save_file} score its rows within their budget "
          "(--save_file none: exact samples)")
    return {"save_file": args.save_file, "n": len(df)}


if __name__ == "__main__":
    run_cli(main, get_args_parser())

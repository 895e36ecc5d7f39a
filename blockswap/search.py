"""The search as a library: candidates within a budget (an archs file or exact samples), their
scores at initialisation, the results store (appended per candidate, settings beside it, shards
of a torchrun search merged) and the ranked genotype files. fisher_rank.py and study.py use it.

`args` below is a search's resolved settings (fisher_rank.resolve): the flags, with `spec`, the
--proxy list parsed once (ensembles.ProxySpec)."""
import argparse
import copy
import csv
import glob
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from typing import List

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from blockswap.cli import progress
from blockswap.count_ops import CostTable
from blockswap.ensembles import finite
from blockswap.files import (atomic_write, format_convs, load_genotype, parse_convs, save_genotype,
                   whole_lines)
from blockswap.funcs import Budget, QuantisedLatency, budget_window, count_genotypes, sample_genotypes
from blockswap.latency import family_of, load_or_measure, timing_from_args
from blockswap.loaders import (Augment, TensorImages, augmented_batches, choose_loader, dataset_identity,
                     tensor_images)
from models import BLOCK_TYPES, SEARCH_SPACE, Network, UserError, load_block_module
from models.archs import WRN_DEPTH, WRN_WIDTH, default_arch
from blockswap.plots import plot_search
from blockswap.proxies import get_proxy
from blockswap.runtime import Runtime, all_sum


DEFAULT_ARCHS = "archs/master_arch.csv"   # --generate_random's file; used when it fits


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


def network(args, num_classes=None) -> Network:
    """The searched network (models.archs): --arch, --wrn_depth, --wrn_width."""
    return Network.from_args(args, num_classes)


def cost_table(args, num_classes, names) -> CostTable:
    return CostTable.for_network(network(args, num_classes), names)


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


def with_latency(args, table, num_classes, names):
    """`table`, or a copy carrying .latency (integer costs) when --latency_goal is given.
    The latency table is cached under <results_dir>/latency/ (measured on first use)."""
    if args.latency_goal is None:
        return table
    if not args.latency_goal > 0:   # before minutes of measuring
        raise UserError(f"--latency_goal must be a positive number of ms, got {args.latency_goal}")
    lat = load_or_measure(family_of(network(args, num_classes)), names,
                          timing_from_args(args, args.device),
                          cache_dir=os.path.join(args.results_dir, "latency"))
    table = copy.copy(table)   # the caller's table stays latency-free
    table.latency = QuantisedLatency(lat, args.latency_goal)
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
    budget = Budget.from_args(args, table.latency)
    available = count_genotypes(table, budget)
    if available < n:
        print(f"only {int(available)} genotypes meet this budget: scoring all of them")
        n = int(available)
    return sample_genotypes(table, n, budget, args.seed), "sampled"


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
    n = args.batch_size * getattr(args, "minibatches", 1)   # study.py scores on one batch
    idx = torch.randperm(len(train_set), generator=g)[:n]
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
        return network(args, num_classes).build(genotype).to(device)


def read_rows(path, score_col):
    """{index: row} of a results CSV; a torn last line (a kill mid-write) is cut off; a
    damaged row is a UserError naming the file and line."""
    if not os.path.isfile(path):
        return {}
    text = whole_lines(path)
    rows = {}
    score_cols = [score_col] if isinstance(score_col, str) else score_col
    reader = csv.DictReader(text.splitlines())
    for r in reader:
        line = reader.line_num
        try:
            row = {"index": int(r["index"]),
                   "convs": parse_convs(r["convs"], where=f"{path}, line {line}, convs"),
                   "params": int(r["params"]), "macs": int(r["macs"]),
                   **{c: float(r[c]) for c in score_cols}}
            if "latency_ms" in r:
                row["latency_ms"] = float(r["latency_ms"])
        except UserError as e:   # a bad convs cell, named by parse_convs
            raise UserError(f"{e}: repair or delete that line, or move the file away to "
                            "start afresh") from None
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}, line {line}: not a results row ({type(e).__name__}: "
                            f"{e}): repair or delete that line, or move the file away to start "
                            "afresh") from None
        rows[row["index"]] = row
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
                              else format_convs(row[c]) for c in self.columns])
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
        w.writerow([format_convs(r[c]) if c == "convs" else r[c] for c in columns])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def check_settings(path, settings):
    """Write the run's settings beside its results, or check that a resumed run matches."""
    if os.path.isfile(path):
        old = read_settings(path)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            text = ", ".join(f"{k} {a!r} then, {b!r} now" for k, (a, b) in diff.items())
            raise UserError(f"{path} records different settings ({text}): rerun with the same "
                            "settings to resume, or move the results file away to start afresh")
    else:
        atomic_write(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))


def read_settings(path) -> dict:
    """The settings a run wrote beside its results; a damaged file is a UserError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError is a ValueError
        old = e
    if not isinstance(old, dict):
        raise UserError(f"{path} is not a readable settings file ({old}): it records the "
                        "settings of the results beside it; restore it from a backup, or move "
                        "it and those results away to start afresh")
    return old


def read_done(paths: "SearchPaths", score_col):
    """Every candidate already scored: the main file and any shard files."""
    rows = read_rows(paths.results, score_col)
    for s in paths.shards():
        rows.update(read_rows(s, score_col))
    return rows


def merge_shards(paths: "SearchPaths", score_col, columns):
    """Fold every shard file into the main results file (index order), then remove them."""
    shards = paths.shards()
    rows = read_done(paths, score_col)
    if shards:
        write_rows(paths.results, rows, columns)
        for s in shards:
            os.remove(s)
    return rows


@dataclass(frozen=True)
class SearchPaths:
    """Every file of one search, named after results/<proxy>_at_<goal>."""
    stem: str

    @classmethod
    def of(cls, args) -> "SearchPaths":
        """results/<proxy>_at_<goal>, or results/<network>_<proxy>_at_<goal> for a network
        other than the data set's default (see network_prefix)."""
        return cls(os.path.join(args.results_dir,
                                f"{network_prefix(args)}{args.spec.label}_at_{goal_label(args)}"))

    results = property(lambda self: self.stem + ".csv")       # one row per candidate
    settings = property(lambda self: self.stem + ".json")     # what a resumed run must share
    lock = property(lambda self: self.stem + ".lock")
    best = property(lambda self: self.stem + "_best.csv")     # the best genotype, always
    plot = property(lambda self: self.stem + ".png")
    rerank = property(lambda self: self.stem + "_rerank.csv")
    rerank_settings = property(lambda self: self.stem + "_rerank.json")
    rerank_dir = property(lambda self: self.stem + "_rerank")  # its checkpoints and genotypes

    def shard(self, rank: int) -> str:
        """The file rank `rank` of a torchrun search appends to (merged by rank 0)."""
        return f"{self.stem}.rank{rank}.csv"

    def shards(self) -> List[str]:
        return sorted(glob.glob(f"{glob.escape(self.stem)}.rank*.csv"))


@dataclass
class Search:
    """One search as it runs: its settings (args), candidates and their cost table, the
    training images, its files and its process."""
    args: argparse.Namespace
    genotypes: List[List[str]]
    table: CostTable
    num_classes: int
    train_set: object
    paths: SearchPaths
    rt: Runtime

    @property
    def score_cols(self) -> List[str]:
        """The proxies scored into columns (the `params` proxy is the params column)."""
        return [c for c in self.args.spec.columns if c != "params"]

    @property
    def columns(self) -> List[str]:
        return ["index", "convs", "params", "macs", *latency_row(self.table, None),
                *self.score_cols]


def score_all(search: Search, todo, out_path: str, best, on_new_best) -> int:
    """Score candidates `todo` (indices), appending each to out_path; on_new_best(row) for
    each new best. Returns the count."""
    args, device = search.args, search.rt.device
    spec = args.spec
    fns = {name: get_proxy(name) for name in search.score_cols}
    score_col = spec.ranker if spec.ranker in spec.columns else None   # ensembles rank last
    shared = (None if args.resample_batch
              else load_batches(search.train_set, args, args.seed, device))
    writer = ResultsWriter(out_path, search.columns)
    bar = progress(todo, desc=f"{args.proxy} at {goal_label(args)}", disable=not search.rt.main)
    try:
        for i in bar:
            key = candidate_key(args.seed, i)
            batches = shared or load_batches(search.train_set, args, key, device)
            net = make_candidate(args, search.genotypes[i], search.num_classes, key, device)
            row = candidate_row(search, i, {name: score_candidate(net, batches, fn)
                                            for name, fn in fns.items()})
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


def candidate_row(search: Search, i: int, scores: dict) -> dict:
    """The results row of candidate i: its genotype, costs and scores."""
    genotype = search.genotypes[i]
    params, macs = search.table.cost(genotype)
    return {"index": i, "convs": genotype, "params": params, "macs": macs, **scores,
            **latency_row(search.table, genotype)}


def network_prefix(args) -> str:
    """'' for the data set's default network (WRN-40-2 on CIFAR, the seed's file names), else
    the network and '_' ('wrn16-1_', 'resnet18_'): the searches of two networks at one goal
    keep apart, and never land on the names of the shipped genotypes."""
    net = network(args)
    if net.arch == default_arch(args.dataset) and \
            (not net.family.sized or (net.depth, net.width) == (WRN_DEPTH, WRN_WIDTH)):
        return ""
    return f"{net.arch}{net.depth}-{net.width}_" if net.family.sized else f"{net.arch}_"


def genotype_stem(args) -> str:
    """'<goal>_' as the original names genotype files; other proxies prefix their name, so a
    comparison run never overwrites the Fisher search's files, and another network than the
    default its own (network_prefix)."""
    prefix = "" if args.proxy == "fisher" else f"{args.spec.label}_"
    return f"{network_prefix(args)}{prefix}{goal_label(args)}_"


def genotype_path(args, row):
    """genotypes/<goal>_<index>.csv (see genotype_stem)."""
    return os.path.join(args.genotype_dir, f"{genotype_stem(args)}{row['index']}.csv")


def save_best(args, row, paths: SearchPaths):
    """A new best: its genotype file (rank 1) and the fixed best file."""
    score = row[args.spec.ranker]
    save_genotype(genotype_path(args, row), row["convs"], score, row["index"], rank=1)
    save_genotype(paths.best, row["convs"], score, row["index"], rank=1)


def genotype_files(args):
    """{index: path} of the genotype files of this proxy and goal in --genotype_dir."""
    if not os.path.isdir(args.genotype_dir):
        return {}
    pattern = re.compile(re.escape(genotype_stem(args)) + r"(\d+)\.csv")
    return {int(m.group(1)): os.path.join(args.genotype_dir, m.group(0))
            for m in map(pattern.fullmatch, sorted(os.listdir(args.genotype_dir))) if m}


def check_genotype_files(args, genotypes):
    """Refuse (before any work) when genotypes/<goal>_<i>.csv holds another genotype than
    candidate i: it belongs to another search, which this one would overwrite."""
    for i, path in genotype_files(args).items():
        if i < len(genotypes) and load_genotype(path) != genotypes[i]:
            raise UserError(f"{path} holds another search's genotype (not candidate {i} of this "
                            "one): pass another --genotype_dir, or move that file away")


def select_rows(rows, n, out_path: str):
    """The stored candidates this run ranks: the first n (--samples); says so when more are
    stored (a search that scored more before)."""
    if max(rows, default=-1) < n:
        return rows
    print(f"{out_path} holds {len(rows)} candidates; ranking the first {n} (--samples "
          f"{n}; rerun with --samples {max(rows) + 1} to rank them all)")
    return {i: r for i, r in rows.items() if i < n}


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


def run_search(search: Search, settings: dict):
    """Check or write the settings, score what is not yet scored, merge, summarise."""
    args, rt, paths = search.args, search.rt, search.paths
    if rt.main:
        check_settings(paths.settings, settings)
    if rt.world > 1:
        dist.barrier()
        check_settings(paths.settings, settings)
    done = scored_before(search)
    spec = args.spec
    todo = [i for i in range(rt.rank, len(search.genotypes), rt.world) if i not in done]
    best = (max(done.values(), key=lambda r: r[spec.ranker], default=None)
            if spec.ranker in spec.columns else None)
    single = rt.world == 1
    start = time.time()
    n = score_all(search, todo, paths.results if single else paths.shard(rt.rank), best,
                  (lambda row: save_best(args, row, paths)) if single else (lambda row: None))
    seconds = time.time() - start
    if rt.world > 1:   # also the barrier before the merge
        n = int(all_sum(torch.tensor([n], device=rt.device), rt))
    if not rt.main:
        return None
    rows = select_rows(merge_shards(paths, search.score_cols, search.columns),
                       len(search.genotypes), paths.results)
    return summarise(args, rows, paths, n, seconds), rows


def scored_before(search: Search) -> dict:
    """{index: row} of this search's candidates already in its files (rank 0 reads and
    repairs them and tells the other ranks); refuses files of other candidates."""
    rt, paths = search.rt, search.paths
    done = read_done(paths, search.score_cols) if rt.main else None
    if rt.world > 1:
        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    done = {i: r for i, r in done.items() if i < len(search.genotypes)}   # beyond --samples
    for i, r in done.items():
        if r["convs"] != search.genotypes[i]:
            raise UserError(f"{paths.results}: candidate {i} there is not candidate {i} now "
                            "(the candidates changed): rerun with the same settings and archs "
                            "file, or move the results file away")
    return done


def write_ranked(args, ranked, paths: SearchPaths, ranker):
    """Genotype files with their rank: the top --top_n, and every file of this search already
    in --genotype_dir (an earlier best) with its rank now; the best last, so the newest file is
    the best. The best also goes to the fixed results/<proxy>_at_<goal>_best.csv."""
    existing = genotype_files(args)
    for k, r in reversed(list(enumerate(ranked, 1))):
        if k <= args.top_n or r["index"] in existing:
            save_genotype(genotype_path(args, r), r["convs"], r[ranker], r["index"], rank=k)
    b = ranked[0]
    save_genotype(paths.best, b["convs"], b[ranker], b["index"], rank=1)


def summarise(args, rows, paths: SearchPaths, n_scored, seconds):
    """Write the genotype files of the top n, ranked, and print and return the summary."""
    if not rows:
        raise UserError("no candidates were scored")
    spec = args.spec
    ranked = rank_rows(spec, rows)
    write_ranked(args, ranked, paths, spec.ranker)
    b = ranked[0]
    if args.best_file:
        save_genotype(args.best_file, b["convs"], b[spec.ranker], b["index"])
    if args.plot:
        plot_search(paths.results, paths.plot, score=spec.columns[0])
    per = seconds / n_scored if n_scored else float("nan")
    lat = f"latency {b['latency_ms']:.3g} ms  " if "latency_ms" in b else ""
    now = f"{n_scored} scored now, {per:.3f} s each" if n_scored else "all scored before"
    print(f"best of {len(rows)}: #{b['index']}  params {b['params']:,}  MACs {b['macs']:,}  {lat}"
          f"{spec.ranker} {b[spec.ranker]:.6g}  ({now})  -> {paths.best}")
    for k, r in enumerate(ranked[:args.top_n], 1):
        print(f"  rank {k}: #{r['index']}  {spec.ranker} {r[spec.ranker]:.6g}  "
              f"-> {genotype_path(args, r)}")
    return {"best_index": b["index"], "best_genotype": b["convs"], "params": b["params"],
            "macs": b["macs"], "latency_ms": b.get("latency_ms"), "score": b[spec.ranker],
            args.proxy: b[spec.ranker], **{item: b[item] for item in spec.items + spec.columns},
            "proxy": args.proxy, "results": paths.results, "genotype": genotype_path(args, b),
            "best_file": paths.best,
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

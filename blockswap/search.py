"""The search as a library: its settings (SearchConfig, built once from fisher_rank.py's flags),
the candidates within a budget (an archs file or exact samples) carried as one table from
sampling to writing (store.Candidates: genotypes and their costs, computed once), their scores
at initialisation (score_genotype, weights from store.candidate_key), its files (SearchPaths;
rows and settings through store.py, shards of a torchrun search merged) and the ranked genotype
files. fisher_rank.py and study.py use it."""
import argparse
import copy
import dataclasses
import glob
import hashlib
import io
import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from blockswap.cli import progress
from blockswap.count_ops import CostTable
from blockswap.ensembles import ProxySpec, finite
from blockswap.files import load_genotype, parse_convs, save_genotype
from blockswap.funcs import Budget, QuantisedLatency, budget_window, count_genotypes, sample_codes
from blockswap.jobs import LaunchSettings, launch_settings
from blockswap.latency import Timing, load_or_measure, timed_network, timing_from_args
from blockswap.loaders import (BATCH_SIZE, LOADER, WORKERS, DataSpec, TensorImages,
                               augmented_batches, choose_loader, dataset_identity, tensor_images)
from models import SEARCH_SPACE, Network, UserError, get_block_type, load_block_module
from models.archs import WRN_DEPTH, WRN_WIDTH, default_arch
from blockswap.plots import plot_search
from blockswap.proxies import get_proxy, proxy_spec
from blockswap.runtime import AMP, DEVICE, Runtime, all_sum, pick_device
from blockswap.store import (INIT_RULE, SEARCH_INIT_RULE, Candidates, ResultsWriter,
                             candidate_key, check_settings, read_rows, write_rows)


DEFAULT_ARCHS = "archs/master_arch.csv"   # --generate_random's file; used when it fits
DEFAULT_PARAM_GOAL = 800_000              # the original's goal when none is given


# --------------------------------------------------------------------------------------------
# Settings: one record per search
# --------------------------------------------------------------------------------------------

def blocks_arg(text: str) -> Tuple[str, ...]:
    """argparse type of --blocks: comma-separated block names (checked against the block table
    once --module has added its own, in SearchConfig.from_args)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no block type: give comma-separated "
                                         "names such as Conv,DConvA4,G8B2")
    return names


@dataclass(frozen=True)
class SearchConfig:
    """Everything that defines a search: fisher_rank.py's flags of the same names, each default
    stated here once (fisher_rank.py's parser reads its defaults from this class). from_args
    fills in what depends on other flags; `spec` is the --proxy list parsed (ProxySpec)."""
    dataset: str = "cifar10"
    data_loc: Optional[str] = None
    download: bool = False
    workers: int = WORKERS
    loader: str = LOADER
    cache_dir: Optional[str] = None
    image_size: Optional[int] = None          # None: the data set's (a folder's: the family's)
    arch: Optional[str] = None                # None: the data set's family (from_args fills in)
    wrn_depth: Optional[int] = None           # None: WRN_DEPTH
    wrn_width: Optional[int] = None           # None: WRN_WIDTH
    module: Optional[str] = None              # a user's block file (register_block)
    blocks: Optional[Tuple[str, ...]] = None  # the search space; None: SEARCH_SPACE
    param_goal: Optional[int] = None          # no goal at all: DEFAULT_PARAM_GOAL (from_args)
    mac_goal: Optional[int] = None
    tol: float = Budget.tol
    latency_goal: Optional[float] = None      # ms on `timing`'s latency table
    timing: Optional[Timing] = None           # from the latency flags, with a latency goal
    samples: int = 1000                       # candidates to score / generate
    seed: int = 0                             # sampling, minibatch and initialisation seed
    init_rule: int = INIT_RULE                # candidate_key's rule; a resumed search: its own
    batch_size: int = BATCH_SIZE              # images per scoring minibatch
    minibatches: int = 1                      # a candidate's scores are summed over this many
    resample_batch: bool = False              # a minibatch per candidate (off: one, shared)
    proxy: str = "fisher"                     # proxies.py's names, ensembles, or a list
    top_n: int = 1                            # genotype files kept for the best n
    generate_random: bool = False
    save_file: str = DEFAULT_ARCHS
    overwrite: bool = False
    results_dir: str = "results"
    genotype_dir: str = "genotypes"
    best_file: Optional[str] = None
    plot: bool = True
    rerank: int = 0                           # then train the top K briefly (fisher_rank.py)
    rerank_epochs: int = 2
    rerank_lr: float = 0.1
    rerank_train_subset: Optional[int] = None
    rerank_val_subset: Optional[int] = None
    amp: str = AMP                            # the re-rank's training precision
    device: str = DEVICE                      # from_args: auto becomes a device type
    launch: LaunchSettings = LaunchSettings()  # where the re-rank's trainings run
    spec: ProxySpec = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "spec", proxy_spec(self.proxy))

    @classmethod
    def from_args(cls, args) -> "SearchConfig":
        """fisher_rank.py's parsed flags as a record: the network resolved (arch, WRN depth
        and width), the default goal, --device auto as a device type (a plain "cuda" stays
        plain: each torchrun process takes its own GPU), --module loaded and the search space
        checked, the latency timing (a bad --latency_device fails here, before any work)."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        values = {k: v for k, v in vars(args).items() if k in known}
        net = Network.from_args(args)
        values.update(arch=net.arch, wrn_depth=net.depth, wrn_width=net.width,
                      blocks=search_space(args.module, args.blocks, net.space))
        if not args.generate_random and args.param_goal is None and args.mac_goal is None \
                and args.latency_goal is None:
            values["param_goal"] = DEFAULT_PARAM_GOAL
        device = pick_device(args.device)
        values["device"] = device.type if args.device in (None, "auto") else args.device
        if args.latency_goal is not None:
            values["timing"] = timing_from_args(args, values["device"])
        values["launch"] = launch_settings(args, LaunchSettings.log_dir, values["device"])
        return cls(**values)

    def replace(self, **changes) -> "SearchConfig":
        return dataclasses.replace(self, **changes)

    def network(self, num_classes: Optional[int] = None) -> Network:
        """The searched network (models.archs)."""
        return Network.named(self.arch, self.dataset, self.wrn_depth, self.wrn_width,
                             num_classes)

    def data_spec(self) -> DataSpec:
        """The images the search scores on (loaders.DataSpec: size and recipe)."""
        return DataSpec.of(self.dataset, self.image_size, self.arch)

    def names(self) -> List[str]:
        """The block names searched over."""
        return list(self.blocks or self.network().space)

    def budget(self, latency=None) -> Budget:
        """The goals' windows; `latency` a QuantisedLatency for a latency goal."""
        return Budget(self.param_goal, self.mac_goal, self.tol, latency)


def search_space(module: Optional[str], blocks: Optional[Tuple[str, ...]],
                 default: Sequence[str] = SEARCH_SPACE) -> Tuple[str, ...]:
    """Block names searched over: --blocks, else the network family's space (`default`) plus
    the user's block types (--module's). The one place the search's block names are checked
    (after --module registers its own)."""
    added = load_block_module(module) if module else ()
    if not blocks:
        return tuple(default) + tuple(n for n in added if n not in default)
    for name in blocks:
        try:
            get_block_type(name)
        except UserError as e:
            raise UserError(f"--blocks: {e}") from None
    return tuple(blocks)


def cost_table(cfg: SearchConfig, num_classes) -> CostTable:
    return CostTable.for_network(cfg.network(num_classes), cfg.names())


def goal_label(cfg: SearchConfig) -> str:
    """'800000', 'macs100000000' or '800000_macs100000000': names the results and genotypes."""
    parts = ([str(cfg.param_goal)] if cfg.param_goal is not None else []) + \
            ([f"macs{cfg.mac_goal}"] if cfg.mac_goal is not None else []) + \
            ([f"lat{cfg.latency_goal:g}ms"] if cfg.latency_goal is not None else [])
    return "_".join(parts)


def in_budget(cfg: SearchConfig, params: np.ndarray, macs: np.ndarray) -> np.ndarray:
    ok = np.ones(len(params), bool)
    for goal, value in ((cfg.param_goal, params), (cfg.mac_goal, macs)):
        if goal is not None:
            lo, hi = budget_window(goal, cfg.tol)
            ok &= (value >= lo) & (value <= hi)
    return ok


def with_latency(cfg: SearchConfig, table, num_classes):
    """`table`, or a copy carrying .latency (integer costs) when --latency_goal is given.
    The latency table is cached under <results_dir>/latency/ (measured on first use)."""
    if cfg.latency_goal is None:
        return table
    lat = load_or_measure(timed_network(cfg.network(num_classes)), cfg.names(), cfg.timing,
                          cache_dir=os.path.join(cfg.results_dir, "latency"))
    table = copy.copy(table)   # the caller's table stays latency-free
    table.latency = QuantisedLatency(lat, cfg.latency_goal)
    return table


def in_latency_budget(cfg: SearchConfig, table, codes: np.ndarray) -> np.ndarray:
    """The latency window on the same quantised costs the sampler uses."""
    if table.latency is None:
        return np.ones(len(codes), bool)
    return table.latency.in_window(codes, cfg.tol)


def latency_columns(table) -> List[str]:
    """['latency_ms'] with a latency goal, else []: the results' latency column."""
    return [] if table.latency is None else ["latency_ms"]


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


def candidates_from_file(cfg: SearchConfig, table) -> Optional[Candidates]:
    """The archs file's rows that meet the budget, in file order (their costs computed once,
    here), or None for exact samples. The default file is skipped with a message when it does
    not fit (another network, too few rows in budget); a file named with --save_file must."""
    path = cfg.save_file
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
    ok = in_budget(cfg, params, macs) & in_latency_budget(cfg, table, codes)
    counts = f"{int(ok.sum())} of its {len(genotypes)} rows meet this budget"
    if ok.sum() < cfg.samples:
        if named:
            raise UserError(f"{path}: {counts}, fewer than --samples {cfg.samples}: lower "
                            "--samples, or pass --save_file none for exact samples")
        print(f"candidates: exact samples ({path} skipped: {counts}, fewer than --samples "
              f"{cfg.samples})")
        return None
    print(f"candidates: {path} (sha256 {digest[:12]}): {counts}; scoring the first "
          f"{cfg.samples}")
    keep = np.flatnonzero(ok)[:cfg.samples]
    return Candidates.of_rows(table, [genotypes[i] for i in keep], params[keep], macs[keep],
                              f"sha256:{digest}")


def get_candidates(cfg: SearchConfig, table) -> Candidates:
    """The archs file's in-budget rows when it fits (see candidates_from_file), else exactly
    uniform samples within the budget window ("sampled")."""
    if cfg.save_file.lower() == "none":
        print("candidates: exact samples (--save_file none)")
    else:
        from_file = candidates_from_file(cfg, table)
        if from_file is not None:
            return from_file
    n = cfg.samples
    budget = cfg.budget(table.latency)
    available = count_genotypes(table, budget)
    if available < n:
        print(f"only {int(available)} genotypes meet this budget: scoring all of them")
        n = int(available)
    return Candidates.of_codes(table, sample_codes(table, n, budget, cfg.seed), "sampled")


# --------------------------------------------------------------------------------------------
# Scoring at initialisation
# --------------------------------------------------------------------------------------------

def training_images(cfg: SearchConfig, train_set, device):
    """The search's training images: decoded once onto `device` (the tensor loader, see
    loaders.py) or, on the PIL path, `train_set` itself."""
    if choose_loader(cfg.loader, cfg.dataset, [train_set], cfg.data_spec()) == "pil":
        return train_set
    return tensor_images(train_set, cfg.workers, cfg.cache_dir, cfg.data_spec()).to(device)


def load_batches(train_set, cfg: SearchConfig, key: int, device):
    """`--minibatches` batches of `--batch_size` training images chosen and augmented by the
    seed `key` alone, so every process and every resumed run sees the same pixels.
    train_set: a TensorImages (augmented on its device) or a dataset of PIL transforms."""
    g = torch.Generator().manual_seed(key)
    idx = torch.randperm(len(train_set), generator=g)[:cfg.batch_size * cfg.minibatches]
    if isinstance(train_set, TensorImages):
        batches = augmented_batches(train_set, idx, cfg.batch_size, cfg.data_spec().augment(),
                                    g)
        return [(x.to(device), y.to(device)) for x, y in batches]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_set, idx.tolist()),
                                         batch_size=cfg.batch_size,
                                         num_workers=cfg.workers, generator=g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)   # the augmentations draw from torch's global generator
        return [(x.to(device), y.to(device)) for x, y in loader]


def score_candidate(net, batches, proxy) -> float:
    """The one place a candidate is scored: proxy(net, inputs, targets) summed over batches."""
    return float(sum(proxy(net, x, y) for x, y in batches))


def make_candidate(net: Network, genotype, key: int, device):
    """`genotype` built as `net` from torch.manual_seed(key) (torch's own generator is left as
    it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)
        return net.build(genotype).to(device)


def score_genotype(net: Network, genotype, key: int, batches, proxies: Dict[str, object],
                   device) -> Dict[str, float]:
    """{name: score} of every proxy on one initialisation of `genotype` (seeded `key`), the
    same network for all of them (a proxy leaves it as it found it: funcs.scoring_mode)."""
    model = make_candidate(net, genotype, key, device)
    return {name: score_candidate(model, batches, fn) for name, fn in proxies.items()}


def read_done(paths: "SearchPaths", score_cols, columns):
    """Every candidate already scored: the main file and any shard files."""
    rows = read_rows(paths.results, score_cols, columns)
    for s in paths.shards():
        rows.update(read_rows(s, score_cols, columns))
    return rows


def merge_shards(paths: "SearchPaths", rows, columns) -> None:
    """Fold the shard files into the main results file (`rows`: all of them, in memory; index
    order), then remove them."""
    shards = paths.shards()
    if shards:
        write_rows(paths.results, rows, columns)
        for s in shards:
            os.remove(s)


@dataclass(frozen=True)
class SearchPaths:
    """Every file of one search, named after results/<proxy>_at_<goal>."""
    stem: str

    @classmethod
    def of(cls, cfg: SearchConfig) -> "SearchPaths":
        """results/<proxy>_at_<goal>, or results/<network>_<proxy>_at_<goal> for a network
        other than the data set's default (see network_prefix)."""
        return cls(os.path.join(cfg.results_dir,
                                f"{network_prefix(cfg)}{cfg.spec.label}_at_{goal_label(cfg)}"))

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
    """One search as it runs: its settings, candidates and their cost table, the training
    images, its files and its process."""
    cfg: SearchConfig
    candidates: Candidates
    table: CostTable
    num_classes: int
    train_set: object
    paths: SearchPaths
    rt: Runtime

    @property
    def score_cols(self) -> List[str]:
        """The proxies scored into columns (the `params` proxy is the params column)."""
        return [c for c in self.cfg.spec.columns if c != "params"]

    @property
    def columns(self) -> List[str]:
        return ["index", "convs", "params", "macs", *latency_columns(self.table),
                *self.score_cols]


def score_all(search: Search, todo, out_path: str, best, on_new_best) -> Dict[int, dict]:
    """Score candidates `todo` (indices), appending each to out_path; on_new_best(row) for
    each new best. Returns the rows scored, {index: row}."""
    cfg, device = search.cfg, search.rt.device
    spec = cfg.spec
    fns = {name: get_proxy(name) for name in search.score_cols}
    score_col = spec.ranker if spec.ranker in spec.columns else None   # ensembles rank last
    shared = (None if cfg.resample_batch
              else load_batches(search.train_set, cfg, cfg.seed, device))
    net = cfg.network(search.num_classes)
    writer = ResultsWriter(out_path, search.columns)
    bar = progress(todo, desc=f"{cfg.proxy} at {goal_label(cfg)}", disable=not search.rt.main)
    rows = {}
    try:
        for i in bar:
            key = candidate_key(cfg.seed, i, rule=cfg.init_rule)
            batches = shared or load_batches(search.train_set, cfg, key, device)
            row = {**search.candidates.row(i),
                   **score_genotype(net, search.candidates.genotypes[i], key, batches, fns,
                                    device)}
            writer.write_row(row)
            rows[i] = row
            if score_col is None:
                continue
            if best is None or row[score_col] > best[score_col]:
                best = row
                on_new_best(row)
            bar.set_postfix(best=f"#{best['index']} {best[score_col]:.4g}", refresh=False)
    finally:
        writer.close()
    return rows


def network_prefix(cfg: SearchConfig) -> str:
    """'' for the data set's default network (WRN-40-2 on CIFAR, the seed's file names), else
    the network and '_' ('wrn16-1_', 'resnet18_'): the searches of two networks at one goal
    keep apart, and never land on the names of the shipped genotypes."""
    net = cfg.network()
    if net.arch == default_arch(cfg.dataset) and \
            (not net.family.sized or (net.depth, net.width) == (WRN_DEPTH, WRN_WIDTH)):
        return ""
    return f"{net.arch}{net.depth}-{net.width}_" if net.family.sized else f"{net.arch}_"


def genotype_stem(cfg: SearchConfig) -> str:
    """'<goal>_' as the original names genotype files; other proxies prefix their name, so a
    comparison run never overwrites the Fisher search's files, and another network than the
    default its own (network_prefix)."""
    prefix = "" if cfg.proxy == "fisher" else f"{cfg.spec.label}_"
    return f"{network_prefix(cfg)}{prefix}{goal_label(cfg)}_"


def genotype_path(cfg: SearchConfig, row):
    """genotypes/<goal>_<index>.csv (see genotype_stem)."""
    return os.path.join(cfg.genotype_dir, f"{genotype_stem(cfg)}{row['index']}.csv")


def save_best(cfg: SearchConfig, row, paths: SearchPaths):
    """A new best: its genotype file (rank 1) and the fixed best file."""
    score = row[cfg.spec.ranker]
    save_genotype(genotype_path(cfg, row), row["convs"], score, row["index"], rank=1)
    save_genotype(paths.best, row["convs"], score, row["index"], rank=1)


def genotype_files(cfg: SearchConfig):
    """{index: path} of the genotype files of this proxy and goal in --genotype_dir."""
    if not os.path.isdir(cfg.genotype_dir):
        return {}
    pattern = re.compile(re.escape(genotype_stem(cfg)) + r"(\d+)\.csv")
    return {int(m.group(1)): os.path.join(cfg.genotype_dir, m.group(0))
            for m in map(pattern.fullmatch, sorted(os.listdir(cfg.genotype_dir))) if m}


def check_genotype_files(cfg: SearchConfig, genotypes):
    """Refuse (before any work) when genotypes/<goal>_<i>.csv holds another genotype than
    candidate i: it belongs to another search, which this one would overwrite."""
    for i, path in genotype_files(cfg).items():
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


SEARCH_SETTINGS = ("dataset", "arch", "param_goal", "mac_goal", "tol", "seed", "batch_size",
                   "minibatches", "resample_batch", "proxy", "latency_goal", "init_rule")
SEARCH_ADDED = {"init_rule": SEARCH_INIT_RULE}   # recorded since: what older files imply


def search_settings(cfg: SearchConfig, num_classes, source, train_set, table):
    """What a resumed search must share with the run that started it."""
    settings = {k: getattr(cfg, k) for k in SEARCH_SETTINGS}
    settings.update(num_classes=num_classes, blocks=cfg.names(), candidates=source,
                    **latency_settings(table),
                    data=dataset_identity(train_set),
                    loader=choose_loader(cfg.loader, cfg.dataset, [train_set], cfg.data_spec()))
    if cfg.arch == "wrn":
        settings.update(wrn_depth=cfg.wrn_depth, wrn_width=cfg.wrn_width)
    size = cfg.data_spec().image_size
    if size != DataSpec.of(cfg.dataset).image_size:   # recorded since: older runs had this
        settings["image_size"] = size
    return settings


def run_search(search: Search, settings: dict):
    """Check or write the settings, score what is not yet scored, merge, summarise. A single
    process keeps its rows in memory; rank 0 of a torchrun search reads the shards back."""
    cfg, rt, paths = search.cfg, search.rt, search.paths
    if rt.main:
        check_settings(paths.settings, settings, SEARCH_ADDED)
    if rt.world > 1:
        dist.barrier()
        check_settings(paths.settings, settings, SEARCH_ADDED)
    stored = scored_before(search)
    n_cands = len(search.candidates)
    todo = [i for i in range(rt.rank, n_cands, rt.world) if i not in stored]
    spec = cfg.spec
    done = [r for i, r in stored.items() if i < n_cands]
    best = (max(done, key=lambda r: r[spec.ranker], default=None)
            if spec.ranker in spec.columns else None)
    single = rt.world == 1
    start = time.time()
    new = score_all(search, todo, paths.results if single else paths.shard(rt.rank), best,
                    (lambda row: save_best(cfg, row, paths)) if single else (lambda row: None))
    seconds, n = time.time() - start, len(new)
    if rt.world > 1:   # also the barrier before the merge
        n = int(all_sum(torch.tensor([n], device=rt.device), rt))
    if not rt.main:
        return None
    rows = {**stored, **new} if single else read_done(paths, search.score_cols, search.columns)
    merge_shards(paths, rows, search.columns)
    rows = select_rows(rows, n_cands, paths.results)
    return summarise(cfg, rows, paths, n, seconds), rows


def scored_before(search: Search) -> dict:
    """{index: row} of everything already in this search's files (rank 0 reads and repairs
    them and tells the other ranks); refuses files of other candidates."""
    rt, paths = search.rt, search.paths
    stored = read_done(paths, search.score_cols, search.columns) if rt.main else None
    if rt.world > 1:
        box = [stored]
        dist.broadcast_object_list(box, src=0)
        stored = box[0]
    genotypes = search.candidates.genotypes
    for i, r in stored.items():
        if i < len(genotypes) and r["convs"] != genotypes[i]:   # beyond --samples: kept
            raise UserError(f"{paths.results}: candidate {i} there is not candidate {i} now "
                            "(the candidates changed): rerun with the same settings and archs "
                            "file, or move the results file away")
    return stored


def write_ranked(cfg: SearchConfig, ranked, paths: SearchPaths, ranker):
    """Genotype files with their rank: the top --top_n, and every file of this search already
    in --genotype_dir (an earlier best) with its rank now; the best last, so the newest file is
    the best. The best also goes to the fixed results/<proxy>_at_<goal>_best.csv."""
    existing = genotype_files(cfg)
    for k, r in reversed(list(enumerate(ranked, 1))):
        if k <= cfg.top_n or r["index"] in existing:
            save_genotype(genotype_path(cfg, r), r["convs"], r[ranker], r["index"], rank=k)
    b = ranked[0]
    save_genotype(paths.best, b["convs"], b[ranker], b["index"], rank=1)


def summarise(cfg: SearchConfig, rows, paths: SearchPaths, n_scored, seconds):
    """Write the genotype files of the top n, ranked, and print and return the summary."""
    if not rows:
        raise UserError("no candidates were scored")
    spec = cfg.spec
    ranked = rank_rows(spec, rows)
    write_ranked(cfg, ranked, paths, spec.ranker)
    b = ranked[0]
    if cfg.best_file:
        save_genotype(cfg.best_file, b["convs"], b[spec.ranker], b["index"])
    if cfg.plot:
        plot_search(paths.results, paths.plot, score=spec.columns[0])
    per = seconds / n_scored if n_scored else float("nan")
    lat = f"latency {b['latency_ms']:.3g} ms  " if "latency_ms" in b else ""
    now = f"{n_scored} scored now, {per:.3f} s each" if n_scored else "all scored before"
    print(f"best of {len(rows)}: #{b['index']}  params {b['params']:,}  MACs {b['macs']:,}  {lat}"
          f"{spec.ranker} {b[spec.ranker]:.6g}  ({now})  -> {paths.best}")
    for k, r in enumerate(ranked[:cfg.top_n], 1):
        print(f"  rank {k}: #{r['index']}  {spec.ranker} {r[spec.ranker]:.6g}  "
              f"-> {genotype_path(cfg, r)}")
    return {"best_index": b["index"], "best_genotype": b["convs"], "params": b["params"],
            "macs": b["macs"], "latency_ms": b.get("latency_ms"), "score": b[spec.ranker],
            cfg.proxy: b[spec.ranker], **{item: b[item] for item in spec.items + spec.columns},
            "proxy": cfg.proxy, "results": paths.results, "genotype": genotype_path(cfg, b),
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

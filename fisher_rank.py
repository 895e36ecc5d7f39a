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

This script parses its flags into a search.SearchConfig (once) and calls the library with it:
search.py (candidates, scoring, the results store, genotype files), engine.py (the re-rank's
trainings, through jobs.py) and funcs.py (sampling).
"""
import argparse
import contextlib
import dataclasses
import os

from blockswap.cli import HelpFormatter, at_least, positive, progress, run_cli
from blockswap.engine import TrainConfig, candidate_config, train_candidate
from blockswap.files import atomic_write, check_writable, pid_lock, save_genotype
from blockswap.funcs import budget_args, sample_codes
from blockswap.jobs import Job, launcher_args, run_jobs
from blockswap.latency import add_latency_args
from blockswap.loaders import NUM_CLASSES, data_args, get_datasets
from models import UserError, network_args
from blockswap.proxies import PROXIES, proxy_arg
from blockswap.runtime import AMP_CHOICES, device_args, distributed_teardown, start_runtime
from blockswap.search import (DEFAULT_ARCHS, SEARCH_ADDED, Search, SearchConfig, SearchPaths,
                              blocks_arg, check_genotype_files, cost_table, genotype_stem,
                              get_candidates, rank_rows, run_search, search_settings,
                              training_images, with_latency)
from blockswap.store import (SEARCH_INIT_RULE, Candidates, ResultsWriter, check_settings,
                             read_rows, stored_rule)

D = SearchConfig()   # every default is stated once, in search.SearchConfig


def get_args_parser():
    p = argparse.ArgumentParser(description="BlockSwap: rank budget-meeting networks by "
                                            "Fisher potential at initialisation.",
                                formatter_class=HelpFormatter,
                                parents=[data_args(), network_args(), budget_args(),
                                         device_args(), launcher_args()])
    p.add_argument("--latency_goal", default=D.latency_goal, type=positive(),
                   help="predicted inference latency budget in ms (may join params/MACs)")
    add_latency_args(p)
    p.add_argument("--samples", default=D.samples, type=at_least(1),
                   help="candidates to score / generate")
    p.add_argument("--seed", default=D.seed, type=int, help="sampling, minibatch and init seed")
    p.add_argument("--batch_size", default=D.batch_size, type=at_least(1),
                   help="images per scoring minibatch")
    p.add_argument("--minibatches", default=D.minibatches, type=at_least(1),
                   help="scores summed over this many")
    p.add_argument("--resample_batch", action="store_true",
                   help="a different minibatch per candidate (off: one shared, fair)")
    p.add_argument("--proxy", default=D.proxy, type=proxy_arg,
                   help="scoring function (proxies.py; higher is better): "
                        f"{', '.join(PROXIES)}; an ensemble 'vote' or 'rank:a+b+c'; or a "
                        "comma-separated list, one column each, ranked by the first")
    p.add_argument("--top_n", default=D.top_n, type=at_least(1),
                   help="genotype files kept for the best n")
    p.add_argument("--blocks", default=D.blocks, type=blocks_arg,
                   help="comma-separated search space (None: the paper's 24 + --module's)")
    p.add_argument("--generate_random", action="store_true",
                   help="write --samples random genotypes to --save_file and stop")
    p.add_argument("--save_file", default=D.save_file,
                   help="archs file: written by --generate_random; when scoring, the candidates "
                        "are its rows within the budget if at least --samples of them are "
                        f"({DEFAULT_ARCHS} is skipped with a message when it does not fit, a "
                        "file you name is an error); 'none': exact samples")
    p.add_argument("--overwrite", action="store_true", help="let --generate_random replace it")
    p.add_argument("--results_dir", default=D.results_dir,
                   help="<proxy>_at_<goal>.csv/.json/.png and _best.csv (the best genotype)")
    p.add_argument("--genotype_dir", default=D.genotype_dir,
                   help="<goal>_<index>.csv of each new best and of the top --top_n")
    p.add_argument("--best_file", default=D.best_file,
                   help="also write the best genotype here (a fixed name for sweep scripts)")
    p.add_argument("--plot", default=D.plot, action=argparse.BooleanOptionalAction,
                   help="draw results/<proxy>_at_<goal>.png: score against params and MACs")
    add_rerank_args(p)
    return p


def add_rerank_args(p) -> None:
    """--rerank and the settings of its short trainings."""
    p.add_argument("--rerank", default=D.rerank, type=at_least(0),
                   help="then train the top K for --rerank_epochs (engine.py, as main.py) and "
                        "rank them by validation error (results/<proxy>_at_<goal>_rerank.csv); "
                        "--launcher says where the trainings run")
    p.add_argument("--rerank_epochs", default=D.rerank_epochs, type=at_least(1),
                   help="epochs per re-ranked candidate")
    p.add_argument("--rerank_lr", default=D.rerank_lr, type=positive(),
                   help="learning rate of the re-rank (cosine schedule)")
    p.add_argument("--rerank_train_subset", default=D.rerank_train_subset, type=at_least(1),
                   help="train each re-ranked candidate on N fixed images (default: all)")
    p.add_argument("--rerank_val_subset", default=D.rerank_val_subset, type=at_least(1),
                   help="validate them on N fixed images (default: all)")
    p.add_argument("--amp", default=D.amp, choices=sorted(AMP_CHOICES),
                   help="the re-rank's training precision (as main.py --amp)")


def main(args):
    with distributed_teardown():   # a no-op without torchrun
        return search(SearchConfig.from_args(args))


def check_outputs(cfg: SearchConfig) -> None:
    """Every output folder and file name, before any work."""
    check_writable(cfg.results_dir, "--results_dir")
    check_writable(cfg.genotype_dir, "--genotype_dir")
    if cfg.best_file:
        if os.path.isdir(cfg.best_file):
            raise UserError(f"--best_file {cfg.best_file} is a folder: give a file name such "
                            "as genotypes/best.csv")
        check_writable(os.path.dirname(cfg.best_file) or ".", "--best_file")
    if cfg.rerank and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--rerank trains in this process: run it without torchrun (the scores "
                        "already in the results file are reused)")


def search(cfg: SearchConfig):
    """The search `cfg` describes (or, with generate_random, its archs file)."""
    if cfg.generate_random:
        return generate_random(cfg)
    if not cfg.data_loc:
        raise UserError("pass --data_loc (a CIFAR folder or an image folder) to score "
                        "candidates, or --generate_random to only write genotypes")
    check_outputs(cfg)
    rt = start_runtime(cfg.device)
    train_set, _, num_classes = get_datasets(cfg.dataset, cfg.data_loc, cfg.download,
                                             spec=cfg.data_spec())
    table = with_latency(cfg, cost_table(cfg, num_classes), num_classes)
    candidates = get_candidates(cfg, table)
    paths = SearchPaths.of(cfg)
    cfg = cfg.replace(init_rule=stored_rule(paths.settings, SEARCH_INIT_RULE))   # a resumed
    settings = search_settings(cfg, num_classes, candidates.source, train_set, table)
    if rt.main and os.path.isfile(paths.settings):   # a resumed search: compare, before decoding
        check_settings(paths.settings, settings, SEARCH_ADDED)
    run = Search(cfg, candidates, table, num_classes,
                 training_images(cfg, train_set, rt.device), paths, rt)
    if not rt.main:
        return run_search(run, settings)
    check_genotype_files(cfg, candidates.genotypes)
    os.makedirs(cfg.results_dir, exist_ok=True)
    with pid_lock(paths.lock, paths.results):
        result, rows = run_search(run, settings)
        if cfg.rerank:
            result["rerank"] = rerank(cfg, rows, paths)
        return result


# --------------------------------------------------------------------------------------------
# Re-rank: train the top K briefly (engine.py), rank by validation error
# --------------------------------------------------------------------------------------------

RERANK_COLUMNS = ["index", "convs", "params", "macs", "score", "val_error"]


def rerank_config(cfg: SearchConfig, row, folder) -> TrainConfig:
    """The short training of one candidate: main.py's teacher training (cross-entropy, cosine
    schedule) on the search's data path and precision."""
    return candidate_config(
        row["convs"], folder, f"candidate_{row['index']}", dataset=cfg.dataset,
        data_loc=cfg.data_loc, image_size=cfg.image_size, arch=cfg.arch, wrn_depth=cfg.wrn_depth,
        wrn_width=cfg.wrn_width, module=cfg.module, epochs=cfg.rerank_epochs,
        lr=cfg.rerank_lr, batch_size=cfg.batch_size, workers=cfg.workers, seed=cfg.seed,
        device=cfg.device, train_subset=cfg.rerank_train_subset,
        val_subset=cfg.rerank_val_subset, loader=cfg.loader, cache_dir=cfg.cache_dir,
        amp=cfg.amp)


def read_rerank(path):
    """{index: row} of a re-rank CSV (a torn last line cut off, as read_rows)."""
    return read_rows(path, ["score", "val_error"], RERANK_COLUMNS)


def rerank(cfg: SearchConfig, rows, paths: SearchPaths):
    """Train the top --rerank candidates by the proxy (appending each to <results>_rerank.csv
    as it finishes, so a rerun resumes), then write the lowest-error one as a genotype file."""
    top = rank_rows(cfg.spec, rows)[:cfg.rerank]
    path, folder = paths.rerank, paths.rerank_dir
    check_settings(paths.rerank_settings, {
        "epochs": cfg.rerank_epochs, "lr": cfg.rerank_lr, "batch_size": cfg.batch_size,
        "seed": cfg.seed, "train_subset": cfg.rerank_train_subset,
        "val_subset": cfg.rerank_val_subset, "proxy": cfg.proxy})
    done = read_rerank(path)
    todo = {f"candidate_{r['index']}": r for r in top if r["index"] not in done}
    writer = ResultsWriter(path, RERANK_COLUMNS)

    def collect(name, result):   # appended as each training ends, so a rerun resumes
        r = todo[name]
        row = {k: r[k] for k in ("index", "convs", "params", "macs")}
        row.update(score=r[cfg.spec.ranker], val_error=result["val_error"])
        writer.write_row(row)
        done[r["index"]] = row
    try:
        run_jobs(train_candidate, [Job(n, rerank_config(cfg, r, folder)) for n, r in todo.items()],
                 dataclasses.replace(cfg.launch, log_dir=os.path.join(folder, "jobs")),
                 on_result=collect)
    finally:
        writer.close()
    trained = [done[r["index"]] for r in top]
    best = min(trained, key=lambda r: (r["val_error"], r["index"]))
    geno = os.path.join(cfg.genotype_dir, f"{genotype_stem(cfg)}rerank_{best['index']}.csv")
    save_genotype(geno, best["convs"], best["score"], best["index"])
    print(f"re-rank of the top {len(top)} after {cfg.rerank_epochs} epochs: #{best['index']} "
          f"val error {best['val_error']:.2f}% (proxy's #1: #{top[0]['index']}, "
          f"{done[top[0]['index']]['val_error']:.2f}%) -> {geno}")
    return {"results": path, "genotype": geno, "best_index": best["index"],
            "ranking": [r["index"] for r in sorted(trained, key=lambda r: (r["val_error"],
                                                                            r["index"]))]}


def generate_random(cfg: SearchConfig):
    """Write --samples genotypes (convs, params, macs) to --save_file, atomically."""
    if cfg.save_file.lower() == "none" or os.path.isdir(cfg.save_file):
        raise UserError(f"--generate_random writes an archs file: --save_file {cfg.save_file} "
                        "is not a file name")
    if os.path.exists(cfg.save_file) and not cfg.overwrite:
        raise UserError(f"{cfg.save_file} exists: pass --overwrite to replace it, or another "
                        "--save_file")
    check_writable(os.path.dirname(cfg.save_file) or ".", "--save_file")
    num_classes = NUM_CLASSES.get(cfg.dataset) or (   # a folder: its classes, if given
        get_datasets(cfg.dataset, cfg.data_loc)[2] if cfg.data_loc else None)
    table = with_latency(cfg, cost_table(cfg, num_classes), num_classes)
    with contextlib.closing(progress(total=cfg.samples, desc="genotypes")) as bar:
        codes = sample_codes(table, cfg.samples, cfg.budget(table.latency), cfg.seed,
                             progress=bar.update)
    df = Candidates.of_codes(table, codes, "sampled").frame()
    atomic_write(cfg.save_file, lambda f: f.write(df.to_csv().encode()))
    print(f"{len(df)} genotypes, params {df['params'].min():,} to {df['params'].max():,} -> "
          f"{cfg.save_file}\nsearches with --save_file {cfg.save_file} score its rows within "
          "their budget (--save_file none: exact samples)")
    return {"save_file": cfg.save_file, "n": len(df)}


if __name__ == "__main__":
    run_cli(main, get_args_parser())

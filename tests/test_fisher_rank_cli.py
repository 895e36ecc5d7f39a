"""fisher_rank.py end to end on a tiny generated image folder with WRN-10-1: results and
genotype files, resume after a simulated kill, settings check, archs file, 2-process shards."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import fisher_rank
from conftest import run
from blockswap import search
from blockswap.funcs import budget_window, fisher_scores, load_genotype
from blockswap.cli import run_cli
from models import Network, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL = 20000
NET = "wrn10-1_"   # WRN-10-1 is not CIFAR's default network: its search files say so


def argv(data, out, *extra):
    return ["cifar10", f"--data_loc={data}", "--wrn_depth", "10", "--wrn_width", "1",
            "--param_goal", str(GOAL), "--tol", "0.3", "--samples", "6", "--batch_size", "8",
            "--results_dir", str(out / "results"), "--genotype_dir", str(out / "genotypes"),
            "--save_file", "none", *extra]


@pytest.fixture(autouse=True)
def cached_cost_tables(monkeypatch):
    """Building a cost table measures every block type (seconds); tests reuse them."""
    built = TABLES

    def cost_table(cfg, num_classes):
        key = (cfg.arch, cfg.wrn_depth, cfg.wrn_width, num_classes, tuple(cfg.names()))
        if key not in built:
            built[key] = ORIGINAL_COST_TABLE(cfg, num_classes)
        return built[key]
    monkeypatch.setattr(fisher_rank, "cost_table", cost_table)


TABLES = {}
ORIGINAL_COST_TABLE = search.cost_table


def config(*a) -> search.SearchConfig:
    """The settings record of argv(*a), as fisher_rank.main builds it."""
    return search.SearchConfig.from_args(fisher_rank.get_args_parser().parse_args(argv(*a)))


@pytest.fixture(scope="module")
def full(tiny_imagefolder, tmp_path_factory):
    """One uninterrupted search, the reference for the other tests."""
    out = tmp_path_factory.mktemp("full")
    summary = run(fisher_rank, *argv(tiny_imagefolder, out))
    return out, summary, open(summary["results"]).read()


def test_search_writes_results_and_best_genotype(tiny_imagefolder, full):
    out, s, text = full
    df = pd.read_csv(s["results"])
    assert list(df.columns) == ["index", "convs", "params", "macs", "fisher"]
    assert list(df["index"]) == list(range(6))
    lo, hi = budget_window(GOAL, 0.3)
    assert df["params"].between(lo, hi).all()
    best = df.loc[df["fisher"].idxmax()]
    assert s["best_index"] == best["index"] and s["fisher"] == pytest.approx(best["fisher"])
    assert s["genotype"] == str(out / "genotypes" / f"{NET}{GOAL}_{best['index']}.csv")
    assert load_genotype(s["genotype"]) == s["best_genotype"]
    # newest genotype file is the best: every file written was a new best at its time
    files = sorted(os.listdir(out / "genotypes"), key=lambda f: int(f.rsplit("_", 1)[1][:-4]))
    assert files[-1] == os.path.basename(s["genotype"])
    # a row's score is the Fisher potential of that candidate rebuilt from (seed, index)
    cfg = config(tiny_imagefolder, out)
    from blockswap.loaders import get_datasets
    train, _, _ = get_datasets("cifar10", tiny_imagefolder)
    train = fisher_rank.training_images(cfg, train, torch.device("cpu"))   # as the search
    (x, y), = search.load_batches(train, cfg, cfg.seed, torch.device("cpu"))
    i = int(best["index"])
    # the key, by hand: rule 2 of store.INIT_RULES at seed 0, replica 0
    net = search.make_candidate(Network("wrn", 10, 1, 10), s["best_genotype"], i + 1,
                                torch.device("cpu"))
    assert float(fisher_scores(net, x, y).sum()) == pytest.approx(best["fisher"], rel=1e-6)


def test_resume_after_kill_loses_nothing(tiny_imagefolder, full, tmp_path):
    _, _, reference = full
    first = run(fisher_rank, *argv(tiny_imagefolder, tmp_path))
    path = first["results"]
    lines = reference.splitlines(keepends=True)
    with open(path, "w") as f:                  # killed while writing candidate 3
        f.write("".join(lines[:4]) + lines[4][:12])
    again = run(fisher_rank, *argv(tiny_imagefolder, tmp_path))
    assert again["n_scored"] == 3
    assert open(path).read() == reference
    assert run(fisher_rank, *argv(tiny_imagefolder, tmp_path))["n_scored"] == 0    # finished: nothing to do


def test_a_search_written_before_the_init_rule_resumes_and_an_unknown_rule_is_refused(
        tiny_imagefolder, full, tmp_path):
    """A settings file without init_rule is a search of rule 2 (the search's rule from its
    first version): it resumes, and the rows it adds are the ones an uninterrupted run writes;
    a rule this version does not know is refused in one line."""
    _, s, reference = full
    settings = json.loads(open(s["results"][:-4] + ".json").read())
    assert settings["init_rule"] == 2
    path = tmp_path / "results" / os.path.basename(s["results"])
    path.parent.mkdir()
    path.with_suffix(".json").write_text(json.dumps(
        {k: v for k, v in settings.items() if k != "init_rule"}))
    path.write_text("".join(reference.splitlines(keepends=True)[:3]))   # 2 rows from before
    assert run(fisher_rank, *argv(tiny_imagefolder, tmp_path))["n_scored"] == 4
    assert path.read_text() == reference
    path.with_suffix(".json").write_text(json.dumps({**settings, "init_rule": 9}))
    with pytest.raises(UserError, match=r"records init_rule 9, which this version does not"):
        run(fisher_rank, *argv(tiny_imagefolder, tmp_path))


def test_a_single_process_search_reads_its_results_once(tiny_imagefolder, tmp_path,
                                                        monkeypatch):
    """The rows scored are kept in memory: the results file is read when the search starts
    (to resume), not again to rank what it has just written."""
    reads, real = [], search.read_rows
    monkeypatch.setattr(search, "read_rows", lambda path, *a: reads.append(path) or real(path, *a))
    summary = run(fisher_rank, *argv(tiny_imagefolder, tmp_path))
    assert reads == [summary["results"]] and summary["n_scored"] == 6
    assert summary["ranking"][0] == summary["best_index"]


def test_resume_with_other_settings_is_refused(tiny_imagefolder, tmp_path):
    run(fisher_rank, *argv(tiny_imagefolder, tmp_path))
    with pytest.raises(UserError, match="seed 0 then, 1 now"):
        run(fisher_rank, *argv(tiny_imagefolder, tmp_path, "--seed", "1"))


def test_generate_random_then_score_the_archs_file(tiny_imagefolder, tmp_path):
    archs_file = ("--save_file", str(tmp_path / "archs.csv"))
    s = run(fisher_rank, *argv(tiny_imagefolder, tmp_path, "--generate_random", "--samples", "9", *archs_file))
    archs = pd.read_csv(s["save_file"])
    assert len(archs) == 9 and {"convs", "params", "macs"} <= set(archs.columns)
    lo, hi = budget_window(GOAL, 0.3)
    assert archs["params"].between(lo, hi).all()
    with pytest.raises(UserError, match="--overwrite"):
        run(fisher_rank, *argv(tiny_imagefolder, tmp_path, "--generate_random", *archs_file))
    scored = pd.read_csv(run(fisher_rank, *argv(tiny_imagefolder, tmp_path, "--samples", "5", *archs_file))["results"])
    assert list(scored["convs"]) == list(archs["convs"][:5])


def test_user_error_is_one_line(tiny_imagefolder, tmp_path, capsys):
    a = argv(tiny_imagefolder, tmp_path)
    a[a.index("--param_goal") + 1] = "10"
    with pytest.raises(SystemExit) as e:
        run_cli(fisher_rank.main, fisher_rank.get_args_parser(), a)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "goal must lie between" in err[0]


def test_user_block_module(tiny_imagefolder, tmp_path):
    from models.blocks import BLOCK_TYPES
    name = "TestFisherUserConv"
    (tmp_path / "blk.py").write_text(
        "import torch.nn as nn\nfrom models.blocks import register_block\n"
        f"register_block('{name}', lambda i, o, s: nn.Conv2d(i, o, 1, s, 0, bias=False))\n")
    try:
        s = run(fisher_rank, *argv(tiny_imagefolder, tmp_path, "--module", str(tmp_path / "blk.py"),
                "--blocks", f"Conv,{name}", "--param_goal", "60000", "--tol", "0.5",
                "--samples", "4"))
    finally:
        BLOCK_TYPES.pop(name, None)
    used = {n for c in pd.read_csv(s["results"])["convs"] for n in eval(c)}
    assert used <= {"Conv", name} and name in used


def test_two_process_shards_equal_one_process(tiny_imagefolder, full, tmp_path):
    _, _, reference = full
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", os.path.join(ROOT, "fisher_rank.py"), *argv(tiny_imagefolder, tmp_path)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    merged = pd.read_csv(tmp_path / "results" / f"{NET}fisher_at_{GOAL}.csv")
    single = pd.read_csv(pd.io.common.StringIO(reference))
    pd.testing.assert_frame_equal(merged.drop(columns="fisher"), single.drop(columns="fisher"))
    assert merged["fisher"].tolist() == pytest.approx(single["fisher"].tolist(), rel=1e-5)
    assert list(merged["fisher"].rank()) == list(single["fisher"].rank())
    assert not [f for f in os.listdir(tmp_path / "results") if ".rank" in f]   # merged away
    assert f"best of 6: #{single['fisher'].idxmax()}" in p.stdout

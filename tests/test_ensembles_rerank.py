"""fisher_rank.py with several proxies in one pass, ensembles, and the trained re-rank, on a
tiny generated image folder with WRN-10-1."""
import os

import pandas as pd
import pytest

from blockswap import engine
import fisher_rank
from conftest import run
from blockswap import search, store
from blockswap.funcs import load_genotype
from blockswap.cli import run_cli
from blockswap.stats import rankdata
from test_fisher_rank_cli import NET, cached_cost_tables  # noqa: F401 (autouse: shared cost tables)

GOAL = 20000


def argv(data, out, *extra):
    return ["cifar10", f"--data_loc={data}", "--wrn_depth", "10", "--wrn_width", "1",
            "--param_goal", str(GOAL), "--tol", "0.3", "--samples", "6", "--batch_size", "8",
            "--results_dir", str(out / "results"), "--genotype_dir", str(out / "genotypes"),
            "--save_file", "none", "--no-plot", *extra]


def config(*a) -> search.SearchConfig:
    return search.SearchConfig.from_args(fisher_rank.get_args_parser().parse_args(argv(*a)))


SPEC = "vote,snip,rank:snip+params"


@pytest.fixture(scope="module")
def multi(tiny_imagefolder, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi")
    return out, run(fisher_rank, *argv(tiny_imagefolder, out, "--proxy", SPEC, "--top_n", "2"))


def test_several_proxies_one_pass_one_column_each(tiny_imagefolder, multi):
    out, s = multi
    assert s["results"] == str(out / "results" / f"{NET}vote_snip_rank-snip+params_at_{GOAL}.csv")
    df = pd.read_csv(s["results"])
    # vote's three proxies, then snip's (already there); params is the params column
    assert list(df.columns) == ["index", "convs", "params", "macs", "synflow", "jacob_cov",
                                "snip"]
    # a column holds that proxy on the candidate rebuilt from (seed, index), as a single run
    cfg = config(tiny_imagefolder, out)
    from blockswap.loaders import get_datasets
    import torch
    from blockswap import proxies
    train, _, _ = get_datasets("cifar10", tiny_imagefolder)
    train = fisher_rank.training_images(cfg, train, torch.device("cpu"))   # as the search
    (x, y), = search.load_batches(train, cfg, cfg.seed, torch.device("cpu"))
    row = df.iloc[3]
    net = search.make_candidate(cfg.network(10), eval(row["convs"]),
                                store.candidate_key(0, 3), torch.device("cpu"))
    for name in ("synflow", "jacob_cov", "snip"):
        assert proxies.get_proxy(name)(net, x, y) == pytest.approx(row[name], rel=1e-6)


def test_vote_ranks_by_pairwise_majority_counted_independently(multi):
    out, s = multi
    df = pd.read_csv(s["results"])
    cols = df[["synflow", "jacob_cov", "snip"]].to_numpy()
    wins = [sum(sum(cols[a] > cols[b]) >= 2 for b in range(len(df)) if b != a)
            for a in range(len(df))]
    order = sorted(range(len(df)), key=lambda a: (-wins[a], a))
    assert s["ranking"] == [int(df["index"][a]) for a in order]       # ranked by the first
    assert s["vote"] == s["score"] == max(wins)
    files = os.listdir(out / "genotypes")                               # --top_n 2
    assert sorted(files) == sorted(f"{NET}vote_snip_rank-snip+params_{GOAL}_{df['index'][a]}.csv"
                                   for a in order[:2])
    # the rank ensemble of the best row: its mean rank of snip and params
    mean = (rankdata(df["snip"]) + rankdata(df["params"])) / 2
    assert s["rank:snip+params"] == mean[order[0]]


def test_multi_proxy_search_resumes_to_the_same_file(tiny_imagefolder, tmp_path, multi):
    out, s = multi
    full = open(s["results"]).read()
    (tmp_path / "results").mkdir()
    name = os.path.basename(s["results"])
    lines = full.splitlines(keepends=True)
    (tmp_path / "results" / name).write_text("".join(lines[:4]) + lines[4][:10])  # torn line
    (tmp_path / "results" / name.replace(".csv", ".json")).write_text(
        open(s["results"][:-4] + ".json").read())
    run(fisher_rank, *argv(tiny_imagefolder, tmp_path, "--proxy", SPEC))
    assert (tmp_path / "results" / name).read_text() == full


def test_bad_proxy_list_is_one_line_and_status_2(tiny_imagefolder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(fisher_rank.main, fisher_rank.get_args_parser(),
                argv(tiny_imagefolder, tmp_path, "--proxy", "fisher,synflw"))
    assert e.value.code == 2
    assert "unknown proxy 'synflw'" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_rerank_trains_the_top_k_writes_csv_and_genotype_and_resumes(
        tiny_imagefolder, tmp_path, monkeypatch):
    extra = ("--proxy", "snip", "--samples", "4", "--rerank", "2", "--rerank_epochs", "1",
             "--rerank_train_subset", "16", "--rerank_val_subset", "10")
    s = run(fisher_rank, *argv(tiny_imagefolder, tmp_path, *extra))
    r = s["rerank"]
    df = pd.read_csv(r["results"])
    assert r["results"] == str(tmp_path / "results" / f"{NET}snip_at_{GOAL}_rerank.csv")
    assert list(df.columns) == ["index", "convs", "params", "macs", "score", "val_error"]
    assert list(df["index"]) == s["ranking"][:2]                        # the proxy's top 2
    scores = pd.read_csv(s["results"]).set_index("index")["snip"]
    assert list(df["score"]) == [scores[i] for i in df["index"]]
    assert (((df["val_error"] / 10).round(6)) % 1 == 0).all()           # 10 validation images
    best = df.sort_values(["val_error", "index"]).iloc[0]
    assert r["best_index"] == best["index"]
    assert r["genotype"] == str(tmp_path / "genotypes" / f"{NET}snip_{GOAL}_rerank_{best['index']}.csv")
    assert load_genotype(r["genotype"]) == eval(best["convs"])
    # resumable: a second run trains nothing, asking for one more trains just that one
    before = open(r["results"]).read()
    trained = []
    monkeypatch.setattr(engine, "train_on", lambda cfg, rt: trained.append(
        cfg.teacher_checkpoint) or engine.TrainResult("x", [{"val_error": 50.0}]))
    run(fisher_rank, *argv(tiny_imagefolder, tmp_path, *extra))
    assert trained == [] and open(r["results"]).read() == before
    run(fisher_rank, *argv(tiny_imagefolder, tmp_path, *extra[:5], "3", *extra[6:]))
    assert trained == [f"candidate_{s['ranking'][2]}"]


def test_rerank_refuses_bad_numbers_and_torchrun(tiny_imagefolder, tmp_path, monkeypatch):
    from models import UserError
    with pytest.raises(SystemExit):   # refused at parse time, before the search
        run(fisher_rank, *argv(tiny_imagefolder, tmp_path, "--rerank", "2", "--rerank_epochs", "0"))
    assert not (tmp_path / "results").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="without torchrun"):
        run(fisher_rank, *argv(tiny_imagefolder, tmp_path, "--rerank", "2"))


def test_rerank_trains_the_searched_network(tmp_path):
    """The re-rank trains what was searched: the training gets --arch (and a WRN's depth and
    width), so a ResNet search is re-ranked as a ResNet, on the search's data path and
    precision."""
    search_cfg = search.SearchConfig.from_args(fisher_rank.get_args_parser().parse_args(
        ["cifar10", "--arch", "resnet18", "--rerank", "1", "--device", "cpu", "--loader", "pil",
         "--cache_dir", str(tmp_path / "c"), "--amp", "off"]))
    row = {"index": 3, "convs": ["Conv"] * 8}
    cfg = fisher_rank.rerank_config(search_cfg, row, str(tmp_path))
    assert (cfg.arch, cfg.wrn_depth, cfg.convs) == ("resnet18", None, ["Conv"] * 8)
    assert (cfg.loader, cfg.cache_dir, cfg.amp) == ("pil", str(tmp_path / "c"), "off")
    assert cfg.teacher_checkpoint == "candidate_3" and cfg.cosine and not cfg.plot
    search_cfg = search.SearchConfig.from_args(fisher_rank.get_args_parser().parse_args(
        ["cifar10", "--wrn_depth", "16", "--rerank", "1", "--device", "cpu"]))
    cfg = fisher_rank.rerank_config(search_cfg, row, str(tmp_path))
    assert (cfg.arch, cfg.wrn_depth, cfg.wrn_width) == ("wrn", 16, 2)

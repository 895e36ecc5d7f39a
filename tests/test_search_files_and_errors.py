"""The search never does something silently wrong: it says where its candidates come from,
never overwrites another search's genotype files, refuses another data set or a second live
run on resume, and ends bad input with one line, exit status 2 and nothing written."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from blockswap import count_ops
import fisher_rank
from conftest import one_error_line, run
from blockswap import funcs
from blockswap import search
from blockswap.funcs import Budget, load_genotype
from blockswap.cli import run_cli
from models import UserError
from test_fisher_rank_cli import GOAL, NET, argv, cached_cost_tables  # noqa: F401 (autouse fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_NET = ["Conv"] * 18                  # a WRN-40-2 genotype: not for WRN-10-1
OUT_OF_BUDGET = ["Conv"] * 3               # WRN-10-1, 77,850 params: outside 20,000 +-30%


def write_archs(path, genotypes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pd.DataFrame({"convs": [repr(g) for g in genotypes]}).to_csv(path)
    return str(path)


@pytest.fixture(scope="module")
def searched(tiny_imagefolder, tmp_path_factory):
    """One finished search of 3 candidates (top 2 kept), copied by the tests that resume it."""
    out = tmp_path_factory.mktemp("searched")
    return out, run(fisher_rank, *argv(tiny_imagefolder, out, "--samples", "3", "--top_n", "2", "--no-plot"))


def copy_of(searched, tmp_path):
    out, summary = searched
    for d in ("results", "genotypes"):
        shutil.copytree(out / d, tmp_path / d)
    return summary


# --- bad input: one line, exit 2, nothing written --------------------------------------------

def _deny_writes_under(monkeypatch, folder):
    real = os.access

    def access(path, mode, *a, **k):
        if mode & os.W_OK and os.path.abspath(path).startswith(str(folder)):
            return False
        return real(path, mode, *a, **k)
    monkeypatch.setattr(os, "access", access)


def _read_only_best_file(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    _deny_writes_under(monkeypatch, tmp_path / "ro")
    return ["--best_file", str(tmp_path / "ro" / "best.csv")]


BAD_SEARCHES = {   # name: (setup(tmp_path, monkeypatch) -> extra argv, text of the error)
    "tol -1": (lambda t, m: ["--tol", "-1"], "must lie strictly between 0 and 1"),
    "tol 5": (lambda t, m: ["--tol", "5"], "must lie strictly between 0 and 1"),
    "tol 0": (lambda t, m: ["--tol", "0"], "must lie strictly between 0 and 1"),
    "blocks comma": (lambda t, m: ["--blocks", ","], "names no block type"),
    "blocks unknown": (lambda t, m: ["--blocks", "Conv,Cnov"],
                       "--blocks: unknown block type 'Cnov'"),
    "param_goal negative": (lambda t, m: ["--param_goal", "-20000"],
                            "argument --param_goal: -20000: must be at least 1"),
    "latency_batch 0": (lambda t, m: ["--latency_goal", "1", "--latency_batch", "0"],
                        "argument --latency_batch: 0: must be at least 1"),
    "wrn_width 0": (lambda t, m: ["--wrn_width", "0"], "argument --wrn_width: 0: must be at"),
    "empty archs": (lambda t, m: ["--save_file", str((t / "a.csv").write_text("") or t / "a.csv")],
                    "is empty"),
    "header-only archs": (lambda t, m: ["--save_file", write_archs(t / "a.csv", [])],
                          "has no rows"),
    "archs is a folder": (lambda t, m: ["--save_file", str(t)], "is a directory"),
    "archs missing": (lambda t, m: ["--save_file", str(t / "nope.csv")], "not found"),
    "archs out of budget": (lambda t, m: ["--save_file", write_archs(
        t / "a.csv", [OUT_OF_BUDGET] * 4)], "0 of its 4 rows meet this budget"),
    "archs of another network": (lambda t, m: ["--save_file", write_archs(
        t / "a.csv", [OTHER_NET])], "does not fit this search"),
    "read-only results": (lambda t, m: _deny_writes_under(m, t / "results"),
                          "--results_dir"),
    "read-only genotypes": (lambda t, m: _deny_writes_under(m, t / "genotypes"),
                            "--genotype_dir"),
    "read-only best_file folder": (lambda t, m: _read_only_best_file(t, m), "--best_file"),
}


@pytest.mark.parametrize("case", sorted(BAD_SEARCHES))
def test_bad_search_input_is_one_line(case, tiny_imagefolder, tmp_path, monkeypatch, capsys):
    setup, match = BAD_SEARCHES[case]
    (tmp_path / "results").mkdir()
    (tmp_path / "genotypes").mkdir()
    extra = setup(tmp_path, monkeypatch) or []
    a = argv(tiny_imagefolder, tmp_path, "--samples", "2", *extra)
    one_error_line(capsys, lambda: run_cli(fisher_rank.main,
                                                  fisher_rank.get_args_parser(), a),
                          tmp_path, match)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_results_folder_by_mode(tiny_imagefolder, tmp_path, capsys):
    (tmp_path / "results").mkdir(mode=0o555)
    a = argv(tiny_imagefolder, tmp_path, "--samples", "2")
    one_error_line(capsys, lambda: run_cli(fisher_rank.main,
                                                  fisher_rank.get_args_parser(), a),
                          tmp_path, "not writable")


@pytest.mark.parametrize("flags,match", [
    (["--num_classes", "0"], "argument --num_classes: 0: must be at least 1"),
    (["--num_classes", "-3"], "argument --num_classes: -3: must be at least 1"),
    (["--wrn_width", "0"], "argument --wrn_width: 0: must be at least 1"),
    (["--latency", "--latency_batch", "0"], "argument --latency_batch: 0: must be at least 1"),
    (["--latency", "--threads", "0"], "argument --threads: 0: must be at least 1"),
])
def test_bad_count_ops_input_is_one_line(flags, match, tmp_path, capsys):
    one_error_line(capsys, lambda: run_cli(count_ops.main, count_ops.get_args_parser(),
                                                  ["--wrn_depth", "10", *flags]),
                          tmp_path, match)


def test_count_ops_accepts_module(tmp_path):
    from models.blocks import BLOCK_TYPES
    name = "TestCountOpsUserConv"
    (tmp_path / "blk.py").write_text(
        "import torch.nn as nn\nfrom models.blocks import register_block\n"
        f"register_block('{name}', lambda i, o, s: nn.Conv2d(i, o, 1, s, 0, bias=False))\n")
    try:
        macs, params = count_ops.main(count_ops.get_args_parser().parse_args(
            ["--module", str(tmp_path / "blk.py"), "--conv", name, "--wrn_depth", "10",
             "--wrn_width", "1"]))
        from blockswap.count_ops import count_params
        from models import WideResNet
        assert params == count_params(WideResNet(10, 1, name))
    finally:
        BLOCK_TYPES.pop(name, None)


def test_genotype_path_that_is_a_folder(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        load_genotype(str(tmp_path))


# --- item 1: the candidate source is said, hashed, and a foreign file is skipped ---------------

def test_candidate_source_is_printed(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    cfg = search.SearchConfig.from_args(fisher_rank.get_args_parser().parse_args(
        argv(tiny_imagefolder, tmp_path, "--samples", "2")))
    table = search.cost_table(cfg, 10)
    assert search.get_candidates(cfg, table).source == "sampled" and \
        "candidates: exact samples (--save_file none)" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)                    # the default archs file, relative to here
    cfg = cfg.replace(save_file=search.DEFAULT_ARCHS)
    search.get_candidates(cfg, table)
    assert "exact samples (archs/master_arch.csv absent)" in capsys.readouterr().out
    write_archs(tmp_path / "archs" / "master_arch.csv", [OTHER_NET])
    assert search.get_candidates(cfg, table).source == "sampled" and \
        "skipped, written for another network" in capsys.readouterr().out
    fits = funcs.sample_genotypes(table, 3, Budget(GOAL, None, 0.3), seed=5)
    write_archs(tmp_path / "archs" / "master_arch.csv", [OUT_OF_BUDGET, *fits])
    cands = search.get_candidates(cfg, table)
    data = (tmp_path / "archs" / "master_arch.csv").read_bytes()
    assert cands.genotypes == fits[:2] and cands.source == \
        "sha256:" + hashlib.sha256(data).hexdigest()
    # the costs carried with them are each genotype's own (one computation, in file order)
    assert [cands.row(i)["params"] for i in range(2)] == [table.cost(g)[0] for g in fits[:2]]
    assert "3 of its 4 rows meet this budget; scoring the first 2" in capsys.readouterr().out
    cfg = cfg.replace(samples=4)                   # more than the file has: said, then sampled
    assert search.get_candidates(cfg, table).source == "sampled" and \
        "fewer than --samples 4" in capsys.readouterr().out


def test_settings_record_the_archs_hash_not_its_path(tiny_imagefolder, tmp_path):
    a = write_archs(tmp_path / "a.csv", funcs.sample_genotypes(
        search.cost_table(search.SearchConfig.from_args(fisher_rank.get_args_parser().parse_args(
            argv(tiny_imagefolder, tmp_path))), 10),
        2, Budget(GOAL, None, 0.3), seed=3))
    s = run(fisher_rank, *argv(tiny_imagefolder, tmp_path, "--samples", "1", "--save_file", a, "--no-plot"))
    text = open(s["results"][:-4] + ".json").read()
    digest = hashlib.sha256(open(a, "rb").read()).hexdigest()
    assert json.loads(text)["candidates"] == f"sha256:{digest}" and str(tmp_path) not in text


def test_sweep_names_its_candidate_source():
    def searches(**env):
        r = subprocess.run(["bash", "bash/blockswap.sh"], cwd=ROOT, capture_output=True,
                           text=True, env={**os.environ, "DRY_RUN": "1", **env}, check=True)
        return [line.split() for line in r.stdout.splitlines() if "fisher_rank.py" in line]
    for quick in ("0", "1"):
        assert all(c[c.index("--save_file") + 1] == "none" for c in searches(QUICK=quick))
    assert all(c[c.index("--save_file") + 1] == "archs/master_arch.csv"
               for c in searches(ARCHS="archs/master_arch.csv"))


# --- item 4: genotype files --------------------------------------------------------------------

def test_top_n_files_carry_their_rank_and_the_best_has_a_fixed_name(searched):
    out, s = searched
    df = pd.read_csv(s["results"]).sort_values("fisher", ascending=False)
    for rank, index in enumerate(df["index"][:2], 1):
        g = pd.read_csv(out / "genotypes" / f"{NET}{GOAL}_{index}.csv")
        assert g["rank"][0] == rank and g["index"][0] == index
    assert s["best_file"] == str(out / "results" / f"{NET}fisher_at_{GOAL}_best.csv")
    assert load_genotype(s["best_file"]) == s["best_genotype"]
    assert s["best_index"] == df["index"].iloc[0]


def test_another_search_never_overwrites_genotype_files(searched, tiny_imagefolder, tmp_path,
                                                        capsys):
    copy_of(searched, tmp_path)
    a = argv(tiny_imagefolder, tmp_path, "--samples", "3", "--seed", "1",
             "--results_dir", str(tmp_path / "other_results"))
    one_error_line(capsys, lambda: run_cli(fisher_rank.main,
                                                  fisher_rank.get_args_parser(), a),
                          tmp_path, "holds another search's genotype")


# --- item 5: the data set is part of the settings ---------------------------------------------

def test_resume_on_other_data_is_refused(searched, tiny_imagefolder, tmp_path):
    copy_of(searched, tmp_path)
    moved = shutil.copytree(tiny_imagefolder, tmp_path / "moved")
    assert run(fisher_rank, *argv(moved, tmp_path, "--samples", "3", "--top_n", "2", "--no-plot"))["n_scored"] == 0
    os.remove(sorted((tmp_path / "moved" / "train" / "cat").iterdir())[0])
    with pytest.raises(UserError, match="data .*'images': 40.* then, .*'images': 39"):
        run(fisher_rank, *argv(moved, tmp_path, "--samples", "3", "--top_n", "2", "--no-plot"))


# --- item 6: one live search per results file ------------------------------------------------

def test_a_live_lock_refuses_a_stale_one_is_taken_over(searched, tiny_imagefolder, tmp_path,
                                                       capsys):
    copy_of(searched, tmp_path)
    lock = tmp_path / "results" / f"{NET}fisher_at_{GOAL}.lock"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(f"{live.pid} {os.uname().nodename}\n")
        a = argv(tiny_imagefolder, tmp_path, "--samples", "3", "--top_n", "2", "--no-plot")
        one_error_line(capsys, lambda: run_cli(fisher_rank.main,
                                                      fisher_rank.get_args_parser(), a),
                              tmp_path, f"another run (process {live.pid}) is writing")
    finally:
        live.kill()
        live.wait()
    s = run(fisher_rank, *argv(tiny_imagefolder, tmp_path, "--samples", "3", "--top_n", "2", "--no-plot"))
    assert f"taking over the stale lock of process {live.pid}" in capsys.readouterr().out
    assert s["n_scored"] == 0 and not lock.exists()


# --- fewer --samples than stored: rank the first n, say so, no false "changed" ----------------

def test_fewer_samples_than_stored_ranks_the_first(searched, tiny_imagefolder, tmp_path, capsys):
    summary = copy_of(searched, tmp_path)
    results = tmp_path / "results" / f"{NET}fisher_at_{GOAL}.csv"
    before = results.read_bytes()
    s = run(fisher_rank, *argv(tiny_imagefolder, tmp_path, "--samples", "2", "--top_n", "2", "--no-plot"))
    assert "holds 3 candidates; ranking the first 2" in capsys.readouterr().out
    assert s["n_scored"] == 0 and sorted(s["ranking"]) == [0, 1]
    assert results.read_bytes() == before
    assert [i for i in summary["ranking"] if i < 2] == s["ranking"]


def test_lock_is_released_and_a_torn_lock_is_stale(tmp_path, capsys):
    from blockswap.files import pid_lock
    lock = tmp_path / "x.lock"
    with pid_lock(str(lock), "x"):
        assert lock.read_text().split()[0] == str(os.getpid())
        with pytest.raises(UserError, match=f"process {os.getpid()}"):
            with pid_lock(str(lock), "x"):
                pass
    assert not lock.exists()
    lock.write_text("")                             # killed between create and write
    with pid_lock(str(lock), "x"):
        assert "taking over the stale lock" in capsys.readouterr().out
    assert not lock.exists()

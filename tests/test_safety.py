"""Safe by default (issue 8, training half): bad input is one line, exit 2 and nothing written;
--resume refuses another run's checkpoint and extends a run by a raised --epochs; a NaN loss
stops the run; study.csv survives a kill; the sweep scripts resume half-trained runs; plots
write the format their suffix names."""
import os
import re
import shutil
import stat
import subprocess
import urllib.error
import urllib.request

import pandas as pd
import pytest
import torch

import fisher_rank
import main as M
import plots as plots_cli  # the script (its CLI)
from blockswap import plots
import study
from conftest import ROOT
from blockswap.files import atomic_write
from blockswap.cli import run_cli


def argv(data, ckdir, *extra):
    return ["cifar10", "teacher", "--wrn_depth", "10", "--wrn_width", "1", "--data_loc", data,
            "--checkpoint_dir", str(ckdir), "--batch_size", "10", "--workers", "0",
            "--epochs", "1", "--no-plot", *extra]


def train(*a):
    return M.main(M.get_args_parser().parse_args(argv(*a)))


def files(folder):
    """{relative path: (bytes, mode)} of everything under a folder."""
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, folder)] = (open(p, "rb").read(), os.stat(p).st_mode)
    return out


def one_line_error(capsys, entry, parser, args, folder):
    """Run a CLI entry point: exit 2, one `error:` line; nothing under `folder` changed."""
    before = files(folder)
    with pytest.raises(SystemExit) as e:
        run_cli(entry, parser, args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert files(folder) == before
    return err


@pytest.fixture(scope="module")
def runs(tiny_imagefolder, tmp_path_factory):
    """A finished 1-epoch teacher `t` (cosine) and a 5-class copy of the data."""
    ckdir = tmp_path_factory.mktemp("runs")
    train(tiny_imagefolder, ckdir, "-t", "t", "--cosine")
    five = tmp_path_factory.mktemp("five")
    for split in ("train", "test"):
        for c in sorted(os.listdir(os.path.join(tiny_imagefolder, split)))[:5]:
            shutil.copytree(os.path.join(tiny_imagefolder, split, c), five / split / c)
    return ckdir, str(five)


# --------------------------------------------------------------------------------------------
# main.py: bad input.
# --------------------------------------------------------------------------------------------

MAIN_BAD = {
    # refused at parse time by argparse (cli.at_least/positive), as run_cli's one error line
    "epochs_0": (["--epochs", "0"], "argument --epochs: 0: must be at least 1"),
    "epochs_neg": (["--epochs", "-1"], "argument --epochs: -1: must be at least 1"),
    "batch_0": (["--batch_size", "0"], "argument --batch_size: 0: must be at least 1"),
    "batch_neg": (["--batch_size", "-5"], "argument --batch_size: -5: must be at least 1"),
    "lr_0": (["--lr", "0"], "argument --lr: 0: must be a positive number"),
    "lr_neg": (["--lr", "-0.1"], "argument --lr: -0.1: must be"),
    "val_subset_neg": (["--val_subset", "-5"], "argument --val_subset: -5: must be at least 1"),
    "train_subset_0": (["--train_subset", "0"], "argument --train_subset: 0: must be at least 1"),
    "cutout_neg": (["--cutout", "-3"], "argument --cutout: -3: must be at least 0"),
    "random_bytes": (["-t", "rnd", "--resume"], "not a checkpoint written by main.py"),
    "text_file": (["-t", "txt", "--resume"], "not a checkpoint written by main.py"),
    "resume_conv_depth": (["-t", "t", "--resume", "--conv", "DConv", "--wrn_depth", "40"],
                          "has convs Conv, this command asks for convs DConv"),
    "resume_depth": (["-t", "t", "--resume", "--wrn_depth", "16"],
                     "has depth 10, this command asks for depth 16"),
    "resume_teacher_as_student": (["student", "-t", "t", "-s", "t2", "--resume"],
                                  "t2.t7 is a teacher checkpoint, this command trains a student"),
    "resume_classes": (["-t", "t", "--resume", "--epochs", "2", "--data_loc", "FIVE"],
                       "t.t7 has 10 classes, cifar10 at"),
    # engine.train_on checks the genotype before any work, for library callers too
    "moonshine_genotype": (["student", "-t", "t", "-s", "m", "--moonshine", "--from_genotype",
                            "genotypes/bs800k.csv", "--wrn_depth", "40"],
                           "--moonshine is a uniform student of --conv blocks"),
    "unknown_conv": (["-t", "u", "--conv", "Nope"], "unknown block type 'Nope'"),
}


@pytest.mark.parametrize("case", sorted(MAIN_BAD))
def test_main_bad_input_is_one_line(case, runs, tiny_imagefolder, tmp_path, capsys):
    ckdir, five = runs
    shutil.copy(ckdir / "t.t7", tmp_path / "t.t7")
    shutil.copy(ckdir / "t.t7", tmp_path / "t2.t7")
    (tmp_path / "rnd.t7").write_bytes(os.urandom(3000))
    (tmp_path / "txt.t7").write_text("this is not a checkpoint\n")
    extra, message = MAIN_BAD[case]
    full = argv(tiny_imagefolder, tmp_path, *[five if a == "FIVE" else a for a in extra])
    if "student" in extra:
        full.remove("teacher")
    err = one_line_error(capsys, M.main, M.get_args_parser(), full, tmp_path)
    assert message in err


def test_read_only_checkpoint_folder_is_named(tiny_imagefolder, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    real = os.access
    # as root the permission bits do not stop a write: simulate what a user sees
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if os.path.abspath(p) ==
                        str(folder) and mode & os.W_OK else real(p, mode, **k))
    err = one_line_error(capsys, M.main, M.get_args_parser(),
                         argv(tiny_imagefolder, folder / "sub", "-t", "x"), tmp_path)
    assert f"--checkpoint_dir {folder / 'sub'}" in err and "not writable" in err


def test_download_without_network_is_one_line(tmp_path, capsys, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data = tmp_path / "data" / "cifar"
    err = one_line_error(capsys, M.main, M.get_args_parser(),
                         argv(str(data), tmp_path / "ck", "-t", "x", "--download"), tmp_path)
    assert "could not download cifar10" in err and "name resolution" in err
    assert not (tmp_path / "data").exists()


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_imagefolder, tmp_path, capsys):
    train(tiny_imagefolder, tmp_path, "-t", "x", "--lr", "1e6")   # epoch 1: huge, finite
    before = files(tmp_path)
    err = one_line_error(capsys, M.main, M.get_args_parser(),
                         argv(tiny_imagefolder, tmp_path, "-t", "x", "--resume", "--epochs", "2"),
                         tmp_path)
    assert re.search(r"NaN or infinite in epoch 2/2, step [1-4] of 4", err), err
    assert files(tmp_path) == before


# --------------------------------------------------------------------------------------------
# main.py: --resume with a raised --epochs, and of a finished run.
# --------------------------------------------------------------------------------------------

def test_raised_epochs_extend_a_run_as_the_longer_run(tiny_imagefolder, runs, tmp_path):
    """A finished 1-epoch cosine run resumed with --epochs 3 equals a 3-epoch run: the first
    epoch's lr is the same in both, and the longer schedule applies from epoch 2 on."""
    ckdir, _ = runs
    shutil.copy(ckdir / "t.t7", tmp_path / "t.t7")
    straight = tmp_path / "straight"
    train(tiny_imagefolder, straight, "-t", "t", "--cosine", "--epochs", "3")
    train(tiny_imagefolder, tmp_path, "-t", "t", "--cosine", "--epochs", "3", "--resume")
    a, b = torch.load(straight / "t.t7", weights_only=True), torch.load(tmp_path / "t.t7",
                                                                        weights_only=True)
    assert b["epoch"] == 3 and b["args"]["epochs"] == 3
    # the closed-form lr of epoch 2 may differ from torch's recursive one in the last bit
    assert all(torch.allclose(a["net"][k].float(), b["net"][k].float(), rtol=1e-4, atol=1e-6)
               for k in a["net"])
    assert [r["lr"] for r in b["log"]] == pytest.approx([r["lr"] for r in a["log"]], rel=1e-12)
    assert [r["lr"] for r in b["log"]] == pytest.approx([0.1, 0.075, 0.025], rel=1e-12)


def test_a_checkpoint_without_a_log_resumes_with_its_lists(tiny_imagefolder, runs, tmp_path):
    """An early checkpoint kept only the per-epoch lists (no `log` rows): it resumes, its rows
    are rebuilt from the lists, and the new epoch is appended after them."""
    ckdir, _ = runs
    old = torch.load(ckdir / "t.t7", weights_only=True)
    del old["log"]
    torch.save(old, tmp_path / "t.t7")
    train(tiny_imagefolder, tmp_path, "-t", "t", "--epochs", "2", "--resume")
    new = torch.load(tmp_path / "t.t7", weights_only=True)
    assert [r["epoch"] for r in new["log"]] == [1, 2]
    assert new["val_errors"][0] == old["val_errors"][0] and len(new["val_errors"]) == 2
    assert [r["val_error"] for r in new["log"]] == new["val_errors"]


def test_resume_of_a_finished_run_says_so(tiny_imagefolder, runs, tmp_path, capsys):
    ckdir, _ = runs
    shutil.copy(ckdir / "t.t7", tmp_path / "t.t7")
    before = files(tmp_path)
    out = train(tiny_imagefolder, tmp_path, "-t", "t", "--cosine", "--resume")
    assert "has finished its 1 epochs: nothing to do" in capsys.readouterr().out
    # nothing trained: the result is the checkpoint's log, without a network
    assert out.model is None and out.teacher is None and out.seconds == 0
    assert out.checkpoint == str(tmp_path / "t.t7")
    assert out.log == torch.load(tmp_path / "t.t7", weights_only=True)["log"]
    assert [r["epoch"] for r in out.log] == [1] and out.val_error == out.log[-1]["val_error"]
    assert files(tmp_path) == before


def help_after(parser, flag: str) -> str:
    """The help text printed beside `flag` (in the options list, not the usage line)."""
    return parser.format_help().split(f"\n  {flag}", 1)[1][:60]


def test_help_shows_every_default():
    for flag, default in (("--lr LR", "0.1"), ("--epochs EPOCHS", "200"),
                          ("--momentum MOMENTUM", "0.9")):
        assert f"default: {default}" in help_after(M.get_args_parser(), flag)
    assert "default: 0.1" in help_after(study.get_args_parser(), "--lr LR")
    search = plots_cli.get_args_parser()._subparsers._group_actions[0].choices["search"]
    assert "default: None" in help_after(search, "--mac_goal MAC_GOAL")


@pytest.mark.parametrize("flag, default", [("device", "auto"), ("workers", 2), ("tol", 0.025),
                                           ("arch", None), ("wrn_depth", None)])
def test_shared_flags_have_one_default_everywhere(flag, default, tiny_imagefolder):
    """The data, network, budget and device flags are declared once (argparse parents): the
    same default in every script that takes them (study.py sets its own smaller network)."""
    from blockswap import count_ops
    parsers = {"main": (M.get_args_parser(), ["cifar10", "teacher"]),
               "fisher_rank": (fisher_rank.get_args_parser(), ["cifar10"]),
               "study": (study.get_args_parser(), ["cifar10"]),
               "count_ops": (count_ops.get_args_parser(), [])}
    seen = {name: getattr(p.parse_args(argv), flag, "absent")
            for name, (p, argv) in parsers.items()}
    if flag == "wrn_depth":
        assert seen.pop("study") == 16
    assert set(seen.values()) - {"absent"} == {default}, seen


# --------------------------------------------------------------------------------------------
# funcs: atomic writes get the usual mode.
# --------------------------------------------------------------------------------------------

def test_atomic_write_respects_umask_and_existing_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a"), lambda f: f.write(b"x"))
        assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o644
        (tmp_path / "b").write_bytes(b"old")
        os.chmod(tmp_path / "b", 0o640)
        atomic_write(str(tmp_path / "b"), lambda f: f.write(b"new"))
        assert stat.S_IMODE(os.stat(tmp_path / "b").st_mode) == 0o640
    finally:
        os.umask(old)


# --------------------------------------------------------------------------------------------
# study.py: validation before settings.json, a kill during candidate 0, --module.
# --------------------------------------------------------------------------------------------

def study_argv(folder, data, *extra):
    return ["cifar10", "--data_loc", data, "--wrn_depth", "10", "--wrn_width", "1",
            "--candidates", "3", "--epochs", "1", "--batch_size", "8", "--train_subset", "16",
            "--val_subset", "10", "--proxies", "params,fisher", "--out", str(folder), *extra]


STUDY_BAD = {
    "infeasible_goal": (["--param_goal", "10"], "no genotype has params within"),
    "no_cuda": (["--device", "cuda"], "--device cuda: no CUDA GPU"),
    "candidates_0": (["--candidates", "0"], "--candidates: 0: must be at least 3"),
    "epochs_0": (["--epochs", "0"], "--epochs: 0: must be at least 1"),
    "no_data": (["--data_loc", "/nonexistent"], "not found at /nonexistent"),
}


@pytest.mark.parametrize("case", sorted(STUDY_BAD))
def test_study_validates_before_writing(case, tiny_imagefolder, tmp_path, capsys):
    if case == "no_cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    extra, message = STUDY_BAD[case]
    err = one_line_error(capsys, study.main, study.get_args_parser(),
                         study_argv(tmp_path / "out", tiny_imagefolder, *extra), tmp_path)
    assert message in err and not (tmp_path / "out").exists()


def test_study_survives_a_kill_in_candidate_0(tiny_imagefolder, tmp_path, monkeypatch):
    block = tmp_path / "myblock_s8.py"
    block.write_text("import torch.nn as nn\nfrom models.blocks import register_block\n"
                     "register_block('MyConvS8', lambda i, o, s: nn.Conv2d(i, o, 3, s, 1))\n")
    args = study.get_args_parser().parse_args(
        study_argv(tmp_path, tiny_imagefolder, "--module", str(block)))
    from blockswap import engine
    real = engine.train_on

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "train_on", killed)
    with pytest.raises(KeyboardInterrupt):
        study.main(args)
    path = tmp_path / "study.csv"
    header = path.read_text()
    assert header.count("\n") == 1 and header.startswith("index,convs,params,macs,fisher,")
    monkeypatch.setattr(engine, "train_on", real)
    for left in ("", header, header + "0,['Conv', 'Co"):   # 0 bytes, header only, a torn row
        path.write_text(left)
        df = study.main(args)
        assert list(df["index"]) == [0, 1, 2]
        text = path.read_text()
        assert text.count("index,") == 1 and text.count("\n") == 4, text
        path.write_text(header)


# --------------------------------------------------------------------------------------------
# plots.py: output format, foreign and unfinished checkpoints, one-epoch curves.
# --------------------------------------------------------------------------------------------

def test_plot_output_format_follows_the_suffix(tmp_path, capsys):
    log = tmp_path / "x.log.csv"
    log.write_text("epoch,lr,train_loss,train_error,val_loss,val_error,seconds\n"
                   "1,0.1,2.0,80,2.1,85,3\n2,0.1,1.5,60,1.7,70,3\n")
    parser = plots_cli.get_args_parser()
    for suffix, magic in (("pdf", b"%PDF"), ("svg", b"<?xml"), ("png", b"\x89PNG")):
        plots_cli.main(parser.parse_args(["training", str(log), "-o", str(tmp_path / f"x.{suffix}")]))
        assert (tmp_path / f"x.{suffix}").read_bytes().startswith(magic)
    one_line_error(capsys, plots_cli.main, parser,
                   ["training", str(log), "-o", str(tmp_path / "x.pdff")], tmp_path)


def test_one_epoch_curves_have_markers(monkeypatch, tmp_path):
    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, out: figs.append(fig) or out)
    log = pd.DataFrame(dict(epoch=[1], lr=[0.1], train_loss=[2.0], train_error=[80.0],
                            val_loss=[2.1], val_error=[85.0], seconds=[3.0]))
    plots.plot_training(log, str(tmp_path / "x.png"))
    ax_err, ax_loss, ax_lr = figs[0].axes
    for ax in (ax_loss, ax_lr):
        assert ax.get_lines() and all(line.get_marker() not in (None, "None", "")
                                      for line in ax.get_lines())


def test_sweep_skips_foreign_and_flags_unfinished(tiny_imagefolder, runs, tmp_path, capsys):
    ckdir, _ = runs
    shutil.copy(ckdir / "t.t7", tmp_path / "t.t7")
    ckpt = torch.load(ckdir / "t.t7", weights_only=True)
    ckpt["args"]["epochs"] = 3    # as a run killed after 1 of 3 epochs
    torch.save(ckpt, tmp_path / "half.t7")
    (tmp_path / "foreign.t7").write_bytes(os.urandom(500))
    plots_cli.main(plots_cli.get_args_parser().parse_args(["sweep", str(tmp_path)]))
    df = pd.read_csv(tmp_path / "sweep.csv").set_index("name")
    assert sorted(df.index) == ["half", "t"]
    assert df["finished"].to_dict() == {"half": False, "t": True}
    err = capsys.readouterr().err
    assert "warning: skipping" in err and "foreign.t7" in err
    assert "unfinished runs" in err and "half" in err


# --------------------------------------------------------------------------------------------
# The sweep scripts resume a checkpoint instead of reusing it (a stand-in `python` records
# the commands).
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script,name", [("bash/blockswap.sh", "wrn_40_2_1"),
                                         ("bash/moonshine.sh", "wrn_40_2_1")])
def test_scripts_resume_existing_checkpoints(script, name, tmp_path):
    bin_dir, ck = tmp_path / "bin", tmp_path / "ck"
    bin_dir.mkdir()
    ck.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    (bin_dir / "python").chmod(0o755)
    (ck / f"{name}.t7").write_bytes(b"half-trained")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "QUICK": "1",
           "QUICK_CHECKPOINTS": str(ck), "QUICK_OUT": str(tmp_path / "out"), "BUDGETS": "162000"}
    subprocess.run(["bash", script], cwd=ROOT, env=env, check=True, capture_output=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    trains = [c.split() for c in calls if c.startswith("main.py")]
    teacher = [c for c in trains if c[2] == "teacher"]
    assert len(teacher) == 1 and "--resume" in teacher[0]
    assert trains[1:] and all("--resume" not in c for c in trains[1:])   # no checkpoint yet
    assert all(str(tmp_path / "out") in c for c in calls if c.startswith("fisher_rank.py"))

"""main.py's runs are safe by default: bad input is one line, exit 2 and nothing written;
--resume refuses another run's checkpoint and extends a run by a raised --epochs; a NaN loss
stops the run; the shared flags have one default; atomic writes keep modes; a sweep of a
checkpoint folder skips foreign files and flags unfinished runs."""
import os
import re
import shutil
import stat
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
from conftest import one_error_line, snapshot
from blockswap.files import atomic_write
from blockswap.cli import run_cli


def argv(data, ckdir, *extra):
    return ["cifar10", "teacher", "--wrn_depth", "10", "--wrn_width", "1", "--data_loc", data,
            "--checkpoint_dir", str(ckdir), "--batch_size", "10", "--workers", "0",
            "--epochs", "1", "--no-plot", *extra]


def train(*a):
    return M.main(M.get_args_parser().parse_args(argv(*a)))


def one_line_error(capsys, entry, parser, args, folder):
    """Run a CLI entry point: exit 2, one `error:` line; nothing under `folder` changed."""
    return one_error_line(capsys, lambda: run_cli(entry, parser, args), folder)


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
    before = snapshot(tmp_path)
    err = one_line_error(capsys, M.main, M.get_args_parser(),
                         argv(tiny_imagefolder, tmp_path, "-t", "x", "--resume", "--epochs", "2"),
                         tmp_path)
    assert re.search(r"NaN or infinite in epoch 2/2, step [1-4] of 4", err), err
    assert snapshot(tmp_path) == before


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
    before = snapshot(tmp_path)
    out = train(tiny_imagefolder, tmp_path, "-t", "t", "--cosine", "--resume")
    assert "has finished its 1 epochs: nothing to do" in capsys.readouterr().out
    # nothing trained: the result is the checkpoint's log, without a network
    assert out.model is None and out.teacher is None and out.seconds == 0
    assert out.checkpoint == str(tmp_path / "t.t7")
    assert out.log == torch.load(tmp_path / "t.t7", weights_only=True)["log"]
    assert [r["epoch"] for r in out.log] == [1] and out.val_error == out.log[-1]["val_error"]
    assert snapshot(tmp_path) == before


def help_after(parser, flag: str) -> str:
    """The help text printed beside `flag` (in the options list, not the usage line)."""
    return parser.format_help().split(f"\n  {flag}", 1)[1][:60]


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


@pytest.mark.parametrize("text", ["[true]", "[-3]", "[1.5]", "60,120", "{}"])
def test_epoch_step_has_one_rule_for_the_flag_and_a_config_built_in_code(text):
    """--epoch_step is refused at parse time, and a TrainConfig built in code (study.py, the
    re-rank) with the same text is refused by the scheduler with the same words."""
    import argparse
    from blockswap.cli import epoch_list
    from blockswap.engine import TrainConfig, make_scheduler
    from models import UserError
    with pytest.raises(argparse.ArgumentTypeError, match="JSON list of epochs"):
        epoch_list(text)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(UserError, match="JSON list of epochs"):
        make_scheduler(opt, TrainConfig(epoch_step=text))
    assert make_scheduler(opt, TrainConfig(epoch_step="[0, 2]")).milestones == {0: 1, 2: 1}

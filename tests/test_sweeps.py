"""The sweep scripts: valid bash, and every command they would run parses with its CLI."""
import os
import shlex
import subprocess

import pytest

import fisher_rank
import main as trainer
import plots as plots_cli  # the script (its CLI)
from blockswap import plots
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["bash/moonshine.sh", "bash/blockswap.sh"]
PARSERS = {"main.py": trainer.get_args_parser, "fisher_rank.py": fisher_rank.get_args_parser,
           "plots.py": plots_cli.get_args_parser}


def dry_run(script, **env):
    r = subprocess.run(["bash", script], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "DRY_RUN": "1", **env})
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)


@pytest.mark.parametrize("quick", ["0", "1"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_command_parses(script, quick):
    commands = dry_run(script, QUICK=quick)
    assert commands
    for argv in commands:
        assert argv[0] == "python" and argv[1] in PARSERS, argv
        args = PARSERS[argv[1]]().parse_args(argv[2:])   # exits (SystemExit) on a bad flag
        if argv[1] == "main.py":
            assert args.epochs == (1 if quick == "1" else 200)
            assert args.train_subset == (256 if quick == "1" else None)


def test_moonshine_runs_the_original_sweep():
    commands = dry_run("bash/moonshine.sh")
    students = [c for c in commands if c[1] == "main.py" and c[3] == "student"]
    names = {c[c.index("-s") + 1] for c in students}
    # 21 uniform cheap-block students and 3 reshaped students for each of 3 teachers
    assert len(students) == 3 * 24 and len(names) == 72
    assert "wrn_40_2_2.DConvA4" in names and "wrn_16_1_3" in names
    shaped = [c for c in students if "--diff_shape" in c]
    assert {(c[c.index("--stu_depth") + 1], c[c.index("--stu_width") + 1]) for c in shaped} \
        == {("16", "2"), ("16", "1"), ("40", "1")}
    assert all(c[-2:] == ["--GPU", "0"] for c in students)   # sequential on one device


def test_blockswap_searches_then_trains_each_budget():
    commands = dry_run("bash/blockswap.sh", BUDGETS="162000 811000")
    searches = [c for c in commands if c[1] == "fisher_rank.py"]
    students = [c for c in commands if c[1] == "main.py" and c[3] == "student"]
    assert [c[c.index("--param_goal") + 1] for c in searches] == ["162000", "811000"]
    for search, student in zip(searches, students):
        assert search[search.index("--best_file") + 1] == \
            student[student.index("--from_genotype") + 1]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "..", "shared", "data",
                                                   "cifar10-jpeg")), reason="no real CIFAR-10")
def test_quick_blockswap_end_to_end(tmp_path):
    """The README's quick pipeline on real CIFAR-10 (a few minutes on a CPU)."""
    env = {**os.environ, "QUICK": "1", "BUDGETS": "162000", "QUICK_CHECKPOINTS": str(tmp_path),
           "QUICK_OUT": str(tmp_path / "results"),   # nothing written into the repository
           "ARCHS": "none"}   # nor read from it (exact samples, the script's default too)
    subprocess.run(["bash", "bash/blockswap.sh"], cwd=ROOT, check=True, env=env)
    assert os.path.getsize(tmp_path / "sweep.png") > 0
    assert os.path.isfile(tmp_path / "wrn_40_2_bs162000.t7")


def test_sweep_table_from_checkpoints(tmp_path, tiny_imagefolder):
    from blockswap.count_ops import count_params
    from models import WideResNet
    common = ["--data_loc", tiny_imagefolder, "--checkpoint_dir", str(tmp_path), "--epochs", "1",
              "--batch_size", "8", "--train_subset", "8", "--val_subset", "10", "--workers", "0",
              "--device", "cpu", "--no-plot", "--wrn_depth", "10", "--wrn_width", "1"]
    trainer.main(trainer.get_args_parser().parse_args(["cifar10", "teacher", "-t", "t", *common]))
    geno = tmp_path / "g.csv"
    geno.write_text(',index,convs,fisher\n0,0,"[\'G2B2\', \'DConv\', \'Conv\']",0.0\n')
    trainer.main(trainer.get_args_parser().parse_args(
        ["cifar10", "student", "-t", "t", "-s", "s", "--from_genotype", str(geno), *common]))
    trainer.main(trainer.get_args_parser().parse_args(
        ["cifar10", "student", "--moonshine", "--conv", "DConvA4", "-t", "t", "-s", "m",
         *common]))
    df = plots.collect_sweep(str(tmp_path)).set_index("name")
    assert df["method"].to_dict() == {"m": "moonshine", "s": "blockswap", "t": "teacher"}
    assert df.loc["s", "params"] == count_params(WideResNet(10, 1, ["G2B2", "DConv", "Conv"]))
    assert df.loc["t", "params"] == count_params(WideResNet(10, 1))
    assert (df["epochs"] == 1).all() and ((df["error"] / 10) % 1 == 0).all()  # 10 val images
    plots_cli.main(plots_cli.get_args_parser().parse_args(["sweep", str(tmp_path)]))
    assert (tmp_path / "sweep.csv").is_file() and (tmp_path / "sweep.png").stat().st_size > 0


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

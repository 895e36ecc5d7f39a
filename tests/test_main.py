"""main.py on CPU with tiny generated images and WRN-10-1: runs, checkpoints, logs, losses,
resume, and the one-line errors of bad input."""
import argparse
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import main as M
from blockswap import loaders as L
from conftest import ROOT, killed_in_epoch
from blockswap.distill import at_loss, distill_loss
from blockswap.cli import run_cli
from blockswap.files import arch_info, model_from_checkpoint
from blockswap.funcs import save_genotype


def base_argv(data, ckdir, *extra):
    """Tiny-run flags, then `extra` (later flags win)."""
    return ["--wrn_depth", "10", "--wrn_width", "1", "--data_loc", data,
            "--checkpoint_dir", str(ckdir), "--batch_size", "10", "--workers", "0",
            "--epochs", "1", *extra]


def run(data, ckdir, *argv):
    return M.main(M.get_args_parser().parse_args(base_argv(data, ckdir, *argv)))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def teacher_dir(tiny_imagefolder, tmp_path_factory):
    """checkpoints/ holding a 2-epoch WRN-10-1 teacher `t`."""
    ckdir = tmp_path_factory.mktemp("checkpoints")
    run(tiny_imagefolder, ckdir, "cifar10", "teacher", "-t", "t", "--epochs", "2")
    return ckdir


def files(folder):
    """{name: bytes} of a folder, to check that nothing was written or replaced."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


# --------------------------------------------------------------------------------------------
# Runs, checkpoints, logs.
# --------------------------------------------------------------------------------------------

def test_teacher_writes_checkpoint_and_log(teacher_dir):
    ckpt = load(teacher_dir / "t.t7")
    assert ckpt["epoch"] == 2
    assert (ckpt["arch"], ckpt["depth"], ckpt["width"], ckpt["num_classes"]) == ("wrn", 10, 1, 10)
    assert ckpt["convs"] == ["Conv"] * 3 and ckpt["conv"] == "Conv"
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["mode"] == "teacher"
    for key in ("train_losses", "train_errors", "val_losses", "val_errors"):
        assert len(ckpt[key]) == 2
    # errors are percentages of 40 train / 20 val images
    assert all(round(e * 40 / 100, 6).is_integer() for e in ckpt["train_errors"])
    assert all(round(e * 20 / 100, 6).is_integer() for e in ckpt["val_errors"])
    model = model_from_checkpoint(ckpt, "t.t7")   # strict load into the recorded architecture
    assert arch_info(model)["convs"] == ckpt["convs"]
    assert set(ckpt["optimizer"]) == {"state", "param_groups"} and "last_epoch" in ckpt["scheduler"]
    rows = read_log(teacher_dir / "t.log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert [float(r["val_error"]) for r in rows] == pytest.approx(ckpt["val_errors"])
    assert [float(r["train_loss"]) for r in rows] == pytest.approx(ckpt["train_losses"])


def test_training_loss_falls(tiny_imagefolder, tmp_path):
    out = run(tiny_imagefolder, tmp_path, "cifar10", "teacher", "-t", "f", "--epochs", "4",
              "--epoch_step", "[]")
    losses = [row["train_loss"] for row in out.log]
    assert len(losses) == 4 and out.model is not None and out.teacher is None
    assert losses[-1] < 0.9 * losses[0], losses


def test_student_trains_and_teacher_is_unchanged(tiny_imagefolder, teacher_dir, tmp_path):
    ckdir = tmp_path
    teacher_bytes = files(teacher_dir)["t.t7"]
    (ckdir / "t.t7").write_bytes(teacher_bytes)
    out = run(tiny_imagefolder, ckdir, "cifar10", "student", "--moonshine", "--conv", "DConvG2",
              "-t", "t", "-s", "t.DConvG2", "--alpha", "0.5")
    teacher_ckpt = load(ckdir / "t.t7")
    # the teacher in memory after training (weights and BN statistics) is the checkpoint's
    after = out.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in teacher_ckpt["net"].items())
    assert not any(p.requires_grad for p in out.teacher.parameters())
    assert (ckdir / "t.t7").read_bytes() == teacher_bytes
    stu = load(ckdir / "t.DConvG2.t7")
    assert stu["convs"] == ["DConvG2"] * 3 and stu["epoch"] == 1
    assert stu["args"]["teacher_checkpoint"] == "t"
    assert len(read_log(ckdir / "t.DConvG2.log.csv")) == 1


def test_student_from_genotype_and_diff_shape(tiny_imagefolder, teacher_dir, tmp_path):
    (tmp_path / "t.t7").write_bytes((teacher_dir / "t.t7").read_bytes())
    geno = ["Conv", "G4B2", "DConvA2"]
    save_genotype(str(tmp_path / "g.csv"), geno)
    run(tiny_imagefolder, tmp_path, "cifar10", "student", "-t", "t", "-s", "g",
        "--from_genotype", str(tmp_path / "g.csv"))
    assert load(tmp_path / "g.t7")["convs"] == geno
    run(tiny_imagefolder, tmp_path, "cifar10", "student", "--moonshine", "-t", "t", "-s", "d",
        "--diff_shape", "--stu_depth", "16", "--stu_width", "1")
    ckpt = load(tmp_path / "d.t7")
    assert (ckpt["depth"], ckpt["width"], len(ckpt["convs"])) == (16, 1, 6)


# --------------------------------------------------------------------------------------------
# Losses against independent numpy computations.
# --------------------------------------------------------------------------------------------

def np_at_loss(s, t):
    def at(x):
        a = (x ** 2).mean(axis=1).reshape(len(x), -1)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    return ((at(s) - at(t)) ** 2).mean()


def np_log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


@pytest.mark.parametrize("pairs,alpha", [(3, 0.0), (4, 0.0), (3, 0.7)])
def test_student_loss_matches_formula(pairs, alpha):
    g = torch.Generator().manual_seed(pairs)
    shapes = [(4, 8, 16, 16), (4, 16, 8, 8), (4, 32, 4, 4), (4, 64, 2, 2)][:pairs]
    acts = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    t_acts = [torch.randn(s[0], s[1] * 2, *s[2:], generator=g, dtype=torch.float64)
              for s in shapes]   # teacher wider than the student: AT maps only need h, w
    logits = torch.randn(4, 10, generator=g, dtype=torch.float64)
    t_logits = torch.randn(4, 10, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 5, 0, 9])
    T, beta = 4.0, 1e3
    hp = argparse.Namespace(alpha=alpha, temperature=T, beta=beta)
    names = ["at", "kd"] if alpha > 0 else ["at"]   # the default --distill for this alpha
    got = distill_loss(names, (logits, acts), (t_logits, t_acts), y, hp).item()

    z, zt, yn = logits.numpy(), t_logits.numpy(), y.numpy()
    ce = -np_log_softmax(z)[np.arange(4), yn].mean()
    p_t = np.exp(np_log_softmax(zt / T))
    kl = (p_t * (np.log(p_t) - np_log_softmax(z / T))).sum() / 4
    at_sum = sum(np_at_loss(s.numpy(), t.numpy()) for s, t in zip(acts, t_acts))
    want = alpha * 2 * T * T * kl + (1 - alpha) * ce + beta * 3 / pairs * at_sum
    assert got == pytest.approx(want, rel=1e-6)
    assert at_loss(acts[0], t_acts[0]).item() == pytest.approx(
        np_at_loss(acts[0].numpy(), t_acts[0].numpy()), rel=1e-9)


# --------------------------------------------------------------------------------------------
# Determinism and resume.
# --------------------------------------------------------------------------------------------

def test_seeded_augment_depends_only_on_seed_epoch_index(tiny_imagefolder):
    from blockswap.loaders import get_datasets
    train, _, _ = get_datasets("cifar10", tiny_imagefolder, cutout=16)
    ds = L.SeededAugment(train, seed=5)
    ds.set_epoch(3)
    a = ds[7][0]
    torch.manual_seed(123)
    _ = ds[2]
    assert torch.equal(ds[7][0], a)                    # not the global RNG, not the order
    ds.set_epoch(4)
    assert not torch.equal(ds[7][0], a)                # a new draw each epoch


@pytest.mark.parametrize("loader", ["tensor", "pil"])
def test_resume_after_kill_equals_uninterrupted(loader, tiny_imagefolder, tmp_path, monkeypatch):
    common = ("cifar10", "teacher", "--epochs", "2", "--epoch_step", "[1]", "--cutout",
              "--seed", "7", "--loader", loader)
    straight = run(tiny_imagefolder, tmp_path / "a", *common, "-t", "x")

    killed_in_epoch(monkeypatch, 2,   # a kill in epoch 2
                    lambda: run(tiny_imagefolder, tmp_path / "b", *common, "-t", "x"))
    assert load(tmp_path / "b" / "x.t7")["epoch"] == 1
    # resumed with data workers: the images do not depend on them
    argv = base_argv(tiny_imagefolder, tmp_path / "b", *common, "-t", "x", "--resume")
    argv[argv.index("--workers") + 1] = "2"
    M.main(M.get_args_parser().parse_args(argv))

    a, b = load(tmp_path / "a" / "x.t7"), load(tmp_path / "b" / "x.t7")
    assert a["net"].keys() == b["net"].keys()
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert all(torch.equal(a["optimizer"]["state"][i]["momentum_buffer"],
                           b["optimizer"]["state"][i]["momentum_buffer"])
               for i in a["optimizer"]["state"])
    assert b["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.2)
    assert a["scheduler"] == b["scheduler"] and b["scheduler"]["last_epoch"] == 2
    for key in ("train_losses", "train_errors", "val_losses", "val_errors"):
        assert a[key] == b[key]
    strip = [{k: v for k, v in r.items() if k != "seconds"}
             for r in read_log(tmp_path / "b" / "x.log.csv")]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"}
                     for r in read_log(tmp_path / "a" / "x.log.csv")]
    assert torch.equal(straight.model.fc.weight, b["net"]["fc.weight"])


def test_overwrite_starts_again(tiny_imagefolder, teacher_dir, tmp_path):
    (tmp_path / "t.t7").write_bytes((teacher_dir / "t.t7").read_bytes())
    run(tiny_imagefolder, tmp_path, "cifar10", "teacher", "-t", "t", "--overwrite")
    assert load(tmp_path / "t.t7")["epoch"] == 1
    assert len(read_log(tmp_path / "t.log.csv")) == 1


# --------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, nothing written.
# --------------------------------------------------------------------------------------------

BAD = {
    "missing_teacher": (["cifar10", "student", "-t", "nobody", "-s", "s"], "nobody.t7 not found"),
    "no_dataset": (["cifar10", "teacher", "-t", "new", "--data_loc", "/nonexistent"],
                   "--download"),
    "genotype_length": (["cifar10", "student", "-t", "t", "-s", "s", "--from_genotype", "G"],
                        "genotype has 4 block types but WRN-10-1 has 3"),
    "unknown_conv": (["cifar10", "teacher", "-t", "new", "--conv", "DConvG3"],
                     "unknown block type 'DConvG3'"),
    "corrupt_teacher": (["cifar10", "student", "-t", "bad", "-s", "s"],
                        "bad.t7 is not a readable checkpoint"),
    "corrupt_resume": (["cifar10", "teacher", "-t", "bad", "--resume"],
                       "bad.t7 is not a readable checkpoint"),
    "exists": (["cifar10", "teacher", "-t", "t"], "t.t7 exists: add --resume"),
    "resume_nothing": (["cifar10", "teacher", "-t", "new", "--resume"], "new.t7 not found"),
    "same_names": (["cifar10", "student", "-t", "t", "-s", "t"], "same checkpoint"),
    "teacher_shape": (["cifar10", "student", "-t", "t", "-s", "s", "--wrn_depth", "16"],
                      "do not match the teacher checkpoint (WRN-10-1)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(case, tiny_imagefolder, teacher_dir, tmp_path, capsys):
    (tmp_path / "t.t7").write_bytes((teacher_dir / "t.t7").read_bytes())
    (tmp_path / "bad.t7").write_bytes((teacher_dir / "t.t7").read_bytes()[:3000])  # truncated
    save_genotype(str(tmp_path / "G.csv"), ["Conv"] * 4)
    before = files(tmp_path)
    argv, message = BAD[case]
    argv = [str(tmp_path / "G.csv") if a == "G" else a for a in argv]
    full = base_argv(tiny_imagefolder, tmp_path, *argv)
    with pytest.raises(SystemExit) as e:
        run_cli(M.main, M.get_args_parser(), full)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert files(tmp_path) == before


def test_cli_subprocess_with_user_block_module(tiny_imagefolder, tmp_path):
    """As a user runs it: a --module block type trains; an unknown --conv is one line, exit 2."""
    (tmp_path / "myblock.py").write_text(
        "import torch.nn as nn\n"
        "from models.blocks import register_block\n"
        "register_block('MyConv', lambda i, o, s: nn.Conv2d(i, o, 3, s, 1, bias=False))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "main.py", *base_argv(tiny_imagefolder, tmp_path, "cifar10",
                                                 "teacher", "-t", "mine")]
    ok = subprocess.run(argv + ["--conv", "MyConv", "--module", str(tmp_path / "myblock.py")],
                        cwd=ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert load(tmp_path / "mine.t7")["convs"] == ["MyConv"] * 3
    bad = subprocess.run(argv + ["--conv", "MyConv", "--overwrite"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    assert "'MyConv'" in bad.stderr


def test_subset_seed_picks_the_same_images_for_every_training_seed(tiny_imagefolder, tmp_path):
    """--subset_seed fixes the --train_subset/--val_subset images whatever --seed is (study.py
    and a re-rank compare runs on the same images); without it the seed picks them."""
    from blockswap.runtime import Runtime

    def images(*flags):
        cfg = M.TrainConfig.from_args(M.get_args_parser().parse_args(base_argv(
            tiny_imagefolder, tmp_path, "cifar10", "teacher", "--train_subset", "8",
            "--val_subset", "6", "--loader", "tensor", *flags)))
        train, val, _ = L.make_loaders(cfg, Runtime(torch.device("cpu")))
        return train.dataset.images, val.dataset.images

    a = images("--seed", "1", "--subset_seed", "7")
    b = images("--seed", "2", "--subset_seed", "7")
    c = images("--seed", "2")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(b, c))

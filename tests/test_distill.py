"""Student distillation terms (funcs.DISTILL_TERMS, main.py --distill): each loss against an
independent numpy computation, sums of terms, and one-epoch student runs that resume exactly."""
import argparse

import numpy as np
import pytest
import torch

import main as M
from blockswap import engine as E
from blockswap.distill import DISTILL_TERMS, dist_loss, distill_loss, dkd_loss, resolve_distill
from blockswap.cli import run_cli
from test_main import load, run, teacher_dir  # noqa: F401 (a fixture)
from conftest import killed_in_epoch


def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_kl(p, q):
    """Mean over rows of KL(p || q)."""
    return (p * (np.log(p) - np.log(q))).sum(1).mean()


def np_dkd(s, t, y, alpha, beta, T):
    """DKD written out per sample, from the paper's definitions."""
    tckd = nckd = 0.0
    for zs, zt, k in zip(s, t, y):
        ps, pt = np_softmax(zs[None] / T)[0], np_softmax(zt[None] / T)[0]
        bs, bt = np.array([ps[k], 1 - ps[k]]), np.array([pt[k], 1 - pt[k]])
        tckd += (bt * np.log(bt / bs)).sum()
        rest = [j for j in range(len(zs)) if j != k]   # p over the other classes, renormalised
        qs, qt = ps[rest] / ps[rest].sum(), pt[rest] / pt[rest].sum()
        nckd += (qt * np.log(qt / qs)).sum()
    return T * T * (alpha * tckd + beta * nckd) / len(s)


def np_dist(s, t, beta, gamma, T):
    ps, pt = np_softmax(s / T), np_softmax(t / T)
    inter = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(ps, pt)])
    intra = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(ps.T, pt.T)])
    return T * T * (beta * inter + gamma * intra)


def logits(seed, n=6, c=10, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, generator=g, dtype=torch.float64) * scale for _ in range(2)]


Y = torch.tensor([0, 3, 9, 3, 5, 1])


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 6.0, 1.0), (2.0, 0.0, 2.0)])
def test_dkd_matches_numpy(alpha, beta, T):
    s, t = logits(int(T))
    got = dkd_loss(s, t, Y, alpha, beta, T).item()
    assert got == pytest.approx(np_dkd(s.numpy(), t.numpy(), Y.numpy(), alpha, beta, T), rel=1e-9)


def test_dkd_target_class():
    s, t = logits(1)
    assert dkd_loss(t.clone(), t, Y).item() == pytest.approx(0, abs=1e-12)   # student = teacher
    # only the target logits differ: the non-target distributions agree, NCKD is zero
    s_target = t.clone()
    s_target[torch.arange(6), Y] += torch.linspace(-2, 2, 6, dtype=torch.float64)
    assert dkd_loss(s_target, t, Y, alpha=0.0).item() == pytest.approx(0, abs=1e-12)
    assert dkd_loss(s_target, t, Y, beta=0.0).item() > 1e-3
    # non-target logits shifted by one constant per sample: same split and same NCKD
    shifted = t + torch.arange(6, dtype=torch.float64)[:, None]
    assert dkd_loss(shifted, t, Y).item() == pytest.approx(0, abs=1e-12)
    # the loss depends on which class is the target
    assert dkd_loss(s, t, Y).item() != pytest.approx(dkd_loss(s, t, (Y + 1) % 10).item())


@pytest.mark.parametrize("beta,gamma,T", [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0), (0.5, 3.0, 2.0)])
def test_dist_matches_numpy(beta, gamma, T):
    s, t = logits(7)
    got = dist_loss(s, t, beta, gamma, T).item()
    assert got == pytest.approx(np_dist(s.numpy(), t.numpy(), beta, gamma, T), rel=1e-6)
    assert dist_loss(t, t, beta, gamma, T).item() == pytest.approx(0, abs=1e-4)   # eps 1e-8


def hp(**kw):
    base = dict(alpha=0.9, temperature=4.0, beta=1e3, dkd_alpha=1.0, dkd_beta=8.0,
                dkd_temperature=4.0, dkd_warmup=20, dist_beta=2.0, dist_gamma=2.0,
                dist_temperature=4.0)
    return argparse.Namespace(**{**base, **kw})


def outputs(seed):
    g = torch.Generator().manual_seed(seed)
    acts = [torch.randn(6, c, h, h, generator=g, dtype=torch.float64)
            for c, h in ((4, 8), (8, 4), (16, 2))]
    return torch.randn(6, 10, generator=g, dtype=torch.float64), acts


def test_terms_sum_and_each_is_its_formula():
    s, t = outputs(0), outputs(1)   # distill_loss works in fp32, as in training
    ce = torch.nn.functional.cross_entropy(s[0], Y).item()
    h = hp(dkd_warmup=4)
    parts = {name: distill_loss([name], s, t, Y, h, epoch=3).item() - ce
             for name in DISTILL_TERMS}
    assert parts["dkd"] == pytest.approx(0.75 * np_dkd(s[0].numpy(), t[0].numpy(), Y.numpy(),
                                                       1.0, 8.0, 4.0), rel=1e-5)
    assert parts["dist"] == pytest.approx(np_dist(s[0].numpy(), t[0].numpy(), 2, 2, 4), rel=1e-5)
    T = 4.0
    kl = np_kl(np_softmax(t[0].numpy() / T), np_softmax(s[0].numpy() / T))
    assert parts["kd"] == pytest.approx(0.9 * (2 * T * T * kl - ce), rel=1e-5)
    both = distill_loss(["at", "dkd"], s, t, Y, h, epoch=3).item()
    assert both == pytest.approx(ce + parts["at"] + parts["dkd"], rel=1e-6)
    every = distill_loss(list(DISTILL_TERMS), s, t, Y, h, epoch=3).item()
    assert every == pytest.approx(ce + sum(parts.values()), rel=1e-6)


def test_dkd_warmup_ramps_with_the_epoch():
    s, t = outputs(2), outputs(3)
    ce = torch.nn.functional.cross_entropy(s[0], Y).item()
    full = dkd_loss(s[0], t[0], Y).item()
    for epoch, share in ((1, 0.05), (10, 0.5), (20, 1.0), (35, 1.0)):
        got = distill_loss(["dkd"], s, t, Y, hp(), epoch=epoch).item()
        assert got - ce == pytest.approx(share * full, rel=1e-5)
    assert distill_loss(["dkd"], s, t, Y, hp(dkd_warmup=0), epoch=1).item() - ce == \
        pytest.approx(full, rel=1e-5)


# --------------------------------------------------------------------------------------------
# Student runs with every --distill choice: one epoch, then an exact resume.
# --------------------------------------------------------------------------------------------

CHOICES = {"at": [], "kd": ["--alpha", "0.9"], "dkd": ["--dkd_warmup", "4"],
           "dist": ["--dist_cifar"], "at+dkd": ["--dkd_warmup", "4"]}


def student(data, ckdir, teacher_dir, name, *extra):
    if not (ckdir / "t.t7").exists():
        ckdir.mkdir(parents=True, exist_ok=True)
        (ckdir / "t.t7").write_bytes((teacher_dir / "t.t7").read_bytes())
    return run(data, ckdir, "cifar10", "student", "--moonshine", "--conv", "DConvG2", "-t", "t",
               "-s", name, "--epoch_step", "[1]", "--no-plot", *extra)


@pytest.mark.parametrize("method", sorted(CHOICES))
def test_student_resumes_exactly(method, tiny_imagefolder, teacher_dir, tmp_path, monkeypatch):
    """Two epochs straight, against a run killed in epoch 2 and resumed by a command that names
    no method or hyper-parameter: the checkpoint's are used, and the DKD warm-up (4 epochs here)
    sees epoch 2 after the resume, not epoch 1 again."""
    flags = ["--distill", method, *CHOICES[method], "--epochs", "2"]
    straight = student(tiny_imagefolder, tmp_path / "a", teacher_dir, "s", *flags)

    killed_in_epoch(monkeypatch, 2,   # a kill in epoch 2
                    lambda: student(tiny_imagefolder, tmp_path / "b", teacher_dir, "s", *flags))
    assert load(tmp_path / "b" / "s.t7")["epoch"] == 1
    student(tiny_imagefolder, tmp_path / "b", teacher_dir, "s", "--resume")

    a, b = load(tmp_path / "a" / "s.t7"), load(tmp_path / "b" / "s.t7")
    assert a["args"]["distill"] == b["args"]["distill"] == method and b["epoch"] == 2
    assert all(torch.equal(v, b["net"][k]) for k, v in a["net"].items())
    assert a["train_losses"] == b["train_losses"] and a["val_errors"] == b["val_errors"]
    assert torch.equal(straight.model.fc.weight, b["net"]["fc.weight"])


def test_checkpoint_from_before_distill_resumes_as_at_kd(tiny_imagefolder, teacher_dir, tmp_path,
                                                          monkeypatch):
    """A checkpoint whose args have no `distill` (written before the flag) resumes with the loss
    it was trained with, at+kd here (alpha 0.5), whatever --distill the resuming command says."""
    flags = ["--alpha", "0.5", "--epochs", "2"]
    straight = student(tiny_imagefolder, tmp_path / "a", teacher_dir, "s", *flags)
    assert load(tmp_path / "a" / "s.t7")["args"]["distill"] == "at+kd"   # the default with alpha

    student(tiny_imagefolder, tmp_path / "b", teacher_dir, "s", *flags[:2], "--epochs", "1")
    path = tmp_path / "b" / "s.t7"
    old = load(path)
    added = {"distill", "dist_cifar", *(f for term in DISTILL_TERMS.values() for f in term.flags)}
    old["args"] = {k: v for k, v in old["args"].items() if k not in added}
    assert "distill" not in old["args"] and "dkd_beta" not in old["args"]
    old["args"]["epochs"] = 2
    torch.save(old, path)
    student(tiny_imagefolder, tmp_path / "b", teacher_dir, "s", "--resume", "--distill", "dkd")
    b = load(path)
    assert b["args"]["distill"] == "at+kd" and b["args"]["alpha"] == 0.5 and b["epoch"] == 2
    assert torch.equal(straight.model.fc.weight, b["net"]["fc.weight"])


def test_kd_alone_takes_alpha_0_9(tiny_imagefolder, teacher_dir, tmp_path, capsys):
    """--distill kd without --alpha trains with Hinton's usual weight 0.9 and says so (issue 21
    item 5); the checkpoint records it, so a resume repeats it; a given --alpha is kept."""
    cfg = E.TrainConfig(mode="student", distill="kd")
    resolved = resolve_distill(cfg, None)
    assert (resolved.distill, resolved.alpha, cfg.alpha) == ("kd", 0.9, 0.0)   # a new record
    assert "--alpha 0.9" in capsys.readouterr().out
    assert resolve_distill(cfg.replace(alpha=0.3), None).alpha == 0.3
    assert capsys.readouterr().out == ""
    student(tiny_imagefolder, tmp_path, teacher_dir, "s", "--distill", "kd")
    assert "--alpha 0.9" in capsys.readouterr().out
    saved = load(tmp_path / "s.t7")["args"]
    assert (saved["distill"], saved["alpha"]) == ("kd", 0.9)


BAD = {
    "unknown": (["--distill", "at+crd"], "unknown method 'crd'"),
    "twice": (["--distill", "dkd+dkd"], "names a method twice"),
    "alpha_without_kd": (["--distill", "dkd", "--alpha", "0.9"], "--distill dkd+kd"),
    "dist_cifar_and_flag": (["--distill", "dist", "--dist_cifar", "--dist_gamma", "3"],
                            "--dist_cifar sets --dist_gamma 2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_distill_is_one_line(case, tiny_imagefolder, teacher_dir, tmp_path, capsys):
    (tmp_path / "t.t7").write_bytes((teacher_dir / "t.t7").read_bytes())
    argv, message = BAD[case]
    full = ["cifar10", "student", "-t", "t", "-s", "s", "--data_loc", tiny_imagefolder,
            "--checkpoint_dir", str(tmp_path), "--workers", "0", *argv]
    with pytest.raises(SystemExit) as e:
        run_cli(M.main, M.get_args_parser(), full)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.t7"]


def test_sweeps_pass_the_method_to_students_only():
    from test_sweeps import dry_run
    for script in ("bash/blockswap.sh", "bash/moonshine.sh"):
        commands = [c for c in dry_run(script, DISTILL="at+dkd", BUDGETS="162000")
                    if c[1] == "main.py"]
        for argv in commands:
            args = M.get_args_parser().parse_args(argv[2:])
            student_run = args.mode == "student"
            assert args.distill == ("at+dkd" if student_run else None), argv
            assert args.student_checkpoint.endswith(".at+dkd") or not student_run
        assert any(c[3] == "student" for c in commands)


def test_student_loss_fn_passes_the_epoch_to_the_warmup():
    """fit's epoch index e (from 0) reaches DKD as e + 1: the warm-up is 1/W in the first epoch."""
    from models import WideResNet
    torch.manual_seed(0)
    teacher, model = WideResNet(10, 1).eval(), WideResNet(10, 1, convs="DConvG2").eval()
    x, y = torch.randn(6, 3, 32, 32), Y
    args = M.get_args_parser().parse_args(["cifar10", "student", "--distill", "dkd",
                                           "--dkd_warmup", "4"])
    loss_fn = E.make_student_loss_fn(teacher, args)
    with torch.no_grad():
        s, t = model(x)[0], teacher(x)[0]
        ce, full = torch.nn.functional.cross_entropy(s, y).item(), dkd_loss(s, t, y, 1, 6, 4).item()
        for epoch in range(6):
            got = loss_fn(model, x, y, epoch=epoch)[0].item()
            assert got == pytest.approx(ce + min((epoch + 1) / 4, 1) * full, rel=1e-5)

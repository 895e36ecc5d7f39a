"""The CUDA path: autocast with channels_last, checkpoints across devices, Fisher potential on
CPU and CUDA, torch.compile, 2-process nccl. Collected always, skipped without CUDA; run them on a
GPU machine with `python -m pytest -m gpu` (bench/device_check.sh does)."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

import main as M
from blockswap import engine as E
from conftest import ROOT, killed_in_epoch
from blockswap.files import load_checkpoint, model_from_checkpoint
from blockswap.funcs import fisher_scores
from models import Network, WideResNet
from blockswap.runtime import Runtime
from test_main import base_argv, load

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@contextlib.contextmanager
def strict_fp32():
    """fp32 proper on CUDA: cuDNN and cuBLAS may use TF32 for fp32 work unless told not to."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(10, (n,), generator=g)


def first_step(rt, compile=False):
    """(loss of the first SGD step, the network after it) of a seeded WRN-10-1 on a fixed batch."""
    torch.manual_seed(0)
    model = rt.place(Network("wrn", 10, 1, 10).build(), compile=compile)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss, _ = E.train_one_epoch(model, [batch()], opt, rt.grad_scaler(), rt, E.teacher_loss_fn)
    return loss, model


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_step_with_channels_last_matches_fp32_cpu(amp):
    if amp == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    reference, _ = first_step(Runtime(CPU))
    loss, model = first_step(Runtime(CUDA, amp_dtype=amp, channels_last=True))
    # the loss is taken before the update: only the precision differs from the CPU fp32 one
    assert loss == pytest.approx(reference, rel=2e-2)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.conv1.weight.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_compiled_step_matches_eager_on_cuda():
    eager, _ = first_step(Runtime(CUDA, amp_dtype=torch.bfloat16, channels_last=True))
    compiled, _ = first_step(Runtime(CUDA, amp_dtype=torch.bfloat16, channels_last=True,
                                       compile=True), compile=True)
    assert compiled == pytest.approx(eager, rel=1e-2)


def run_main(data, ckdir, *argv):
    return M.main(M.get_args_parser().parse_args(base_argv(data, ckdir, "--no-plot", *argv)))


def test_checkpoint_written_on_cuda_loads_on_cpu(tiny_imagefolder, tmp_path):
    out = run_main(tiny_imagefolder, tmp_path, "cifar10", "teacher", "-t", "g", "--device", "cuda")
    ckpt = load(tmp_path / "g.t7")
    assert all(v.device == CPU for v in ckpt["net"].values())
    assert ckpt["args"]["amp"] in ("bf16", "fp16") and ckpt["args"]["channels_last"] is True
    on_cpu = model_from_checkpoint(load_checkpoint(str(tmp_path / "g.t7")), "g").eval()
    x, _ = batch(8)
    with torch.no_grad(), strict_fp32():
        a = on_cpu(x)[0]
        b = out.model.eval()(x.to(CUDA))[0].float().cpu()   # fp32: no autocast here
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_checkpoint_written_on_cpu_resumes_on_cuda(tiny_imagefolder, tmp_path, monkeypatch):
    common = ("cifar10", "teacher", "-t", "c", "--epochs", "2")
    killed_in_epoch(monkeypatch, 2,   # a kill in epoch 2
                    lambda: run_main(tiny_imagefolder, tmp_path, *common, "--device", "cpu"))
    before = load(tmp_path / "c.t7")
    assert before["epoch"] == 1
    out = run_main(tiny_imagefolder, tmp_path, *common, "--device", "cuda", "--resume")
    after = load(tmp_path / "c.t7")
    assert after["epoch"] == 2 and next(out.model.parameters()).device.type == "cuda"
    assert not torch.equal(before["net"]["fc.weight"], after["net"]["fc.weight"])
    assert all(torch.isfinite(v).all() for v in after["net"].values() if v.is_floating_point())


def test_fisher_potential_cpu_equals_cuda():
    torch.manual_seed(0)
    net = WideResNet(16, 2, convs=["Conv", "DConvA2", "G4B2", "ConvB2", "DConvG4", "A4B2"],
                     num_classes=10)
    x, y = batch(32)
    on_cpu = fisher_scores(net, x, y)
    with strict_fp32():
        on_cuda = fisher_scores(net.to(CUDA), x.to(CUDA), y.to(CUDA)).cpu()
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-3, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_two_nccl_processes(tiny_imagefolder, tmp_path):
    flags = base_argv(tiny_imagefolder, tmp_path, "cifar10", "teacher", "-t", "ddp",
                      "--batch_size", "16", "--train_subset", "32", "--device", "cuda",
                      "--no-plot")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "main.py", *flags], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x2" in proc.stdout
    ckpt = load(tmp_path / "ddp.t7")
    assert ckpt["epoch"] == 1 and ckpt["args"]["batch_size"] == 16

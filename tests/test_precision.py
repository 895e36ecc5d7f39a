"""--amp, channels_last and --compile on CPU: the selection logic (capability check mocked, so
both branches run on any machine), bf16 and fp16 (GradScaler) training steps, exact resume
under bf16, and a compiled step against the eager one."""

import pytest
import torch

import main as M
from blockswap import engine as E
from blockswap import runtime
from models import Network
from test_main import load, run

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
from conftest import killed_in_epoch


@pytest.mark.parametrize("native, expected", [(True, (torch.bfloat16, True)),
                                              (False, (None, False))])
def test_cpu_auto_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert runtime.resolve_precision(CPU, "auto") == expected
    assert runtime.resolve_precision(CPU, "auto", no_channels_last=True) == (expected[0], False)
    # an explicit choice does not depend on the processor
    assert runtime.resolve_precision(CPU, "bf16") == (torch.bfloat16, True)
    assert runtime.resolve_precision(CPU, "fp16") == (torch.float16, False)
    assert runtime.resolve_precision(CPU, "off") == (None, False)


@pytest.mark.parametrize("bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_auto_bf16_else_fp16(monkeypatch, bf16, dtype):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert runtime.resolve_precision(CUDA, "auto") == (dtype, True)
    assert runtime.resolve_precision(CUDA, "off") == (None, True)
    assert runtime.resolve_precision(CUDA, "auto", no_channels_last=True) == (dtype, False)
    assert runtime.resolve_precision(torch.device("mps"), "auto") == (None, False)


def test_no_amp_means_amp_off(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    parse = M.get_args_parser().parse_args
    rt = E.setup_runtime(E.TrainConfig.from_args(
        parse(["cifar10", "teacher", "--device", "cpu", "--no_amp"])))
    assert (rt.amp_dtype, rt.channels_last) == (None, False)
    rt = E.setup_runtime(E.TrainConfig.from_args(parse(
        ["cifar10", "teacher", "--device", "cpu", "--amp", "bf16", "--no_channels_last"])))
    assert (rt.amp_dtype, rt.channels_last) == (torch.bfloat16, False)
    assert runtime.Runtime(CPU, amp_dtype=torch.float16).precision() == \
        "fp16 autocast + GradScaler, NCHW"


def test_bf16_autocast_runs_convolutions_in_bf16():
    rt = runtime.Runtime(CPU, amp_dtype=torch.bfloat16, channels_last=True)
    torch.manual_seed(0)
    model = rt.place(Network("wrn", 10, 1, 10).build())
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with rt.autocast():
        logits, acts = model(rt.images(torch.randn(4, 3, 32, 32)))
    assert logits.dtype == torch.bfloat16 and acts[0].dtype == torch.bfloat16
    assert model.conv1.weight.dtype == torch.float32          # master weights stay fp32


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_run_records_precision_and_scaler(amp, tiny_imagefolder, tmp_path, capsys):
    run(tiny_imagefolder, tmp_path, "cifar10", "teacher", "-t", "x", "--amp", amp, "--no-plot",
        "--train_subset", "10", "--val_subset", "10")   # fp16 convolutions are slow on CPU
    ckpt = load(tmp_path / "x.t7")
    layout = "channels_last" if amp == "bf16" else "NCHW"
    out = capsys.readouterr().out
    assert f"on cpu x1, {amp} autocast" in out and f", {layout}" in out
    assert ckpt["args"]["amp"] == amp
    assert ckpt["args"]["channels_last"] == (amp == "bf16")
    # the GradScaler is on for fp16 only: its state holds a scale then
    assert ("scale" in ckpt["scaler"]) == (amp == "fp16")
    assert all(torch.isfinite(v).all() for v in ckpt["net"].values() if v.is_floating_point())
    assert ckpt["net"]["fc.weight"].dtype == torch.float32


def test_auto_is_saved_as_what_it_chose(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    run(tiny_imagefolder, tmp_path, "cifar10", "teacher", "-t", "x", "--device", "cpu", "--no-plot")
    assert "fp32, NCHW" in capsys.readouterr().out
    args = load(tmp_path / "x.t7")["args"]
    assert (args["amp"], args["channels_last"]) == ("off", False)


def test_resume_under_bf16_equals_uninterrupted(tiny_imagefolder, tmp_path, monkeypatch):
    common = ("cifar10", "teacher", "--epochs", "2", "--seed", "3", "--amp", "bf16", "-t", "x",
              "--no-plot", "--train_subset", "20", "--val_subset", "10")
    run(tiny_imagefolder, tmp_path / "a", *common)
    killed_in_epoch(monkeypatch, 2,   # a kill in epoch 2
                    lambda: run(tiny_imagefolder, tmp_path / "b", *common))
    b = load(tmp_path / "b" / "x.t7")
    assert b["epoch"] == 1 and b["args"]["amp"] == "bf16"
    run(tiny_imagefolder, tmp_path / "b", *common, "--resume")
    a, b = load(tmp_path / "a" / "x.t7"), load(tmp_path / "b" / "x.t7")
    assert b["epoch"] == 2
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert a["val_losses"] == b["val_losses"] and a["train_losses"] == b["train_losses"]
    # and bf16 really changed the numbers: an fp32 run of the same seed differs
    run(tiny_imagefolder, tmp_path / "c", *common, "--amp", "off")
    c = load(tmp_path / "c" / "x.t7")
    assert not torch.equal(a["net"]["fc.weight"], c["net"]["fc.weight"])


def one_step_loss(rt, seed=0):
    """Loss and updated fc weight after one SGD step of a WRN-10-1 on a fixed batch."""
    torch.manual_seed(seed)
    model = rt.place(Network("wrn", 10, 1, 10).build(), compile=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    batch = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(10, (8,), generator=g))]
    loss, _ = E.train_one_epoch(model, batch, opt, rt.grad_scaler(), rt, E.teacher_loss_fn)
    return loss, model.fc.weight.detach().clone(), model.state_dict().keys()


@pytest.mark.slow
def test_compiled_step_gives_eager_loss():
    eager = one_step_loss(runtime.Runtime(CPU))
    compiled = one_step_loss(runtime.Runtime(CPU, compile=True))
    assert compiled[0] == pytest.approx(eager[0], rel=1e-4)
    assert torch.allclose(compiled[1], eager[1], rtol=1e-4, atol=1e-5)
    assert compiled[2] == eager[2]        # compiled in place: checkpoints keep their names

"""ONNX export (onnx_export.py, export.py, bench/bench_export.py) on tiny networks and the tiny
image folder (conftest). Exports take about a second each, so networks are few and small."""
import json
import math
import os
import re
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import export as X
from blockswap import onnx_export as E
from blockswap.files import arch_info, load_checkpoint, save_checkpoint
from blockswap.cli import run_cli
from models import Network
from models.blocks import BLOCK_TYPES, SepConv3D, residual_blocks
from models.wide_resnet import WideResNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--repeats", "2", "--batch", "2", "--threads", "1", "--parity", "8"]


def settled(model, size=32, seed=0):
    """BN running statistics from a few random batches, as training leaves them (the default
    mean 0, variance 1 lets activations grow with depth, unlike a trained network's)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None     # a plain average over the batches
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size))
    return model.eval()


def bn_after_sums(model) -> int:
    """BatchNorms no exporter can fold, from the module structure: every residual block's
    pre-activation bn1 (it reads a residual sum, or the ResNet stem's max pool), WRN's final
    bn1, and a DConv3D block's bn2 (it reads the mean over the Conv3d's depth) or an MB
    block's bn2 when the inverted residual keeps its own shortcut (a sum); less WRN's
    first bn1 when a 1x1 shortcut means it alone reads the stem convolution."""
    blocks = residual_blocks(model)
    n = len(blocks) + sum(isinstance(b.conv1, SepConv3D) or getattr(b.conv1, "use_res_connect",
                                                                     False)
                          for b in blocks if hasattr(b, "bn2"))
    if isinstance(model, WideResNet):
        n += 1 - (blocks[0].convShortcut is not None)
    return n


def all_types_network():
    """A WRN holding every registered block type (WRN-(6n+4)-2 with 3n >= the types)."""
    names = list(BLOCK_TYPES)
    n = math.ceil(len(names) / 3)
    return Network("wrn", 6 * n + 4, 2).build((names * 2)[:3 * n])


def test_every_block_type_exports_and_matches():
    model = settled(all_types_network())
    x = torch.randn(3, 3, 32, 32)
    proto = E.export_onnx(model, x)
    session = E.make_session(proto, threads=1)
    check = E.parity(model, session, [x, x[:1]])      # the batch dimension is dynamic
    assert check.images == 4 and check.top1_agreement == 1.0
    assert check.max_abs_diff <= E.PARITY_TOL, check
    assert E.batchnorm_nodes(proto) == bn_after_sums(model) == E.expected_batchnorms(model, x)
    assert set(model.genotype) == set(BLOCK_TYPES)


@pytest.mark.parametrize("net, genotype, size, left", [
    (Network("wrn", 10, 1), "Conv", 32, 4),          # identity shortcut reads the stem: kept
    (Network("wrn", 10, 2), ["DConv3D", "Conv", "ConvB2"], 32, 4),
    (Network("resnet18", None, None, 10), "DConvB4", 64, 8),
])
def test_batchnorms_that_follow_a_convolution_are_folded(net, genotype, size, left):
    model = settled(net.build(genotype), size)
    x = torch.randn(2, 3, size, size)
    proto = E.export_onnx(model, x)
    total = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert E.batchnorm_nodes(proto) == bn_after_sums(model) == left < total
    assert E.expected_batchnorms(model, x) == left
    assert E.parity(model, E.make_session(proto, 1), [x]).passes()


# --------------------------------------------------------------------------------------------
# export.py
# --------------------------------------------------------------------------------------------

def write_checkpoint(path, net, genotype, dataset="cifar10", data_loc=None, **extra):
    model = settled(net.build(genotype), net.image_size if net.arch == "wrn" else 64)
    save_checkpoint(str(path), {"net": model.state_dict(), "epoch": 1, **arch_info(model),
                                "args": {"dataset": dataset, "data_loc": data_loc}, **extra})
    return model


def run(argv):
    return run_cli(X.main, X.get_args_parser(), [str(a) for a in argv])


def feed_like_a_deployment(meta, image_path):
    """An image file as the JSON says to feed it (numpy only: RGB in [0, 1], then
    (x - mean) / std, NCHW): the steps are ToTensor and Normalize for CIFAR."""
    pre = meta["input"]["preprocessing"]
    assert [s.split("(")[0] for s in pre["steps"]] == ["ToTensor", "Normalize"]
    rgb = np.asarray(Image.open(image_path).convert("RGB"), np.float32) / 255
    x = (rgb - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    return x.transpose(2, 0, 1)[None]


def test_export_writes_onnx_and_json_a_deployment_can_use(tiny_imagefolder, tmp_path):
    model = write_checkpoint(tmp_path / "w.t7", Network("wrn", 10, 2),
                             ["DConvA4", "G8B2", "Conv"], data_loc=tiny_imagefolder)
    run([tmp_path / "w.t7", *FAST])
    meta = json.loads((tmp_path / "w.json").read_text())
    assert meta["genotype"] == ["DConvA4", "G8B2", "Conv"] and meta["onnx"] == "w.onnx"
    assert meta["family"] == {"arch": "wrn", "depth": 10, "width": 2}
    assert meta["num_classes"] == 10 and meta["classes"][0] == "airplane"
    assert meta["input"]["shape"] == ["batch", 3, 32, 32]
    assert meta["parity"]["images"] == 8 and meta["parity"]["max_abs_diff"] <= 1e-4
    assert set(meta["latency_ms"]) == {"1", "2"}
    assert all(v > 0 for ms in meta["latency_ms"].values() for v in ms.values())
    assert meta["versions"]["onnxruntime"] == ort.__version__ and meta["int8"] is None
    assert meta["size_bytes"] == os.path.getsize(tmp_path / "w.onnx")
    # The JSON alone rebuilds the network; fed as it says, the file gives its logits.
    net = Network(meta["family"]["arch"], meta["family"]["depth"], meta["family"]["width"],
                  meta["num_classes"]).build(meta["genotype"])
    net.load_state_dict(load_checkpoint(str(tmp_path / "w.t7"))["net"])
    image = next(os.scandir(os.path.join(tiny_imagefolder, "test", "cat"))).path
    x = feed_like_a_deployment(meta, image)
    session = ort.InferenceSession(str(tmp_path / "w.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(["logits"], {"input": np.concatenate([x, x])})[0]
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(x))[0].numpy()
        assert np.abs(model(torch.from_numpy(x))[0].numpy() - ref).max() == 0
    assert out.shape == (2, 10) and np.abs(out - ref).max() <= 1e-4


def test_a_resnet_exports(tiny_imagefolder, tmp_path, capsys):
    write_checkpoint(tmp_path / "r.t7", Network("resnet18", None, None, 10), "DConvB4",
                     dataset="imagenet", data_loc=tiny_imagefolder)
    run([tmp_path / "r.t7", "-o", tmp_path / "out" / "r.onnx", *FAST, "--parity", "2"])
    meta = json.loads((tmp_path / "out" / "r.json").read_text())
    assert meta["family"]["arch"] == "resnet18" and meta["input"]["shape"][2:] == [224, 224]
    assert meta["batchnorms"] == {"left": 8, "expected": 8}
    assert "CenterCrop" in " ".join(meta["input"]["preprocessing"]["steps"])
    out = capsys.readouterr().out
    assert "parity on 2 validation images" in out and "onnxruntime" in out


def test_int8_is_written_and_compared(tiny_imagefolder, tmp_path, capsys):
    write_checkpoint(tmp_path / "w.t7", Network("wrn", 10, 1), "DConv",
                     data_loc=tiny_imagefolder)
    run([tmp_path / "w.t7", *FAST, "--int8", "--calib", "8", "--val", "20"])
    q = json.loads((tmp_path / "w.json").read_text())["int8"]
    assert q["calibration_images"] == 8 and q["images"] == 20
    assert all(0 <= a <= 1 for a in q["accuracy"].values())
    assert q["size_bytes"]["int8"] == os.path.getsize(tmp_path / "w.int8.onnx")
    assert q["size_bytes"]["int8"] < q["size_bytes"]["fp32"]
    session = ort.InferenceSession(str(tmp_path / "w.int8.onnx"),
                                   providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "w.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    out = session.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})[0]
    assert out.shape == (1, 10) and np.isfinite(out).all()
    assert "int8 (calibrated on 8 training images)" in capsys.readouterr().out


def _deny_writes_under(monkeypatch, folder):
    real = os.access    # as root the permission bits stop nothing: simulate a read-only folder
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if mode & os.W_OK and
                        os.path.abspath(p).startswith(str(folder)) else real(p, mode, *a, **k))


BAD = {   # name: (argv after the checkpoint, setup(tmp_path, monkeypatch), text of the error)
    "not a checkpoint": (["--checkpoint_is", "txt"], None, "is not a readable checkpoint"),
    "unwritable output": (["-o", "ro/w.onnx"], lambda t, m: _deny_writes_under(m, t / "ro"),
                          "not writable"),
    "unknown family": (["--checkpoint_is", "vgg"], None, "unknown architecture 'vgg16'"),
    "calib 0": (["--int8", "--calib", "0"], None, "argument --calib: 0: must be at least 1"),
    "not .onnx": (["-o", "w.t7"], None, "must be a .onnx file"),
    "no data": (["--data_loc", "nowhere"], None, "pass --data_loc"),
    "parity fails": (["--tol", "1e-12"], None, "does not match PyTorch"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_imagefolder, tmp_path, capsys,
                                                  monkeypatch):
    extra, setup, message = BAD[case]
    write_checkpoint(tmp_path / "w.t7", Network("wrn", 10, 1), "Conv", data_loc=tiny_imagefolder)
    (tmp_path / "txt.t7").write_text("not a checkpoint\n")
    ckpt = load_checkpoint(str(tmp_path / "w.t7"))
    save_checkpoint(str(tmp_path / "vgg.t7"), {**ckpt, "arch": "vgg16"})
    (tmp_path / "ro").mkdir()
    if setup:
        setup(tmp_path, monkeypatch)
    source = tmp_path / "w.t7"
    if extra[0] == "--checkpoint_is":
        source, extra = tmp_path / f"{extra[1]}.t7", []
    extra = [str(tmp_path / a) if a.startswith(("ro/", "w.", "nowhere")) else a for a in extra]
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run([source, *FAST, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert message in err[0]
    assert sorted(os.listdir(tmp_path)) == before and not os.listdir(tmp_path / "ro")


def test_bench_export_quick(capsys):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_export as B
    B.main(B.get_args_parser().parse_args(
        ["--quick", "--genotype", os.path.join(ROOT, "genotypes", "bs800k.csv")]))
    lines = capsys.readouterr().out.strip().splitlines()
    number = r"\d+\.\d+"
    assert re.fullmatch(f"int8: onnxruntime fp32 {number} ms, int8 {number} ms, ratio "
                        f"{number}x", lines[-2]), lines[-2]
    assert re.fullmatch(f"export: torch eager {number} ms, onnxruntime {number} ms, ratio "
                        f"{number}x", lines[-1]), lines[-1]
    assert "WRN-10-1" in lines[0] and "top-1 agreement 100%" in lines[0]

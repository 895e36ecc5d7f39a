"""main.py under torchrun with 2 CPU (gloo) processes against a single-process computation of
the same global batches.

Plain DDP normalises BatchNorm per process (SyncBatchNorm needs a GPU), so 2 processes with 8
images each are not one process with 16 images in one BN batch. The reference here is one
process doing exactly what data-parallel SGD defines: for each global batch (the same images,
shuffled and augmented by the same seeds), each half goes through the network on its own, the
gradient is the mean of the two halves', and BN running statistics are rank 0's (DDP broadcasts
rank 0's buffers before every forward).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import main as M
from blockswap import loaders as L
from blockswap import engine as E
from blockswap.build import new_model
from conftest import ROOT
from blockswap.runtime import Runtime


@pytest.mark.parametrize("loader", ["tensor", "pil"])
def test_ddp_two_gloo_processes_match_single_process(loader, tiny_imagefolder, tmp_path):
    flags = ["cifar10", "teacher", "-t", "ddp", "--wrn_depth", "10", "--wrn_width", "1",
             "--data_loc", tiny_imagefolder, "--checkpoint_dir", str(tmp_path),
             "--epochs", "2", "--batch_size", "16", "--train_subset", "32", "--workers", "0",
             "--seed", "3", "--device", "cpu", "--cutout", "--loader", loader,
             "--amp", "off"]   # the reference below is fp32
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "main.py", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp.t7", map_location="cpu", weights_only=True)
    assert ckpt["args"]["batch_size"] == 16 and ckpt["epoch"] == 2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as each torchrun process: the same summation order in the kernels
    try:
        model, losses, val_error = reference_run(flags)
    finally:
        torch.set_num_threads(threads)
    for epoch in range(2):
        assert ckpt["train_losses"][epoch] == pytest.approx(losses[epoch], rel=1e-6)
    # small BN batches amplify rounding; with one thread on both sides the runs agree to ~1e-7
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ckpt["net"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert ckpt["val_errors"][-1] == pytest.approx(val_error)


def reference_run(flags):
    """Two epochs of 2-rank data-parallel SGD, emulated in this process."""
    args = E.TrainConfig.from_args(M.get_args_parser().parse_args(flags))   # as main.main
    ranks = [Runtime(torch.device("cpu"), rank=r, world=2) for r in range(2)]
    loaders = [L.make_loaders(args, rt)[0] for rt in ranks]
    _, val_loader, _ = L.make_loaders(args, Runtime(torch.device("cpu")))
    torch.manual_seed(args.seed)
    model = new_model(args, 10, None)
    optimizer = E.make_optimizer(model, args)
    buffers = [b for b in model.buffers()]
    losses = []
    for epoch in range(2):
        model.train()
        loss_sum = 0.0
        for loader in loaders:
            L.set_epoch(loader, epoch)
        for (x0, y0), (x1, y1) in zip(*loaders):
            assert len(y0) == len(y1) == 8
            optimizer.zero_grad()
            kept = [b.clone() for b in buffers]
            loss1 = F.cross_entropy(model(x1)[0], y1)
            (loss1 / 2).backward()
            for b, k in zip(buffers, kept):   # rank 1's BN statistics are not kept
                b.copy_(k)
            loss0 = F.cross_entropy(model(x0)[0], y0)
            (loss0 / 2).backward()
            optimizer.step()
            loss_sum += (loss0.item() + loss1.item()) * 8
        losses.append(loss_sum / 32)
    return model, losses, E.validate(model, val_loader, Runtime(torch.device("cpu")))[1]

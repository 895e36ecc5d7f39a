"""Hardware: which device, the torchrun process group, mixed precision and memory format.

main.py (training) and fisher_rank.py (search) start the same way: start_runtime picks the
device and joins the process group when launched by torchrun; training then adds its
precision (with_precision). Everything a run does on the hardware goes through its Runtime.
"""
import argparse
import contextlib
import dataclasses
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from models.blocks import UserError


DEVICE = "auto"   # --device: cuda, else mps, else cpu (pick_device)
AMP = "auto"      # --amp: bf16 on CUDA where supported, else fp16; CPU bf16 where native


def device_args() -> argparse.ArgumentParser:
    """--device as every script takes it (an argparse parent)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument_group("hardware").add_argument(
        "--device", default=DEVICE,
        help="cpu, cuda, cuda:1 or mps (auto: cuda, else mps, else cpu)")
    return p


@contextlib.contextmanager
def distributed_teardown():
    """Leave a torchrun process group cleanly when the body finishes. On success: free DDP's
    reducer (gc), wait for every rank, then destroy the group; torch 2.14's gloo aborts at exit
    now and then ('terminate called without an active exception') when a process leaves with
    those still alive, or while another rank is still working. On an error: destroy only
    (another rank may never reach a barrier)."""
    try:
        yield
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def pick_device(name: Optional[str] = None, local_rank: int = 0) -> torch.device:
    """The device to run on: `name` (cuda, cuda:N, mps or cpu), or with None or "auto" CUDA,
    else MPS, else CPU. A plain "cuda" means this process's GPU (torchrun's LOCAL_RANK)."""
    if name is None or name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible (check --GPU / "
                            "CUDA_VISIBLE_DEVICES)")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available on this machine")
    if name not in ("mps", "cpu"):
        raise UserError(f"--device {name}: expected cuda, cuda:N, mps or cpu")
    return torch.device(name)



def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls/convolutions run natively (oneDNN), about 2x fp32.
    (torch.ops.mkldnn._is_mkldnn_bf16_supported() is also true for plain AVX512, where bf16
    is emulated and no faster.)"""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cuda_auto_amp(device: torch.device) -> Optional[torch.dtype]:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_auto_amp(device: torch.device) -> Optional[torch.dtype]:
    return torch.bfloat16 if cpu_has_native_bf16() else None


# --amp auto per device type: what is fast and safe there (others, e.g. MPS: fp32).
AUTO_AMP = {"cuda": cuda_auto_amp, "cpu": cpu_auto_amp}
AMP_CHOICES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}   # --amp values


def resolve_precision(device: torch.device, amp: str, no_channels_last: bool = False):
    """(autocast dtype or None, channels_last) for a run on `device` with --amp `amp`.
    channels_last goes with autocast where it pays: always on CUDA, with bf16 on CPU."""
    if amp == "auto":
        auto = AUTO_AMP.get(device.type)
        dtype = auto(device) if auto else None
    else:
        dtype = AMP_CHOICES[amp]
    fast_layout = device.type == "cuda" or (device.type == "cpu" and dtype == torch.bfloat16)
    return dtype, fast_layout and not no_channels_last


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    amp_dtype: Optional[torch.dtype] = None   # None: fp32
    channels_last: bool = False
    compile: bool = False                     # torch.compile the trained network

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.preserve_format

    def precision(self) -> str:
        """For the start-up line, e.g. 'bf16 autocast, channels_last'."""
        amp = f"{AMP_NAMES[self.amp_dtype]} autocast" if self.amp_dtype else "fp32"
        return (f"{amp}{' + GradScaler' if self.amp_dtype == torch.float16 else ''}, "
                f"{'channels_last' if self.channels_last else 'NCHW'}"
                f"{', compiled' if self.compile else ''}")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 only (its small range underflows gradients); a no-op else."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def place(self, model: nn.Module, compile: bool = False) -> nn.Module:
        """Move to the device in the run's memory format; compile in place (its state_dict
        keeps its names) when asked."""
        model.to(self.device, memory_format=self.memory_format)
        if compile and self.compile:
            model.compile()
        return model

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def print(self, *a):
        if self.main:
            print(*a, flush=True)


def start_runtime(device: Optional[str], timeout_hours: float = 12) -> Runtime:
    """This process's device, and the process group when launched by torchrun (RANK and
    WORLD_SIZE set; gloo on CPU, nccl on GPU), in fp32. The long timeout lets ranks wait at a
    barrier while another one finishes its share."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=timeout_hours))
    if world > 1:
        rank = dist.get_rank()
    return Runtime(device, rank, world)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def with_precision(rt: Runtime, amp: str, no_channels_last: bool = False,
                   compile: bool = False) -> Runtime:
    """`rt` with the precision and layout of --amp/--no_channels_last (see resolve_precision)."""
    amp_dtype, channels_last = resolve_precision(rt.device, amp, no_channels_last)
    return dataclasses.replace(rt, amp_dtype=amp_dtype, channels_last=channels_last,
                               compile=compile)


def all_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world > 1:
        dist.all_reduce(t)
    return t


def sync_buffers(model: nn.Module, rt: Runtime) -> None:
    """DDP keeps rank 0's BatchNorm statistics (broadcast before each forward); give them to
    every process before an evaluation that runs outside DDP."""
    if rt.world > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)

"""Train a teacher network, or a student that learns from a frozen teacher (BlockSwap).

    python main.py cifar10 teacher --conv Conv -t wrn_40_2 --wrn_depth 40 --wrn_width 2 --cifar_loc=<path>
    python main.py cifar10 student -t wrn_40_2 -s wrn_40_2_bs800k --from_genotype genotypes/bs800k.csv --cifar_loc=<path>
    python main.py cifar10 student --moonshine --conv DConvG2 -t wrn_40_2 -s wrn_40_2.DConvG2 --cifar_loc=<path>
    torchrun --nproc_per_node 4 main.py cifar10 teacher ...    (DistributedDataParallel)

A teacher is trained with cross-entropy. A student is trained with cross-entropy plus the --distill
terms (funcs.DISTILL_TERMS: at, kd, dkd, dist or sums such as at+dkd); the default is the original
recipe: cross-entropy (or Hinton KD with --alpha > 0) plus attention transfer between its group
outputs and the frozen teacher's.

Files (rank 0 writes them, after every epoch):
  checkpoints/<name>.t7        weights, optimizer/scheduler/scaler state, architecture, genotype,
                               arguments and metric history; written atomically.
  checkpoints/<name>.log.csv   one row per epoch: epoch, lr, train/val loss and error (%), seconds.
A fresh run refuses to replace an existing checkpoint: pass --resume to continue it (with the
schedule saved in it) or --overwrite to start again. --resume refuses a checkpoint of another
network, class count or mode; a raised --epochs extends the run (the longer run's schedule from
the current epoch on); a finished run is left as it is.

Reproducibility: with a fixed --seed, the shuffling and the augmentation of every image are drawn
from (seed, epoch, image index), so a resumed run repeats the uninterrupted one and the images do
not depend on --workers or on the number of processes. --batch_size is the global batch: under
torchrun each of the N processes takes batch_size / N. BatchNorm statistics are per process (plain
DDP), so N processes are equivalent to one process that normalises each 1/N of the batch apart.
"""
import argparse
import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from funcs import (DIST_CIFAR, DISTILL_TERMS, HelpFormatter, arch_info, atomic_write,
                   check_writable, distill_loss, get_datasets,
                   get_no_params, load_checkpoint, load_genotype, model_from_checkpoint,
                   parse_distill, run_cli, save_checkpoint, save_genotype, subset, subset_indices)
from loaders import Augment, TensorLoader, choose_loader, data_args, tensor_images
from models import Network, UserError, get_block_type, load_block_module, network_args
from runtime import (AMP_CHOICES, AMP_NAMES, Runtime, device_args, distributed_teardown,
                     start_runtime, unwrap, with_precision)

# Arguments that define the training run: on --resume the checkpoint's values are used, so the
# continued run follows the schedule it started with.
RUN_KEYS = ("dataset", "mode", "lr", "momentum", "weight_decay", "epoch_step", "lr_decay_ratio",
            "cosine", "epochs", "batch_size", "seed", "subset_seed", "cutout", "train_subset",
            "val_subset",
            "alpha", "temperature", "beta", "teacher_checkpoint", "loader")
# ... and the student's distillation method with every term's hyper-parameters.
RUN_KEYS += ("distill", "dist_cifar",
             *(flag for term in DISTILL_TERMS.values() for flag in term.flags))
LOG_FIELDS = ("epoch", "lr", "train_loss", "train_error", "val_loss", "val_error", "seconds")


def get_args_parser():
    p = argparse.ArgumentParser(description="BlockSwap teacher/student training",
                                formatter_class=HelpFormatter,
                                parents=[data_args(), network_args(), device_args()])
    p.add_argument("mode", choices=["teacher", "student"], help="train a teacher or a student")
    # data (the seed's folder flags; --data_loc overrides them)
    p.add_argument("--cifar_loc", default="data/cifar", help="CIFAR folder (or ImageFolder root)")
    p.add_argument("--imagenet_loc", default="data/imagenet", help="folder with train/ and val/")
    p.add_argument("--train_subset", default=None, type=int, help="train on N fixed random images")
    p.add_argument("--val_subset", default=None, type=int, help="validate on N fixed random images")
    p.add_argument("--cutout", default=0, type=int, nargs="?", const=16,
                   help="Cutout square side in pixels (--cutout alone: 16, the paper's)")
    # checkpoints
    p.add_argument("--teacher_checkpoint", "-t", default="wrn_40_2_T",
                   help="teacher name: checkpoints/<name>.t7 is written (teacher) or read (student)")
    p.add_argument("--student_checkpoint", "-s", default="wrn_40_2_student_KT",
                   help="student name: checkpoints/<name>.t7 is written")
    p.add_argument("--checkpoint_dir", default="checkpoints")
    p.add_argument("--resume", "-r", action="store_true", help="continue from the checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again over an existing checkpoint")
    # network (also --arch, --wrn_depth, --wrn_width, --module)
    p.add_argument("--conv", default="Conv", help="block type of a uniform network (see models/blocks.py)")
    p.add_argument("--from_genotype", default="", help="genotype CSV: one block type per block")
    p.add_argument("--moonshine", action="store_true", help="uniform student of --conv blocks")
    p.add_argument("--diff_shape", action="store_true", help="student shape from --stu_depth/width")
    p.add_argument("--stu_depth", default=40, type=int)
    p.add_argument("--stu_width", default=2, type=int)
    # optimisation (the seed's recipe; --cosine --cutout give the ICLR paper's)
    p.add_argument("--lr", default=0.1, type=float)
    p.add_argument("--momentum", default=0.9, type=float)
    p.add_argument("--weight_decay", "--weightDecay", default=5e-4, type=float)
    p.add_argument("--epochs", default=200, type=int)
    p.add_argument("--batch_size", default=128, type=int, help="global batch (all processes)")
    p.add_argument("--epoch_step", default="[60,120,160]", help="JSON list: epochs to decay lr at")
    p.add_argument("--lr_decay_ratio", default=0.2, type=float)
    p.add_argument("--cosine", action="store_true", help="cosine annealing to 0 instead of steps")
    p.add_argument("--alpha", default=0.0, type=float, help="KD weight (0: cross-entropy only)")
    p.add_argument("--temperature", default=4.0, type=float, help="KD temperature")
    p.add_argument("--beta", default=1e3, type=float, help="attention transfer weight")
    add_distill_args(p)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--subset_seed", default=None, type=int,
                   help="seed that picks --train_subset/--val_subset images (default: --seed); "
                        "runs compared with each other should share it")
    # hardware (also --device)
    p.add_argument("--GPU", default=None, help="sets CUDA_VISIBLE_DEVICES, e.g. '0,1'")
    p.add_argument("--amp", default="auto", choices=sorted(AMP_CHOICES),
                   help="autocast precision; auto: bf16 on CUDA where supported, else fp16 with "
                        "a GradScaler; bf16 on a CPU with native bf16 (AVX512-BF16 or AMX), "
                        "else off")
    p.add_argument("--no_amp", action="store_true", help="same as --amp off")
    p.add_argument("--no_channels_last", action="store_true",
                   help="NCHW memory format (channels_last is the default on CUDA and with "
                        "CPU bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained network")
    p.add_argument("--print_freq", default=10, type=int, help="progress bar refresh, in steps")
    p.add_argument("--plot", default=True, action=argparse.BooleanOptionalAction,
                   help="draw <name>.png (error, loss, lr curves) beside the log every epoch")
    return p


def add_distill_args(p):
    """--distill and the hyper-parameters of every term in funcs.DISTILL_TERMS."""
    methods = "; ".join(f"{k}: {v.about}" for k, v in DISTILL_TERMS.items())
    p.add_argument("--distill", default=None,
                   help=f"student loss: cross-entropy + these terms, joined by '+' ({methods}); "
                        "default at, or at+kd when --alpha > 0")
    for term in DISTILL_TERMS.values():
        for flag, (kind, default, about) in term.flags.items():
            p.add_argument(f"--{flag}", default=default, type=kind, help=about)
    p.add_argument("--dist_cifar", action="store_true",
                   help="DIST's CIFAR setting: " + " ".join(
                       f"--{k} {v:g}" for k, v in DIST_CIFAR.items()))


# The smallest value each numeric flag accepts (a flag left at None is not checked); --lr and
# --temperature must be positive.
ARG_MINIMA = {"epochs": 1, "batch_size": 1, "train_subset": 1, "val_subset": 1, "cutout": 0,
              "workers": 0, "print_freq": 1, "momentum": 0, "weight_decay": 0,
              "lr_decay_ratio": 0, "alpha": 0, "beta": 0}


def validate_args(args) -> None:
    """One-line errors for numeric flags out of range, before anything is read or written."""
    for key, low in ARG_MINIMA.items():
        value = getattr(args, key)
        if value is not None and not value >= low:   # `not >=`: NaN is refused too
            raise UserError(f"--{key} {value}: must be at least {low}")
    for key in ("lr", "temperature"):
        value = getattr(args, key)
        if not (value > 0 and math.isfinite(value)):
            raise UserError(f"--{key} {value}: must be a positive number")


# --------------------------------------------------------------------------------------------
# Models and checkpoints.
# --------------------------------------------------------------------------------------------

def describe(model: nn.Module) -> str:
    convs = model.genotype
    kinds = convs[0] if len(set(convs)) == 1 else ",".join(convs)
    return f"{Network.of(model).name} [{kinds}], {get_no_params(model):,} params"


# The per-epoch lists a checkpoint also carries (older readers, plots.py), from the log rows.
HISTORY = {"train_losses": "train_loss", "train_errors": "train_error",
           "val_losses": "val_loss", "val_errors": "val_error"}


@dataclass
class Run:
    """A training run in progress: what fit() steps through, epoch by epoch. `log` is the one
    per-epoch record (rows of LOG_FIELDS); `epoch` counts the epochs finished."""
    model: nn.Module
    train_loader: object
    val_loader: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    loss_fn: Callable
    log: List[dict] = field(default_factory=list)
    epoch: int = 0

    def history(self) -> Dict[str, list]:
        return {key: [row[col] for row in self.log] for key, col in HISTORY.items()}

    def resume(self, ckpt: dict, args) -> None:
        """Continue from a checkpoint: optimiser, schedule (extended by a raised --epochs),
        loss scaling, the log and the epoch count."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        extend_schedule(self.scheduler, self.optimizer, args)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.log, self.epoch = log_of(ckpt), ckpt["epoch"]

    def state(self, args) -> dict:
        """The checkpoint of the run as it stands."""
        net = unwrap(self.model)
        # .contiguous(): channels_last weights are saved in the standard layout.
        weights = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
        uniform = len(set(net.genotype)) == 1
        return {"net": weights, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, **arch_info(net),
                "conv": net.genotype[0] if uniform else None, "module": args.module,
                "args": dict(vars(args)), **self.history(), "log": list(self.log)}


def log_of(ckpt: dict) -> List[dict]:
    """A checkpoint's log rows; a checkpoint without them (an early version) gets rows rebuilt
    from its per-epoch lists, lr and seconds unknown."""
    if ckpt.get("log"):
        return list(ckpt["log"])
    lists = [ckpt.get(key, []) for key in HISTORY]
    return [dict(zip(LOG_FIELDS, (e + 1, "", *values, ""))) for e, values in
            enumerate(zip(*lists))]


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes: <folder>/<name>.t7 (checkpoint), .log.csv and .png (curves)."""
    checkpoint: str
    log: str
    plot: str

    @classmethod
    def of(cls, folder: str, name: str) -> "RunPaths":
        return cls(*(os.path.join(folder, name + ext) for ext in (".t7", ".log.csv", ".png")))


# --------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------

def item_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2 ** 63


class SeededAugment(Dataset):
    """The random augmentation of image i in epoch e is drawn from item_seed(seed, e, i): the
    same whatever the worker, the process or the point a run was resumed from."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch   # workers are started per epoch and take a copy with this value

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):   # leave the caller's CPU RNG as it was
            torch.default_generator.manual_seed(item_seed(self.seed, self.epoch, i))
            return self.dataset[i]


def data_location(args) -> str:
    if args.data_loc:
        return args.data_loc
    return args.imagenet_loc if args.dataset == "imagenet" else args.cifar_loc


def make_loaders(args, rt: Runtime, check_classes=None):
    """(train_loader, val_loader, num_classes). Each process gets its share of every global
    batch (DistributedSampler, also with one process, so the order never depends on it) and a
    strided share of the validation set. `check_classes(num_classes)`, if given, runs once the
    data set is read, before any image is decoded."""
    if args.batch_size % rt.world:
        raise UserError(f"--batch_size {args.batch_size} is not divisible by the "
                        f"{rt.world} processes")
    if args.download and rt.world > 1 and not rt.main:
        dist.barrier()   # let rank 0 download first
    train_set, val_set, num_classes = get_datasets(args.dataset, data_location(args),
                                                   args.download, args.cutout)
    if args.download and rt.world > 1 and rt.main:
        dist.barrier()
    if check_classes:
        check_classes(num_classes)
    if choose_loader(args.loader, args.dataset, (train_set, val_set)) == "tensor":
        return make_tensor_loaders(args, rt, train_set, val_set) + (num_classes,)
    train_set = SeededAugment(subset(train_set, args.train_subset, subset_seed(args)), args.seed)
    val_set = subset(val_set, args.val_subset, subset_seed(args))
    val_part = Subset(val_set, range(rt.rank, len(val_set), rt.world))
    sampler = DistributedSampler(train_set, num_replicas=rt.world, rank=rt.rank, shuffle=True,
                                 seed=args.seed)
    per_rank = args.batch_size // rt.world
    pin = rt.device.type == "cuda"
    train = DataLoader(train_set, per_rank, sampler=sampler, num_workers=args.workers,
                       pin_memory=pin)
    val = DataLoader(val_part, per_rank, shuffle=False, num_workers=args.workers, pin_memory=pin)
    return train, val, num_classes


def subset_seed(args) -> int:
    """The seed that picks the image subsets: --subset_seed, else --seed (the seed's behaviour)."""
    return args.seed if getattr(args, "subset_seed", None) is None else args.subset_seed


def make_tensor_loaders(args, rt: Runtime, train_set, val_set):
    """make_loaders' (train, val) on the tensor path: the splits decoded once (rank 0 first, the
    others then read its cache), on the device; the same subsets, order and shares."""
    first = rt.world > 1 and dist.is_initialized()
    if first and not rt.main:
        dist.barrier()
    train_data, val_data = (tensor_images(s, args.workers, args.cache_dir)
                            for s in (train_set, val_set))
    if first and rt.main:
        dist.barrier()
    train_data = train_data.subset(subset_indices(len(train_data), args.train_subset, subset_seed(args)))
    val_data = val_data.subset(subset_indices(len(val_data), args.val_subset, subset_seed(args)))
    sampler = DistributedSampler(range(len(train_data)), num_replicas=rt.world, rank=rt.rank,
                                 shuffle=True, seed=args.seed)
    per_rank = args.batch_size // rt.world
    train = TensorLoader(train_data.to(rt.device), per_rank, sampler,
                         Augment.for_dataset(args.dataset, args.cutout), args.seed)
    val = TensorLoader(val_data.to(rt.device), per_rank, range(rt.rank, len(val_data), rt.world),
                       Augment.for_dataset(args.dataset, train=False))
    return train, val


def set_epoch(loader, epoch: int) -> None:
    """Reseed the shuffle and the augmentation of a train loader (DataLoader or TensorLoader)."""
    if isinstance(loader, TensorLoader):
        loader.set_epoch(epoch)
        return
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)


# --------------------------------------------------------------------------------------------
# Losses, training and validation.
# --------------------------------------------------------------------------------------------

def student_loss(out, t_out, targets, alpha, temperature, beta):
    """The original loss, KD (cross-entropy when alpha=0) + beta' * sum of at_loss over group
    pairs (beta' = beta * 3 / pairs): funcs.distill_loss with at, +kd when alpha > 0.
    out, t_out: (logits, group outputs) of the student and the teacher."""
    hp = argparse.Namespace(alpha=alpha, temperature=temperature, beta=beta)
    return distill_loss(["at", "kd"] if alpha > 0 else ["at"], out, t_out, targets, hp)


def teacher_loss_fn(model, inputs, targets, epoch=0):
    logits, _ = model(inputs)
    return F.cross_entropy(logits.float(), targets), logits


def make_student_loss_fn(teacher, args):
    """Cross-entropy + the --distill terms; `epoch` counts from 0 (fit's loop index)."""
    names = parse_distill(args.distill)

    def loss_fn(model, inputs, targets, epoch=0):
        with torch.no_grad():
            t_out = teacher(inputs)
        out = model(inputs)
        return distill_loss(names, out, t_out, targets, args, epoch + 1), out[0]
    return loss_fn


def resolve_distill(args, saved: Optional[dict]) -> None:
    """Settle --distill before anything is written. A checkpoint from before --distill resumes
    with the loss it was trained with: at, +kd when its alpha > 0."""
    if saved is not None and "distill" not in saved:
        args.distill = None
    if args.distill is None:
        args.distill = "at+kd" if args.alpha > 0 else "at"
    names = parse_distill(args.distill)
    if ("kd" in names) != (args.alpha > 0):
        raise UserError(f"--alpha is the weight of kd: with --distill {args.distill} give "
                        + ("--alpha > 0 (e.g. 0.9)" if "kd" in names else
                           f"--alpha 0, or add kd (--distill {args.distill}+kd)"))
    if args.dist_cifar:
        for key, value in DIST_CIFAR.items():
            default = DISTILL_TERMS["dist"].flags[key][1]
            if getattr(args, key) not in (default, value):
                raise UserError(f"--dist_cifar sets --{key} {value:g}: drop one of them")
            setattr(args, key, value)


def all_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world > 1:
        dist.all_reduce(t)
    return t


@dataclass(frozen=True)
class Progress:
    """The progress bar of an epoch: its label, refreshed every `every` steps (--print_freq)."""
    desc: str = "train"
    every: int = 10


def train_one_epoch(model, loader, optimizer, scaler, rt: Runtime, loss_fn,
                    progress: Progress = Progress()):
    """One pass over `loader`; returns (mean loss, top-1 error %) over all processes."""
    desc, print_freq = progress.desc, progress.every
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)   # loss * n, wrong, n
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
               disable=True if not rt.main else None)              # None: off when not a tty
    start = time.perf_counter()
    bad = torch.full((), -1, dtype=torch.int64, device=rt.device)  # first non-finite loss step
    for step, (inputs, targets) in enumerate(bar):
        inputs, targets = rt.images(inputs), targets.to(rt.device, non_blocking=True)
        with rt.autocast():
            loss, logits = loss_fn(model, inputs, targets)
        bad = first_nonfinite(bad, loss, step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n = targets.size(0)
        sums[0] += loss.detach().double() * n
        sums[1] += (logits.argmax(1) != targets).sum()
        sums[2] += n
        if rt.main and (step + 1) % print_freq == 0:
            if rt.world == 1:
                check_finite(bad, rt, desc, len(loader))   # stop early (no extra sync)
            s = sums.tolist()
            bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", err=f"{100 * s[1] / s[2]:.1f}%",
                            img_s=f"{s[2] * rt.world / (time.perf_counter() - start):.0f}")
    loss_sum, wrong, n = all_sum(sums, rt).tolist()
    check_finite(bad, rt, desc, len(loader))
    return loss_sum / max(n, 1), 100.0 * wrong / max(n, 1)


def first_nonfinite(bad: torch.Tensor, loss: torch.Tensor, step: int) -> torch.Tensor:
    """`bad`, or `step` where this is the first step whose loss is NaN or infinite (on the
    device: no synchronisation per step)."""
    return torch.where((bad < 0) & ~torch.isfinite(loss.detach()), step, bad)


def check_finite(bad: torch.Tensor, rt: Runtime, desc: str, steps: int) -> None:
    """Stop the run at a NaN or infinite loss: nothing of this epoch is saved, so the last
    checkpoint stays that of the last good epoch. Every process stops together."""
    if rt.world > 1:
        bad = bad.clone()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    step = int(bad)
    if step >= 0:
        raise UserError(f"the loss became NaN or infinite in {desc}, step "
                        f"{step + 1} of {steps}: the run is stopped and the checkpoint keeps the "
                        "last finished epoch; lower --lr or check the data")


def sync_buffers(model: nn.Module, rt: Runtime) -> None:
    """DDP keeps rank 0's BatchNorm statistics (broadcast before each forward); give them to
    every process before an evaluation that runs outside DDP."""
    if rt.world > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


@torch.no_grad()
def validate(model, loader, rt: Runtime):
    """(mean cross-entropy, top-1 error %) over the whole validation set (all processes)."""
    net = unwrap(model)
    sync_buffers(net, rt)
    net.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    for inputs, targets in loader:
        inputs, targets = rt.images(inputs), targets.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits, _ = net(inputs)
        sums[0] += F.cross_entropy(logits.float(), targets, reduction="sum").double()
        sums[1] += (logits.argmax(1) != targets).sum()
        sums[2] += targets.size(0)
    loss_sum, wrong, n = all_sum(sums, rt).tolist()
    return loss_sum / max(n, 1), 100.0 * wrong / max(n, 1)


# --------------------------------------------------------------------------------------------
# Setting up a run: names, resume, teacher, student, schedule.
# --------------------------------------------------------------------------------------------

def run_name(args) -> str:
    return args.teacher_checkpoint if args.mode == "teacher" else args.student_checkpoint


def start_or_resume(args, path: str, rt: Runtime) -> Optional[dict]:
    """The checkpoint to resume (its run arguments copied into args), or None for a fresh run;
    refuses a fresh run over an existing checkpoint unless --overwrite."""
    if not args.resume:
        if os.path.exists(path) and not args.overwrite:
            raise UserError(f"{path} exists: add --resume to continue it or --overwrite to "
                            "train from scratch over it")
        return None
    ckpt = load_checkpoint(path)
    check_resume(ckpt, args, path, rt)
    saved = ckpt.get("args", {})
    for key in RUN_KEYS:
        if key in saved and saved[key] != getattr(args, key):
            rt.print(f"resume: using the checkpoint's --{key} {saved[key]} "
                     f"(this command said {getattr(args, key)})")
            setattr(args, key, saved[key])
    return ckpt


def requested_arch(args) -> dict:
    """The network this command asks for, as far as it says without the teacher's checkpoint
    (a student's shape is its teacher's unless --diff_shape or --wrn_depth/--wrn_width)."""
    want = {"convs": genotype_arg(args)}   # a list, or one block name for a uniform network
    if args.mode == "teacher":
        net = Network.from_args(args)
        want.update(arch=net.arch, depth=net.depth, width=net.width)
    elif args.diff_shape:
        want["arch"], want["depth"], want["width"] = "wrn", args.stu_depth, args.stu_width
    else:
        want.update({k: v for k, v in (("arch", args.arch), ("depth", args.wrn_depth),
                                       ("width", args.wrn_width)) if v is not None})
    return want


def check_resume(ckpt: dict, args, path: str, rt: Runtime) -> None:
    """Refuse to resume a checkpoint of another kind of run (teacher/student) or of another
    network than the command asks for. A raised --epochs extends the run: the checkpoint's
    recorded --epochs is raised in memory, so the copy of its run arguments keeps the new one."""
    saved = ckpt.get("args") or {}
    mode = saved.get("mode")
    if mode and mode != args.mode:
        raise UserError(f"--resume: {path} is a {mode} checkpoint, this command trains a "
                        f"{args.mode}")
    have = {"arch": ckpt.get("arch", "wrn"), "depth": ckpt.get("depth"),
            "width": ckpt.get("width"), "convs": list(ckpt["convs"])}
    for key, value in requested_arch(args).items():
        old = have[key]
        if key == "convs" and isinstance(value, str):
            value = [value] * len(old)     # --conv X: a uniform genotype
        if old != value:
            old, value = (_short(v) for v in (old, value))
            raise UserError(f"--resume: {path} has {key} {old}, this command asks for "
                            f"{key} {value}; give the run's own settings to resume it, or a new "
                            "name to train another network")
    if saved.get("epochs") is not None and args.epochs > saved["epochs"]:
        rt.print(f"resume: extending the run from {saved['epochs']} to {args.epochs} epochs")
        saved["epochs"] = args.epochs


def _short(value):
    """A uniform genotype as its one block name (for messages)."""
    return value[0] if isinstance(value, list) and len(set(value)) == 1 else value


def check_resume_classes(ckpt: Optional[dict], num_classes: int, args, path: str) -> None:
    if ckpt and ckpt["num_classes"] != num_classes:
        raise UserError(f"--resume: {path} has {ckpt['num_classes']} classes, {args.dataset} at "
                        f"{data_location(args)} has {num_classes}")


def finished(ckpt: dict, args, path: str, rt: Runtime) -> bool:
    """True (and says so) when the resumed run has already trained all its epochs."""
    if ckpt["epoch"] < args.epochs:
        return False
    rt.print(f"{path} has finished its {ckpt['epoch']} epochs: nothing to do (to train it "
             f"longer, resume with a larger --epochs)")
    return True


def extend_schedule(scheduler, optimizer, args) -> None:
    """After a raised --epochs, cosine annealing follows the longer run's curve from the
    current epoch on (a stepped schedule does not depend on --epochs)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) \
            or scheduler.T_max == args.epochs:
        return
    scheduler.T_max, epoch = args.epochs, scheduler.last_epoch
    lrs = [scheduler.eta_min + (base - scheduler.eta_min) *
           (1 + math.cos(math.pi * epoch / args.epochs)) / 2 for base in scheduler.base_lrs]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def record_precision(args, rt: Runtime, ckpt: Optional[dict]) -> None:
    """Put the resolved precision into args (saved in every checkpoint): --amp auto becomes
    what it chose. A resumed run repeats the interrupted one exactly only in the same precision."""
    resolved = {"amp": AMP_NAMES[rt.amp_dtype],
                "channels_last": rt.channels_last}
    saved = ckpt.get("args", {}) if ckpt else {}
    if "amp" in saved and saved["amp"] != resolved["amp"]:
        rt.print(f"resume: the checkpoint was trained with --amp {saved['amp']}, this run uses "
                 f"--amp {resolved['amp']} (pass --amp {saved['amp']} to continue it exactly)")
    vars(args).update(resolved)


def load_teacher(args, num_classes: int) -> nn.Module:
    """The frozen teacher: rebuilt from its checkpoint, eval mode, no gradients."""
    path = os.path.join(args.checkpoint_dir, args.teacher_checkpoint + ".t7")
    if not os.path.isfile(path):
        raise UserError(f"teacher checkpoint {path} not found: train it first (python main.py "
                        f"{args.dataset} teacher -t {args.teacher_checkpoint} ...) or pass -t NAME "
                        f"of a checkpoint in {args.checkpoint_dir}/")
    ckpt = load_checkpoint(path)
    if ckpt["num_classes"] != num_classes:
        raise UserError(f"{path} has {ckpt['num_classes']} classes but {args.dataset} at "
                        f"{data_location(args)} has {num_classes}")
    teacher = model_from_checkpoint(ckpt, path)
    teacher.requires_grad_(False)
    return teacher.eval()


def genotype_arg(args):
    """--from_genotype's list of block names, else the --conv name (uniform network)."""
    if args.from_genotype:
        if args.moonshine:
            raise UserError("--moonshine is a uniform student of --conv blocks: drop "
                            "--from_genotype or --moonshine")
        return load_genotype(args.from_genotype)
    get_block_type(args.conv)   # validated here, after --module has registered its names
    return args.conv


def new_model(args, num_classes: int, teacher: Optional[nn.Module]) -> nn.Module:
    """A fresh teacher (shape from the flags) or student (the teacher's shape unless
    --diff_shape) with the genotype from --from_genotype or --conv."""
    convs = genotype_arg(args)
    net = Network.from_args(args, num_classes) if teacher is None \
        else student_network(args, Network.of(teacher))
    try:
        return net.build(convs)
    except UserError as e:
        where = f"--from_genotype {args.from_genotype}" if args.from_genotype else "--conv"
        raise UserError(f"{where}: {e}") from None


def student_network(args, teacher: Network) -> Network:
    """The teacher's network, or a WRN of --stu_depth/--stu_width with --diff_shape."""
    if args.arch not in (None, teacher.arch):
        raise UserError(f"--arch {args.arch} does not match the teacher checkpoint "
                        f"({teacher.arch}): a student has its teacher's family")
    given = (args.wrn_depth or teacher.depth, args.wrn_width or teacher.width)
    if teacher.family.sized and given != (teacher.depth, teacher.width):
        raise UserError(f"--wrn_depth/--wrn_width {given[0]}/{given[1]} do not match the "
                        f"teacher checkpoint ({teacher.name}); for a student of another "
                        "shape use --diff_shape --stu_depth D --stu_width W")
    if not args.diff_shape:
        return teacher
    if not teacher.family.sized:
        raise UserError("--diff_shape is for WRN students only")
    return Network(teacher.arch, args.stu_depth, args.stu_width, teacher.num_classes)


def make_optimizer(model, args):
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)


def make_scheduler(optimizer, args):
    """Stepped once per epoch: cosine to 0, or x lr_decay_ratio at each --epoch_step epoch."""
    if args.cosine:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    try:
        steps = json.loads(args.epoch_step)
        assert isinstance(steps, list) and all(isinstance(s, int) for s in steps)
    except (ValueError, AssertionError):
        raise UserError(f"--epoch_step {args.epoch_step!r}: expected a JSON list of epochs "
                        "such as '[60,120,160]'") from None
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, steps, gamma=args.lr_decay_ratio)


# --------------------------------------------------------------------------------------------
# Per-epoch log (CSV beside the checkpoint).
# --------------------------------------------------------------------------------------------

def write_log(path: str, rows) -> None:
    """Start the log afresh (atomically): header and the rows of a resumed checkpoint."""
    def write(f):
        text = ",".join(LOG_FIELDS) + "\n" + "".join(
            ",".join(str(r[k]) for k in LOG_FIELDS) + "\n" for r in rows)
        f.write(text.encode())
    atomic_write(path, write)


def append_log(path: str, row: dict) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, LOG_FIELDS, lineterminator="\n").writerow(row)   # as write_log
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------

def fit(run: Run, rt: Runtime, args, paths: RunPaths) -> Run:
    """Train from run.epoch to args.epochs; checkpoint and log after every epoch."""
    for epoch in range(run.epoch, args.epochs):
        t0 = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        set_epoch(run.train_loader, epoch)
        train_loss, train_err = train_one_epoch(
            run.model, run.train_loader, run.optimizer, run.scaler, rt,
            partial(run.loss_fn, epoch=epoch),   # DKD's warm-up
            Progress(f"epoch {epoch + 1}/{args.epochs}", args.print_freq))
        speed = len(run.train_loader.dataset) / (time.perf_counter() - t0)
        val_loss, val_err = validate(run.model, run.val_loader, rt)
        run.scheduler.step()
        seconds = time.perf_counter() - t0
        row = dict(zip(LOG_FIELDS, (epoch + 1, lr, train_loss, train_err, val_loss, val_err,
                                    round(seconds, 2))))
        run.log.append(row)
        run.epoch = epoch + 1
        if rt.main:
            save_checkpoint(paths.checkpoint, run.state(args))
            append_log(paths.log, row)
            if args.plot:   # training curves beside the log, redrawn each epoch
                from plots import plot_training
                plot_training(paths.log, paths.plot)
        rt.print(f"epoch {epoch + 1}/{args.epochs}  lr {lr:.4g}  train loss {train_loss:.4f} "
                 f"err {train_err:.2f}%  val loss {val_loss:.4f} err {val_err:.2f}%  "
                 f"{seconds:.1f} s  {speed:.0f} img/s (train)")
    return run


def train_genotype(genotype, folder: str, name: str, flags: dict) -> float:
    """Train `genotype` from scratch as a teacher (cross-entropy, cosine schedule) into
    <folder>/checkpoints/<name>.t7 and return its final validation error (%): the short
    training that fisher_rank.py --rerank and study.py rank candidates by. `flags` are main.py
    flags without their dashes (dataset, data_loc, arch, epochs, ...): None is left out, True
    is a bare switch."""
    genotype_csv = os.path.join(folder, "genotypes", name + ".csv")
    save_genotype(genotype_csv, genotype)
    flags = dict(flags)
    argv = [flags.pop("dataset"), "teacher", "--from_genotype", genotype_csv, "-t", name,
            "--checkpoint_dir", os.path.join(folder, "checkpoints"), "--cosine", "--overwrite"]
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None:
            argv += [f"--{key}", str(value)]
    main(get_args_parser().parse_args(argv))
    ckpt = load_checkpoint(os.path.join(folder, "checkpoints", name + ".t7"))
    return float(ckpt["val_errors"][-1])


def main(args):
    validate_args(args)
    if args.GPU is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.GPU   # before anything initialises CUDA
    rt = setup_runtime(args)
    with distributed_teardown():
        return train(args, rt)


def setup_runtime(args) -> Runtime:
    """Device, process group (runtime.start_runtime) and this run's precision."""
    return with_precision(start_runtime(args.device), "off" if args.no_amp else args.amp,
                          args.no_channels_last, args.compile)


def train(args, rt: Runtime):
    """Everything that can fail on bad input happens before the first file is written."""
    if args.module:
        load_block_module(args.module)
    if args.mode == "student" and args.student_checkpoint == args.teacher_checkpoint:
        raise UserError("-s and -t name the same checkpoint: the student would overwrite its "
                        "teacher; give the student another name")
    paths = RunPaths.of(args.checkpoint_dir, run_name(args))
    check_writable(args.checkpoint_dir, "--checkpoint_dir")
    ckpt = start_or_resume(args, paths.checkpoint, rt)
    if args.mode == "student":
        resolve_distill(args, ckpt.get("args", {}) if ckpt else None)
    if ckpt and finished(ckpt, args, paths.checkpoint, rt):
        return None
    run, teacher = set_up(args, rt, paths, ckpt)
    if rt.main:
        write_log(paths.log, run.log)
    if rt.world > 1:
        run.model = DistributedDataParallel(
            run.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    fit(run, rt, args, paths)
    return {"model": unwrap(run.model), "teacher": teacher, "history": run.history()}


def set_up(args, rt: Runtime, paths: RunPaths, ckpt: Optional[dict]):
    """(Run, teacher or None): data, network (new, or the checkpoint's), optimiser, schedule
    and loss, on the device, with the start-up lines printed."""
    train_loader, val_loader, num_classes = make_loaders(
        args, rt, lambda n: check_resume_classes(ckpt, n, args, paths.checkpoint))
    teacher = load_teacher(args, num_classes) if args.mode == "student" else None
    torch.manual_seed(args.seed)   # same initial weights in every process and every rerun
    model = (model_from_checkpoint(ckpt, paths.checkpoint) if ckpt
             else new_model(args, num_classes, teacher))
    rt.place(model, compile=True)
    optimizer = make_optimizer(model, args)
    run = Run(model, train_loader, val_loader, optimizer, make_scheduler(optimizer, args),
              rt.grad_scaler(), make_student_loss_fn(teacher, args) if teacher else
              teacher_loss_fn)
    if ckpt:
        run.resume(ckpt, args)
    record_precision(args, rt, ckpt)
    rt.print(f"{args.mode} {run_name(args)}: {describe(model)} on {rt.device} x{rt.world}, "
             f"{rt.precision()}{f', resuming after epoch {run.epoch}' if ckpt else ''}")
    if rt.device.type == "cuda" and rt.world == 1 and torch.cuda.device_count() > 1:
        rt.print(f"{torch.cuda.device_count()} GPUs visible, 1 used: launch with torchrun "
                 f"--nproc_per_node {torch.cuda.device_count()} main.py ... to use them all")
    if teacher is not None:
        rt.place(teacher)
        rt.print(f"teacher {args.teacher_checkpoint}: {describe(teacher)}, "
                 f"val error {validate(teacher, val_loader, rt)[1]:.2f}%")
    return run, teacher


if __name__ == "__main__":
    run_cli(main, get_args_parser())

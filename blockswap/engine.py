"""The training engine: a run's settings as one record (TrainConfig) in, a TrainResult out.

    from blockswap.engine import TrainConfig, train
    result = train(TrainConfig("cifar10", data_loc="data/cifar", convs=genotype, epochs=5,
                               cosine=True, teacher_checkpoint="cand_7", overwrite=True))
    result.val_error, result.checkpoint, result.log

main.py turns its flags into a TrainConfig (TrainConfig.from_args); fisher_rank.py --rerank
and study.py build one per candidate. A teacher is trained with cross-entropy; a student with
cross-entropy plus the --distill terms (distill.DISTILL_TERMS) against its frozen teacher.

Files (rank 0 writes them after every epoch, see files.RunPaths): <name>.t7 (the checkpoint,
atomic), <name>.log.csv (one row per epoch) and <name>.png. A fresh run refuses to replace a
checkpoint unless resume (continue it, with its saved settings) or overwrite; resume refuses
another network, class count or mode; a raised epochs extends the run.

Reproducibility: with a fixed seed, the shuffling and the augmentation of every image are drawn
from (seed, epoch, image index), so a resumed run repeats the uninterrupted one and the images do
not depend on the workers or on the number of processes. batch_size is the global batch: under
torchrun each of the N processes takes batch_size / N. BatchNorm statistics are per process (plain
DDP), so N processes are equivalent to one process that normalises each 1/N of the batch apart.
"""
import dataclasses
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
from tqdm import tqdm

from blockswap.distill import DIST_CIFAR, DISTILL_TERMS, distill_loss, parse_distill
from blockswap.files import (HISTORY, LOG_FIELDS, RunPaths, append_log, arch_info, check_writable,
                   load_checkpoint, load_genotype, log_of, model_from_checkpoint,
                   save_checkpoint, write_log)
from blockswap.funcs import get_no_params
from blockswap.loaders import data_location, make_loaders, set_epoch
from models import Network, UserError, get_block_type, load_block_module
from blockswap.runtime import (AMP_NAMES, Runtime, all_sum, distributed_teardown, start_runtime,
                     sync_buffers, unwrap, with_precision)


def _term_default(flag: str):
    """The default of a distillation term's hyper-parameter (stated once, in distill.py)."""
    return next(t.flags[flag][1] for t in DISTILL_TERMS.values() if flag in t.flags)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; main.py's flags of the same names. Each default
    is stated here once (main.py's parser takes its defaults from this class)."""
    dataset: str = "cifar10"
    mode: str = "teacher"                 # teacher: cross-entropy; student: + --distill terms
    data_loc: str = "data/cifar"
    download: bool = False
    workers: int = 2                      # processes that decode images (per GPU)
    loader: str = "auto"                  # tensor, pil, or auto (tensor for CIFAR-scale data)
    cache_dir: Optional[str] = None
    arch: Optional[str] = None            # None: wrn on CIFAR, resnet34 on ImageNet
    wrn_depth: Optional[int] = None
    wrn_width: Optional[int] = None
    module: Optional[str] = None          # a user's block file (register_block)
    conv: str = "Conv"                    # a uniform network of these, unless convs is given
    convs: Optional[List[str]] = None     # the genotype
    from_genotype: str = ""               # the genotype file convs was read from (messages)
    moonshine: bool = False
    diff_shape: bool = False
    stu_depth: int = 40
    stu_width: int = 2
    # checkpoints
    teacher_checkpoint: str = "wrn_40_2_T"
    student_checkpoint: str = "wrn_40_2_student_KT"
    checkpoint_dir: str = "checkpoints"
    resume: bool = False
    overwrite: bool = False
    # optimisation: the seed's recipe (cosine + cutout: the ICLR paper's)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 200
    batch_size: int = 128                 # the global batch (all processes)
    epoch_step: str = "[60,120,160]"      # JSON list: epochs to decay lr at
    lr_decay_ratio: float = 0.2
    cosine: bool = False
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    cutout: int = 0
    seed: int = 0
    subset_seed: Optional[int] = None     # None: seed
    # the student's loss
    alpha: float = 0.0                    # KD weight (0: cross-entropy only)
    temperature: float = 4.0              # KD temperature
    beta: float = 1e3                     # attention transfer weight
    distill: Optional[str] = None         # None: at, or at+kd when alpha > 0
    dkd_alpha: float = _term_default("dkd_alpha")
    dkd_beta: float = _term_default("dkd_beta")
    dkd_temperature: float = _term_default("dkd_temperature")
    dkd_warmup: int = _term_default("dkd_warmup")
    dist_beta: float = _term_default("dist_beta")
    dist_gamma: float = _term_default("dist_gamma")
    dist_temperature: float = _term_default("dist_temperature")
    dist_cifar: bool = False
    # hardware
    device: str = "auto"
    amp: str = "auto"
    no_channels_last: bool = False
    channels_last: Optional[bool] = None  # resolved from the device and amp
    compile: bool = False
    print_freq: int = 10
    plot: bool = True

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        """main.py's parsed flags as a record: the seed's --cifar_loc/--imagenet_loc become
        data_loc, --no_amp becomes amp off, --from_genotype is read into convs."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in known}
        values["data_loc"] = data_location(args)
        if getattr(args, "no_amp", False):
            values["amp"] = "off"
        if args.from_genotype:
            values["convs"] = load_genotype(args.from_genotype)
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def run_name(self) -> str:
        return self.teacher_checkpoint if self.mode == "teacher" else self.student_checkpoint


@dataclass
class TrainResult:
    """What a run gives back: its per-epoch log (rows of LOG_FIELDS), the final validation
    error (%), the checkpoint's path, the seconds trained in this call (0 when the run had
    already finished), and the trained network (and teacher) when trained in this process."""
    checkpoint: str
    log: List[dict]
    seconds: float = 0.0
    model: Optional[nn.Module] = None
    teacher: Optional[nn.Module] = None

    @property
    def val_error(self) -> float:
        return float(self.log[-1]["val_error"]) if self.log else float("nan")


# Arguments that define the training run: on --resume the checkpoint's values are used, so the
# continued run follows the schedule it started with.
RUN_KEYS = ("dataset", "mode", "lr", "momentum", "weight_decay", "epoch_step", "lr_decay_ratio",
            "cosine", "epochs", "batch_size", "seed", "subset_seed", "cutout", "train_subset",
            "val_subset", "alpha", "temperature", "beta", "teacher_checkpoint", "loader",
            # ... and the student's distillation method with every term's hyper-parameters
            "distill", "dist_cifar", *(f for term in DISTILL_TERMS.values() for f in term.flags))


def describe(model: nn.Module) -> str:
    convs = model.genotype  # a uniform network is named by its one block type
    kinds = convs[0] if len(set(convs)) == 1 else ",".join(convs)
    return f"{Network.of(model).name} [{kinds}], {get_no_params(model):,} params"


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

    def resume(self, ckpt: dict, cfg) -> None:
        """Continue from a checkpoint: optimiser, schedule (extended by a raised --epochs),
        loss scaling, the log and the epoch count."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        extend_schedule(self.scheduler, self.optimizer, cfg)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.log, self.epoch = log_of(ckpt), ckpt["epoch"]

    def state(self, cfg) -> dict:
        """The checkpoint of the run as it stands."""
        net = unwrap(self.model)
        # .contiguous(): channels_last weights are saved in the standard layout.
        weights = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
        uniform = len(set(net.genotype)) == 1
        return {"net": weights, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, **arch_info(net),
                "conv": net.genotype[0] if uniform else None, "module": cfg.module,
                "args": dataclasses.asdict(cfg), **self.history(), "log": list(self.log)}


def teacher_loss_fn(model, inputs, targets, epoch=0):
    logits, _ = model(inputs)
    return F.cross_entropy(logits.float(), targets), logits


def make_student_loss_fn(teacher, cfg):
    """Cross-entropy + the --distill terms; `epoch` counts from 0 (fit's loop index)."""
    names = parse_distill(cfg.distill)

    def loss_fn(model, inputs, targets, epoch=0):
        with torch.no_grad():
            t_out = teacher(inputs)
        out = model(inputs)
        return distill_loss(names, out, t_out, targets, cfg, epoch + 1), out[0]
    return loss_fn


KD_ALPHA = 0.9   # Hinton KD's usual weight (the original's), when --distill names kd alone


def resolve_distill(cfg: TrainConfig, saved: Optional[dict],
                    say: Callable = print) -> TrainConfig:
    """The settled --distill, before anything is written. A checkpoint from before --distill
    resumes with the loss it was trained with: at, +kd when its alpha > 0. `say` prints the
    defaults it chose (train_on passes rt.print: one line, not one per torchrun process)."""
    if saved is not None and "distill" not in saved:
        cfg = cfg.replace(distill=None)
    if cfg.distill is None:
        cfg = cfg.replace(distill="at+kd" if cfg.alpha > 0 else "at")
    names = parse_distill(cfg.distill)
    if "kd" in names and cfg.alpha == 0:
        say(f"--distill {cfg.distill}: kd takes its usual weight, --alpha {KD_ALPHA} "
              "(pass --alpha to choose another)")
        cfg = cfg.replace(alpha=KD_ALPHA)
    if ("kd" in names) != (cfg.alpha > 0):
        raise UserError(f"--alpha is the weight of kd: with --distill {cfg.distill} give "
                        + ("--alpha > 0 (e.g. 0.9)" if "kd" in names else
                           f"--alpha 0, or add kd (--distill {cfg.distill}+kd)"))
    if cfg.dist_cifar:
        for key, value in DIST_CIFAR.items():
            default = _term_default(key)
            if getattr(cfg, key) not in (default, value):
                raise UserError(f"--dist_cifar sets --{key} {value:g}: drop one of them")
        cfg = cfg.replace(**DIST_CIFAR)
    return cfg


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


def start_or_resume(cfg: TrainConfig, path: str, rt: Runtime):
    """(cfg with the checkpoint's run settings, checkpoint) to resume, or (cfg, None) for a
    fresh run; refuses a fresh run over an existing checkpoint unless --overwrite."""
    if not cfg.resume:
        if os.path.exists(path) and not cfg.overwrite:
            raise UserError(f"{path} exists: add --resume to continue it or --overwrite to "
                            "train from scratch over it")
        return cfg, None
    ckpt = load_checkpoint(path)
    check_resume(ckpt, cfg, path, rt)
    saved, changes = ckpt.get("args", {}), {}
    for key in RUN_KEYS:
        if key in saved and saved[key] != getattr(cfg, key):
            rt.print(f"resume: using the checkpoint's --{key} {saved[key]} "
                     f"(this command said {getattr(cfg, key)})")
            changes[key] = saved[key]
    return cfg.replace(**changes), ckpt


def requested_arch(cfg) -> dict:
    """The network this command asks for, as far as it says without the teacher's checkpoint
    (a student's shape is its teacher's unless --diff_shape or --wrn_depth/--wrn_width)."""
    want = {"convs": genotype_arg(cfg)}   # a list, or one block name for a uniform network
    if cfg.mode == "teacher":
        net = Network.from_args(cfg)
        want.update(arch=net.arch, depth=net.depth, width=net.width)
    elif cfg.diff_shape:
        want["arch"], want["depth"], want["width"] = "wrn", cfg.stu_depth, cfg.stu_width
    else:
        want.update({k: v for k, v in (("arch", cfg.arch), ("depth", cfg.wrn_depth),
                                       ("width", cfg.wrn_width)) if v is not None})
    return want


def check_resume(ckpt: dict, cfg, path: str, rt: Runtime) -> None:
    """Refuse to resume a checkpoint of another kind of run (teacher/student) or of another
    network than the command asks for. A raised --epochs extends the run: the checkpoint's
    recorded --epochs is raised in memory, so the copy of its run arguments keeps the new one."""
    saved = ckpt.get("args") or {}
    mode = saved.get("mode")
    if mode and mode != cfg.mode:
        raise UserError(f"--resume: {path} is a {mode} checkpoint, this command trains a "
                        f"{cfg.mode}")
    have = {"arch": ckpt.get("arch", "wrn"), "depth": ckpt.get("depth"),
            "width": ckpt.get("width"), "convs": list(ckpt["convs"])}
    for key, value in requested_arch(cfg).items():
        old = have[key]
        if key == "convs" and isinstance(value, str):
            value = [value] * len(old)     # --conv X: a uniform genotype
        if old != value:
            old, value = (_short(v) for v in (old, value))
            raise UserError(f"--resume: {path} has {key} {old}, this command asks for "
                            f"{key} {value}; give the run's own settings to resume it, or a new "
                            "name to train another network")
    if saved.get("epochs") is not None and cfg.epochs > saved["epochs"]:
        rt.print(f"resume: extending the run from {saved['epochs']} to {cfg.epochs} epochs")
        saved["epochs"] = cfg.epochs


def _short(value):
    """A uniform genotype as its one block name (for messages)."""
    return value[0] if isinstance(value, list) and len(set(value)) == 1 else value


def check_resume_classes(ckpt: Optional[dict], num_classes: int, cfg, path: str) -> None:
    if ckpt and ckpt["num_classes"] != num_classes:
        raise UserError(f"--resume: {path} has {ckpt['num_classes']} classes, {cfg.dataset} at "
                        f"{data_location(cfg)} has {num_classes}")


def finished(ckpt: dict, cfg, path: str, rt: Runtime) -> bool:
    """True (and says so) when the resumed run has already trained all its epochs."""
    if ckpt["epoch"] < cfg.epochs:
        return False
    rt.print(f"{path} has finished its {ckpt['epoch']} epochs: nothing to do (to train it "
             f"longer, resume with a larger --epochs)")
    return True


def extend_schedule(scheduler, optimizer, cfg) -> None:
    """After a raised --epochs, cosine annealing follows the longer run's curve from the
    current epoch on (a stepped schedule does not depend on --epochs)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) \
            or scheduler.T_max == cfg.epochs:
        return
    scheduler.T_max, epoch = cfg.epochs, scheduler.last_epoch
    lrs = [scheduler.eta_min + (base - scheduler.eta_min) *
           (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2 for base in scheduler.base_lrs]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def record_precision(cfg: TrainConfig, rt: Runtime, ckpt: Optional[dict]) -> TrainConfig:
    """cfg with the resolved precision (saved in every checkpoint): --amp auto becomes
    what it chose. A resumed run repeats the interrupted one exactly only in the same precision."""
    resolved = {"amp": AMP_NAMES[rt.amp_dtype],
                "channels_last": rt.channels_last}
    saved = ckpt.get("args", {}) if ckpt else {}
    if "amp" in saved and saved["amp"] != resolved["amp"]:
        rt.print(f"resume: the checkpoint was trained with --amp {saved['amp']}, this run uses "
                 f"--amp {resolved['amp']} (pass --amp {saved['amp']} to continue it exactly)")
    return cfg.replace(**resolved)


def load_teacher(cfg, num_classes: int) -> nn.Module:
    """The frozen teacher: rebuilt from its checkpoint, eval mode, no gradients."""
    path = RunPaths.of(cfg.checkpoint_dir, cfg.teacher_checkpoint).checkpoint
    if not os.path.isfile(path):
        raise UserError(f"teacher checkpoint {path} not found: train it first (python main.py "
                        f"{cfg.dataset} teacher -t {cfg.teacher_checkpoint} ...) or pass -t NAME "
                        f"of a checkpoint in {cfg.checkpoint_dir}/")
    ckpt = load_checkpoint(path)
    if ckpt["num_classes"] != num_classes:
        raise UserError(f"{path} has {ckpt['num_classes']} classes but {cfg.dataset} at "
                        f"{data_location(cfg)} has {num_classes}")
    teacher = model_from_checkpoint(ckpt, path)
    teacher.requires_grad_(False)
    return teacher.eval()


def genotype_arg(cfg: TrainConfig):
    """The genotype's list of block names (convs), else the --conv name (uniform network)."""
    if cfg.convs:
        if cfg.moonshine:
            raise UserError("--moonshine is a uniform student of --conv blocks: drop "
                            "--from_genotype or --moonshine")
        return list(cfg.convs)
    get_block_type(cfg.conv)   # validated here, after --module has registered its names
    return cfg.conv


def new_model(cfg, num_classes: int, teacher: Optional[nn.Module]) -> nn.Module:
    """A fresh teacher (shape from the flags) or student (the teacher's shape unless
    --diff_shape) with the genotype from --from_genotype or --conv."""
    convs = genotype_arg(cfg)
    net = Network.from_args(cfg, num_classes) if teacher is None \
        else student_network(cfg, Network.of(teacher))
    try:
        return net.build(convs)
    except UserError as e:
        where = (f"--from_genotype {cfg.from_genotype}" if cfg.from_genotype else
                 "the genotype" if cfg.convs else "--conv")
        raise UserError(f"{where}: {e}") from None


def student_network(cfg, teacher: Network) -> Network:
    """The teacher's network, or a WRN of --stu_depth/--stu_width with --diff_shape."""
    if cfg.arch not in (None, teacher.arch):
        raise UserError(f"--arch {cfg.arch} does not match the teacher checkpoint "
                        f"({teacher.arch}): a student has its teacher's family")
    given = (cfg.wrn_depth or teacher.depth, cfg.wrn_width or teacher.width)
    if teacher.family.sized and given != (teacher.depth, teacher.width):
        raise UserError(f"--wrn_depth/--wrn_width {given[0]}/{given[1]} do not match the "
                        f"teacher checkpoint ({teacher.name}); for a student of another "
                        "shape use --diff_shape --stu_depth D --stu_width W")
    if not cfg.diff_shape:
        return teacher
    if not teacher.family.sized:
        raise UserError("--diff_shape is for WRN students only")
    return Network(teacher.arch, cfg.stu_depth, cfg.stu_width, teacher.num_classes)


def make_optimizer(model, cfg):
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg):
    """Stepped once per epoch: cosine to 0, or x lr_decay_ratio at each --epoch_step epoch."""
    if cfg.cosine:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    try:
        steps = json.loads(cfg.epoch_step)
        assert isinstance(steps, list) and all(isinstance(s, int) for s in steps)
    except (ValueError, AssertionError):
        raise UserError(f"--epoch_step {cfg.epoch_step!r}: expected a JSON list of epochs "
                        "such as '[60,120,160]'") from None
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, steps, gamma=cfg.lr_decay_ratio)


def fit(run: Run, rt: Runtime, cfg, paths: RunPaths) -> Run:
    """Train from run.epoch to cfg.epochs; checkpoint and log after every epoch."""
    first = run.epoch
    for epoch in range(run.epoch, cfg.epochs):
        t0 = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        set_epoch(run.train_loader, epoch)
        train_loss, train_err = train_one_epoch(
            run.model, run.train_loader, run.optimizer, run.scaler, rt,
            partial(run.loss_fn, epoch=epoch),   # DKD's warm-up
            Progress(f"epoch {epoch + 1}/{cfg.epochs}", cfg.print_freq))
        speed = len(run.train_loader.dataset) / (time.perf_counter() - t0)
        val_loss, val_err = validate(run.model, run.val_loader, rt)
        run.scheduler.step()
        seconds = time.perf_counter() - t0
        row = dict(zip(LOG_FIELDS, (epoch + 1, lr, train_loss, train_err, val_loss, val_err,
                                    round(seconds, 2))))
        run.log.append(row)
        run.epoch = epoch + 1
        if rt.main:
            save_checkpoint(paths.checkpoint, run.state(cfg))
            if epoch == first:   # the log starts afresh (with a resumed run's rows) only now,
                write_log(paths.log, run.log)   # so a first epoch that fails leaves no stub
            else:
                append_log(paths.log, row)
            if cfg.plot:   # training curves beside the log, redrawn each epoch
                from blockswap.plots import plot_training   # here: matplotlib loads only to plot
                plot_training(paths.log, paths.plot)
        rt.print(f"epoch {epoch + 1}/{cfg.epochs}  lr {lr:.4g}  train loss {train_loss:.4f} "
                 f"err {train_err:.2f}%  val loss {val_loss:.4f} err {val_err:.2f}%  "
                 f"{seconds:.1f} s  {speed:.0f} img/s (train)")
    return run


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Device, process group (runtime.start_runtime) and this run's precision."""
    return with_precision(start_runtime(cfg.device), cfg.amp, cfg.no_channels_last,
                          cfg.compile)


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume, or extend) the run `cfg` describes on its device; under torchrun, in
    every process. A run that has already finished is not trained again: its result is read
    from the checkpoint."""
    rt = setup_runtime(cfg)
    with distributed_teardown():
        return train_on(cfg, rt)


def train_on(cfg: TrainConfig, rt: Runtime) -> TrainResult:
    """train() on a runtime already set up. Everything that can fail on bad input happens
    before the first file is written."""
    t0 = time.perf_counter()
    if cfg.module:
        load_block_module(cfg.module)
    genotype_arg(cfg)   # a bad block name, or --moonshine with a genotype: before any work
    if cfg.mode == "student" and cfg.student_checkpoint == cfg.teacher_checkpoint:
        raise UserError("-s and -t name the same checkpoint: the student would overwrite its "
                        "teacher; give the student another name")
    paths = RunPaths.of(cfg.checkpoint_dir, cfg.run_name())
    check_writable(cfg.checkpoint_dir, "--checkpoint_dir")
    cfg, ckpt = start_or_resume(cfg, paths.checkpoint, rt)
    if cfg.mode == "student":
        cfg = resolve_distill(cfg, ckpt.get("args", {}) if ckpt else None, rt.print)
    if ckpt and finished(ckpt, cfg, paths.checkpoint, rt):
        return TrainResult(paths.checkpoint, log_of(ckpt))
    run, teacher, cfg = set_up(cfg, rt, paths, ckpt)
    if rt.world > 1:
        run.model = DistributedDataParallel(
            run.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    fit(run, rt, cfg, paths)
    return TrainResult(paths.checkpoint, list(run.log), time.perf_counter() - t0,
                       unwrap(run.model), teacher)


def set_up(cfg: TrainConfig, rt: Runtime, paths: RunPaths, ckpt: Optional[dict]):
    """(Run, teacher or None, cfg with its precision): data, network (new, or the
    checkpoint's), optimiser, schedule and loss, on the device, start-up lines printed."""
    train_loader, val_loader, num_classes = make_loaders(
        cfg, rt, lambda n: check_resume_classes(ckpt, n, cfg, paths.checkpoint))
    teacher = load_teacher(cfg, num_classes) if cfg.mode == "student" else None
    torch.manual_seed(cfg.seed)   # same initial weights in every process and every rerun
    model = (model_from_checkpoint(ckpt, paths.checkpoint) if ckpt
             else new_model(cfg, num_classes, teacher))
    rt.place(model, compile=True)
    optimizer = make_optimizer(model, cfg)
    run = Run(model, train_loader, val_loader, optimizer, make_scheduler(optimizer, cfg),
              rt.grad_scaler(), make_student_loss_fn(teacher, cfg) if teacher else
              teacher_loss_fn)
    if ckpt:
        run.resume(ckpt, cfg)
    cfg = record_precision(cfg, rt, ckpt)
    rt.print(f"{cfg.mode} {cfg.run_name()}: {describe(model)} on {rt.device} x{rt.world}, "
             f"{rt.precision()}{f', resuming after epoch {run.epoch}' if ckpt else ''}")
    if rt.device.type == "cuda" and rt.world == 1 and torch.cuda.device_count() > 1:
        rt.print(f"{torch.cuda.device_count()} GPUs visible, 1 used: launch with torchrun "
                 f"--nproc_per_node {torch.cuda.device_count()} main.py ... to use them all")
    if teacher is not None:
        rt.place(teacher)
        rt.print(f"teacher {cfg.teacher_checkpoint}: {describe(teacher)}, "
                 f"val error {validate(teacher, val_loader, rt)[1]:.2f}%")
    return run, teacher, cfg


# --------------------------------------------------------------------------------------------
# Short trainings that rank candidates (fisher_rank.py --rerank, study.py)
# --------------------------------------------------------------------------------------------

def candidate_config(genotype, folder: str, name: str, **settings) -> TrainConfig:
    """A teacher-style run of `genotype` (cross-entropy, cosine schedule, no plot) into
    <folder>/checkpoints/<name>.t7; `settings` are other TrainConfig fields."""
    return TrainConfig(mode="teacher", convs=list(genotype), teacher_checkpoint=name,
                       checkpoint_dir=os.path.join(folder, "checkpoints"), cosine=True,
                       plot=False, **settings)


def train_candidate(cfg: TrainConfig) -> dict:
    """Train one candidate to its last epoch and return {'val_error', 'seconds', 'checkpoint'}.
    Kill-safe: a checkpoint already there is resumed (a finished one is only read), so a rerun
    after a kill, under any launcher, trains only what is unfinished."""
    path = RunPaths.of(cfg.checkpoint_dir, cfg.run_name()).checkpoint
    result = train(cfg.replace(resume=os.path.isfile(path), overwrite=True))
    return {"val_error": result.val_error, "seconds": round(result.seconds, 2),
            "checkpoint": result.checkpoint}

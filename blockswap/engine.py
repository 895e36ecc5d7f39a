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

from blockswap.build import (Teacher, check_mode_flags, check_teacher_classes, genotype_arg,
                             initial_weights, load_teacher, new_model, same_validation)
from blockswap.cli import EPOCH_LIST_HINT, epoch_steps
from blockswap.distill import Taps, distill_loss, parse_distill, resolve_distill, term_default
from blockswap.files import (HISTORY, LOG_FIELDS, RunPaths, append_log, arch_info,
                             check_writable, load_genotype, log_of, model_from_checkpoint,
                             save_checkpoint, write_log)
from blockswap.funcs import get_no_params
from blockswap.loaders import (BATCH_SIZE, LOADER, WORKERS, DataSpec, data_location,
                               make_loaders, set_epoch)
from blockswap.resume import (check_resume_classes, extend_schedule, finished, record_precision,
                              start_or_resume)
from blockswap.runtime import (AMP, DEVICE, Runtime, all_sum, distributed_teardown,
                               start_runtime, sync_buffers, unwrap, with_precision)
from models import Network, UserError, load_block_module
from models.blocks import logits_of


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; main.py's flags of the same names. Each default
    is stated here once (main.py's parser takes its defaults from this class)."""
    dataset: str = "cifar10"
    mode: str = "teacher"                 # teacher: cross-entropy; student: + --distill terms
    data_loc: str = "data/cifar"
    download: bool = False
    workers: int = WORKERS                # processes that decode images (per GPU)
    loader: str = LOADER                  # tensor, pil, or auto (tensor for CIFAR-scale data)
    cache_dir: Optional[str] = None
    image_size: Optional[int] = None      # None: the data set's; a folder's: the family's
    arch: Optional[str] = None            # None: wrn on CIFAR, resnet34 on ImageNet
    wrn_depth: Optional[int] = None
    wrn_width: Optional[int] = None
    module: Optional[str] = None          # a user's block file (register_block)
    conv: Optional[str] = None            # a uniform network of these, unless convs is given;
                                          # None: the family's own (Conv for WRN, the ResNets)
    convs: Optional[List[str]] = None     # the genotype
    from_genotype: str = ""               # the genotype file convs was read from (messages)
    moonshine: bool = False
    diff_shape: bool = False
    stu_depth: int = 40
    stu_width: int = 2
    # weights from a file (build.py)
    init_weights: Optional[str] = None    # a new teacher starts from this state dict
    teacher_weights: Optional[str] = None  # a student's teacher: this file, not -t's checkpoint
    inherit: bool = False                 # a student starts from its teacher's same-shape tensors
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
    batch_size: int = BATCH_SIZE          # the global batch (all processes)
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
    dkd_alpha: float = term_default("dkd_alpha")
    dkd_beta: float = term_default("dkd_beta")
    dkd_temperature: float = term_default("dkd_temperature")
    dkd_warmup: int = term_default("dkd_warmup")
    dist_beta: float = term_default("dist_beta")
    dist_gamma: float = term_default("dist_gamma")
    dist_temperature: float = term_default("dist_temperature")
    dist_cifar: bool = False
    # hardware
    device: str = DEVICE
    amp: str = AMP
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
    teacher_val_error: Optional[float] = None   # a student's teacher's, measured once

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
                "args": dataclasses.asdict(cfg), **self.history(), "log": list(self.log),
                # its last validation error (a student reads its teacher's from here), and
                # a student's teacher's (a resumed student does not validate the teacher again)
                "val_error": self.log[-1]["val_error"] if self.log else None,
                "teacher_val_error": self.teacher_val_error}


def teacher_loss_fn(model, inputs, targets, epoch=0):
    logits = logits_of(model(inputs))
    return F.cross_entropy(logits.float(), targets), logits


def make_student_loss_fn(teacher, cfg):
    """Cross-entropy + the --distill terms on (logits, stage outputs) of student and teacher;
    the stage outputs are caught by forward hooks at each family's Network.taps (distill.Taps),
    the student's hooked at its first step (before a compiled forward first runs). `epoch`
    counts from 0 (fit's loop index)."""
    names = parse_distill(cfg.distill)
    if "at" in names and not Network.of(teacher).taps:
        raise UserError(f"--distill {cfg.distill}: attention transfer needs the stage outputs "
                        f"of {Network.of(teacher).name} (its family's taps) and it names none; "
                        "give it taps, or use --distill kd, dkd or dist")
    teacher_taps, student_taps = Taps.of(teacher), {}

    def loss_fn(model, inputs, targets, epoch=0):
        with torch.no_grad():
            t_out = teacher_taps(teacher, inputs)
        net = unwrap(model)
        taps = student_taps.get(id(net)) or student_taps.setdefault(id(net), Taps.of(net))
        out = taps(model, inputs)
        return distill_loss(names, out, t_out, targets, cfg, epoch + 1), out[0]
    return loss_fn


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
            logits = logits_of(net(inputs))
        sums[0] += F.cross_entropy(logits.float(), targets, reduction="sum").double()
        sums[1] += (logits.argmax(1) != targets).sum()
        sums[2] += targets.size(0)
    loss_sum, wrong, n = all_sum(sums, rt).tolist()
    return loss_sum / max(n, 1), 100.0 * wrong / max(n, 1)


def make_optimizer(model, cfg):
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg):
    """Stepped once per epoch: cosine to 0, or x lr_decay_ratio at each --epoch_step epoch."""
    if cfg.cosine:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    steps = epoch_steps(cfg.epoch_step)
    if steps is None:
        raise UserError(f"--epoch_step {cfg.epoch_step!r}: {EPOCH_LIST_HINT}")
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
    check_mode_flags(cfg)
    if cfg.mode == "student" and not cfg.teacher_weights \
            and cfg.student_checkpoint == cfg.teacher_checkpoint:
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
                       unwrap(run.model), teacher.model if teacher else None)


def set_up(cfg: TrainConfig, rt: Runtime, paths: RunPaths, ckpt: Optional[dict]):
    """(Run, Teacher or None, cfg with its image size and precision): teacher, data, network
    (new, or the checkpoint's), optimiser, schedule and loss, on the device, start-up lines
    printed."""
    teacher = load_teacher(cfg) if cfg.mode == "student" else None
    cfg = settle_data(cfg, teacher)

    def check_classes(n):   # before any image is decoded
        check_resume_classes(ckpt, n, cfg, paths.checkpoint)
        if teacher is not None:
            check_teacher_classes(teacher, n, cfg)
    train_loader, val_loader, num_classes = make_loaders(cfg, rt, check_classes)
    torch.manual_seed(cfg.seed)   # same initial weights in every process and every rerun
    if ckpt:
        model = model_from_checkpoint(ckpt, paths.checkpoint)
    else:
        model = new_model(cfg, num_classes, teacher.model if teacher else None)
        initial_weights(model, cfg, teacher, rt.print)
    rt.place(model, compile=True)
    optimizer = make_optimizer(model, cfg)
    run = Run(model, train_loader, val_loader, optimizer, make_scheduler(optimizer, cfg),
              rt.grad_scaler(), make_student_loss_fn(teacher.model, cfg) if teacher else
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
        rt.place(teacher.model)
        run.teacher_val_error = teacher_error(teacher, cfg, ckpt, val_loader, rt)
        rt.print(f"teacher {teacher.label}: {describe(teacher.model)}, "
                 f"val error {run.teacher_val_error:.2f}%")
    return run, teacher, cfg


def settle_data(cfg: TrainConfig, teacher: Optional[Teacher]) -> TrainConfig:
    """cfg with the family a student's data is made for (its teacher's) and the image size
    settled: --image_size, else a teacher checkpoint's, else the data set's or family's
    (loaders.DataSpec); recorded in the checkpoint, so a resumed run sees the same images."""
    arch = cfg.arch or (Network.of(teacher.model).arch if teacher else None)
    size = cfg.image_size or (teacher.args.get("image_size") if teacher else None)
    return cfg.replace(arch=arch, image_size=DataSpec.of(cfg.dataset, size, arch).image_size)


def teacher_error(teacher: Teacher, cfg: TrainConfig, ckpt: Optional[dict], val_loader,
                  rt: Runtime) -> float:
    """The teacher's validation error (%), computed once: a resumed student's checkpoint keeps
    it, a teacher checkpoint validated on the same images records it (its last epoch's);
    otherwise (a weights file, other images) one validation pass measures it."""
    if ckpt and ckpt.get("teacher_val_error") is not None:
        return float(ckpt["teacher_val_error"])
    if teacher.val_error is not None and same_validation(teacher.args, cfg):
        return teacher.val_error
    return validate(teacher.model, val_loader, rt)[1]


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

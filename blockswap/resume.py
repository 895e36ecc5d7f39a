"""Resuming a training run: which of its settings a resumed run takes from the checkpoint
(RUN_KEYS), whether the checkpoint is of the run this command describes (check_resume), a
finished run, a raised --epochs (extend_schedule) and the precision it ran in. Each function
takes the run's settings record (engine.TrainConfig) and returns a new one, never edits it.
"""
import math
import os
from typing import Optional

import torch

from blockswap.build import genotype_arg
from blockswap.distill import DISTILL_TERMS
from blockswap.files import load_checkpoint
from blockswap.runtime import AMP_NAMES, Runtime
from models import Network, UserError, get_family

# Arguments that define the training run: on --resume the checkpoint's values are used, so the
# continued run follows the schedule it started with.
RUN_KEYS = ("dataset", "mode", "lr", "momentum", "weight_decay", "epoch_step", "lr_decay_ratio",
            "cosine", "epochs", "batch_size", "seed", "subset_seed", "cutout", "train_subset",
            "val_subset", "alpha", "temperature", "beta", "teacher_checkpoint", "loader",
            "teacher_weights", "image_size",
            # ... and the student's distillation method with every term's hyper-parameters
            "distill", "dist_cifar", *(f for term in DISTILL_TERMS.values() for f in term.flags))
# Of those, the ones a run settles when it starts (None: the default, e.g. the family's image
# size): a resumed run takes the checkpoint's value without a word when the command gives none.
SETTLED_KEYS = ("image_size",)


def start_or_resume(cfg, path: str, rt: Runtime):
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
            if not (key in SETTLED_KEYS and getattr(cfg, key) is None):
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
        if key == "convs" and value is None:   # the family's unmodified network
            value = get_family(have["arch"]).plain
        if key == "convs" and isinstance(value, str):
            value = [value] * len(old)     # --conv X: a uniform genotype
        value = list(value) if key == "convs" else value
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
                        f"{cfg.data_loc} has {num_classes}")


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


def record_precision(cfg, rt: Runtime, ckpt: Optional[dict]):
    """cfg with the resolved precision (saved in every checkpoint): --amp auto becomes
    what it chose. A resumed run repeats the interrupted one exactly only in the same precision."""
    resolved = {"amp": AMP_NAMES[rt.amp_dtype],
                "channels_last": rt.channels_last}
    saved = ckpt.get("args", {}) if ckpt else {}
    if "amp" in saved and saved["amp"] != resolved["amp"]:
        rt.print(f"resume: the checkpoint was trained with --amp {saved['amp']}, this run uses "
                 f"--amp {resolved['amp']} (pass --amp {saved['amp']} to continue it exactly)")
    return cfg.replace(**resolved)

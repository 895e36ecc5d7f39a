"""Shared pieces of BlockSwap: parameter counting, genotype files, data, losses, CLI glue.
(Fisher potential and genotype sampling live here too; see the sections below.)"""
import argparse
import ast
import contextlib
import copy
import csv
import hashlib
import math
import os
import re
import socket
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.archs import Network

from models.blocks import UserError, count_params, get_block_type, residual_blocks


# --------------------------------------------------------------------------------------------
# CLI glue
# --------------------------------------------------------------------------------------------

def run_cli(main, parser, argv: Optional[Sequence[str]] = None):
    """Parse, run main(args); a UserError ends as one line on stderr and exit status 2."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default, also for flags without a help text (argparse's own
    formatter shows it only beside a help text), unless the text already states one."""

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        return action.help if "default" in action.help else super()._get_help_string(action)


def check_writable(folder: str, flag: str) -> None:
    """UserError naming `folder` when files cannot be written there (or in the nearest existing
    folder above it, where it would be made), so a run fails before any work, not after."""
    d = os.path.abspath(folder)
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UserError(f"{flag} {folder}: {d} is a file, not a folder")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: the folder {d} is not writable (read-only); "
                        f"pass another {flag}")


def budget_args() -> argparse.ArgumentParser:
    """--param_goal, --mac_goal and --tol as every script that samples takes them (a parent)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("budget")
    g.add_argument("--param_goal", default=None, type=int, help="parameter budget")
    g.add_argument("--mac_goal", default=None, type=int, help="MAC budget (may join params)")
    g.add_argument("--tol", default=0.025, type=float,
                   help="window half-width, a fraction between 0 and 1 (0.025: +-2.5%%)")
    return p


def get_no_params(net: nn.Module, verbose: bool = False) -> int:
    """Parameters as the original counts them (no BN running stats, no masks)."""
    total = count_params(net)
    if verbose:
        print(f"Net has {total} params in total")
    return total


def atomic_write(path: str, write) -> None:
    """Write a file through `write(f)` into a temporary file, then rename over `path`, so a
    crash never leaves a half-written file (and never truncates an existing one)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.chmod(tmp, _file_mode(path))   # mkstemp's 0600 would make every output private
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


@contextlib.contextmanager
def pid_lock(path: str, what: str):
    """Hold `path` (created exclusively, holding "<pid> <host>") while the body runs, so two
    runs never write `what` at once. The lock of a process that died on this host (killed,
    crashed) is taken over with a message; a live one is a UserError."""
    host = socket.gethostname()
    for attempt in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    pid, _, owner = f.read().strip().partition(" ")
            except FileNotFoundError:   # released meanwhile: try again
                continue
            # a torn lock (no pid) or a dead process of this host: stale
            stale = not pid.isdigit() or (owner == host and not _pid_alive(int(pid)))
            if attempt == 2 or not stale:
                where = "" if owner == host else f" on {owner}"
                raise UserError(f"another run (process {pid or '?'}{where}) is writing {what}: "
                                f"wait for it to finish, or remove {path} if it is gone") from None
            print(f"{path}: taking over the stale lock of process {pid or '?'} (not running)")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    else:
        raise UserError(f"{path}: could not take the lock for {what}; try again")
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {host}\n")
    try:
        yield path
    finally:
        os.remove(path)


def _file_mode(path: str) -> int:
    """The mode a plain open(path, "w") gives: an existing file's own, else 0666 less the umask."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0o022)   # the only way to read it is to set it; set back at once
    os.umask(umask)
    return 0o666 & ~umask


# --------------------------------------------------------------------------------------------
# Genotype files: CSV with columns (unnamed row index), index, convs, fisher, as the paper's
# repository ships them. `convs` is a Python list literal of block names; the 2019 form held
# the text of a numpy array of `<class 'models.blocks.X'>` entries.
# --------------------------------------------------------------------------------------------

_LEGACY_CLASS = re.compile(r"<class\s+'models\.blocks\.(\w+)'>")


def parse_convs(cell: str, where: str = "genotype") -> List[str]:
    """A `convs` cell -> list of block names (validated)."""
    text = cell.strip()
    if "<class" in text:
        names = _LEGACY_CLASS.findall(text)
        leftover = _LEGACY_CLASS.sub("", text).strip("[] \n\t,")
        if not names or leftover:
            raise UserError(f"{where}: cannot read the convs cell {cell!r}")
    else:
        try:
            names = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise UserError(f"{where}: cannot read the convs cell {cell!r} "
                            "(expected a list such as ['Conv', 'DConvA4', ...])") from None
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise UserError(f"{where}: the convs cell {cell!r} is not a list of block names")
        names = list(names)
    for n in names:
        try:
            get_block_type(n)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return names


def format_convs(genotype: Sequence[str]) -> str:
    """The `convs` cell of a genotype: a Python list literal, as parse_convs reads it back."""
    return repr([str(n) for n in genotype])


def load_genotype(path: str) -> List[str]:
    """The genotype (list of block names) in the first row of a genotype CSV."""
    if os.path.isdir(path):
        raise UserError(f"genotype file {path} is a directory, not a CSV file")
    if not os.path.isfile(path):
        raise UserError(f"genotype file {path} not found")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable CSV file ({e})") from None
    if not rows or "convs" not in rows[0]:
        raise UserError(f"{path}: expected a CSV with a 'convs' column and at least one row")
    return parse_convs(rows[0]["convs"] or "", where=f"{path}, row 1, column convs")


def save_genotype(path: str, genotype: Sequence[str], fisher: float = 0.0, index: int = 0,
                  rank: Optional[int] = None):
    """Write a genotype CSV in the paper repository's form (atomically); a search adds the
    candidate's `rank` (1 = best) as a last column."""
    genotype = [get_block_type(n).name for n in genotype]
    head, tail = (",rank", f",{rank}") if rank is not None else ("", "")

    def write(f):
        text = (f",index,convs,fisher{head}\n"
                + f'0,{index},"{format_convs(genotype)}",{float(fisher)!r}{tail}\n')
        f.write(text.encode())
    atomic_write(path, write)


# --------------------------------------------------------------------------------------------
# Checkpoints (main.py writes them; plots.py, fisher_rank.py and study.py read them): a dict
# with the weights ('net'), the network (arch, depth, width, num_classes, convs), the epoch,
# the optimiser state and the per-epoch record.
# --------------------------------------------------------------------------------------------

def arch_info(model: nn.Module) -> dict:
    """What rebuilds `model` (models.archs.Network and its convs), as plain values."""
    net = Network.of(model)
    return {"arch": net.arch, "depth": net.depth, "width": net.width,
            "num_classes": net.num_classes, "convs": list(model.genotype)}


def model_from_checkpoint(ckpt: dict, path: str) -> nn.Module:
    """Rebuild the network a checkpoint describes and load its weights."""
    try:
        net = Network(ckpt.get("arch", "wrn"), ckpt.get("depth"), ckpt.get("width"),
                      ckpt["num_classes"])
        model = net.build(ckpt["convs"])
    except UserError as e:
        hint = f" (it was trained with --module {ckpt['module']})" if ckpt.get("module") else ""
        raise UserError(f"{path}: {e}{hint}") from None
    try:
        model.load_state_dict(ckpt["net"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit its recorded architecture "
                        f"({str(e).splitlines()[0]})") from None
    return model


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by save_checkpoint; UserError if missing, corrupt or foreign.
    weights_only=True: a checkpoint is a pickle and loading must never run code from it."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holds arbitrary Python objects
        raise UserError(f"{path} is not a readable checkpoint (not a checkpoint written by "
                        f"main.py: {type(e).__name__})") from None
    missing = [k for k in ("net", "epoch", "convs", "num_classes") if k not in ckpt] \
        if isinstance(ckpt, dict) else ["net"]
    if missing:
        raise UserError(f"{path} is not a checkpoint of this code (no {', '.join(missing)})")
    return ckpt


def save_checkpoint(path: str, state: dict) -> None:
    """Temporary file then rename: a kill during the save leaves the previous checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


# --------------------------------------------------------------------------------------------
# Data. CIFAR-10/100 in torchvision's folders (cifar-10-batches-py/, ...) or any ImageFolder
# tree (train/<class>/*.jpg with test/ or val/), detected from what is on disk.
# --------------------------------------------------------------------------------------------

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


class Cutout:
    """Zero one random `size` x `size` square of a CHW tensor (DeVries & Taylor, 2017)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        y, x = torch.randint(h, ()).item(), torch.randint(w, ()).item()
        y0, y1 = max(0, y - self.size // 2), min(h, y + self.size // 2)
        x0, x1 = max(0, x - self.size // 2), min(w, x + self.size // 2)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0
        return img


def get_transforms(dataset: str, train: bool, cutout: int = 0):
    import torchvision.transforms as T
    if dataset == "imagenet":
        mean, std = IMAGENET_STATS
        if train:
            steps = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
        else:
            steps = [T.Resize(256), T.CenterCrop(224)]
    else:
        mean, std = CIFAR_STATS.get(dataset, CIFAR_STATS["cifar10"])
        steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if train and cutout > 0:
        steps.append(Cutout(cutout))
    return T.Compose(steps)


def _imagefolder_split(root: str, names) -> Optional[str]:
    for n in names:
        d = os.path.join(root, n)
        if os.path.isdir(d) and any(os.scandir(d)):
            return d
    return None


def get_datasets(dataset: str, data_loc: str, download: bool = False, cutout: int = 0):
    """(train_set, val_set, num_classes) for cifar10/cifar100/imagenet at `data_loc`."""
    import torchvision.datasets as D
    t_train, t_val = get_transforms(dataset, True, cutout), get_transforms(dataset, False)
    train_dir = _imagefolder_split(data_loc, ["train"])
    val_dir = _imagefolder_split(data_loc, ["val", "test"])
    if train_dir and val_dir:
        train_set = D.ImageFolder(train_dir, t_train)
        val_set = D.ImageFolder(val_dir, t_val)
        if train_set.classes != val_set.classes:
            raise UserError(f"{data_loc}: train/ and {os.path.basename(val_dir)}/ hold "
                            "different class folders")
        return train_set, val_set, len(train_set.classes)
    if dataset == "imagenet":
        raise UserError(f"ImageNet not found at {data_loc}: expected train/<class>/ and "
                        "val/<class>/ image folders")
    cls = {"cifar10": D.CIFAR10, "cifar100": D.CIFAR100}[dataset]
    created = _first_missing(data_loc)   # what a failed download must not leave behind
    try:
        train_set = cls(data_loc, train=True, download=download, transform=t_train)
        val_set = cls(data_loc, train=False, download=download, transform=t_val)
    except OSError as e:   # URLError, a refused connection, a full disk: nothing half-made kept
        if not download:
            raise
        raise _download_failed(dataset, data_loc, created, e) from None
    except RuntimeError as e:
        raise UserError(f"{dataset} not found at {data_loc} ({e}); expected torchvision's "
                        f"{cls.base_folder}/ or an image folder train/<class>/ with test/ or "
                        "val/; pass --download to fetch it") from None
    return train_set, val_set, NUM_CLASSES[dataset]


def dataset_identity(ds) -> dict:
    """What identifies a data set for a resumed run: its size and a sha256 of its file list
    (an image folder: paths relative to its root, with labels) or of its pixels and labels
    (torchvision CIFAR). A moved or copied folder matches; another folder does not."""
    h = hashlib.sha256()
    if hasattr(ds, "samples") and hasattr(ds, "root"):          # ImageFolder
        for path, label in ds.samples:
            rel = os.path.relpath(path, ds.root).replace(os.sep, "/")
            h.update(f"{rel}\t{label}\n".encode())
    elif hasattr(ds, "data") and hasattr(ds, "targets"):          # torchvision CIFAR
        h.update(np.ascontiguousarray(ds.data).tobytes())
        h.update(np.asarray(ds.targets, np.int64).tobytes())
    else:
        raise TypeError(f"dataset_identity: cannot identify a {type(ds).__name__}")
    return {"images": len(ds), "sha256": h.hexdigest()}


def subset_indices(size: int, n: Optional[int], seed: int = 0) -> Optional[List[int]]:
    """The indices of subset(): the first n of a seeded permutation (None: all items)."""
    if not n or n >= size:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=g)[:n].tolist()


def _first_missing(path: str) -> Optional[str]:
    """The topmost folder of `path` that does not exist yet (None if `path` exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def _download_failed(dataset: str, data_loc: str, created: Optional[str],
                     e: OSError) -> UserError:
    """The error for a failed --download; removes the folders the attempt created."""
    if created:
        shutil.rmtree(created, ignore_errors=True)
    reason = str(getattr(e, "reason", "") or e).strip().splitlines()
    return UserError(f"could not download {dataset} into {data_loc} "
                     f"({reason[0] if reason else type(e).__name__}): check the network, or "
                     "fetch it elsewhere and pass its folder as --data_loc")


def subset(ds, n: Optional[int], seed: int = 0):
    """A fixed random subset of n items (all when n is None or >= len)."""
    idx = subset_indices(len(ds), n, seed)
    return ds if idx is None else torch.utils.data.Subset(ds, idx)


# --------------------------------------------------------------------------------------------
# Losses for students: attention transfer and knowledge distillation, as the original.
# --------------------------------------------------------------------------------------------

def at(x: torch.Tensor) -> torch.Tensor:
    """Attention map: (n, c, h, w) -> (n, h*w), the channel mean of x^2, L2-normalised."""
    return F.normalize(x.pow(2).mean(1).flatten(1))


def at_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (at(x) - at(y)).pow(2).mean()


def distillation(y, teacher_scores, labels, T: float, alpha: float) -> torch.Tensor:
    """Hinton KD: alpha * 2T^2 * KL(teacher || student at T) + (1 - alpha) * CE."""
    kd = F.kl_div(F.log_softmax(y / T, dim=1), F.softmax(teacher_scores / T, dim=1),
                  reduction="batchmean")
    return kd * (T * T * 2.0 * alpha) + F.cross_entropy(y, labels) * (1.0 - alpha)


def dkd_loss(student_logits, teacher_logits, targets, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022) without its cross-entropy and warm-up:
    alpha * TCKD + beta * NCKD, each a KL(teacher || student) at temperature T, times T^2,
    averaged over the batch. TCKD compares the binary (target, all other classes) split of the
    softened probabilities; NCKD the distribution over the non-target classes only."""
    T = temperature
    n, c = student_logits.shape
    is_target = F.one_hot(targets, c).bool()
    # binary split in log space (stable where the rest has almost no mass): (n, 2)
    def split(z):
        log_p = F.log_softmax(z / T, dim=1)
        return torch.stack([log_p[is_target], log_p.masked_fill(is_target, -math.inf)
                            .logsumexp(1)], 1)
    tckd = F.kl_div(split(student_logits), split(teacher_logits), reduction="batchmean",
                    log_target=True)
    # the non-target classes, target column removed: (n, c - 1)
    others_s, others_t = (z[~is_target].view(n, c - 1) / T
                          for z in (student_logits, teacher_logits))
    nckd = F.kl_div(F.log_softmax(others_s, 1), F.log_softmax(others_t, 1),
                    reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * (T * T)


def _row_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b: (n, k) -> (n,)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits, teacher_logits, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): with p = softmax(z / T) per sample, inter = 1 - mean
    Pearson correlation of student and teacher rows (each sample's class scores), intra = the
    same over columns (each class's scores across the batch); T^2 * (beta*inter + gamma*intra)."""
    T = temperature
    p_s, p_t = F.softmax(student_logits / T, 1), F.softmax(teacher_logits / T, 1)
    inter = 1 - _row_pearson(p_s, p_t).mean()
    intra = 1 - _row_pearson(p_s.t(), p_t.t()).mean()
    return (beta * inter + gamma * intra) * (T * T)


# Distillation terms for `main.py student --distill a+b`: the loss is cross-entropy plus the
# sum of the named terms. A term is fn(student, teacher, targets, hp, epoch) -> scalar, where
# student/teacher are a network's (logits, group activations), hp holds the run's flags (an
# argparse namespace) and epoch counts from 1. `flags` are the term's own hyper-parameters,
# {name: (type, default, help)}: main.py adds them as --name and saves them with the run.

@dataclass(frozen=True)
class DistillTerm:
    fn: Callable
    flags: Dict[str, tuple] = field(default_factory=dict)
    about: str = ""


def _at_term(s, t, targets, hp, epoch):
    # beta' = beta * 3 / pairs: the original's weighting, tuned for the three WRN groups.
    # fp32: x^2 can overflow fp16.
    losses = [at_loss(a.float(), b.float()) for a, b in zip(s[1], t[1])]
    return hp.beta * 3 / len(losses) * sum(losses)


def _kd_term(s, t, targets, hp, epoch):
    # Hinton KD takes the share alpha of the cross-entropy: CE + this = distillation().
    T, ce = hp.temperature, F.cross_entropy(s[0], targets)
    kl = F.kl_div(F.log_softmax(s[0] / T, 1), F.softmax(t[0] / T, 1), reduction="batchmean")
    return hp.alpha * (2 * T * T * kl - ce)


def _dkd_term(s, t, targets, hp, epoch):
    # linear warm-up over the first dkd_warmup epochs, as mdistiller (epochs count from 1)
    ramp = min(epoch / hp.dkd_warmup, 1.0) if hp.dkd_warmup > 0 else 1.0
    return ramp * dkd_loss(s[0], t[0], targets, hp.dkd_alpha, hp.dkd_beta, hp.dkd_temperature)


def _dist_term(s, t, targets, hp, epoch):
    return dist_loss(s[0], t[0], hp.dist_beta, hp.dist_gamma, hp.dist_temperature)


DISTILL_TERMS: Dict[str, DistillTerm] = {
    "at": DistillTerm(_at_term, about="attention transfer (--beta)"),
    "kd": DistillTerm(_kd_term, about="Hinton KD (--alpha, --temperature)"),
    "dkd": DistillTerm(_dkd_term, {
        "dkd_alpha": (float, 1.0, "DKD: weight of TCKD"),
        "dkd_beta": (float, 6.0, "DKD: weight of NCKD (6: mdistiller's WRN-40-2 teacher configs; "
                                 "the paper's general CIFAR value is 8)"),
        "dkd_temperature": (float, 4.0, "DKD: temperature"),
        "dkd_warmup": (int, 20, "DKD: epochs of linear warm-up of its weight (0: none)")},
        "decoupled KD"),
    "dist": DistillTerm(_dist_term, {
        "dist_beta": (float, 1.0, "DIST: weight of the inter-class (per sample) relation"),
        "dist_gamma": (float, 1.0, "DIST: weight of the intra-class (per class) relation"),
        "dist_temperature": (float, 1.0, "DIST: temperature")},
        "DIST, Pearson-correlation KD"),
}

# DIST's CIFAR-100 recipe (hunto/image_classification_sota configs/strategies/distill/
# dist_cifar.yaml, used by hunto/DIST_KD): DIST(beta=1, gamma=1, tau=4) with loss weight 2 beside
# cross-entropy weight 1, i.e. beta = gamma = 2, T = 4. main.py's --dist_cifar selects it.
DIST_CIFAR = {"dist_beta": 2.0, "dist_gamma": 2.0, "dist_temperature": 4.0}


def parse_distill(spec: str) -> List[str]:
    """'at+dkd' -> ['at', 'dkd']; UserError for an unknown or repeated name."""
    names = spec.split("+")
    for name in names:
        if name not in DISTILL_TERMS:
            raise UserError(f"--distill {spec}: unknown method {name!r}; choose from "
                            f"{', '.join(DISTILL_TERMS)} or a sum such as at+dkd")
    if len(set(names)) < len(names):
        raise UserError(f"--distill {spec} names a method twice")
    return names


def distill_loss(names: Sequence[str], student, teacher, targets, hp, epoch: int = 1):
    """Cross-entropy + the sum of the named DISTILL_TERMS. student/teacher: (logits, acts)."""
    s, t = (student[0].float(), student[1]), (teacher[0].float(), teacher[1])
    loss = F.cross_entropy(s[0], targets)
    for name in names:
        loss = loss + DISTILL_TERMS[name].fn(s, t, targets, hp, epoch)
    return loss


# --------------------------------------------------------------------------------------------
# Fisher potential (Theis et al. 2018, as BlockSwap). For residual block b with branch output
# a (n, c, h, w) -- after the branch's last conv, before the shortcut is added -- and
# g = dL/da for the MEAN cross-entropy of one training minibatch:
#     Delta_c = 0.5 * mean_n (sum_hw a[n,c,h,w] * g[n,c,h,w])^2,   block value = sum_c Delta_c.
# Cost floor: one forward plus the gradients with respect to activations. Parameters are frozen
# for the call, so autograd records nothing before the first branch output and computes no
# weight gradient; torch.autograd.grad hands back dL/da without touching any `.grad`.
# --------------------------------------------------------------------------------------------

def logits_of(output) -> torch.Tensor:
    """Our networks return (logits, activations); plain modules return logits."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def scoring_mode(net: nn.Module, freeze: bool = False):
    """How every score at initialisation sees a network (Fisher potential and the proxies):
    train mode with batch statistics, parameters frozen if `freeze`; all restored afterwards.

    BatchNorm in train mode with track_running_stats=False normalises by the batch (as a
    training step does) but leaves running_mean/var and num_batches_tracked untouched, so the
    network leaves exactly as it came."""
    was_training = net.training
    flags = [(p, p.requires_grad) for p in net.parameters()] if freeze else []
    bns = [m for m in net.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    net.train()
    for p, _ in flags:
        p.requires_grad_(False)
    for m in bns:
        m.track_running_stats = False
    try:
        yield net
    finally:
        for m in bns:
            m.track_running_stats = True
        for p, flag in flags:
            p.requires_grad_(flag)
        net.train(was_training)


def fisher_scores(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fisher value of every residual block (genotype order), shape (n_blocks,), at the current
    weights; the network's weights, buffers, mode and requires_grad flags are left unchanged."""
    blocks = residual_blocks(net)
    if not blocks:
        raise UserError("fisher_scores: the network has no residual blocks to score")
    acts: List[torch.Tensor] = []

    def keep(module, inp, out):
        if not out.requires_grad:   # the first branch: nothing upstream needs a gradient
            out = out.detach().requires_grad_()
        acts.append(out)
        return out

    handles = [b.branch_end.register_forward_hook(keep) for b in blocks]
    try:
        with scoring_mode(net, freeze=True), torch.enable_grad():
            logits = logits_of(net(inputs))
            if len(acts) != len(blocks):
                raise UserError(f"fisher_scores: {len(blocks)} residual blocks but "
                                f"{len(acts)} branch outputs seen in one forward")
            grads = torch.autograd.grad(F.cross_entropy(logits, targets), acts)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        # (n, c, h, w) -> (n, c) -> (c,) -> scalar per block
        return torch.stack([0.5 * (a * g).sum((2, 3)).pow(2).mean(0).sum()
                            for a, g in zip(acts, grads)])


def _minibatches(data, n_steps: int):
    """n_steps (inputs, targets) pairs: one pair given is used every step; an iterable (a
    DataLoader) is restarted when it runs out, as the original did."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        for _ in range(n_steps):
            yield data[0], data[1]
        return
    it = iter(data)
    for _ in range(n_steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(data)
            batch = next(it)
        yield batch[0], batch[1]


def one_shot_fisher(net: nn.Module, data, n_steps: int = 1):
    """(params, {block_index: Fisher value summed over n_steps minibatches}), as the original,
    but without the original's SGD step: the weights are never updated."""
    params = get_no_params(net)
    device = next(net.parameters()).device
    total = None
    for inputs, targets in _minibatches(data, n_steps):
        s = fisher_scores(net, inputs.to(device), targets.to(device))
        total = s if total is None else total + s
    return params, {i: float(v) for i, v in enumerate(total)}


# --------------------------------------------------------------------------------------------
# Sampling genotypes uniformly within a budget window. Rejection cannot reach most budgets
# (about 1 uniform WRN-40-2 genotype in 10^6 lands within +-2.5% of 1.6M params), so the
# sampler counts, for every position i and partial cost s of positions < i, how many ways the
# remaining positions complete a genotype inside the window (dynamic programming backwards
# over positions), then draws position by position with probability proportional to those
# counts: exactly uniform over the window.
#
# Counts: float64. They reach 24^18 ~ 7e24 > 2^63, and every count is a sum of non-negative
# terms (never a difference), so the relative error stays below ~1e-15 and a count is 0.0
# exactly when no completion exists: feasibility is exact, uniformity exact to 1e-15.
# Size: costs are shifted by each position's cheapest type and divided by the gcd of all
# shifts (WRN-40-2: 8 params, 2048 MACs), so each array is at most ~270K entries.
# With both a parameter and a MAC goal, the DP runs on the rarer window and draws are kept
# when they also meet the other: still exactly uniform over the intersection.
# --------------------------------------------------------------------------------------------

def budget_window(goal: float, tol: float = 0.025):
    """Integer costs accepted for `goal`: [ceil(goal(1-tol)), floor(goal(1+tol))]."""
    return math.ceil(goal * (1 - tol) - 1e-9), math.floor(goal * (1 + tol) + 1e-9)


class WindowCounts:
    """Completion counts for one cost (params or MACs) and one window [lo, hi].

    costs[i, t] is the cost of type t at position i; total = base + sum_i costs[i, t_i].
    `total` is the number of genotypes in the window (float64)."""

    def __init__(self, costs: np.ndarray, base: int, lo: int, hi: int):
        costs = np.asarray(costs, dtype=np.int64)
        self.min_total = int(base + costs.min(1).sum())
        self.max_total = int(base + costs.max(1).sum())
        shift = costs - costs.min(1, keepdims=True)
        g = int(np.gcd.reduce(shift.ravel())) or 1
        self.d = shift // g                                     # (P, T), >= 0, small ints
        P = len(self.d)
        L = -((self.min_total - lo) // g)                       # ceil((lo - min_total) / g)
        H = (hi - self.min_total) // g                          # floor(...)
        maxd = self.d.max(1)
        max_pre = np.concatenate([[0], np.cumsum(maxd)])        # largest partial sum before i
        max_suf = np.concatenate([np.cumsum(maxd[::-1])[::-1], [0]])
        # Partial sums s of positions < i that can still land in [L, H]: [off[i], top[i]].
        self.off = [max(0, L - int(max_suf[i])) for i in range(P + 1)]
        top = [min(int(max_pre[i]), H) for i in range(P + 1)]
        self.F = [None] * (P + 1)
        self.F[P] = np.ones(max(0, top[P] - self.off[P] + 1))
        for i in range(P - 1, -1, -1):
            self.F[i] = self._fold(i, max(0, top[i] - self.off[i] + 1))
        self.total = float(self.F[0][0]) if len(self.F[0]) and self.off[0] == 0 else 0.0

    def _fold(self, i: int, length: int) -> np.ndarray:
        """F_i[s] = sum over types t of F_{i+1}[s + d[i, t]]."""
        out, nxt, o = np.zeros(length), self.F[i + 1], self.off[i + 1]
        for dt in self.d[i]:
            start = self.off[i] + int(dt) - o       # index into nxt of out[0]
            a, b = max(0, -start), min(length, len(nxt) - start)
            if a < b:
                out[a:b] += nxt[start + a:start + b]
        return out

    def draw(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """k independent uniform genotypes in the window, as an int array (k, P)."""
        P, T = self.d.shape
        s = np.zeros(k, np.int64)
        codes = np.empty((k, P), np.int64)
        for i in range(P):
            nxt = self.F[i + 1]
            j = s[:, None] + self.d[i][None, :] - self.off[i + 1]        # (k, T)
            ok = (j >= 0) & (j < len(nxt))
            w = np.where(ok, nxt[np.clip(j, 0, len(nxt) - 1)], 0.0)     # completions per t
            cum = w.cumsum(1)
            u = rng.random(k) * cum[:, -1]
            last = T - 1 - (w[:, ::-1] > 0).argmax(1)   # guards u rounding up to the total
            t = np.minimum((cum <= u[:, None]).sum(1), last)                # first cum > u
            codes[:, i] = t
            s += self.d[i][t]
        return codes


def _feasible_range_error(what: str, goal, tol, counts: WindowCounts) -> UserError:
    lo, hi = counts.min_total / (1 + tol), counts.max_total / (1 - tol)
    return UserError(f"no genotype has {what} within +-{tol:.1%} of {goal:,}: this network's "
                     f"genotypes range from {counts.min_total:,} to {counts.max_total:,} "
                     f"{what}, so the goal must lie between {math.ceil(lo):,} and "
                     f"{math.floor(hi):,}")


@dataclass(frozen=True)
class Budget:
    """The windows a genotype must meet: each given goal +-tol. `latency` is a
    latency.QuantisedLatency (integer costs and its own goal) for a latency goal. No goal: any
    genotype."""
    param_goal: Optional[int] = None
    mac_goal: Optional[int] = None
    tol: float = 0.025
    latency: object = None

    @classmethod
    def from_args(cls, args, latency=None) -> "Budget":
        """--param_goal, --mac_goal and --tol (budget_args), with a quantised latency goal."""
        return cls(args.param_goal, args.mac_goal, args.tol, latency)


def count_genotypes(table, budget: Budget = Budget()) -> float:
    """How many genotypes of `table` lie in the window of one goal (float64; exact below 2^53).
    With several goals this is the smallest of the single-window counts (an upper bound)."""
    counters = _window_counters(table, budget)
    if not counters:
        return float(len(table.names)) ** table.n_positions
    return min(c.total for c, _, _ in counters)


def _window_counters(table, budget: Budget):
    tol = budget.tol
    out = _latency_counter(budget.latency, tol)
    for what, goal, costs, base in (("params", budget.param_goal, table.params, table.base_params),
                                    ("MACs", budget.mac_goal, table.macs, table.base_macs)):
        if goal is None:
            continue
        lo, hi = budget_window(goal, tol)
        counts = WindowCounts(costs, base, lo, hi)
        if counts.total == 0:
            raise _feasible_range_error(what, goal, tol, counts)
        out.append((counts, costs, (base, lo, hi)))
    return out


def _latency_counter(latency, tol):
    """[] or the latency window's counter: its costs are already integers (quantised)."""
    if latency is None:
        return []
    lo, hi = latency.window(tol)
    counts = WindowCounts(latency.units, latency.base, lo, hi)
    if counts.total == 0:
        raise latency.infeasible(tol)
    return [(counts, latency.units, (latency.base, lo, hi))]


SAMPLE_CHUNK, MAX_DRAWS = 2048, 10_000_000   # draws per step; draws before giving up


def sample_codes(table, n: int, budget: Budget = Budget(), seed: int = 0,
                 distinct: bool = True, progress=None) -> np.ndarray:
    """(n, positions) type indices into table.names, uniform over the genotypes within the
    budget's windows (over all genotypes when it has no goal).

    Draws come in fixed-size chunks from one generator, so the first m of n samples are the
    samples of n=m: a larger --samples extends a search. `progress(k)` is told of k new ones."""
    rng = np.random.default_rng(seed)
    P, T = table.params.shape
    counters = sorted(_window_counters(table, budget), key=lambda c: c[0].total)
    chunk, max_draws = SAMPLE_CHUNK, MAX_DRAWS
    if distinct and len(counters) == 1 and counters[0][0].total < n:
        raise UserError(f"only {int(counters[0][0].total)} distinct genotypes meet this budget; "
                        f"ask for at most that many samples (--samples) or widen the window")
    kept, seen, draws = [], set(), 0
    while len(kept) < n:
        if draws >= max_draws:
            raise UserError(f"only {len(kept)} of {n} samples found meeting every goal "
                            f"(params, MACs, latency) after {draws:,} draws: the two windows barely "
                            "overlap; loosen one of the goals")
        codes = counters[0][0].draw(rng, chunk) if counters else rng.integers(0, T, (chunk, P))
        draws += chunk
        pos = np.arange(P)
        for _, costs, (base, lo, hi) in counters[1:]:
            total = base + costs[pos, codes].sum(1)
            codes = codes[(total >= lo) & (total <= hi)]
        before = len(kept)
        for row in codes:
            key = row.tobytes()
            if distinct and key in seen:
                continue
            seen.add(key)
            kept.append(row)
            if len(kept) == n:
                break
        if progress is not None and len(kept) > before:
            progress(len(kept) - before)
    return np.array(kept, np.int64).reshape(n, P)


def sample_genotypes(table, n: int, budget: Budget = Budget(), seed: int = 0,
                     distinct: bool = True, progress=None) -> List[List[str]]:
    """n genotypes (lists of block names), uniform within the budget window(s); see
    sample_codes. An infeasible budget raises UserError stating the feasible range."""
    codes = sample_codes(table, n, budget, seed, distinct, progress)
    return [[table.names[t] for t in row] for row in codes]

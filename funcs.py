"""Shared pieces of BlockSwap: parameter counting, genotype files, data, losses, CLI glue.
(Fisher potential and genotype sampling live here too; see the sections below.)"""
import ast
import csv
import os
import re
import sys
import tempfile
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from count_ops import count_params
from models.blocks import UserError, get_block_type


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
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


def load_genotype(path: str) -> List[str]:
    """The genotype (list of block names) in the first row of a genotype CSV."""
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


def save_genotype(path: str, genotype: Sequence[str], fisher: float = 0.0, index: int = 0):
    """Write a genotype CSV in the paper repository's form (atomically)."""
    genotype = [get_block_type(n).name for n in genotype]

    def write(f):
        text = ",index,convs,fisher\n" + f'0,{index},"{genotype!r}",{float(fisher)!r}\n'
        f.write(text.encode())
    atomic_write(path, write)


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
    try:
        train_set = cls(data_loc, train=True, download=download, transform=t_train)
        val_set = cls(data_loc, train=False, download=download, transform=t_val)
    except RuntimeError as e:
        raise UserError(f"{dataset} not found at {data_loc} ({e}); expected torchvision's "
                        f"{cls.base_folder}/ or an image folder train/<class>/ with test/ or "
                        "val/; pass --download to fetch it") from None
    return train_set, val_set, NUM_CLASSES[dataset]


def subset(ds, n: Optional[int], seed: int = 0):
    """A fixed random subset of n items (all when n is None or >= len)."""
    if not n or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=g)[:n].tolist())


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

"""The data sets (cifar10, cifar100, imagenet, and `folder`: any image folder) and the two ways
to feed them. What a network is fed is a DataSpec: the data set, the side of its square images
and its recipe (RECIPES): "cifar" (a random crop with 4-pixel zero padding and a flip) or
"imagenet" (RandomResizedCrop and a flip; for evaluation a resize to 256/224 of the side and a
centre crop), each followed by ToTensor + Normalize and optionally Cutout. `folder` takes its
class count from its class folders and its recipe and side from the network family (ImageNet's
for the 224-pixel families, CIFAR's for WRN), normalised with ImageNet's statistics.

The tensor data path: a data set whose decoded images fit in memory (TENSOR_MAX_BYTES) is
decoded once into a uint8 tensor (N, 3, H, W), cached on disk, moved to the training device once
and augmented there, a batch at a time (Augment, ResizedCrop: the recipes' steps on the device;
a folder's images are resized when decoded, see DataSpec.decode_side). The random draws of image
i in epoch e are row i of a table drawn per epoch from a generator seeded by (seed, epoch) alone,
on the CPU: they do not depend on the batch, the process, the device or the point a run was
resumed from. Other data keeps the PIL loader (torchvision transforms in DataLoader workers):
see choose_loader for the rule, and --loader to force either.
"""
import argparse
import hashlib
import math
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from blockswap.cli import at_least
from blockswap.packs import unpacked
from blockswap.tensor_data import (CROP, PADDING, Augment, ResizedCrop, TensorLoader,
                                   bad_image, default_cache_dir, item_seed, read_image,
                                   tensor_images)
from blockswap.tensor_data import TensorImages, augmented_batches  # noqa: F401 (search, study)
from models.archs import default_arch, get_family
from models.blocks import UserError
from blockswap.runtime import Runtime

# --loader auto decodes into memory when the decoded uint8 images take at most this much (train
# and validation splits together). CIFAR-10 takes 180 MB; ImageNet never qualifies (PIL).
TENSOR_MAX_BYTES = 4 * 2 ** 30



DATASETS = ("cifar10", "cifar100", "imagenet", "folder")
# The data flags' defaults, stated once (data_args and the settings records read them).
WORKERS = 2        # processes that decode images (per GPU)
LOADER = "auto"    # tensor for CIFAR-scale data, else pil (choose_loader)
BATCH_SIZE = 128   # images per batch: the seed's training batch and Fisher minibatch
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)),
}


IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}   # folder: its class folders
STATS = {**CIFAR_STATS, "imagenet": IMAGENET_STATS, "folder": IMAGENET_STATS}
# The named data sets' recipe and image side; `folder` takes both from the network family.
DATASET_RECIPES = {"cifar10": ("cifar", 32), "cifar100": ("cifar", 32),
                   "imagenet": ("imagenet", 224)}
IMAGENET_SIDE = 224        # families whose input is this large train on a folder as on ImageNet
RESIZE_RATIO = 256 / 224   # ImageNet's evaluation: resize to 256, centre crop 224


@dataclass(frozen=True)
class DataSpec:
    """What a network is fed: a data set's images as `image_size`-pixel squares made by
    `recipe` (a key of RECIPES) and normalised with STATS[dataset]."""
    dataset: str
    image_size: int = CROP
    recipe: str = "cifar"

    @classmethod
    def of(cls, dataset: str, image_size: Optional[int] = None,
           arch: Optional[str] = None) -> "DataSpec":
        """The spec of `dataset` at --image_size (None: the data set's, for `folder` the
        family's); `arch` (None: the data set's default family) picks a folder's recipe."""
        if dataset in DATASET_RECIPES:
            recipe, side = DATASET_RECIPES[dataset]
            if recipe == "cifar" and image_size not in (None, side):
                raise UserError(f"--image_size {image_size}: {dataset}'s images are {side} "
                                "pixels; resize them into an image folder and use the folder "
                                "data set for another size")
        else:
            side = get_family(arch or default_arch(dataset)).image_size
            recipe = "imagenet" if side >= IMAGENET_SIDE else "cifar"
        return cls(dataset, image_size or side, recipe)

    @property
    def stats(self):
        return STATS[self.dataset]

    @property
    def resize_side(self) -> int:
        """The side an image is resized to before its centre crop: 256 for 224 (ImageNet's
        evaluation), the image size itself for the CIFAR recipe."""
        return round(self.image_size * RESIZE_RATIO) if self.recipe == "imagenet" \
            else self.image_size

    @property
    def decode_side(self) -> Optional[int]:
        """The side of the centre square an image is resized and cropped to when decoded for
        the tensor path; None for CIFAR itself (decoded as it is, 32x32)."""
        return None if self.dataset in CIFAR_STATS else self.resize_side

    def transforms(self, train: bool, cutout: int = 0):
        """The PIL path's torchvision transform of a split."""
        import torchvision.transforms as T
        mean, std = self.stats
        steps = RECIPES[self.recipe].steps(self, train)
        steps += [T.ToTensor(), T.Normalize(mean, std)]
        if train and cutout > 0:
            steps.append(Cutout(cutout))
        return T.Compose(steps)

    def augment(self, cutout: int = 0, train: bool = True) -> "Augment":
        """The tensor path's augmentation of a split (on images decoded at decode_side)."""
        mean, std = self.stats
        return RECIPES[self.recipe].augment(mean, std, cutout, train, self.image_size)

    def describe(self) -> str:
        return f"{self.image_size} px, {self.recipe} recipe"


def data_args(datasets: Sequence[str] = DATASETS) -> argparse.ArgumentParser:
    """The data flags of main.py, fisher_rank.py and study.py (an argparse parent): the
    dataset, --data_loc, --download, --workers, --loader and --cache_dir."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("dataset", choices=list(datasets),
                   help="cifar10/cifar100 (torchvision folders or any ImageFolder tree), "
                        "imagenet (train/ and val/ folders) or folder (your own images: "
                        "train/<class>/ with val/ or test/; classes read from the folders)")
    g = p.add_argument_group("data")
    g.add_argument("--data_loc", default=None,
                   help="data folder: a torchvision CIFAR folder or an image folder with "
                        "train/ and test/ or val/")
    g.add_argument("--download", action="store_true", help="download CIFAR into --data_loc")
    g.add_argument("--image_size", default=None, type=at_least(8),
                   help="side of the square images the network sees (default: the data set's; "
                        "folder: the family's, 224 for the torchvision families, 32 for WRN)")
    g.add_argument("--workers", default=WORKERS, type=at_least(0),
                   help="processes that decode images (per GPU)")
    add_loader_args(g)
    return p


def add_loader_args(p) -> None:
    """--loader and --cache_dir (part of data_args)."""
    p.add_argument("--loader", default=LOADER, choices=["auto", "tensor", "pil"],
                   help="tensor: decode once into memory and augment on the device; pil: decode "
                        "and augment every epoch in --workers processes; auto: tensor for "
                        f"CIFAR-scale data (<= {TENSOR_MAX_BYTES // 2 ** 30} GiB decoded), "
                        "else pil")
    p.add_argument("--cache_dir", default=None,
                   help="where decoded data sets are cached (default: $XDG_CACHE_HOME/blockswap "
                        "or ~/.cache/blockswap); never the data folder")


# --------------------------------------------------------------------------------------------
# Which loader.
# --------------------------------------------------------------------------------------------

def image_size(dataset):
    """(H, W) of the first image of a torchvision CIFAR set or an ImageFolder, without decoding
    the rest."""
    if isinstance(getattr(dataset, "data", None), np.ndarray):   # torchvision CIFAR: decoded
        return dataset.data.shape[1:3]
    from PIL import Image
    path = dataset.samples[0][0]
    try:
        with Image.open(path) as im:   # reads the header only
            return im.size[::-1]
    except (OSError, SyntaxError, ValueError) as e:
        raise bad_image(path, e) from None


def choose_loader(requested: str, dataset_name: str, splits: Sequence,
                  spec: Optional[DataSpec] = None) -> str:
    """'tensor' or 'pil'. auto: tensor for data whose decoded uint8 images fit in
    TENSOR_MAX_BYTES (all taken as the size of the first, or as spec.decode_side squares);
    ImageNet always pil."""
    if dataset_name == "imagenet":
        if requested == "tensor":
            raise UserError("--loader tensor decodes the whole data set into memory; "
                            "ImageNet needs --loader pil (or auto)")
        return "pil"
    if requested != "auto":
        return requested
    return "tensor" if decoded_bytes(splits, spec) <= TENSOR_MAX_BYTES else "pil"


def decoded_bytes(splits: Sequence, spec: Optional[DataSpec] = None) -> int:
    """What the splits take decoded as uint8 tensors (see choose_loader)."""
    side = spec.decode_side if spec else None
    return sum(len(s) * 3 * (side * side if side else math.prod(image_size(s)))
               for s in splits if len(s))


# --------------------------------------------------------------------------------------------
# The PIL path: torchvision data sets and transforms, decoded and augmented in DataLoader
# workers. CIFAR-10/100 in torchvision's folders or any ImageFolder tree (train/<class>/*.jpg
# with test/ or val/), detected from what is on disk.
# --------------------------------------------------------------------------------------------

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


def _cifar_steps(spec: DataSpec, train: bool) -> list:
    """RandomCrop(size, padding=4) and a flip (train); a folder's images are first resized
    and centre-cropped to size (CIFAR's own are 32x32 already)."""
    import torchvision.transforms as T
    s = spec.image_size
    steps = [T.Resize(s), T.CenterCrop(s)] if spec.decode_side else []
    return steps + ([T.RandomCrop(s, padding=PADDING), T.RandomHorizontalFlip()] if train
                    else [])


def _imagenet_steps(spec: DataSpec, train: bool) -> list:
    """RandomResizedCrop(size) and a flip (train); Resize(256/224 size) + CenterCrop(size)."""
    import torchvision.transforms as T
    s = spec.image_size
    return [T.RandomResizedCrop(s), T.RandomHorizontalFlip()] if train else \
        [T.Resize(spec.resize_side), T.CenterCrop(s)]


@dataclass(frozen=True)
class Recipe:
    """How images are resized and augmented: the PIL path's torchvision steps before
    ToTensor, and the tensor path's augmentation class (mean, std, cutout, train, size)."""
    steps: Callable[[DataSpec, bool], list]
    augment: Callable[..., Augment]


RECIPES: Dict[str, Recipe] = {"cifar": Recipe(_cifar_steps, Augment),
                              "imagenet": Recipe(_imagenet_steps, ResizedCrop)}


def _imagefolder_split(root: str, names) -> Optional[str]:
    for n in names:
        d = os.path.join(root, n)
        if os.path.isdir(d) and any(os.scandir(d)):
            return d
    return None


def image_folder(root: str, transform):
    """torchvision's ImageFolder of `root` that decodes with read_image (a damaged file is a
    UserError naming it, also in a DataLoader worker); a class folder without images is a
    UserError naming it."""
    import torchvision.datasets as D
    from torchvision.datasets.folder import IMG_EXTENSIONS
    try:
        return D.ImageFolder(root, transform, loader=read_image)
    except FileNotFoundError as e:   # "Found no valid file for the classes ..."
        empty = [d.path for d in sorted(os.scandir(root), key=lambda d: d.name)
                 if d.is_dir() and not any(f.lower().endswith(IMG_EXTENSIONS)
                                           for _, _, fs in os.walk(d.path) for f in fs)]
        if not empty:
            raise UserError(f"{root}: {e}") from None
        raise UserError(f"class folder {', '.join(empty)} holds no images "
                        f"({', '.join(IMG_EXTENSIONS)}): add its images, or remove the folder "
                        "from every split") from None


def get_datasets(dataset: str, data_loc: str, download: bool = False, cutout: int = 0,
                 spec: Optional[DataSpec] = None):
    """(train_set, val_set, num_classes) for cifar10/cifar100/imagenet/folder at `data_loc` (a
    folder, or a pack of one: packs.py), transformed as `spec` says (default: the data set's
    own, DataSpec.of); an image folder's class count is its number of class folders."""
    import torchvision.datasets as D
    data_loc = unpacked(data_loc, default_cache_dir())
    spec = spec or DataSpec.of(dataset)
    t_train, t_val = spec.transforms(True, cutout), spec.transforms(False)
    train_dir = _imagefolder_split(data_loc, ["train"])
    val_dir = _imagefolder_split(data_loc, ["val", "test"])
    if train_dir and val_dir:
        train_set, val_set = image_folder(train_dir, t_train), image_folder(val_dir, t_val)
        if train_set.classes != val_set.classes:
            raise UserError(f"{data_loc}: train/ and {os.path.basename(val_dir)}/ hold "
                            "different class folders")
        return train_set, val_set, len(train_set.classes)
    if dataset not in CIFAR_STATS:   # imagenet, folder: image folders only
        name = "ImageNet" if dataset == "imagenet" else "the image folder"
        raise UserError(f"{name} not found at {data_loc}: expected train/<class>/ and "
                        "val/<class>/ (or test/<class>/) folders of images")
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
# Loaders of a training run (engine.py): the seeded per-image augmentation and the shares of
# each process under torchrun.
# --------------------------------------------------------------------------------------------

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


def make_loaders(cfg, rt: Runtime, check_classes=None):
    """(train_loader, val_loader, num_classes). Each process gets its share of every global
    batch (DistributedSampler, also with one process, so the order never depends on it) and a
    strided share of the validation set. `check_classes(num_classes)`, if given, runs once the
    data set is read, before any image is decoded."""
    if cfg.batch_size % rt.world:
        raise UserError(f"--batch_size {cfg.batch_size} is not divisible by the "
                        f"{rt.world} processes")
    spec = DataSpec.of(cfg.dataset, cfg.image_size, cfg.arch)
    if cfg.download and rt.world > 1 and not rt.main:
        dist.barrier()   # let rank 0 download first
    train_set, val_set, num_classes = get_datasets(cfg.dataset, data_location(cfg),
                                                   cfg.download, cfg.cutout, spec)
    if cfg.download and rt.world > 1 and rt.main:
        dist.barrier()
    if check_classes:
        check_classes(num_classes)
    path = choose_loader(cfg.loader, cfg.dataset, (train_set, val_set), spec)
    rt.print(data_line(cfg, spec, (train_set, val_set), num_classes, path))
    if path == "tensor":
        return make_tensor_loaders(cfg, rt, (train_set, val_set), spec) + (num_classes,)
    train_set = SeededAugment(subset(train_set, cfg.train_subset, subset_seed(cfg)), cfg.seed)
    val_set = subset(val_set, cfg.val_subset, subset_seed(cfg))
    val_part = Subset(val_set, range(rt.rank, len(val_set), rt.world))
    sampler = DistributedSampler(train_set, num_replicas=rt.world, rank=rt.rank, shuffle=True,
                                 seed=cfg.seed)
    per_rank = cfg.batch_size // rt.world
    pin = rt.device.type == "cuda"
    train = DataLoader(train_set, per_rank, sampler=sampler, num_workers=cfg.workers,
                       pin_memory=pin)
    val = DataLoader(val_part, per_rank, shuffle=False, num_workers=cfg.workers, pin_memory=pin)
    return train, val, num_classes


def data_line(cfg, spec: DataSpec, splits, num_classes: int, path: str) -> str:
    """The one line that says what a run reads and which path decodes it."""
    gib = decoded_bytes(splits, spec) / 2 ** 30
    why = (f"--loader {cfg.loader}" if cfg.loader != "auto" else
           f"{gib:.2g} GiB decoded {'<=' if path == 'tensor' else '>'} "
           f"{TENSOR_MAX_BYTES / 2 ** 30:g} GiB")
    how = ("decoded once, augmented on the device" if path == "tensor" else
           f"decoded every epoch in {cfg.workers} workers")
    return (f"data: {cfg.dataset} at {data_location(cfg)}, {num_classes} classes, "
            f"{len(splits[0])} train / {len(splits[1])} val images, {spec.describe()}; "
            f"{path} path ({why}: {how})")


def subset_seed(cfg) -> int:
    """The seed that picks the image subsets: --subset_seed, else --seed (the seed's behaviour)."""
    return cfg.seed if cfg.subset_seed is None else cfg.subset_seed


def make_tensor_loaders(cfg, rt: Runtime, splits, spec: DataSpec):
    """make_loaders' (train, val) on the tensor path: the splits decoded once (rank 0 first, the
    others then read its cache), on the device; the same subsets, order and shares."""
    first = rt.world > 1 and dist.is_initialized()
    if first and not rt.main:
        dist.barrier()
    train_data, val_data = (tensor_images(s, cfg.workers, cfg.cache_dir, spec) for s in splits)
    if first and rt.main:
        dist.barrier()
    train_data = train_data.subset(subset_indices(len(train_data), cfg.train_subset, subset_seed(cfg)))
    val_data = val_data.subset(subset_indices(len(val_data), cfg.val_subset, subset_seed(cfg)))
    sampler = DistributedSampler(range(len(train_data)), num_replicas=rt.world, rank=rt.rank,
                                 shuffle=True, seed=cfg.seed)
    per_rank = cfg.batch_size // rt.world
    train = TensorLoader(train_data.to(rt.device), per_rank, sampler,
                         spec.augment(cfg.cutout), cfg.seed)
    val = TensorLoader(val_data.to(rt.device), per_rank, range(rt.rank, len(val_data), rt.world),
                       spec.augment(train=False))
    return train, val


def set_epoch(loader, epoch: int) -> None:
    """Reseed the shuffle and the augmentation of a train loader (DataLoader or TensorLoader)."""
    if isinstance(loader, TensorLoader):
        loader.set_epoch(epoch)
        return
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)

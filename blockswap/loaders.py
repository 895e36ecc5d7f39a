"""The tensor data path: a CIFAR-scale data set decoded once into a uint8 tensor (N, 3, H, W),
cached on disk, moved to the training device once and augmented there, a batch at a time.

The augmentation is get_transforms(train=True)'s: a random crop with 4-pixel zero padding,
a horizontal flip, ToTensor + Normalize, then Cutout (a square of the *normalised* image set to
0, as Cutout runs after Normalize). The random draws of image i in epoch e are row i of a
table drawn per epoch from a generator seeded by (seed, epoch) alone, on the CPU: they do not
depend on the batch, the process, the device or the point a run was resumed from.

ImageNet-scale data keeps the PIL loader (torchvision transforms in DataLoader workers): see
choose_loader for the rule, and --loader to force either.
"""
import argparse
import hashlib
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from blockswap.cli import at_least, progress
from blockswap.files import atomic_write
from models.blocks import UserError
from blockswap.runtime import Runtime

CACHE_VERSION = 1
# --loader auto decodes into memory when the decoded uint8 images take at most this much (train
# and validation splits together). CIFAR-10 takes 180 MB; ImageNet never qualifies (PIL).
TENSOR_MAX_BYTES = 4 * 2 ** 30
PADDING, CROP = 4, 32   # RandomCrop(32, padding=4), as get_transforms


DATASETS = ("cifar10", "cifar100", "imagenet")
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)),
}


IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


def data_args(datasets: Sequence[str] = DATASETS) -> argparse.ArgumentParser:
    """The data flags of main.py, fisher_rank.py and study.py (an argparse parent): the
    dataset, --data_loc, --download, --workers, --loader and --cache_dir."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("dataset", choices=list(datasets),
                   help="cifar10/cifar100 (torchvision folders or any ImageFolder tree) or "
                        "imagenet (train/ and val/ folders)")
    g = p.add_argument_group("data")
    g.add_argument("--data_loc", default=None,
                   help="data folder: a torchvision CIFAR folder or an image folder with "
                        "train/ and test/ or val/")
    g.add_argument("--download", action="store_true", help="download CIFAR into --data_loc")
    g.add_argument("--workers", default=2, type=at_least(0),
                   help="processes that decode images (per GPU)")
    add_loader_args(g)
    return p


def add_loader_args(p) -> None:
    """--loader and --cache_dir (part of data_args)."""
    p.add_argument("--loader", default="auto", choices=["auto", "tensor", "pil"],
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


def choose_loader(requested: str, dataset_name: str, splits: Sequence) -> str:
    """'tensor' or 'pil'. auto: tensor for CIFAR-style data whose decoded uint8 images (taken
    as all the size of the first) fit in TENSOR_MAX_BYTES; ImageNet always pil."""
    if dataset_name == "imagenet":
        if requested == "tensor":
            raise UserError("--loader tensor implements the CIFAR augmentation (padded crop, "
                            "flip); ImageNet's RandomResizedCrop needs --loader pil (or auto)")
        return "pil"
    if requested != "auto":
        return requested
    nbytes = sum(len(s) * 3 * math.prod(image_size(s)) for s in splits if len(s))
    return "tensor" if nbytes <= TENSOR_MAX_BYTES else "pil"


# --------------------------------------------------------------------------------------------
# Decoding once, with a cache.
# --------------------------------------------------------------------------------------------

@dataclass
class TensorImages:
    """A decoded split: images (N, 3, H, W) uint8 and labels (N,) int64, on one device."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return len(self.labels)

    def subset(self, indices: Optional[List[int]]) -> "TensorImages":
        if indices is None:
            return self
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorImages(self.images[idx], self.labels[idx])

    def to(self, device) -> "TensorImages":
        return TensorImages(self.images.to(device), self.labels.to(device))


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "blockswap")


def source_key(root: str, samples) -> str:
    """A digest of the files an ImageFolder split reads (path, label, size, mtime): a changed,
    added or removed image gives another key, hence a rebuild."""
    h = hashlib.sha256(f"v{CACHE_VERSION}\n{os.path.abspath(root)}\n".encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n"
                 .encode())
    return h.hexdigest()[:24]


def cache_path(root: str, samples, cache_dir: Optional[str]) -> str:
    root = os.path.abspath(root)
    name = f"{os.path.basename(os.path.dirname(root))}-{os.path.basename(root)}"
    return os.path.join(cache_dir or default_cache_dir(), f"{name}-{source_key(root, samples)}.pt")


def bad_image(path: str, e: Exception) -> UserError:
    """The error for an image file that cannot be decoded (corrupt, truncated, not an image)."""
    return UserError(f"cannot decode the image {path} ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else 'unreadable'}): replace it with a "
                     "good copy, or delete it")


def read_image(path: str):
    """The image at `path` as RGB PIL, fully decoded here (PIL decodes lazily: a truncated file
    fails in .convert), a damaged file as a UserError that names it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:   # UnidentifiedImageError is an OSError
        raise bad_image(path, e) from None


class _Files(torch.utils.data.Dataset):
    """Image files -> (3, H, W) uint8 tensors (decoded in DataLoader workers)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(np.asarray(read_image(self.paths[i])).copy()).permute(2, 0, 1)


def decode_files(paths: List[str], workers: int = 0, desc: str = "decoding") -> torch.Tensor:
    """(N, 3, H, W) uint8 of image files that all have the first one's size."""
    loader = torch.utils.data.DataLoader(_Files(paths), batch_size=256, num_workers=workers,
                                         collate_fn=list)
    out, i = None, 0
    bar = progress(total=len(paths), desc=desc, unit="img", leave=False, dynamic_ncols=True)
    for batch in loader:
        bar.update(len(batch))
        for img in batch:
            if out is None:
                out = torch.empty((len(paths), *img.shape), dtype=torch.uint8)
            if img.shape != out.shape[1:]:
                raise UserError(f"{paths[i]} is {img.shape[2]}x{img.shape[1]} but "
                                f"{paths[0]} is {out.shape[3]}x{out.shape[2]}: the tensor "
                                "loader needs images of one size; use --loader pil")
            out[i] = img
            i += 1
    bar.close()
    return out


def imagefolder_images(ds, workers: int = 0, cache_dir: Optional[str] = None) -> TensorImages:
    """An ImageFolder split decoded, from the cache when its files have not changed and the
    cache holds this folder's images (see cache_mismatch)."""
    path = cache_path(ds.root, ds.samples, cache_dir)
    labels = torch.tensor([y for _, y in ds.samples], dtype=torch.long)
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            wrong = cache_mismatch(saved, labels)
            if wrong is None:
                return TensorImages(saved["images"], saved["labels"])
            print(f"note: rebuilding the cache {path}, which is not {ds.root}'s ({wrong})")
        except Exception as e:   # a damaged cache file is rebuilt, never trusted
            print(f"note: rebuilding the unreadable cache {path} ({type(e).__name__})")
    images = decode_files([p for p, _ in ds.samples], workers,
                          desc=f"decoding {ds.root} once (cache: {path})")
    try:
        atomic_write(path, lambda f: torch.save(
            {"version": CACHE_VERSION, "images": images, "labels": labels,
             "source": os.path.abspath(ds.root)}, f))
    except OSError as e:   # no cache then: the run goes on with the decoded images
        fix = ("make --cache_dir writable to keep one" if cache_dir else
               "pass --cache_dir to keep one")
        print(f"note: cannot write the cache {path} ({e}); going on without it ({fix})")
    return TensorImages(images, labels)


def cache_mismatch(saved: dict, labels: torch.Tensor) -> Optional[str]:
    """Why a loaded cache is not the folder whose file list gave its name (a cache copied or
    renamed by hand), or None when it is: its version, its image count and its labels
    (cheap; the pixels are trusted, as the name covers each file's size and mtime)."""
    if saved.get("version") != CACHE_VERSION:
        return f"written by cache version {saved.get('version')}"
    images, cached = saved.get("images"), saved.get("labels")
    if not (isinstance(images, torch.Tensor) and isinstance(cached, torch.Tensor)):
        return "it holds no images"
    if len(images) != len(labels) or len(cached) != len(labels):
        return (f"it holds {len(images)} images and {len(cached)} labels, the folder "
                f"{len(labels)} images")
    if not torch.equal(cached.to(labels.dtype), labels):
        return "its labels differ from the folder's"
    return None


def tensor_images(ds, workers: int = 0, cache_dir: Optional[str] = None) -> TensorImages:
    """A split of funcs.get_datasets as uint8 tensors on the CPU: torchvision's CIFAR sets are
    decoded already (their .data); an ImageFolder is decoded once and cached."""
    if isinstance(getattr(ds, "data", None), np.ndarray):
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()   # NHWC -> NCHW
        return TensorImages(images, torch.as_tensor(ds.targets, dtype=torch.long))
    return imagefolder_images(ds, workers, cache_dir)


# --------------------------------------------------------------------------------------------
# Augmentation on the device, a batch at a time.
# --------------------------------------------------------------------------------------------

def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's augmentation table."""
    return torch.Generator().manual_seed(item_seed(seed, epoch, 0))   # the one seed rule


@dataclass
class Augment:
    """Padded random crop, flip, normalisation and optional Cutout of uint8 batches."""
    mean: Sequence[float]
    std: Sequence[float]
    cutout: int = 0
    train: bool = True
    scale: torch.Tensor = field(init=False, repr=False)   # (1, 3, 1, 1): 1 / (255 std)
    bias: torch.Tensor = field(init=False, repr=False)    # (1, 3, 1, 1): -mean / std

    def __post_init__(self):
        std = torch.tensor(self.std, dtype=torch.float64)
        self.scale = (1.0 / (255.0 * std)).float().view(1, -1, 1, 1)
        self.bias = (-torch.tensor(self.mean, dtype=torch.float64) / std).float().view(1, -1, 1, 1)

    @classmethod
    def for_dataset(cls, name: str, cutout: int = 0, train: bool = True) -> "Augment":
        mean, std = CIFAR_STATS.get(name, CIFAR_STATS["cifar10"])
        return cls(mean, std, cutout, train)

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """(5, n) int64: crop row and column offsets, flip (0/1), Cutout centre row and column
        of n images, in this order, from `generator`."""
        hi = (height + 2 * PADDING - CROP + 1, width + 2 * PADDING - CROP + 1, 2, CROP, CROP)
        return torch.stack([torch.randint(h, (n,), generator=generator) for h in hi])

    def __call__(self, x: torch.Tensor, params: Optional[torch.Tensor] = None,
                 padded: bool = False) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, 32, 32) normalised (train), or (B, 3, H, W)
        normalised only (not train); params: this batch's columns of draw(). padded: x is
        zero-padded by 4 pixels already (TensorLoader pads a data set once)."""
        if self.train:
            x = crop_flip(x if padded else F.pad(x, (PADDING,) * 4),
                          params[0], params[1], params[2].bool())
        # ToTensor + Normalize, (x / 255 - mean) / std, as one multiply and one add (within
        # 1e-6 of torchvision's three steps; in place: half the time of one addcmul on a CPU)
        out = x.float().mul_(self.scale.to(x.device)).add_(self.bias.to(x.device))
        if self.train and self.cutout > 0:
            out.mul_(cutout_keep(params[3], params[4], self.cutout, CROP)[:, None])
        return out


def crop_flip(p: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor):
    """Zero-padded uint8 (B, C, H+8, W+8) -> (B, C, 32, 32): image b cropped at (oy[b], ox[b])
    of the padded image, then mirrored left-right where flip[b]. One gather of flat indices."""
    b, c, _, pw = p.shape
    r = torch.arange(CROP, device=p.device)
    cols = ox[:, None] + torch.where(flip[:, None], CROP - 1 - r, r)       # (B, 32)
    rows = (oy[:, None] + r) * pw                                          # (B, 32)
    idx = (rows[:, :, None] + cols[:, None, :]).view(b, 1, CROP * CROP)   # flat (row, col)
    out = torch.gather(p.reshape(b, c, -1), 2, idx.expand(b, c, CROP * CROP))
    return out.view(b, c, CROP, CROP)


def cutout_keep(cy: torch.Tensor, cx: torch.Tensor, size: int, side: int) -> torch.Tensor:
    """(B, side, side) float, 0 inside each image's Cutout square and 1 elsewhere: rows
    [cy - size//2, cy + size//2) by columns [cx - size//2, cx + size//2), clipped to the image
    (Cutout's square)."""
    r = torch.arange(side, device=cy.device)
    in_y = ((r >= cy[:, None] - size // 2) & (r < cy[:, None] + size // 2)).float()   # (B, side)
    in_x = ((r >= cx[:, None] - size // 2) & (r < cx[:, None] + size // 2)).float()
    return 1.0 - in_y[:, :, None] * in_x[:, None, :]


# --------------------------------------------------------------------------------------------
# Batches.
# --------------------------------------------------------------------------------------------

class TensorLoader:
    """(inputs, targets) batches of a TensorImages on its device, in the order of `order` (a
    DistributedSampler, reseeded by set_epoch, or a fixed list of indices), as a DataLoader
    would give them: the same batches, the last one short."""

    def __init__(self, data: TensorImages, batch_size: int, order, augment: Augment,
                 seed: int = 0):
        self.data, self.batch_size, self.order = data, batch_size, order
        self.augment, self.seed, self.epoch = augment, seed, 0
        # training crops come from the zero-padded images: padded once here, not every batch
        # (1.56x the memory of 32x32 images)
        self.source = F.pad(data.images, (PADDING,) * 4) if augment.train else data.images
        self.dataset = data   # len(loader.dataset): the whole split, as a DataLoader's

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        if hasattr(self.order, "set_epoch"):
            self.order.set_epoch(epoch)

    def __len__(self):
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self):
        device = self.data.images.device
        order = torch.as_tensor(list(self.order), dtype=torch.long).to(device)
        table = None
        if self.augment.train:   # every image's draws, whichever of them this process takes
            h, w = self.data.images.shape[2:]
            table = self.augment.draw(len(self.data), h, w,
                                      epoch_generator(self.seed, self.epoch)).to(device)
        for start in range(0, len(order), self.batch_size):   # the batches of a DataLoader
            idx = order[start:start + self.batch_size]
            x = self.source.index_select(0, idx)
            params = None if table is None else table.index_select(1, idx)
            yield self.augment(x, params, padded=True), self.data.labels.index_select(0, idx)


def augmented_batches(data: TensorImages, indices: torch.Tensor, batch_size: int,
                      augment: Augment, generator: torch.Generator):
    """[(inputs, targets)] of images `indices` in batches, augmented with draws taken from
    `generator` (fisher_rank and study: one seed fixes the pixels)."""
    h, w = data.images.shape[2:]
    table = augment.draw(len(indices), h, w, generator).to(data.images.device)
    idx = indices.to(data.images.device)
    out = []
    for start in range(0, len(idx), batch_size):
        part = idx[start:start + batch_size]
        x = data.images.index_select(0, part)
        out.append((augment(x, table[:, start:start + batch_size]),
                    data.labels.index_select(0, part)))
    return out




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


def get_datasets(dataset: str, data_loc: str, download: bool = False, cutout: int = 0):
    """(train_set, val_set, num_classes) for cifar10/cifar100/imagenet at `data_loc`."""
    import torchvision.datasets as D
    t_train, t_val = get_transforms(dataset, True, cutout), get_transforms(dataset, False)
    train_dir = _imagefolder_split(data_loc, ["train"])
    val_dir = _imagefolder_split(data_loc, ["val", "test"])
    if train_dir and val_dir:
        train_set, val_set = image_folder(train_dir, t_train), image_folder(val_dir, t_val)
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
# Loaders of a training run (engine.py): the seeded per-image augmentation and the shares of
# each process under torchrun.
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

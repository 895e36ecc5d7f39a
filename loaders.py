"""The tensor data path: a CIFAR-scale data set decoded once into a uint8 tensor (N, 3, H, W),
cached on disk, moved to the training device once and augmented there, a batch at a time.

The augmentation is funcs.get_transforms(train=True)'s: a random crop with 4-pixel zero padding,
a horizontal flip, ToTensor + Normalize, then Cutout (a square of the *normalised* image set to
0, as funcs.Cutout runs after Normalize). The random draws of image i in epoch e are row i of a
table drawn per epoch from a generator seeded by (seed, epoch) alone, on the CPU: they do not
depend on the batch, the process, the device or the point a run was resumed from.

ImageNet-scale data keeps the PIL loader (torchvision transforms in DataLoader workers): see
choose_loader for the rule, and --loader to force either.
"""
import argparse
import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from funcs import CIFAR_STATS, atomic_write
from models.blocks import UserError

CACHE_VERSION = 1
# --loader auto decodes into memory when the decoded uint8 images take at most this much (train
# and validation splits together). CIFAR-10 takes 180 MB; ImageNet never qualifies (PIL).
TENSOR_MAX_BYTES = 4 * 2 ** 30
PADDING, CROP = 4, 32   # RandomCrop(32, padding=4), as funcs.get_transforms


DATASETS = ("cifar10", "cifar100", "imagenet")


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
    g.add_argument("--workers", default=2, type=int,
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
    with Image.open(dataset.samples[0][0]) as im:   # reads the header only
        return im.size[::-1]


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


class _Files(torch.utils.data.Dataset):
    """Image files -> (3, H, W) uint8 tensors (decoded in DataLoader workers)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.paths[i]) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def decode_files(paths: List[str], workers: int = 0, desc: str = "decoding") -> torch.Tensor:
    """(N, 3, H, W) uint8 of image files that all have the first one's size."""
    loader = torch.utils.data.DataLoader(_Files(paths), batch_size=256, num_workers=workers,
                                         collate_fn=list)
    out, i = None, 0
    bar = tqdm(total=len(paths), desc=desc, unit="img", leave=False, dynamic_ncols=True)
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
    """An ImageFolder split decoded, from the cache when its files have not changed."""
    path = cache_path(ds.root, ds.samples, cache_dir)
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("version") == CACHE_VERSION:
                return TensorImages(saved["images"], saved["labels"])
        except Exception as e:   # a damaged cache file is rebuilt, never trusted
            print(f"note: rebuilding the unreadable cache {path} ({type(e).__name__})")
    images = decode_files([p for p, _ in ds.samples], workers,
                          desc=f"decoding {ds.root} once (cache: {path})")
    labels = torch.tensor([y for _, y in ds.samples], dtype=torch.long)
    try:
        atomic_write(path, lambda f: torch.save(
            {"version": CACHE_VERSION, "images": images, "labels": labels,
             "source": os.path.abspath(ds.root)}, f))
    except OSError as e:   # no cache then: the run goes on with the decoded images
        print(f"note: cannot write the cache {path} ({e}); pass --cache_dir to keep one")
    return TensorImages(images, labels)


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
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_000_007) % 2 ** 63)


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
    (funcs.Cutout's square)."""
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

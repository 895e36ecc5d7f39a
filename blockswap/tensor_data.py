"""The tensor data path: a data set decoded once into a uint8 tensor (N, 3, H, W), cached on
disk, moved to the training device once and augmented there, a batch at a time (see loaders.py
for when it is taken and for the PIL path it replaces).

The augmentation is a recipe's (loaders.RECIPES) on the device: Augment is the CIFAR recipe
(a random crop with 4-pixel zero padding, a horizontal flip, ToTensor + Normalize, then Cutout:
a square of the *normalised* image set to 0, as Cutout runs after Normalize), ResizedCrop the
ImageNet recipe (RandomResizedCrop and a flip, or the centre crop). The random draws of image i
in epoch e are row i of a table drawn per epoch from a generator seeded by (seed, epoch) alone,
on the CPU: they do not depend on the batch, the process, the device or the point a run was
resumed from.
"""
import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from blockswap.cli import progress
from blockswap.files import atomic_write
from models.blocks import UserError

CACHE_VERSION = 1
PADDING, CROP = 4, 32   # RandomCrop(32, padding=4), as DataSpec.transforms

def item_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2 ** 63


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


def source_key(root: str, samples, side: Optional[int] = None) -> str:
    """A digest of the files an ImageFolder split reads (path, label, size, mtime) and of the
    side they are resized to (if any): a changed, added or removed image gives another key,
    hence a rebuild."""
    h = hashlib.sha256(f"v{CACHE_VERSION}\n{os.path.abspath(root)}\n".encode())
    if side:
        h.update(f"side {side}\n".encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n"
                 .encode())
    return h.hexdigest()[:24]


def cache_path(root: str, samples, cache_dir: Optional[str], side: Optional[int] = None) -> str:
    root = os.path.abspath(root)
    name = f"{os.path.basename(os.path.dirname(root))}-{os.path.basename(root)}"
    name += f"-{side}px" if side else ""
    return os.path.join(cache_dir or default_cache_dir(),
                        f"{name}-{source_key(root, samples, side)}.pt")


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
    """Image files -> (3, H, W) uint8 tensors (decoded in DataLoader workers), each resized
    (shorter side) and centre-cropped to a `side` square if given, as the PIL path's
    evaluation transform does (DataSpec.transforms)."""

    def __init__(self, paths, side: Optional[int] = None):
        self.paths, self.side = paths, side

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = read_image(self.paths[i])
        if self.side:
            import torchvision.transforms.functional as TF
            img = TF.center_crop(TF.resize(img, self.side), self.side)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def decode_files(paths: List[str], workers: int = 0, desc: str = "decoding",
                 side: Optional[int] = None) -> torch.Tensor:
    """(N, 3, H, W) uint8 of image files that all have the first one's size, or of every
    image resized and centre-cropped to a `side` square."""
    loader = torch.utils.data.DataLoader(_Files(paths, side), batch_size=256,
                                         num_workers=workers, collate_fn=list)
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


def imagefolder_images(ds, workers: int = 0, cache_dir: Optional[str] = None,
                       side: Optional[int] = None) -> TensorImages:
    """An ImageFolder split decoded (as `side` squares if given), from the cache when its files
    have not changed and the cache holds this folder's images (see cache_mismatch)."""
    path = cache_path(ds.root, ds.samples, cache_dir, side)
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
                          desc=f"decoding {ds.root} once (cache: {path})", side=side)
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


def tensor_images(ds, workers: int = 0, cache_dir: Optional[str] = None,
                  spec=None) -> TensorImages:
    """A split of loaders.get_datasets as uint8 tensors on the CPU: torchvision's CIFAR sets
    are decoded already (their .data); an ImageFolder is decoded once (as spec.decode_side
    squares when its loaders.DataSpec says so) and cached."""
    if isinstance(getattr(ds, "data", None), np.ndarray):
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()   # NHWC -> NCHW
        return TensorImages(images, torch.as_tensor(ds.targets, dtype=torch.long))
    return imagefolder_images(ds, workers, cache_dir, spec.decode_side if spec else None)


# --------------------------------------------------------------------------------------------
# Augmentation on the device, a batch at a time.
# --------------------------------------------------------------------------------------------

def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's augmentation table."""
    return torch.Generator().manual_seed(item_seed(seed, epoch, 0))   # the one seed rule


@dataclass
class Augment:
    """The CIFAR recipe on uint8 batches: padded random crop to `size`, flip, normalisation and
    optional Cutout."""
    mean: Sequence[float]
    std: Sequence[float]
    cutout: int = 0
    train: bool = True
    size: int = CROP                                      # side of the crops (train)
    scale: torch.Tensor = field(init=False, repr=False)   # (1, 3, 1, 1): 1 / (255 std)
    bias: torch.Tensor = field(init=False, repr=False)    # (1, 3, 1, 1): -mean / std

    def __post_init__(self):
        std = torch.tensor(self.std, dtype=torch.float64)
        self.scale = (1.0 / (255.0 * std)).float().view(1, -1, 1, 1)
        self.bias = (-torch.tensor(self.mean, dtype=torch.float64) / std).float().view(1, -1, 1, 1)

    def source(self, images: torch.Tensor) -> torch.Tensor:
        """What batches are taken from (TensorLoader, once per data set): training crops
        come from the zero-padded images (1.56x the memory of 32x32 images)."""
        return F.pad(images, (PADDING,) * 4) if self.train else images

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """(5, n) int64: crop row and column offsets, flip (0/1), Cutout centre row and column
        of n images, in this order, from `generator`."""
        s = self.size
        hi = (height + 2 * PADDING - s + 1, width + 2 * PADDING - s + 1, 2, s, s)
        return torch.stack([torch.randint(h, (n,), generator=generator) for h in hi])

    def __call__(self, x: torch.Tensor, params: Optional[torch.Tensor] = None,
                 padded: bool = False) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, size, size) normalised (train), or (B, 3, H, W)
        normalised only (not train); params: this batch's columns of draw(). padded: x is
        zero-padded by 4 pixels already (TensorLoader pads a data set once)."""
        if self.train:
            x = crop_flip(x if padded else F.pad(x, (PADDING,) * 4),
                          params[0], params[1], params[2].bool(), self.size)
        return self.normalise(x, params)

    def normalise(self, x: torch.Tensor, params: Optional[torch.Tensor],
                  cutout_rows: int = 3) -> torch.Tensor:
        """ToTensor + Normalize, then Cutout (train) centred at params[cutout_rows:+2]."""
        # (x / 255 - mean) / std, as one multiply and one add (within 1e-6 of torchvision's
        # three steps; in place: half the time of one addcmul on a CPU)
        out = x.float().mul_(self.scale.to(x.device)).add_(self.bias.to(x.device))
        if self.train and self.cutout > 0:
            cy, cx = params[cutout_rows], params[cutout_rows + 1]
            out.mul_(cutout_keep(cy, cx, self.cutout, out.shape[-1])[:, None])
        return out


@dataclass
class ResizedCrop(Augment):
    """The ImageNet recipe on uint8 batches of squares decoded at DataSpec.resize_side:
    RandomResizedCrop(size) (torchvision's draw: scale 0.08-1 of the area, aspect 3/4-4/3, ten
    tries then the centre) and a flip, resampled bilinearly on the device (without
    torchvision's antialiasing, and within the decoded centre square rather than the whole
    photo); for evaluation the centre `size` crop, as Resize + CenterCrop. Then Normalize
    and optional Cutout."""
    TRIES = 10

    def source(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """(7, n) int64: crop top, left, height, width, flip (0/1), Cutout centre row and
        column of n images, from `generator`."""
        area = height * width
        u = torch.rand(3, self.TRIES, n, generator=generator, dtype=torch.float64)
        target = area * (0.08 + (1 - 0.08) * u[0])
        log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
        w = torch.sqrt(target * aspect).round().long()
        h = torch.sqrt(target / aspect).round().long()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.long().argmax(0)   # the first try that fits
        pick = lambda t: t.gather(0, first[None])[0]   # noqa: E731
        found = ok.any(0)
        h = torch.where(found, pick(h), torch.full_like(first, height))   # else: the whole
        w = torch.where(found, pick(w), torch.full_like(first, width))    # (square) image
        top = (pick(u[2]) * (height - h + 1)).long()
        left = (torch.rand(n, generator=generator, dtype=torch.float64) * (width - w + 1)).long()
        rest = torch.stack([torch.randint(k, (n,), generator=generator)
                            for k in (2, self.size, self.size)])
        return torch.cat([torch.stack([top, left, h, w]), rest])

    def __call__(self, x: torch.Tensor, params: Optional[torch.Tensor] = None,
                 padded: bool = False) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, size, size) normalised; params: this batch's
        columns of draw() (train)."""
        if not self.train:
            top, left = (int(round((d - self.size) / 2.0)) for d in x.shape[-2:])
            return self.normalise(x[..., top:top + self.size, left:left + self.size], None)
        return self.normalise(resized_crop(x, params[:5], self.size), params, cutout_rows=5)


def resized_crop(x: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, C, size, size): image b's box (top, left, height,
    width) = box[:4, b] resampled bilinearly (pixel centres aligned), mirrored where box[4, b].
    An affine grid maps output x in [-1, 1] to input (2 left + w) / W - 1 + x w / W."""
    b, c, height, width = x.shape
    top, left, h, w, flip = box.to(x.device).double()
    theta = torch.zeros(b, 2, 3, dtype=torch.float64, device=x.device)
    theta[:, 0, 0] = w / width * (1 - 2 * flip)
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta.float(), [b, c, size, size], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def crop_flip(p: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor,
              size: int = CROP):
    """Zero-padded uint8 (B, C, H+8, W+8) -> (B, C, size, size): image b cropped at (oy[b],
    ox[b]) of the padded image, then mirrored left-right where flip[b]. One gather of flat
    indices."""
    b, c, _, pw = p.shape
    r = torch.arange(size, device=p.device)
    cols = ox[:, None] + torch.where(flip[:, None], size - 1 - r, r)       # (B, size)
    rows = (oy[:, None] + r) * pw                                          # (B, size)
    idx = (rows[:, :, None] + cols[:, None, :]).view(b, 1, size * size)   # flat (row, col)
    out = torch.gather(p.reshape(b, c, -1), 2, idx.expand(b, c, size * size))
    return out.view(b, c, size, size)


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
        self.source = augment.source(data.images)   # once here, not every batch
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

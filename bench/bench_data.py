"""Training-data throughput on ONE CPU core: the tensor path (loaders.py: decoded uint8 images,
augmented a batch at a time) against the PIL path (main.py's DataLoader of SeededAugment: decode,
torchvision transforms and per-image seeding, --workers 0), on the same images with the same
augmentation. Prints figures, asserts nothing.

    python bench/bench_data.py [--data ../shared/data/cifar10-jpeg] [--images 4096] [--epochs 2]
                               [--quick]

Two settings, crop + flip and crop + flip + Cutout 16, each the best of --epochs epochs of
--images training images in batches of --batch (the best: other processes share the core; the
tensor path's one-off decoding is printed apart). Its last line takes both settings together:
    data: tensor <N> img/s, pil <M> img/s, ratio <R>x
Without --data (or with a folder that is absent) it writes random 32x32 PNGs to a temporary
ImageFolder. --quick: a smoke test in seconds (64 generated images, batches of 32, 1 epoch).
"""
import argparse
import os
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from blockswap import loaders as L  # noqa: E402
from blockswap.loaders import get_datasets, subset_indices  # noqa: E402
from blockswap.tensor_data import decode_files  # noqa: E402


def pil_epochs(train_set, batch, epochs, seed=0):
    """Images/s of main.py's PIL path with --workers 0."""
    ds = L.SeededAugment(train_set, seed)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed)
    loader = DataLoader(ds, batch, sampler=sampler, num_workers=0)
    rates = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        start = time.perf_counter()
        rates.append(sum(len(y) for _, y in loader) / (time.perf_counter() - start))
    return max(rates)


def tensor_epochs(data, batch, epochs, cutout, seed=0):
    """Images/s of main.py's tensor path on the CPU."""
    sampler = DistributedSampler(range(len(data)), num_replicas=1, rank=0, shuffle=True, seed=seed)
    loader = L.TensorLoader(data, batch, sampler, L.DataSpec.of("cifar10").augment(cutout), seed)
    rates = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        start = time.perf_counter()
        rates.append(sum(len(y) for _, y in loader) / (time.perf_counter() - start))
    return max(rates)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg"))
    p.add_argument("--images", default=4096, type=int, help="training images (a fixed subset)")
    p.add_argument("--batch", default=256, type=int)
    p.add_argument("--epochs", default=2, type=int)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 64 generated images, batches of 32, 1 epoch")
    args = p.parse_args()
    if args.quick:
        args.data, args.images, args.batch, args.epochs = "", 64, 32, 1
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data
        if not os.path.isdir(data_dir):
            from conftest import write_imagefolder
            data_dir = write_imagefolder(tmp, n_train=args.images, n_test=10)
        train = get_datasets("cifar10", data_dir)[0]
        idx = subset_indices(len(train), args.images, seed=0) or list(range(len(train)))
        t0 = time.perf_counter()
        pixels = decode_files([train.samples[i][0] for i in idx])
        data = L.TensorImages(pixels, torch.tensor([train.samples[i][1] for i in idx]))
        print(f"images: {len(idx)} of {data_dir}, decoded once in {time.perf_counter() - t0:.1f} s"
              f", 1 thread ({torch.get_num_threads()})")
        rates = {"tensor": [], "pil": []}
        for cutout in (0, 16):
            pil_set = Subset(get_datasets("cifar10", data_dir, cutout=cutout)[0], idx)
            rates["tensor"].append(tensor_epochs(data, args.batch, args.epochs, cutout))
            rates["pil"].append(pil_epochs(pil_set, args.batch, args.epochs))
            what = "crop+flip" + (f"+cutout{cutout}" if cutout else "")
            t, p = rates["tensor"][-1], rates["pil"][-1]
            print(f"{what}: tensor {t:.0f} img/s, pil {p:.0f} img/s, ratio {t / p:.1f}x")
    # both settings, the same number of images each: the harmonic mean of the two rates
    tensor, pil = (len(r) / sum(1 / x for x in r) for r in rates.values())
    print(f"data: tensor {tensor:.0f} img/s, pil {pil:.0f} img/s, ratio {tensor / pil:.1f}x")

if __name__ == "__main__":
    main()

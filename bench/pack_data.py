"""Pack an image folder (train/<class>/*.jpg with test/ or val/) into one file, its images'
bytes as they are, so that the data set travels with the working tree to a GPU machine
(docs/gpus.md). Every script reads the pack as the folder: `--data_loc DEST`.

    python bench/pack_data.py SRC DEST          # DEST/images.pack (blockswap/packs.py)
    python bench/pack_data.py ../shared/data/cifar10-jpeg data/cifar10-pack   # 54.3 MiB

A DEST that holds a pack already is left alone (an error says so).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blockswap.cli import run_cli  # noqa: E402
from blockswap.packs import pack_folder  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="the image folder")
    p.add_argument("dest", help="the pack's folder (made; its one file is images.pack)")
    return p


def main(args):
    start = time.perf_counter()
    files, size = pack_folder(args.src, args.dest)
    print(f"packed {files} images from {args.src} into {args.dest}: {size:,} bytes "
          f"({size / 2 ** 20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return files, size


if __name__ == "__main__":
    run_cli(main, get_args_parser())

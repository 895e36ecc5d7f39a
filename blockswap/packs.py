"""An image folder packed into one file, so that a data set can travel where only a working tree
does (a GPU machine lent for minutes): bench/pack_data.py writes a pack, loaders.get_datasets
reads one wherever it reads a folder (`--data_loc PACK`).

A pack is a folder that holds one file, images.pack:

    b"BLOCKSWAP-PACK 1\\n"
    the length of the index in bytes (8 bytes, little-endian)
    the index, JSON: {"files": [[path relative to the folder, size], ...],
                      "sha256": the digest of the bytes that follow}
    every image file's bytes as they are on disk, in the index's order

No image is re-encoded, so the pixels are the source's. All of CIFAR-10 as JPEG (60,000 files,
52.7 MiB) packs into 54.3 MiB; a tar file would take 88.4 MiB (512-byte headers, padding).
Read, a pack is unpacked once into the cache folder, <cache>/unpacked/<name>-<key>/: an image
folder again with the same relative paths, so both loaders, the decoded-image cache and a run's
data-set identity see what they would have seen in the source folder.
"""
import hashlib
import json
import os
import shutil
import tempfile
from typing import List, Optional, Tuple

from blockswap.files import atomic_write
from models.blocks import UserError

PACK_FILE = "images.pack"
MAGIC = b"BLOCKSWAP-PACK 1\n"
# torchvision's IMG_EXTENSIONS: the files an ImageFolder reads (kept here so that packing needs
# no torchvision)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CHUNK = 1 << 20


def is_pack(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, PACK_FILE))


def image_files(src: str) -> List[Tuple[str, int]]:
    """[(path relative to src with '/' separators, size)] of every image file under src, sorted
    (the order of a pack)."""
    out = []
    for folder, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(folder, name)
                out.append((os.path.relpath(path, src).replace(os.sep, "/"),
                            os.path.getsize(path)))
    return out


def _stream(src: str, files, sink) -> None:
    """Each file's bytes, in order, to sink(chunk)."""
    for rel, _ in files:
        with open(os.path.join(src, rel), "rb") as f:
            while chunk := f.read(CHUNK):
                sink(chunk)


def pack_folder(src: str, dest: str) -> Tuple[int, int]:
    """Pack the image files under `src` into the folder `dest` (made; never over an existing
    pack). Returns (files, bytes of images.pack)."""
    if not os.path.isdir(src):
        raise UserError(f"{src} is not a folder")
    if is_pack(src):
        raise UserError(f"{src} is a pack already")
    target = os.path.join(dest, PACK_FILE)
    if os.path.exists(target):
        raise UserError(f"{target} exists: remove it, or pack into another folder")
    files = image_files(src)
    if not files:
        raise UserError(f"{src} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    digest = hashlib.sha256()
    _stream(src, files, digest.update)   # first pass: the digest the index records
    index = json.dumps({"files": files, "sha256": digest.hexdigest()},
                       separators=(",", ":")).encode()

    def write(f):
        f.write(MAGIC + len(index).to_bytes(8, "little") + index)
        _stream(src, files, f.write)
    atomic_write(target, write)
    return len(files), os.path.getsize(target)


def read_index(path: str) -> Tuple[dict, int, str]:
    """(index, offset of the first file's bytes, key) of the pack file `path`; key: a digest of
    the index, which names the pack's contents."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 8)
        if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
            raise UserError(f"{path} is not a pack (bench/pack_data.py writes them)")
        raw = f.read(int.from_bytes(head[len(MAGIC):], "little"))
    try:
        index = json.loads(raw)
    except ValueError:
        raise UserError(f"{path}: its index is damaged; pack the folder again") from None
    for rel, _ in index["files"]:   # a pack names files inside its folder only
        if rel.startswith("/") or ".." in rel.split("/"):
            raise UserError(f"{path} names a file outside its folder ({rel}); not unpacked")
    return index, len(head) + len(raw), hashlib.sha256(raw).hexdigest()[:16]


def _extract(path: str, index: dict, offset: int, folder: str) -> None:
    """Write every file of the pack under `folder`, checking the bytes against the index's
    digest (a truncated or damaged copy is a UserError)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for rel, size in index["files"]:
            data = f.read(size)
            if len(data) != size:
                raise UserError(f"{path} is cut short (at {rel}): copy or pack it again")
            digest.update(data)
            out = os.path.join(folder, *rel.split("/"))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "wb") as g:
                g.write(data)
    if digest.hexdigest() != index["sha256"]:
        raise UserError(f"{path} is damaged (its images do not match its digest): copy or "
                        "pack it again")


def unpacked(data_loc: Optional[str], cache_dir: str) -> Optional[str]:
    """The image folder to read for `data_loc`: itself, unless it is a pack; then the pack's
    files, unpacked once under cache_dir/unpacked/ (a folder is only ever renamed into place
    whole, so a killed unpacking is started again and two processes never read a partial one)."""
    if not is_pack(data_loc):
        return data_loc
    path = os.path.join(data_loc, PACK_FILE)
    index, offset, key = read_index(path)
    name = os.path.basename(os.path.abspath(data_loc))
    folder = os.path.join(cache_dir, "unpacked", f"{name}-{key}")
    if os.path.isdir(folder):
        return folder
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
    except OSError as e:   # a read-only cache: a temporary folder of this machine instead
        folder = os.path.join(tempfile.gettempdir(), "blockswap-unpacked", f"{name}-{key}")
        print(f"note: cannot write under {cache_dir} ({e.strerror}); unpacking into {folder}")
        if os.path.isdir(folder):
            return folder
        os.makedirs(os.path.dirname(folder), exist_ok=True)
    print(f"note: unpacking {path} ({len(index['files'])} images) into {folder} once",
          flush=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=f".{name}-")
    os.chmod(tmp, 0o755)   # mkdtemp's 0700 would make the unpacked images private
    try:
        _extract(path, index, offset, tmp)
        os.rename(tmp, folder)
    except OSError:
        if not os.path.isdir(folder):   # not another process's unpacking that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder

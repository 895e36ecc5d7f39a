"""bench/pack_data.py and blockswap/packs.py: an image folder packed into one file reads back as
the same images and labels through every loader; a damaged pack is refused in one line."""
import json
import os
import sys

import pytest
import torch

from conftest import ROOT, write_imagefolder
from blockswap import packs
from blockswap.loaders import get_datasets, tensor_images
from models import UserError

sys.path.insert(0, os.path.join(ROOT, "bench"))
import pack_data  # noqa: E402


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("jpegs"), n_train=30, n_test=20, ext="jpg")


@pytest.fixture(scope="module")
def packed(jpeg_folder, tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("pack") / "p")
    files, size = pack_data.main(pack_data.get_args_parser().parse_args([jpeg_folder, dest]))
    return dest, files, size


def rel(ds):
    return [(os.path.relpath(p, ds.root), y) for p, y in ds.samples]


def test_the_pack_is_one_file_of_the_images_bytes(jpeg_folder, packed):
    dest, files, size = packed
    assert os.listdir(dest) == ["images.pack"] and files == 50
    on_disk = packs.image_files(jpeg_folder)
    index, offset, _ = packs.read_index(os.path.join(dest, "images.pack"))
    assert index["files"] == [list(f) for f in on_disk]
    assert size == offset + sum(s for _, s in on_disk)   # nothing but the index beside them
    with open(os.path.join(dest, "images.pack"), "rb") as f:
        f.seek(offset)
        for path, n in on_disk:   # the bytes as they are: no re-encoding
            assert f.read(n) == open(os.path.join(jpeg_folder, path), "rb").read()


def test_every_loader_reads_the_pack_as_the_folder(jpeg_folder, packed):
    dest = packed[0]
    (ft, fv, fk), (pt, pv, pk) = get_datasets("cifar10", jpeg_folder), get_datasets("cifar10", dest)
    assert fk == pk == 10 and ft.classes == pt.classes
    for a, b in ((ft, pt), (fv, pv)):
        assert rel(a) == rel(b) and a.root != b.root
        x, y = tensor_images(a), tensor_images(b)          # the tensor loader's decoding
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    for i in range(len(fv)):                                 # the PIL loader's items
        assert torch.equal(fv[i][0], pv[i][0]) and fv[i][1] == pv[i][1]


def test_a_pack_is_unpacked_once(packed, tmp_path, capsys):
    first = packs.unpacked(packed[0], str(tmp_path))
    again = packs.unpacked(packed[0], str(tmp_path))
    assert first == again and capsys.readouterr().out.count("unpacking") == 1
    assert os.listdir(os.path.join(tmp_path, "unpacked")) == [os.path.basename(first)]
    assert packs.unpacked(str(tmp_path), "unused") == str(tmp_path)   # a folder is itself


def damage(packed, tmp_path, how):
    data = bytearray(open(os.path.join(packed[0], "images.pack"), "rb").read())
    data = how(data)
    os.makedirs(tmp_path / "bad")
    (tmp_path / "bad" / "images.pack").write_bytes(bytes(data))
    return str(tmp_path / "bad")


def flip_last(data):
    data[-1] ^= 0xFF
    return data


def escape(data):
    start = len(packs.MAGIC) + 8
    offset = start + int.from_bytes(data[len(packs.MAGIC):start], "little")
    index = json.loads(bytes(data[start:offset]))
    index["files"][0][0] = "../evil.jpg"
    raw = json.dumps(index).encode()
    return packs.MAGIC + len(raw).to_bytes(8, "little") + raw + data[offset:]


@pytest.mark.parametrize("how, says", [(lambda d: d[:-10], "cut short"),
                                       (flip_last, "damaged"),
                                       (lambda d: b"PK" + d, "not a pack"),
                                       (escape, "outside its folder")])
def test_a_damaged_pack_is_refused_in_one_line(packed, tmp_path, how, says):
    bad = damage(packed, tmp_path, how)
    with pytest.raises(UserError, match=says):
        packs.unpacked(bad, str(tmp_path / "cache"))
    kept = tmp_path / "cache" / "unpacked"
    assert not kept.exists() or not os.listdir(kept)   # nothing half-unpacked is kept
    assert not (tmp_path / "evil.jpg").exists()


def test_packing_refuses_what_it_must(jpeg_folder, packed, tmp_path):
    with pytest.raises(UserError, match="exists"):   # never over a pack
        packs.pack_folder(jpeg_folder, packed[0])
    with pytest.raises(UserError, match="no image files"):
        packs.pack_folder(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(UserError, match="is a pack already"):
        packs.pack_folder(packed[0], str(tmp_path / "again"))

"""The tensor data path (loaders.py): decoding and its cache, the augmentation against
torchvision's and funcs.Cutout, the per-image seeding, and main.py's loaders on both paths."""
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from blockswap import engine as E
from blockswap import loaders as L
import main as M
from blockswap.loaders import CIFAR_STATS, Cutout, get_datasets
from blockswap.runtime import Runtime
from blockswap import tensor_data
from blockswap.tensor_data import cutout_keep

MEAN, STD = CIFAR_STATS["cifar10"]


def random_images(n, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def torchvision_view(img, oy, ox, flip):
    """torchvision's steps of DataSpec.transforms(train=True) for a given crop offset and flip."""
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    pil = TF.crop(TF.pad(pil, 4, fill=0), oy, ox, 32, 32)
    if flip:
        pil = TF.hflip(pil)
    return TF.normalize(TF.to_tensor(pil), MEAN, STD)


def test_crop_flip_normalise_equals_torchvision():
    imgs = random_images(18)
    imgs[0] = 0
    imgs[1] = 255   # the extremes of the normalisation
    g = torch.Generator().manual_seed(1)
    oy = torch.tensor([0, 8] * 9)            # both ends of the offset range, and in between
    ox = torch.randint(0, 9, (18,), generator=g)
    ox[:2] = torch.tensor([8, 0])
    flip = torch.arange(18) % 3 == 0
    params = torch.stack([oy, ox, flip.long(), torch.zeros(18, dtype=torch.long),
                          torch.zeros(18, dtype=torch.long)])
    got = L.Augment(MEAN, STD)(imgs, params)
    want = torch.stack([torchvision_view(imgs[i], int(oy[i]), int(ox[i]), bool(flip[i]))
                        for i in range(18)])
    assert got.shape == (18, 3, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_validation_is_normalisation_only():
    imgs = random_images(4)
    want = torch.stack([TF.normalize(TF.to_tensor(Image.fromarray(i.permute(1, 2, 0).numpy())),
                                     MEAN, STD) for i in imgs])
    torch.testing.assert_close(L.Augment(MEAN, STD, train=False)(imgs), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_cutout_square_equals_funcs_cutout(seed):
    """funcs.Cutout draws the centre (y, x) from torch's global generator: replay its draws."""
    x = torch.randn(3, 32, 32)
    torch.manual_seed(seed)
    want = Cutout(16)(x)
    torch.manual_seed(seed)
    cy, cx = torch.randint(32, ()), torch.randint(32, ())
    keep = cutout_keep(cy.view(1), cx.view(1), 16, 32)
    assert torch.equal(x * keep[:, None][0], want)
    assert (keep == 0).any()


def test_cutout_runs_after_normalisation():
    """Cutout zeroes the normalised image (the mean colour), padding is black (-mean/std)."""
    imgs = random_images(1)
    params = torch.tensor([[0], [0], [0], [0], [0]])   # crop at the corner, cutout at (0, 0)
    out = L.Augment(MEAN, STD, cutout=16)(imgs, params)[0]
    assert (out[:, :8, :8] == 0).all()                 # the cutout square, clipped
    pad = -torch.tensor(MEAN) / torch.tensor(STD)
    torch.testing.assert_close(out[:, 8:, 0], pad[:, None].expand(3, 24))
    assert (out[:, 8:, 4:] != 0).all()


def loader_images(data, order, batch_size, epoch, seed=3):
    """{image index: augmented tensor} of one epoch of a TensorLoader."""
    loader = L.TensorLoader(data, batch_size, order, L.Augment(MEAN, STD, cutout=8), seed)
    loader.set_epoch(epoch)
    idx = list(order)
    x = torch.cat([b for b, _ in loader])
    return {i: x[k] for k, i in enumerate(idx)}


def test_augmentation_depends_only_on_seed_epoch_index():
    data = L.TensorImages(random_images(40), torch.arange(40) % 10)
    one = loader_images(data, torch.randperm(40).tolist(), 16, epoch=2)
    parts = {}
    for rank in range(2):   # another order, other batch sizes, two processes' shares
        parts.update(loader_images(data, list(range(rank, 40, 2)), 7, epoch=2))
    assert sorted(one) == sorted(parts) == list(range(40))
    assert all(torch.equal(one[i], parts[i]) for i in range(40))
    nxt = loader_images(data, list(range(40)), 16, epoch=3)
    assert sum(not torch.equal(one[i], nxt[i]) for i in range(40)) > 30   # new draws per epoch


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_imagefolder_decoded_once_and_cached(tiny_imagefolder, tmp_path, monkeypatch):
    data_dir = copy_folder(tiny_imagefolder, tmp_path / "data")
    before = sorted(os.walk(data_dir))
    train, _, _ = get_datasets("cifar10", data_dir)
    cache = tmp_path / "cache"
    a = L.tensor_images(train, cache_dir=str(cache))
    want = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                        for p, _ in train.samples])
    assert torch.equal(a.images, want) and a.labels.tolist() == [y for _, y in train.samples]
    assert len(os.listdir(cache)) == 1 and sorted(os.walk(data_dir)) == before

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(tensor_data, "decode_files", no_decoding)
    b = L.tensor_images(get_datasets("cifar10", data_dir)[0], cache_dir=str(cache))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    monkeypatch.undo()

    path = train.samples[5][0]   # a changed image: rebuilt, with the new pixels
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(path)
    c = L.tensor_images(get_datasets("cifar10", data_dir)[0], cache_dir=str(cache))
    assert (c.images[5] == 7).all() and torch.equal(c.images[6], a.images[6])
    assert len(os.listdir(cache)) == 2   # no half-written files beside the two caches


def test_default_cache_folder_follows_xdg(tiny_imagefolder, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    L.tensor_images(get_datasets("cifar10", tiny_imagefolder)[0])
    assert [f.endswith(".pt") for f in os.listdir(tmp_path / "blockswap")] == [True]


def test_torchvision_cifar_layout(tiny_cifar, cifar_no_md5):
    train, _, _ = get_datasets("cifar10", tiny_cifar)
    data = L.tensor_images(train)
    assert torch.equal(data.images, torch.from_numpy(train.data).permute(0, 3, 1, 2))
    assert data.labels.tolist() == list(train.targets)


def test_images_of_different_sizes_are_one_error(tiny_imagefolder, tmp_path):
    data_dir = copy_folder(tiny_imagefolder, tmp_path / "data")
    train, _, _ = get_datasets("cifar10", data_dir)
    Image.fromarray(np.zeros((36, 32, 3), np.uint8)).save(train.samples[3][0])
    with pytest.raises(M.UserError, match="--loader pil"):
        L.tensor_images(get_datasets("cifar10", data_dir)[0], cache_dir=str(tmp_path / "c"))


def test_choose_loader(tiny_imagefolder, monkeypatch):
    splits = get_datasets("cifar10", tiny_imagefolder)[:2]
    assert L.choose_loader("auto", "cifar10", splits) == "tensor"
    assert L.choose_loader("pil", "cifar10", splits) == "pil"
    assert L.choose_loader("auto", "imagenet", splits) == "pil"
    with pytest.raises(M.UserError, match="--loader pil"):
        L.choose_loader("tensor", "imagenet", splits)
    monkeypatch.setattr(L, "TENSOR_MAX_BYTES", 60 * 3 * 32 * 32 - 1)   # 40 + 20 images: too big
    assert L.choose_loader("auto", "cifar10", splits) == "pil"


def main_loaders(data, loader, *extra):
    args = E.TrainConfig.from_args(M.get_args_parser().parse_args(
        ["cifar10", "teacher", "--data_loc", data, "--workers", "0", "--batch_size", "4",
         "--train_subset", "10", "--val_subset", "6", "--seed", "2", "--loader", loader, *extra]))
    return L.make_loaders(args, Runtime(torch.device("cpu")))


def test_main_subsets_pick_the_same_images_on_both_paths(tiny_imagefolder):
    tensor, pil = main_loaders(tiny_imagefolder, "tensor"), main_loaders(tiny_imagefolder, "pil")
    assert isinstance(tensor[0], L.TensorLoader) and not isinstance(pil[0], L.TensorLoader)
    assert len(tensor[0]) == len(pil[0]) == 3 and len(tensor[1]) == len(pil[1]) == 2
    for a, b in zip(tensor[1], pil[1]):   # validation: no augmentation, the same pixels
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
        assert torch.equal(a[1], b[1])
    for epoch in (0, 1):                  # training: the same order (labels), own augmentation
        L.set_epoch(tensor[0], epoch)
        L.set_epoch(pil[0], epoch)
        assert [y.tolist() for _, y in tensor[0]] == [y.tolist() for _, y in pil[0]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_path_on_cuda_equals_cpu():
    data = L.TensorImages(random_images(64), torch.arange(64) % 10)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    aug = L.Augment(MEAN, STD, cutout=16)
    cpu = L.TensorLoader(data, 24, order, aug, seed=5)
    gpu = L.TensorLoader(data.to(torch.device("cuda")), 24, order, aug, seed=5)
    for loader in (cpu, gpu):
        loader.set_epoch(4)
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)
        assert torch.equal(yg.cpu(), yc)

"""Genotype files (both formats), user errors from the command line, and the data loaders."""
import os
import subprocess
import sys

import pytest
import torch

from blockswap import funcs
from blockswap import loaders
from models import UserError, WideResNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENO = ["A2B2", "G16B2", "G8B4", "DConv", "DConv", "A4B2", "DConvG4", "DConvG4", "DConvG2",
        "G2B4", "A8B2", "G4B2", "G16B2", "G2B4", "G8B4", "G2B2", "G4B4", "ConvB4"]


def test_round_trip_current_format(tmp_path):
    path = tmp_path / "g.csv"
    funcs.save_genotype(str(path), GENO, fisher=0.25, index=7)
    assert funcs.load_genotype(str(path)) == GENO
    import pandas as pd
    df = pd.read_csv(path)
    assert list(df.columns) == ["Unnamed: 0", "index", "convs", "fisher"]
    assert df["index"][0] == 7 and df["fisher"][0] == 0.25
    assert df["convs"][0] == str(GENO)          # a Python list literal, as the paper's files


def test_reads_2019_numpy_class_repr_format(tmp_path):
    import numpy as np
    cells = np.array([f"<class 'models.blocks.{n}'>" for n in GENO], dtype=object)
    text = str(cells).replace('"', "")          # numpy prints the array over several lines
    assert "\n" in text
    path = tmp_path / "old.csv"
    path.write_text(f',index,convs,fisher\n0,3,"{text}",1.5\n')
    assert funcs.load_genotype(str(path)) == GENO


# The genotypes the repository ships (the paper's), by name: a user's searches write beside
# them into genotypes/, and must not make this test fail.
SHIPPED_GENOTYPES = {"bs150k.csv": 18, "bs200k.csv": 18, "bs250k.csv": 18, "bs400k.csv": 18,
                     "bs500k.csv": 18, "bs800k.csv": 18, "bs1.6m.csv": 18,
                     "bs_imagenet_1.csv": 16, "bs_imagenet_2.csv": 16}


@pytest.mark.parametrize("name", sorted(SHIPPED_GENOTYPES))
def test_reads_all_shipped_genotypes(name):
    geno = funcs.load_genotype(os.path.join(ROOT, "genotypes", name))
    assert len(geno) == SHIPPED_GENOTYPES[name], name


@pytest.mark.parametrize("cell,message", [
    ("['Conv', 'DConvZ']", r"bad.csv, row 1, column convs: unknown block type 'DConvZ'"),
    ("['Conv', ", r"bad.csv, row 1, column convs: cannot read the convs cell"),
    ("[1, 2]", r"bad.csv, row 1, column convs: .* not a list of block names"),
    ("[<class 'models.blocks.Conv'> <clas", r"bad.csv, row 1, column convs: cannot read"),
])
def test_malformed_cells_name_file_and_cell(tmp_path, cell, message):
    path = tmp_path / "bad.csv"
    path.write_text(f',index,convs,fisher\n0,0,"{cell}",0.0\n')
    with pytest.raises(UserError, match=message):
        funcs.load_genotype(str(path))


def test_missing_file_and_missing_column(tmp_path):
    with pytest.raises(UserError, match="not found"):
        funcs.load_genotype(str(tmp_path / "none.csv"))
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="'convs' column"):
        funcs.load_genotype(str(tmp_path / "x.csv"))


def test_save_is_atomic_and_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "g.csv"
    funcs.save_genotype(str(path), GENO)
    before = path.read_text()
    with pytest.raises(UserError):
        funcs.save_genotype(str(path), GENO[:-1] + ["Nope"])
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["g.csv"]    # no temporary file left behind


def test_cli_user_errors_are_one_line(tmp_path):
    bad = tmp_path / "short.csv"
    funcs.save_genotype(str(bad), GENO[:17])
    for argv, message in [
        (["--genotype", str(bad)], "error: genotype has 17 block types but WRN-40-2 has 18 "
                                   "residual blocks"),
        (["--conv", "Nope"], "error: unknown block type 'Nope'; valid names: Conv,"),
        (["--genotype", str(tmp_path / "nope.csv")], "error: genotype file"),
    ]:
        r = subprocess.run([sys.executable, "count_ops.py", *argv], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode != 0
        assert r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr


def test_imagefolder_is_detected(tiny_imagefolder):
    train, val, n = loaders.get_datasets("cifar10", tiny_imagefolder)
    assert (len(train), len(val), n) == (40, 20, 10)
    from conftest import CLASSES
    assert train.classes == CLASSES and sorted(set(train.targets)) == list(range(10))
    x, y = train[5]
    assert tuple(x.shape) == (3, 32, 32) and y == train.targets[5]
    loader = torch.utils.data.DataLoader(loaders.subset(train, 16, seed=1), batch_size=8)
    xb, yb = next(iter(loader))
    logits, _ = WideResNet(10, 1)(xb)
    assert logits.shape == (8, 10)


def test_torchvision_cifar_layout(tiny_cifar, cifar_no_md5):
    train, val, n = loaders.get_datasets("cifar10", tiny_cifar)
    assert (len(train), len(val), n) == (20, 10, 10)
    assert tuple(train[0][0].shape) == (3, 32, 32)
    assert train.targets[:4] == [0, 1, 2, 3]


def test_dataset_not_found_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="not found at .*--download"):
        loaders.get_datasets("cifar10", str(tmp_path))
    with pytest.raises(UserError, match="ImageNet not found"):
        loaders.get_datasets("imagenet", str(tmp_path))


def test_subset_is_fixed_by_seed(tiny_imagefolder):
    train, _, _ = loaders.get_datasets("cifar10", tiny_imagefolder)
    a, b = loaders.subset(train, 10, seed=3), loaders.subset(train, 10, seed=3)
    assert a.indices == b.indices and len(set(a.indices)) == 10
    assert loaders.subset(train, 10, seed=4).indices != a.indices


def test_cutout_zeroes_a_square():
    torch.manual_seed(0)
    out = loaders.Cutout(16)(torch.ones(3, 32, 32))
    zeros = (out == 0).all(0)
    assert 0 < zeros.sum() <= 256
    rows, cols = zeros.nonzero(as_tuple=True)
    assert zeros[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a rectangle

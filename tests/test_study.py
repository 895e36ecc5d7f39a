"""study.py end to end on tiny data: scores, trained errors, correlations, plot, resume."""
import ast
import os

import pytest
import torch

import study
from models import WideResNet
from blockswap.proxies import PROXIES, get_proxy


def run(folder, data, extra=()):
    argv = ["cifar10", "--data_loc", data, "--wrn_depth", "10", "--wrn_width", "1",
            "--candidates", "3", "--epochs", "1", "--batch_size", "8", "--train_subset", "16",
            "--val_subset", "10", "--out", str(folder), *extra]
    return study.main(study.get_args_parser().parse_args(argv))


def test_study_end_to_end_and_resume(tmp_path, tiny_imagefolder, capsys):
    df = run(tmp_path, tiny_imagefolder)
    assert len(df) == 3 and set(PROXIES) <= set(df.columns)
    assert df["val_error"].between(0, 100).all()
    # 10 validation images: every error is a multiple of 10%
    assert ((df["val_error"] / 10).round(6) % 1 == 0).all()
    out = capsys.readouterr().out
    assert "| fisher |" in out and "Spearman" in out
    assert os.path.getsize(tmp_path / "study.png") > 0
    # a score in the table equals the proxy recomputed on the same init and minibatch
    x, y, n = study.fixed_minibatch(study.get_args_parser().parse_args(
        ["cifar10", "--data_loc", tiny_imagefolder, "--batch_size", "8",
         "--train_subset", "16"]), torch.device("cpu"))
    row = df.iloc[1]
    torch.manual_seed(0 + 1)
    net = WideResNet(10, 1, ast.literal_eval(row["convs"]), n)
    assert get_proxy("params")(net, x, y) == row["params"]
    assert get_proxy("fisher")(net, x, y) == pytest.approx(row["fisher"], rel=1e-5)
    # re-running resumes: nothing is trained again, the file is unchanged
    before = (tmp_path / "study.csv").read_bytes()
    run(tmp_path, tiny_imagefolder)
    assert (tmp_path / "study.csv").read_bytes() == before


def test_study_refuses_other_settings(tmp_path, tiny_imagefolder):
    run(tmp_path, tiny_imagefolder, ["--proxies", "params"])
    from models import UserError
    with pytest.raises(UserError, match=r"records different settings \(epochs 1 then, 2 now\)"):
        run(tmp_path, tiny_imagefolder, ["--proxies", "params", "--epochs", "2"])

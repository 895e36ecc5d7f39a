"""study.py end to end on tiny data: scores, trained errors, correlations, plot, resume."""
import ast
import json
import os

import pytest
import torch

import study
from blockswap.cli import run_cli
from conftest import one_error_line, study_argv
from blockswap.files import load_checkpoint
from models import UserError, WideResNet
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
    x, y, n = study.fixed_minibatch(study.StudyConfig(
        data_loc=tiny_imagefolder, batch_size=8, train_subset=16), torch.device("cpu"))
    row = df.iloc[1]
    torch.manual_seed(2)   # store.candidate_key, rule 2, by hand: (0 * P + 0) * P + 1 + 1
    net = WideResNet(10, 1, ast.literal_eval(row["convs"]), n)
    assert get_proxy("params")(net, x, y) == row["params"]
    assert get_proxy("fisher")(net, x, y) == pytest.approx(row["fisher"], rel=1e-5)
    # re-running resumes: nothing is trained again, the file is unchanged
    before = (tmp_path / "study.csv").read_bytes()
    run(tmp_path, tiny_imagefolder)
    assert (tmp_path / "study.csv").read_bytes() == before


def test_a_study_written_before_the_init_rule_resumes_with_its_own(tmp_path, tiny_imagefolder):
    """A settings.json without init_rule (or amp, tol, score_seeds) is a study of rule 1
    (seed + index + 1000 r): it resumes with that rule (the scores and the trainings' seeds are
    the old ones) and its file is left as it was; a rule this version does not know is refused
    in one line, before any work."""
    old = dict(dataset="cifar10", data_loc=tiny_imagefolder, loader="auto", arch=None,
               wrn_depth=10, wrn_width=1, module=None, param_goal=None, mac_goal=None,
               candidates=3, proxies="params,fisher", batch_size=8, epochs=1, lr=0.1,
               train_subset=16, val_subset=10, seed=0)   # as study.py's first version wrote it
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "settings.json").write_text(json.dumps(old))
    df = run(tmp_path / "old", tiny_imagefolder, ["--proxies", "params,fisher"])
    assert json.loads((tmp_path / "old" / "settings.json").read_text()) == old
    x, y, n = study.fixed_minibatch(study.StudyConfig(
        data_loc=tiny_imagefolder, batch_size=8, train_subset=16), torch.device("cpu"))
    for i, row in df.iterrows():
        torch.manual_seed(0 + i)   # rule 1, by hand
        net = WideResNet(10, 1, ast.literal_eval(row["convs"]), n)
        assert get_proxy("fisher")(net, x, y) == pytest.approx(row["fisher"], rel=1e-5)
    seeds = {p.stem: load_checkpoint(str(p))["args"]["seed"]
             for p in (tmp_path / "old" / "checkpoints").glob("*.t7")}
    assert seeds == {"candidate_0": 0, "candidate_1": 1, "candidate_2": 2}
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "settings.json").write_text(json.dumps({**old, "init_rule": 9}))
    with pytest.raises(UserError, match=r"records init_rule 9, which this version does not "
                                        r"know \(it knows 1, 2\)"):
        run(tmp_path / "new", tiny_imagefolder, ["--proxies", "params,fisher"])
    assert os.listdir(tmp_path / "new") == ["settings.json"]


def test_a_candidates_training_honours_amp_and_starts_from_its_scored_seed():
    cfg = study.StudyConfig(amp="off", seed=3, train_seeds=2)
    train = study.train_config(cfg, ["Conv"] * 6, 5, "out", replica=1)
    assert (train.amp, train.seed, train.subset_seed) == ("off", (1 * P + 3) * P + 5 + 1, 3)
    assert train.teacher_checkpoint == "candidate_5_seed1"
    legacy = study.train_config(cfg.replace(init_rule=1), ["Conv"] * 6, 5, "out", replica=1)
    assert legacy.seed == 3 + 5 + 1000
    assert study.get_args_parser().parse_args(["cifar10", "--amp", "bf16"]).amp == "bf16"


P = 1_000_003   # the modulus of store.candidate_key's rule 2


def test_study_refuses_other_settings(tmp_path, tiny_imagefolder):
    run(tmp_path, tiny_imagefolder, ["--proxies", "params"])
    with pytest.raises(UserError, match=r"records different settings \(epochs 1 then, 2 now\)"):
        run(tmp_path, tiny_imagefolder, ["--proxies", "params", "--epochs", "2"])


def test_a_folder_study_refuses_another_image_size(tmp_path, tiny_imagefolder):
    """The image size is part of a study's settings: a folder studied at 32 pixels does not
    resume at 24 (its rows would mix two input sizes)."""
    argv = ["folder", "--data_loc", tiny_imagefolder, "--wrn_depth", "10", "--wrn_width", "1",
            "--candidates", "3", "--epochs", "1", "--batch_size", "8", "--train_subset", "16",
            "--val_subset", "10", "--proxies", "params", "--out", str(tmp_path)]
    study.main(study.get_args_parser().parse_args(argv + ["--image_size", "32"]))
    with pytest.raises(UserError, match=r"records different settings \(image_size 32 then, 24 now\)"):
        study.main(study.get_args_parser().parse_args(argv + ["--image_size", "24"]))


STUDY_BAD = {
    "infeasible_goal": (["--param_goal", "10"], "no genotype has params within"),
    "no_cuda": (["--device", "cuda"], "--device cuda: no CUDA GPU"),
    "candidates_0": (["--candidates", "0"], "--candidates: 0: must be at least 3"),
    "epochs_0": (["--epochs", "0"], "--epochs: 0: must be at least 1"),
    "no_data": (["--data_loc", "/nonexistent"], "not found at /nonexistent"),
}


@pytest.mark.parametrize("case", sorted(STUDY_BAD))
def test_study_validates_before_writing(case, tiny_imagefolder, tmp_path, capsys):
    if case == "no_cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    extra, message = STUDY_BAD[case]
    err = one_error_line(capsys, lambda: run_cli(study.main, study.get_args_parser(),
                         study_argv(tmp_path / "out", tiny_imagefolder, *extra)), tmp_path)
    assert message in err and not (tmp_path / "out").exists()


def test_study_survives_a_kill_in_candidate_0(tiny_imagefolder, tmp_path, monkeypatch):
    block = tmp_path / "myblock_s8.py"
    block.write_text("import torch.nn as nn\nfrom models.blocks import register_block\n"
                     "register_block('MyConvS8', lambda i, o, s: nn.Conv2d(i, o, 3, s, 1))\n")
    args = study.get_args_parser().parse_args(
        study_argv(tmp_path, tiny_imagefolder, "--module", str(block)))
    from blockswap import engine
    real = engine.train_on

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "train_on", killed)
    with pytest.raises(KeyboardInterrupt):
        study.main(args)
    path = tmp_path / "study.csv"
    header = path.read_text()
    assert header.count("\n") == 1 and header.startswith("index,convs,params,macs,fisher,")
    monkeypatch.setattr(engine, "train_on", real)
    for left in ("", header, header + "0,['Conv', 'Co"):   # 0 bytes, header only, a torn row
        path.write_text(left)
        df = study.main(args)
        assert list(df["index"]) == [0, 1, 2]
        text = path.read_text()
        assert text.count("index,") == 1 and text.count("\n") == 4, text
        path.write_text(header)

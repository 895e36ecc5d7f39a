"""What a new user trips on, each ending in one clear line or the right file: a tensor cache of another folder, damaged images and
settings files, a CUDA latency device without CUDA, search outputs of another network beside
the shipped genotypes, small wrong messages, and progress bars in log files."""
import argparse
import io
import os
import re
import shutil
import sys

import pytest
import torch

from blockswap import cli
from blockswap import count_ops
import fisher_rank
from blockswap import loaders
from blockswap import search
from blockswap import store
from blockswap import tensor_data
from blockswap.cli import run_cli
from models import UserError
from test_fisher_rank_cli import GOAL, argv, cached_cost_tables  # noqa: F401 (autouse fixture)
from conftest import one_error_line as one_line


def search_cli(data, out, *extra):
    p = fisher_rank.get_args_parser()
    return lambda: run_cli(fisher_rank.main, p, argv(data, out, *extra))


def train_cli(data, ckdir, *extra):
    import main as M
    args = ["cifar10", "teacher", "--wrn_depth", "10", "--wrn_width", "1", "--data_loc", data,
            "--checkpoint_dir", str(ckdir), "--batch_size", "10", "--workers", "0",
            "--epochs", "1", "--no-plot", *extra]
    return lambda: run_cli(M.main, M.get_args_parser(), args)


# --- item 2: the tensor cache belongs to its folder --------------------------------------------

def test_a_cache_of_another_folder_is_rebuilt(tiny_imagefolder, tmp_path, capsys):
    cache = tmp_path / "cache"
    train, test, _ = loaders.get_datasets("cifar10", tiny_imagefolder)
    tensor_data.imagefolder_images(test, cache_dir=str(cache))   # the test split's cache (20)
    test_cache = tensor_data.cache_path(test.root, test.samples, str(cache))
    # copied over the train split's cache name, as a user did
    shutil.copy(test_cache, tensor_data.cache_path(train.root, train.samples, str(cache)))
    capsys.readouterr()
    data = tensor_data.imagefolder_images(train, cache_dir=str(cache))
    assert len(data) == len(train) == 40
    assert data.labels.tolist() == [y for _, y in train.samples]
    out = capsys.readouterr().out
    assert "note: rebuilding the cache" in out and "20 images" in out, out
    # rebuilt: the next read takes the cache without a note
    assert len(tensor_data.imagefolder_images(train, cache_dir=str(cache))) == 40
    assert "note" not in capsys.readouterr().out


def test_a_cache_with_other_labels_is_rebuilt(tiny_imagefolder, tmp_path, capsys):
    train, _, _ = loaders.get_datasets("cifar10", tiny_imagefolder)
    path = tensor_data.cache_path(train.root, train.samples, str(tmp_path))
    data = tensor_data.imagefolder_images(train, cache_dir=str(tmp_path))
    torch.save({"version": tensor_data.CACHE_VERSION, "images": data.images,
                "labels": (data.labels + 1) % 10}, path)
    capsys.readouterr()
    again = tensor_data.imagefolder_images(train, cache_dir=str(tmp_path))
    assert torch.equal(again.labels, data.labels)
    assert "labels differ" in capsys.readouterr().out


# --- item 8: damaged images, empty class folders, with both loaders -----------------------------

def damaged_copy(src, dst, kind):
    """A copy of an image folder with one damaged train image (or an empty class folder)."""
    shutil.copytree(src, dst)
    victim = os.path.join(dst, "train", "cat", sorted(os.listdir(os.path.join(dst, "train", "cat")))[0])
    if kind == "corrupt":
        with open(victim, "wb") as f:
            f.write(b"not an image at all" * 10)
    elif kind == "truncated":
        from PIL import Image
        os.remove(victim)
        victim = victim[:-4] + ".jpg"
        Image.new("RGB", (32, 32), (200, 10, 10)).save(victim, quality=95)
        with open(victim, "rb") as f:
            data = f.read()
        with open(victim, "wb") as f:
            f.write(data[:len(data) // 2])
    else:   # an empty class folder
        shutil.rmtree(os.path.join(dst, "train", "dog"))
        os.makedirs(os.path.join(dst, "train", "dog"))
        victim = os.path.join(dst, "train", "dog")
    return str(dst), victim


@pytest.mark.parametrize("loader", ["tensor", "pil"])
@pytest.mark.parametrize("kind", ["corrupt", "truncated", "empty"])
def test_damaged_data_is_one_line_naming_it(kind, loader, tiny_imagefolder, tmp_path, capsys):
    data, victim = damaged_copy(tiny_imagefolder, tmp_path / "data", kind)
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    # the PIL path decodes during the first epoch, once engine.py has begun its log: only the
    # error line is checked there (engine.py's side, see the report)
    watched = None if (loader == "pil" and kind != "empty") else ckdir
    err = one_line(capsys, train_cli(data, ckdir, "--loader", loader, "--cache_dir",
                                     str(tmp_path / "cache")), watched)
    assert victim in err, err
    assert ("replace it" in err) if kind != "empty" else ("add its images" in err), err


@pytest.mark.parametrize("workers", [0, 1])
def test_damaged_image_in_a_worker_is_one_line(tiny_imagefolder, tmp_path, capsys, workers):
    data, victim = damaged_copy(tiny_imagefolder, tmp_path / "data", "corrupt")
    train, _, _ = loaders.get_datasets("cifar10", data)

    def decode(_):
        tensor_data.decode_files([p for p, _ in train.samples], workers)
    err = one_line(capsys, lambda: run_cli(decode, argparse.ArgumentParser(), []))
    assert victim in err


# --- item 9: a damaged settings file ---------------------------------------------------------

@pytest.mark.parametrize("text", ["{ broken", "[1, 2]", "\xff\xfe"])
def test_corrupt_settings_file_is_one_line(text, tmp_path, capsys):
    path = tmp_path / "fisher_at_20000.json"
    path.write_bytes(text.encode("latin-1"))
    err = one_line(capsys, lambda: run_cli(lambda a: store.check_settings(str(path), {"a": 1}),
                                           argparse.ArgumentParser(), []), tmp_path)
    assert str(path) in err and "move it" in err


def test_search_with_corrupt_settings_is_one_line(tiny_imagefolder, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / f"fisher_at_{GOAL}.json").write_text("{ broken")
    # WRN-10-1 is not CIFAR's default network: its files carry its name (item 11)
    (results / f"wrn10-1_fisher_at_{GOAL}.json").write_text("{ broken")
    err = one_line(capsys, search_cli(tiny_imagefolder, tmp_path), tmp_path)
    assert f"wrn10-1_fisher_at_{GOAL}.json is not a readable settings file" in err


# --- item 10: latency flags ------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_latency_device_cuda_without_cuda_is_one_line(tiny_imagefolder, tmp_path, capsys):
    err = one_line(capsys, search_cli(tiny_imagefolder, tmp_path, "--latency_goal", "1",
                                      "--latency_device", "cuda"), tmp_path)
    assert "--latency_device cuda" in err and "--latency_device cpu" in err
    err = one_line(capsys, lambda: run_cli(count_ops.main, count_ops.get_args_parser(),
                                           ["--latency", "--latency_device", "cuda",
                                            "--latency_dir", str(tmp_path / "lat")]), tmp_path)
    assert "--latency_device cuda" in err


def test_latency_goal_inf_is_refused_at_parse_time(tiny_imagefolder, tmp_path, capsys):
    err = one_line(capsys, search_cli(tiny_imagefolder, tmp_path, "--latency_goal", "inf"),
                   tmp_path)
    assert "--latency_goal" in err


# --- item 11: search outputs named after a non-default network -------------------------------

def names(**kw):
    cfg = search.SearchConfig(**{"param_goal": 60000, **kw})
    return search.genotype_stem(cfg), search.SearchPaths.of(cfg).results


def test_search_outputs_name_a_non_default_network():
    assert names() == ("60000_", os.path.join("results", "fisher_at_60000.csv"))   # the seed's
    assert names(arch="wrn", wrn_depth=40, wrn_width=2) == names()
    assert names(wrn_depth=16, wrn_width=1) == (
        "wrn16-1_60000_", os.path.join("results", "wrn16-1_fisher_at_60000.csv"))
    assert names(wrn_depth=16, wrn_width=1, proxy="synflow")[0] == "wrn16-1_synflow_60000_"
    assert names(arch="resnet18")[0] == "resnet18_60000_"
    assert names(dataset="imagenet")[0] == "60000_"   # ResNet-34: ImageNet's default


def test_two_networks_at_one_goal_keep_apart(tiny_imagefolder, tmp_path):
    def run(*extra):
        p = fisher_rank.get_args_parser()
        a = argv(tiny_imagefolder, tmp_path, "--samples", "2", "--no-plot", *extra)
        return fisher_rank.main(p.parse_args(a))
    s10 = run()
    s16 = run("--wrn_depth", "16", "--param_goal", "60000")
    assert os.path.basename(s10["genotype"]).startswith("wrn10-1_20000_")
    assert os.path.basename(s16["results"]) == "wrn16-1_fisher_at_60000.csv"
    assert os.path.basename(s16["genotype"]).startswith("wrn16-1_60000_")


# --- item 13: small wrong messages -----------------------------------------------------------

def test_bad_wrn_depth_names_its_flag(tiny_imagefolder, tmp_path, capsys):
    err = one_line(capsys, train_cli(tiny_imagefolder, tmp_path, "--wrn_depth", "15"), tmp_path)
    assert "--wrn_depth" in err and "--conv" not in err and "6n+4" in err
    err = one_line(capsys, search_cli(tiny_imagefolder, tmp_path, "--wrn_depth", "15"), tmp_path)
    assert "--wrn_depth" in err
    with pytest.raises(UserError, match="--wrn_depth 15"):
        from models import Network
        Network.from_args(argparse.Namespace(arch="wrn", wrn_depth=15, wrn_width=1))


def test_resumed_search_with_nothing_left_says_so(tiny_imagefolder, tmp_path, capsys):
    call = search_cli(tiny_imagefolder, tmp_path, "--samples", "2", "--no-plot")
    call()
    capsys.readouterr()
    call()
    out = capsys.readouterr().out
    assert "nan" not in out and "all scored before" in out, out


def test_cache_note_keeps_to_the_flag_given(tiny_imagefolder, tmp_path, capsys, monkeypatch):
    _, test, _ = loaders.get_datasets("cifar10", tiny_imagefolder)

    def refuse(path, write):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(tensor_data, "atomic_write", refuse)
    tensor_data.imagefolder_images(test, cache_dir=str(tmp_path))
    out = capsys.readouterr().out
    assert "cannot write the cache" in out and "pass --cache_dir" not in out, out
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))   # no default cache yet
    tensor_data.imagefolder_images(test, cache_dir=None)
    assert "pass --cache_dir" in capsys.readouterr().out


@pytest.mark.parametrize("cell,message", [
    ("['Conv', 'DConvZ']", "unknown block type 'DConvZ'"),
    ("['Conv', ", "cannot read the convs cell"),
])
def test_bad_convs_cell_in_results_names_file_and_line(cell, message, tmp_path):
    path = tmp_path / "fisher_at_1.csv"
    path.write_text("index,convs,params,macs,fisher\n"
                    "0,\"['Conv', 'Conv', 'Conv']\",1,2,0.5\n"
                    f"1,\"{cell}\",1,2,0.5\n")
    with pytest.raises(UserError, match=f"{path}, line 3.*{message}") as e:
        store.read_rows(str(path), "fisher")
    assert "repair or delete that line" in str(e.value)
    path.write_text("index,convs,params,macs,fisher\n0,\"['Conv']\",many,2,0.5\n")
    with pytest.raises(UserError, match=f"{path}, line 2: not a results row"):
        store.read_rows(str(path), "fisher")


# --- item 14: progress in logs ---------------------------------------------------------------

def untimed(line: str) -> str:
    """A progress line without its times (tests/test_launch_notes.py checks those exactly)."""
    return re.sub(r" \[elapsed [0-9:]+(, ETA [0-9:]+)?(, )?", " [", line).replace(" []", "")


def test_progress_off_a_terminal_prints_lines_not_redraws(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", io.StringIO())   # not a terminal
    monkeypatch.setattr(sys, "stdout", err)             # the lines go with the run's notes
    bar = cli.progress(range(200), desc="decoding")
    assert list(bar) == list(range(200))
    lines = [untimed(line) for line in err.getvalue().splitlines()]
    assert "\r" not in err.getvalue()
    assert lines[0] == "decoding: 20/200 (10%)" and lines[-1] == "decoding: 200/200 (100%)"
    assert len(lines) == 10
    err.truncate(0)
    err.seek(0)
    bar = cli.progress(total=3, desc="x")
    bar.set_postfix(best="#1")
    for _ in range(3):
        bar.update(1)
    assert [untimed(line) for line in err.getvalue().splitlines()] == [
        "x: 1/3 (33%) [best=#1]", "x: 2/3 (66%) [best=#1]", "x: 3/3 (100%) [best=#1]"]
    err.truncate(0)
    err.seek(0)
    list(cli.progress(range(5), disable=True))
    assert err.getvalue() == ""


def test_decoding_and_search_log_without_carriage_returns(tiny_imagefolder, tmp_path, capfd):
    # capfd: stderr is a pipe, as in `python fisher_rank.py ... > log 2>&1`
    p = fisher_rank.get_args_parser()
    fisher_rank.main(p.parse_args(argv(tiny_imagefolder, tmp_path, "--samples", "2", "--no-plot",
                                       "--cache_dir", str(tmp_path / "cache"))))
    out = capfd.readouterr()
    assert "\r" not in out.err + out.out and out.err == "", out.err
    assert "decoding" in out.out and f"fisher at {GOAL}: 2/2 (100%)" in out.out, out.out


# --------------------------------------------------------------------------------------------
# Items 1, 3: a study's --out is locked and its rows are unique by index; too few candidates.
# --------------------------------------------------------------------------------------------

def study_cli(folder, data, *extra):
    import study
    from conftest import study_argv
    p = study.get_args_parser()
    return lambda: run_cli(study.main, p, study_argv(folder, data, *extra))


def test_a_second_study_into_one_out_is_refused(tiny_imagefolder, tmp_path, capsys):
    # a live run holds the lock (this process stands for it): the second one writes nothing
    (tmp_path / "study.lock").write_text(f"{os.getpid()} {__import__('socket').gethostname()}\n")
    err = one_line(capsys, study_cli(tmp_path, tiny_imagefolder), tmp_path)
    assert "another run" in err and "study.csv" in err


def test_study_rows_read_back_are_unique_by_index(tiny_imagefolder, tmp_path):
    import study
    from conftest import study_argv
    args = study.get_args_parser().parse_args(study_argv(tmp_path, tiny_imagefolder))
    df = study.main(args)
    path = tmp_path / "study.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + lines[1:]) + "\n")   # what two writers used to leave
    again = study.main(args)
    assert list(again["index"]) == [0, 1, 2]
    assert again["val_error"].tolist() == df["val_error"].tolist()


@pytest.mark.parametrize("n", ["1", "2"])
def test_study_refuses_fewer_than_three_candidates(n, tiny_imagefolder, tmp_path, capsys):
    err = one_line(capsys, study_cli(tmp_path, tiny_imagefolder, "--candidates", n), tmp_path)
    assert f"--candidates: {n}: must be at least 3" in err


# --------------------------------------------------------------------------------------------
# Items 5, 6, 13: flags refused at start-up, one line each.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--dkd_warmup", "-5"], "--dkd_warmup: -5: must be at least 0"),
    (["--dkd_temperature", "-4"], "--dkd_temperature: -4: must be a positive number"),
    (["--dkd_temperature", "0"], "--dkd_temperature: 0: must be a positive number"),
    (["--dkd_beta", "-6"], "--dkd_beta: -6: must be at least 0"),
    (["--dist_temperature", "0"], "--dist_temperature: 0: must be a positive number"),
    (["--dist_beta", "nan"], "--dist_beta: nan: must be at least 0"),
    (["--dkd_alpha", "inf"], "--dkd_alpha: inf: must be a finite number"),
    (["--amp", "bf16", "--no_amp"], "--no_amp and --amp bf16 contradict each other"),
], ids=lambda v: v if isinstance(v, str) else "_".join(v))
def test_bad_training_flags_are_one_line_at_start_up(flags, message, tiny_imagefolder,
                                                     tmp_path, capsys):
    err = one_line(capsys, train_cli(tiny_imagefolder, tmp_path / "ck", *flags), tmp_path)
    assert message in err
    assert not (tmp_path / "ck").exists()


def test_best_file_that_is_a_folder_is_refused_before_the_search(tiny_imagefolder, tmp_path,
                                                                  capsys):
    (tmp_path / "best").mkdir()
    err = one_line(capsys, search_cli(tiny_imagefolder, tmp_path, "--best_file",
                                      str(tmp_path / "best")), tmp_path)
    assert "--best_file" in err and "is a folder" in err


# --------------------------------------------------------------------------------------------
# Item 12: plots.py writes where the README says.
# --------------------------------------------------------------------------------------------

def test_plots_default_pictures_are_the_documented_names(tmp_path):
    import plots   # the script (its CLI), not the library blockswap.plots
    log = tmp_path / "run.log.csv"
    log.write_text("epoch,lr,train_loss,train_error,val_loss,val_error,seconds\n"
                   "1,0.1,2.0,80,2.1,85,3\n")
    out = run_cli(plots.main, plots.get_args_parser(), ["training", str(log)])
    assert out == str(tmp_path / "run.png") and os.path.isfile(out)
    assert plots.default_out("sweep", str(tmp_path) + "/") == os.path.join(
        str(tmp_path) + "/", "sweep.png")

"""study.py through the job layer (issue 19): the launcher changes where the trainings run,
never the numbers; a study killed half-way and run again with another launcher trains only the
unfinished trainings; the early noise estimate and --stop_if_noisy."""
import os

import numpy as np
import pytest

from blockswap import engine
import study
from conftest import study_argv


def run_study(folder, data, *extra):
    args = study.get_args_parser().parse_args(
        study_argv(folder, data, "--threads_per_job", "1", "--train_seeds", "2", *extra))
    return study.main(args)


ERRORS = ["val_error_0", "val_error_1", "val_error"]


@pytest.fixture(scope="module")
def inline_study(tmp_path_factory, tiny_imagefolder):
    folder = tmp_path_factory.mktemp("inline")
    return run_study(folder, tiny_imagefolder)


def test_local_and_submitit_launchers_give_the_inline_numbers(inline_study, tiny_imagefolder,
                                                               tmp_path):
    local = run_study(tmp_path / "local", tiny_imagefolder, "--launcher", "local", "--jobs", "2")
    slurm = run_study(tmp_path / "slurm", tiny_imagefolder, "--launcher", "slurm",
                      "--jobs", "2")     # no Slurm here: submitit's local executor
    for df in (local, slurm):
        assert df[["index", "convs"] + ERRORS].equals(inline_study[["index", "convs"] + ERRORS])
    assert sorted(os.listdir(tmp_path / "local" / "jobs")) == sorted(
        f"candidate_{i}{s}.{ext}" for i in range(3) for s in ("", "_seed1")
        for ext in ("log", "result.json"))


def test_a_killed_study_reruns_only_unfinished_trainings_with_another_launcher(
        inline_study, tiny_imagefolder, tmp_path, monkeypatch):
    real, calls = engine.train_on, []

    def killed_at_third(cfg, rt):
        calls.append(cfg.teacher_checkpoint)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cfg, rt)
    monkeypatch.setattr(engine, "train_on", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        run_study(tmp_path, tiny_imagefolder)
    monkeypatch.setattr(engine, "train_on", real)
    done = sorted(f for f in os.listdir(tmp_path / "jobs") if f.endswith(".result.json"))
    assert done == ["candidate_0.result.json", "candidate_0_seed1.result.json"]
    df = run_study(tmp_path, tiny_imagefolder, "--launcher", "local", "--jobs", "2")
    logs = sorted(f for f in os.listdir(tmp_path / "jobs") if f.endswith(".log"))
    assert logs == [f"candidate_{i}{s}.log" for i in (1, 2) for s in ("", "_seed1")]
    assert df[ERRORS].equals(inline_study[ERRORS])


def noise_args(**kw):
    return study.StudyConfig(**{**dict(train_seeds=2, candidates=40, bootstrap=200), **kw})


def rows(errors):
    return {i: {"val_error_0": str(a), "val_error_1": str(b)} for i, (a, b) in enumerate(errors)}


def test_early_noise_warns_after_fifteen_percent_and_can_stop(capsys):
    rng = np.random.default_rng(0)
    d = rng.uniform(1, 3, 6)
    noisy = np.stack([50 + d, 50 - d], 1)                 # the same mean: all the spread is seeds
    check = study.EarlyNoise(noise_args(), {})
    assert check.at == 6                                  # 15% of 40
    check.check(rows(noisy[:5]))
    assert check.predicted is None                        # not yet
    check.check(rows(noisy))
    out = capsys.readouterr().out
    assert "after 6 of 40 candidates: Predicted noise ceiling" in out and "WARNING" in out
    with pytest.raises(study.StopStudy, match="--stop_if_noisy"):
        study.EarlyNoise(noise_args(stop_if_noisy=True), {}).check(rows(noisy))
    clean = np.repeat(np.arange(6.0)[:, None] * 10, 2, 1) + rng.normal(0, 0.1, (6, 2))
    capsys.readouterr()
    quiet = study.EarlyNoise(noise_args(stop_if_noisy=True), {})
    quiet.check(rows(clean))                              # architectures differ: no stop
    assert quiet.predicted.ceiling > 0.9 and "WARNING" not in capsys.readouterr().out

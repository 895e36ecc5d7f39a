"""bench/device_check.py, the one command of a GPU slot: its study is sized from the bench's
figures by a formula checked here by hand, a step is stopped at its time limit, what comes back
is at most 8 flat files under $OUT, its state resumes a study elsewhere; the smoke runs on a CPU
and names a missing torch API in one line; (slow) QUICK=1 end to end, twice."""
import json
import math
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import ROOT, write_imagefolder

sys.path.insert(0, os.path.join(ROOT, "bench"))
import device_check as C  # noqa: E402
import device_smoke  # noqa: E402


def bench_json(img_s=20_000.0, wall_s=30.0, network="WRN-16-2 teacher"):
    return {"rows": [dict(network=network, amp="bf16", compile="off", loader="tensor",
                          img_s=img_s, wall_s=wall_s, images=10_240, epochs=2,
                          val_images=1024)]}


def test_sizing_figures_take_the_wrn16_row_and_its_time_outside_the_epochs():
    img_s, start_s = C.sizing_figures(bench_json())
    # 2 epochs of 10,240 training images and 1,024 validation images (a third of the cost)
    assert img_s == 20_000.0
    assert start_s == pytest.approx(30.0 - 2 * (10_240 + 1024 / 3) / 20_000)
    assert C.sizing_figures(bench_json(network="WRN-40-2 teacher")) == (None, None)
    assert C.sizing_figures(None) == (None, None)


def test_the_prediction_is_the_formula_of_its_docstring():
    mode = C.GPU   # 8 at once, assumed 2x one process, 2 seeds, 1.5 s to score a candidate
    rate = 20_000 * 2.0 / 8
    one = 10 + 6 * (10_000 + 10_000 / 3) / rate
    expect = C.SAFETY * (10 + 40 * 1.5 + math.ceil(80 / 8) * one)
    assert C.predict_s(mode, 20_000, 10, (40, 6, 10_000), 10_000) == pytest.approx(expect)


def test_the_plan_is_the_most_training_that_fits_down_the_ladder():
    mode = C.GPU
    left = 300
    plan = C.plan_study(mode, 20_000, 10, left, 50_000, 10_000)
    chosen = (plan["candidates"], plan["epochs"], plan["train_subset"])
    assert C.predict_s(mode, 20_000, 10, chosen, 10_000) <= left
    # by brute force: the first ladder rung with a fitting plan, and its largest epochs x images
    for candidates, least in mode.ladder:
        fits = [(e * n, n, e) for e in mode.epochs for n in mode.images if e * n >= least
                and C.predict_s(mode, 20_000, 10, (candidates, e, n), 10_000) <= left]
        if fits:
            best = max(fits)
            assert chosen == (candidates, best[2], best[1])
            break
    assert plan["predicted_s"] == round(C.predict_s(mode, 20_000, 10, chosen, 10_000))
    text = C.describe_plan(plan)
    assert text.startswith(f"Study plan (sized from the bench): {chosen[0]} candidates x 2 "
                           f"training seeds, {chosen[1]} epochs on {chosen[2]:,} training images")
    assert f"predicted {plan['predicted_s']} s of the 300 s left" in text


def test_without_figures_or_time_the_plan_is_the_smallest_and_says_so():
    no_fig = C.plan_study(C.GPU, None, None, 300, 50_000, 10_000)
    tight = C.plan_study(C.GPU, 20_000, 10, 5, 50_000, 10_000)
    for plan in (no_fig, tight):
        assert (plan["candidates"], plan["epochs"], plan["train_subset"]) == (16, 2, 5_000)
    assert "no WRN-16-2 figure" in C.describe_plan(no_fig)
    assert "nothing fits" in C.describe_plan(tight)
    small = C.plan_study(C.QUICK, None, None, 60, 40, 20)   # a data set smaller than the grid
    assert small["train_subset"] == 32
    assert C.plan_study(C.QUICK, None, None, 60, 20, 20)["train_subset"] == 20


def test_a_step_is_stopped_at_its_limit_and_its_output_kept(tmp_path):
    console = C.Console(str(tmp_path))
    code = "import time; print('started', flush=True); time.sleep(60)"
    rc, text = C.run_step(console, [sys.executable, "-c", code], 3)
    assert rc == 124 and text == "started\n"
    rc, text = C.run_step(console, [sys.executable, "-c", "print('hi'); raise SystemExit(3)"], 60)
    assert (rc, text) == (3, "hi\n")
    console.close()
    assert (tmp_path / "device_check.log").read_text() == "started\nhi\n"


def test_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    args = C.get_args_parser().parse_args(["--out", str(tmp_path / "file"), "--work",
                                           str(tmp_path / "w")])
    assert C.main(args) == 2
    assert capsys.readouterr().out.strip().endswith("is a file; it must be a folder")
    assert (tmp_path / "file").read_text() == "mine"


def test_no_data_is_one_line_and_nothing_else_runs(tmp_path, capsys):
    args = C.get_args_parser().parse_args(["--data", str(tmp_path / "absent"), "--work",
                                           str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert C.main(args) == 2
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"device check: no data at {tmp_path / 'absent'}: pack CIFAR-10 with bench/pack_data.py")


def test_state_keeps_what_a_resume_needs_and_restores_into_work(tmp_path):
    work, out = tmp_path / "w", tmp_path / "o"
    for rel in ("plan.json", "tests.md", "bench.json", "study/study.csv", "study/settings.json",
                "study/jobs/candidate_0.result.json", "study/jobs/candidate_0.log",
                "study/checkpoints/candidate_0.t7", "study/study.lock", "data/pack/images.pack",
                "bench/checkpoints/t40.t7"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(rel)
    out.mkdir()
    check = C.Check(C.QUICK, "data", str(work), str(out))
    check.save_state()
    check.console.close()
    with tarfile.open(out / "state.tgz") as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
    assert names == ["bench.json", "plan.json", "study/jobs/candidate_0.log",
                     "study/jobs/candidate_0.result.json", "study/settings.json",
                     "study/study.csv", "tests.md"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "state.tgz").write_bytes((out / "state.tgz").read_bytes())
    assert C.restore(str(fresh)) and (fresh / "study" / "study.csv").read_text() == \
        "study/study.csv"
    assert not C.restore(str(fresh))   # a plan is there now: never over what a call made


def test_what_comes_back_is_at_most_8_flat_files(tmp_path):
    """The report and the study's files land flat in OUT, nothing from WORK's subfolders."""
    work, out = tmp_path / "w", tmp_path / "o"
    (work / "study" / "jobs").mkdir(parents=True)
    for name in ("study.csv", "summary.md", "study.png", "settings.json"):
        (work / "study" / name).write_text(name)
    out.mkdir()
    check = C.Check(C.QUICK, "data", str(work), str(out))
    check.report["smoke"] = "## Smoke"
    check.write_report()
    check.copy_study()
    check.save_state()
    check.console.close()
    got = sorted(os.listdir(out))
    assert got == ["device_check.log", "device_check.md", "state.tgz", "study.csv", "study.png",
                   "summary.md"]
    assert all(os.path.isfile(out / f) for f in got)


def test_the_smoke_runs_on_a_cpu(capsys):
    assert device_smoke.main(device_smoke.get_args_parser().parse_args(["--device", "cpu"])) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("versions: python ") and "torch " in out[0]
    assert out[2].startswith("training step: WRN-16-2, ") and out[-1].startswith("smoke: ok in")
    assert "Fisher potential: " in out[3] and "relative difference 0.0e+00" in out[3]


def test_a_missing_torch_api_is_named_in_one_line():
    import torch
    try:
        torch.no_such_api_of_2_14()
    except AttributeError as e:
        line = device_smoke.failure(e)
    assert line == (f"smoke failed: AttributeError: module 'torch' has no attribute "
                    f"'no_such_api_of_2_14' (an API that torch {torch.__version__} lacks or "
                    "spells otherwise; the project was written on torch 2.14)")
    assert device_smoke.failure(RuntimeError("CUDA error: out of memory\nmore")) == \
        "smoke failed: RuntimeError: CUDA error: out of memory"


@pytest.mark.slow
def test_quick_mode_end_to_end_then_a_second_call_resumes(tmp_path):
    """QUICK=1 bash bench/device_check.sh with OUT set: what lands there; then the same command
    again skips the tests and the bench and keeps the first call's plan."""
    data = write_imagefolder(tmp_path / "images", n_train=64, n_test=20, ext="jpg")
    subprocess.run([sys.executable, "bench/pack_data.py", data, str(tmp_path / "pack")],
                   cwd=ROOT, check=True, capture_output=True)
    work = tmp_path / "work"
    env = dict(os.environ, QUICK="1", OUT=str(tmp_path / "out"), WORK=str(work),
               PYTHON=sys.executable)
    argv = ["bash", "bench/device_check.sh", str(tmp_path / "pack")]
    first = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:]
    files = sorted(os.listdir(tmp_path / "out"))
    assert len(files) <= 8 and all(os.path.isfile(tmp_path / "out" / f) for f in files)
    assert {"device_check.log", "device_check.md", "state.tgz"} <= set(files)
    report = (tmp_path / "out" / "device_check.md").read_text()
    for part in ("## Smoke", "## Data", "## The gpu tests", "## Device bench", "## GPU study (",
                 "Study plan ("):
        assert part in report, report
    # a loaded CPU may cut the first call's study short: then it says so, and the second resumes
    assert "## GPU study (finished" in report or "a second call resumes it" in report
    plan = json.load(open(work / "plan.json"))
    env["OUT"] = str(tmp_path / "out2")
    second = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:]
    for line in ("gpu tests: done in an earlier call", "device bench: done in an earlier call",
                 "resuming with the plan of an earlier call"):
        assert line in second.stdout
    assert json.load(open(work / "plan.json")) == plan
    assert "## GPU study (finished" in (tmp_path / "out2" / "device_check.md").read_text()
    summary = (tmp_path / "out2" / "summary.md").read_text()
    assert "Study plan (" in summary and "validation on 20," in summary   # the whole test split
    rows = (tmp_path / "out2" / "study.csv").read_text().splitlines()
    assert len(rows) == plan["candidates"] + 1


def test_the_smoke_runs_on_a_cpu_and_fails_in_one_line_without_cuda():
    """bench/device_smoke.py, the check's first step: on a CPU the same code path passes and
    its Fisher potential agrees with itself; asked for CUDA where there is none it ends with one
    `smoke failed:` line and a non-zero status, which device_check.py reports and stops on."""
    smoke = os.path.join(ROOT, "bench", "device_smoke.py")
    ok = subprocess.run([sys.executable, smoke, "--device", "cpu"], capture_output=True,
                        text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.splitlines()[-1].startswith("smoke: ok")
    assert "Fisher potential: " in ok.stdout and "training step: WRN-16-2" in ok.stdout
    if torch.cuda.is_available():
        return
    bad = subprocess.run([sys.executable, smoke, "--device", "cuda"], capture_output=True,
                         text=True, timeout=300)
    failed = [line for line in bad.stdout.splitlines() + bad.stderr.splitlines()
              if line.startswith("smoke failed:")]
    assert bad.returncode != 0 and len(failed) == 1 and "no CUDA device" in failed[0]
    assert "Traceback" not in bad.stderr

"""Issue 25, what a new user tripped on in the job layer: the job bar in a log has elapsed time
and an ETA; --jobs above the cores and --jobs_per_device on a CPU each say so in one line; no
more workers than jobs; each result file records its threads and device, and a rerun that would
mix thread counts says so; nothing imports submitit unless --launcher slurm."""
import json
import os
import subprocess
import sys


from blockswap import cli, jobs
from blockswap.jobs import Job, LaunchSettings, launch_settings, launcher_args, run_jobs
from jobs_toy import train_toy

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def toy_jobs(n):
    return [Job(f"cand{i}", dict(name=f"cand{i}", seed=100 + i)) for i in range(n)]


def test_a_log_bar_prints_elapsed_and_eta_on_each_line(capsys):
    now = [100.0]
    bar = cli.LogProgress(total=4, desc="jobs (2 workers)", step=0.25, clock=lambda: now[0])
    bar.set_postfix(failed=0)
    for dt in (30, 30, 3600, 10):   # 30 s a job, then one of an hour
        now[0] += dt
        bar.update(1)
    assert capsys.readouterr().out.splitlines() == [
        "jobs (2 workers): 1/4 (25%) [elapsed 0:30, ETA 1:30, failed=0]",     # 30 s x 3 left
        "jobs (2 workers): 2/4 (50%) [elapsed 1:00, ETA 1:00, failed=0]",
        "jobs (2 workers): 3/4 (75%) [elapsed 1:01:00, ETA 20:20, failed=0]",  # 3660 s / 3
        "jobs (2 workers): 4/4 (100%) [elapsed 1:01:10, failed=0]"]
    unknown = cli.LogProgress(desc="x", clock=lambda: 5.0)
    unknown.update(1)
    assert capsys.readouterr().out == "x: 1 [elapsed 0:00]\n"


def parsed(*argv):
    return launcher_args().parse_args(list(argv))


def test_flags_a_launch_ignores_say_so_in_one_line(capsys, tmp_path):
    launch_settings(parsed("--launcher", "local", "--jobs_per_device", "4"), str(tmp_path), "cpu")
    out = capsys.readouterr().out.splitlines()
    assert out == ["note: --jobs_per_device 4 applies to GPUs only (--launcher local --device "
                   "cuda); ignored here (--launcher local, device cpu): --jobs sets the local "
                   "workers"]
    launch_settings(parsed("--jobs", "3"), str(tmp_path), "cpu")
    assert capsys.readouterr().out.splitlines() == [
        "note: --jobs 3 applies to --launcher local (and slurm's waves without Slurm); "
        "--launcher inline runs one job at a time"]
    launch_settings(parsed("--launcher", "local", "--jobs_per_device", "4", "--jobs", "2"),
                    str(tmp_path), "cuda:1")
    launch_settings(parsed(), str(tmp_path), "cpu")
    assert capsys.readouterr().out == ""   # what is used, or the defaults: nothing to say


def test_jobs_above_the_cores_start_no_more_workers_than_jobs_and_say_so(tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setattr(jobs.os, "sched_getaffinity", lambda pid: {0})   # a 1-core machine
    s = LaunchSettings("local", jobs=999, log_dir=str(tmp_path))
    out = run_jobs(train_toy, toy_jobs(2), s)
    assert sorted(out) == ["cand0", "cand1"] and {r["threads"] for r in out.values()} == {1}
    text = capsys.readouterr().out
    assert ("note: --jobs 999: 2 worker processes at once on 1 cores; each holds its own copy "
            "of the training data (CIFAR-10 decoded: 150 MB, 0.3 GB for 2) and they share the "
            "cores") in text
    assert "jobs (2 workers): 2/2 (100%)" in text   # 2 workers for 2 jobs, not 999


def test_the_crowding_note_is_for_cpus_only():
    assert jobs.crowding_note(LaunchSettings("local", jobs=4), 4, 4) is None
    assert jobs.crowding_note(LaunchSettings("local", jobs=16, device="cuda"), 16, 4) is None
    assert "5 worker processes at once on 4 cores" in jobs.crowding_note(
        LaunchSettings("local", jobs=5), 5, 4)


def test_result_files_record_threads_and_device_and_a_mixing_rerun_says_so(tmp_path, capsys):
    todo = toy_jobs(3)
    run_jobs(train_toy, todo[:2], LaunchSettings("inline", threads=2, log_dir=str(tmp_path)))
    record = json.load(open(tmp_path / "cand0.result.json"))
    assert record["ran_on"] == {"threads": 2, "device": "cpu"}
    capsys.readouterr()
    run_jobs(train_toy, todo, LaunchSettings("inline", threads=1, log_dir=str(tmp_path)))
    lines = capsys.readouterr().out.splitlines()
    note = [line for line in lines if line.startswith("note:")]
    assert note == [f"note: 2 finished jobs in {tmp_path} ran with 2 torch thread(s), the other "
                    "1 run with 1: on a CPU the numbers depend on the thread count, so this run "
                    "mixes them (--threads_per_job 2 matches them)"]
    assert json.load(open(tmp_path / "cand2.result.json"))["ran_on"]["threads"] == 1


def test_mixing_note_rules():
    cpu2 = {"ran_on": {"threads": 2, "device": "cpu"}}
    old = {"result": {}}                                    # written before ran_on existed
    s = LaunchSettings("local", jobs=2, threads=2, device="cpu", log_dir="j")
    assert jobs.mixing_note([cpu2, old], s, 3) is None      # same threads
    assert "ran with 2 torch thread(s), the other 3 run with 1" in jobs.mixing_note(
        [cpu2], LaunchSettings("local", threads=1, log_dir="j"), 3)
    assert jobs.mixing_note([cpu2], LaunchSettings("slurm", log_dir="j"), 3) is None  # unknown
    on_gpu = LaunchSettings("local", threads=1, device="cuda", log_dir="j")
    assert jobs.mixing_note([cpu2], on_gpu, 3) == (
        "note: 1 finished jobs in j ran on cpu, the other 3 run on cuda: this run mixes "
        "numbers from two devices")
    assert jobs.mixing_note([{"ran_on": {"threads": 8, "device": "cuda"}}], on_gpu, 3) is None


def test_nothing_imports_submitit_unless_the_slurm_launcher_runs(tmp_path):
    """The GPU machine has no submitit: every script and a local launch (its spawned workers
    too) must run without it."""
    block = tmp_path / "no_submitit"
    block.mkdir()
    (block / "submitit.py").write_text("raise ImportError('submitit is not installed here')\n")
    code = f"""
from blockswap.jobs import Job, LaunchSettings, run_jobs
import main, fisher_rank, study, export, plots, count_ops, funcs, engine
from jobs_toy import train_toy
out = run_jobs(train_toy, [Job("a", dict(name="a", seed=1))],
               LaunchSettings("local", jobs=1, threads=1, log_dir={str(tmp_path)!r}),
               progress=False)
print("ok", sorted(out))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(block), ROOT, TESTS]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok ['a']"), proc.stderr[-2000:]
    assert "submitit" not in (tmp_path / "a.log").read_text()


def test_a_thread_count_is_planned_as_the_workers_get_it(monkeypatch):
    monkeypatch.setattr(jobs.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert jobs.planned_threads(LaunchSettings("local", jobs=3)) == \
        jobs.worker_slots(LaunchSettings("local", jobs=3), 8, [])[1] == 2
    assert jobs.planned_threads(LaunchSettings("local", threads=5)) == 5
    assert jobs.planned_threads(LaunchSettings("slurm")) is None

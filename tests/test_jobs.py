"""jobs.py: the three launchers give the same numbers, skip finished jobs after a kill, report
failures with their logs, and leave no process behind on Ctrl-C / SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from blockswap import jobs
from blockswap.jobs import Job, JobsFailed, LaunchSettings, run_jobs
from jobs_toy import fail_or_echo, train_toy
from models.blocks import UserError

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def toy_jobs(n, **extra):
    return [Job(f"cand{i}", dict(name=f"cand{i}", seed=100 + i, **extra)) for i in range(n)]


def settings(tmp_path, launcher, sub="", **kw):
    return LaunchSettings(launcher=launcher, log_dir=str(tmp_path / (sub or launcher)), **kw)


def test_inline_local_and_submitit_give_the_same_numbers(tmp_path):
    todo = toy_jobs(2)
    got = {name: run_jobs(train_toy, todo, settings(tmp_path, name, threads=1, jobs=2),
                          progress=False)
           for name in ("inline", "local", "slurm")}
    assert list(got["inline"]) == ["cand0", "cand1"]
    assert got["inline"]["cand0"]["loss"] != got["inline"]["cand1"]["loss"]   # seeds differ
    for name in ("local", "slurm"):
        assert {k: (r["loss"], r["weight_sum"], r["threads"]) for k, r in got[name].items()} \
            == {k: (r["loss"], r["weight_sum"], r["threads"]) for k, r in got["inline"].items()}
    # the result files say which job and payload they hold; local and slurm wrote logs
    record = json.load(open(tmp_path / "local" / "cand1.result.json"))
    assert record["name"] == "cand1" and record["payload"]["seed"] == 101
    assert "toy cand1: loss" in (tmp_path / "slurm" / "cand1.log").read_text()
    assert "toy cand0: loss" in (tmp_path / "local" / "cand0.log").read_text()


def test_a_killed_run_resumes_with_any_launcher_and_trains_only_the_rest(tmp_path):
    calls, flag = tmp_path / "calls.txt", tmp_path / "kill"
    flag.write_text("")
    todo = toy_jobs(4, calls=str(calls))
    todo[2].payload["interrupt_if"] = str(flag)
    # cand2 is "killed" (KeyboardInterrupt) after cand0 and cand1 finished
    with pytest.raises(KeyboardInterrupt):
        run_jobs(train_toy, todo, settings(tmp_path, "inline", "run", threads=1),
                 progress=False)
    assert calls.read_text().split() == ["cand0", "cand1", "cand2"]
    calls.write_text("")
    flag.unlink()
    out = run_jobs(train_toy, todo, settings(tmp_path, "local", "run", threads=1, jobs=2),
                   progress=False)
    assert sorted(calls.read_text().split()) == ["cand2", "cand3"]
    assert list(out) == ["cand0", "cand1", "cand2", "cand3"]
    calls.write_text("")
    assert run_jobs(train_toy, todo, settings(tmp_path, "slurm", "run", threads=1),
                    progress=False) == out
    assert calls.read_text() == ""                   # all finished: nothing ran


class Enough(Exception):
    pass


def test_on_result_sees_each_result_as_it_ends_and_can_stop_the_run(tmp_path):
    calls, seen = tmp_path / "calls.txt", []
    todo = toy_jobs(3, calls=str(calls))

    def stop_after_first(name, result):
        seen.append(name)
        raise Enough   # e.g. a study's --stop_if_noisy
    with pytest.raises(Enough):
        run_jobs(train_toy, todo, settings(tmp_path, "local", "run", jobs=1, threads=1),
                 on_result=stop_after_first, progress=False)
    assert seen == ["cand0"] and calls.read_text().split() == ["cand0"]   # nothing else ran
    out = run_jobs(train_toy, todo, settings(tmp_path, "inline", "run", threads=1),
                   on_result=lambda name, result: seen.append((name, result["loss"])),
                   progress=False)
    assert seen[1:] == [(n, r["loss"]) for n, r in out.items()]   # finished ones first
    assert calls.read_text().split() == ["cand0", "cand1", "cand2"]


def test_a_result_of_other_settings_is_an_error_not_reused(tmp_path):
    s = settings(tmp_path, "inline", threads=1)
    run_jobs(train_toy, toy_jobs(1), s, progress=False)
    changed = [Job("cand0", dict(name="cand0", seed=999))]
    with pytest.raises(UserError, match="cand0.result.json holds job cand0's result for other"):
        run_jobs(train_toy, changed, s, progress=False)


@pytest.mark.parametrize("launcher", ["inline", "local"])
def test_a_failed_job_is_reported_with_its_log_and_the_others_go_on(tmp_path, launcher):
    todo = [Job(n, dict(name=n, fail=n == "b")) for n in ("a", "b", "c")]
    with pytest.raises(JobsFailed) as err:
        run_jobs(fail_or_echo, todo, settings(tmp_path, launcher, jobs=2), progress=False)
    assert {k: r["echo"] for k, r in err.value.results.items()} == {"a": "a", "c": "c"}
    [failure] = err.value.failures
    assert failure.name == "b" and "1 of 3 jobs failed: b (" in str(err.value)
    if launcher == "local":
        log = (tmp_path / "local" / "b.log").read_text()
        assert failure.log == str(tmp_path / "local" / "b.log") and failure.log in str(err.value)
        assert "hello from b" in log and "RuntimeError: job b was told to fail" in log
        assert "hello from a" in (tmp_path / "local" / "a.log").read_text()
        # each worker got its share of the cores, also as OMP_NUM_THREADS before torch loaded
        share = max(1, len(os.sched_getaffinity(0)) // 2)
        assert {(r["threads"], r["omp"]) for r in err.value.results.values()} \
            == {(share, str(share))}


def test_worker_slots_spread_jobs_over_gpus_k_per_device():
    s = LaunchSettings(launcher="local", device="cuda", jobs_per_device=2)
    envs, threads = jobs.worker_slots(s, cores=16, gpus=["3", "5"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3", "3", "5", "5"]
    assert threads == 4 and {e["OMP_NUM_THREADS"] for e in envs} == {"4"}
    envs, threads = jobs.worker_slots(LaunchSettings(jobs=3), cores=2, gpus=[])
    assert len(envs) == 3 and threads == 1 and "CUDA_VISIBLE_DEVICES" not in envs[0]
    with pytest.raises(UserError, match="--jobs 5 needs more than the 2 visible GPU"):
        jobs.worker_slots(LaunchSettings(device="cuda", jobs=5, jobs_per_device=2), 16,
                          ["0", "1"])
    with pytest.raises(UserError, match="no CUDA device is visible"):
        jobs.worker_slots(LaunchSettings(device="cuda"), 16, [])


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 7")
    assert jobs._visible_gpus() == ["2", "7"]


def test_launcher_flags_are_checked_at_parse_time_and_become_settings():
    import argparse
    p = argparse.ArgumentParser(parents=[jobs.launcher_args()])
    for bad in (["--launcher", "pbs"], ["--jobs", "-1"], ["--jobs_per_device", "0"],
                ["--slurm_time", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    args = p.parse_args(["--launcher", "slurm", "--slurm_partition", "gpu", "--slurm_time",
                         "30", "--slurm_parallel", "8", "--slurm_mem", "24"])
    s = jobs.launch_settings(args, "out/jobs", "cuda:1")
    assert s == LaunchSettings(launcher="slurm", log_dir="out/jobs", device="cuda",
                               slurm_partition="gpu", slurm_time=30, slurm_parallel=8,
                               slurm_mem=24)
    assert s.gpus_per_job() == 1 and jobs.launch_settings(args, "j", "cpu").gpus_per_job() == 0
    args.slurm_gpus_per_job = 2
    assert jobs.launch_settings(args, "j", "cuda").gpus_per_job() == 2


def test_the_executor_asks_for_the_settings_resources(tmp_path, monkeypatch):
    """What _executor hands submitit: memory, partition, array width and cores only when set
    (0/None: the cluster's defaults, so no key at all)."""
    import submitit
    asked = []
    monkeypatch.setattr(submitit.AutoExecutor, "update_parameters",
                        lambda self, **kw: asked.append(kw))
    jobs._executor(LaunchSettings(launcher="slurm", log_dir=str(tmp_path), slurm_time=30))
    assert asked[-1] == dict(timeout_min=30, gpus_per_node=0, tasks_per_node=1, nodes=1,
                             name="blockswap")
    jobs._executor(LaunchSettings(launcher="slurm", log_dir=str(tmp_path), slurm_time=30,
                                  threads=4, slurm_partition="gpu", slurm_parallel=8,
                                  slurm_mem=24, slurm_gpus_per_job=1))
    assert asked[-1] == dict(timeout_min=30, gpus_per_node=1, tasks_per_node=1, nodes=1,
                             name="blockswap", cpus_per_task=4, slurm_partition="gpu",
                             slurm_array_parallelism=8, mem_gb=24)


def test_job_names_must_be_unique_file_names_and_fn_top_level(tmp_path):
    s = settings(tmp_path, "inline")
    with pytest.raises(ValueError, match="unique"):
        run_jobs(fail_or_echo, [Job("a", {}), Job("a", {})], s)
    with pytest.raises(ValueError, match="file-name safe"):
        run_jobs(fail_or_echo, [Job("../a", {})], s)
    with pytest.raises(ValueError, match="top-level"):
        run_jobs(lambda p: {}, [Job("a", {})], s)


def _descendants(pid):
    """Live (not zombie) processes below `pid`, from /proc."""
    parents = {}
    for d in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{d}/stat").read()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if d.isdigit() and fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


SLEEPER = """
import signal
import sys
# Ctrl-C as a terminal delivers it: a shell started in the background (`pytest ... &`, nohup)
# hands its children SIGINT ignored, and Python keeps it so; the test is about the handler
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path[:0] = [{root!r}, {tests!r}]
from blockswap.jobs import Job, LaunchSettings, run_jobs
from jobs_toy import sleep_job
if __name__ == "__main__":
    todo = [Job(f"s{{i}}", dict(name=f"s{{i}}", pid_dir={pids!r}, seconds=120)) for i in range(3)]
    run_jobs(sleep_job, todo, LaunchSettings(launcher="local", jobs=2, log_dir={logs!r}))
"""


SLOW = pytest.mark.slow   # each case starts 3 Python processes that load torch


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=SLOW),
                                 pytest.param(signal.SIGKILL, marks=SLOW)])
def test_ctrl_c_or_sigterm_stops_every_worker_and_leaves_no_orphan(tmp_path, sig):
    """SIGINT/SIGTERM: the parent stops its workers; SIGKILL: the workers see their parent
    gone and stop themselves."""
    pids = tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER.format(root=ROOT, tests=TESTS, pids=str(pids),
                                     logs=str(tmp_path / "logs")))
    parent = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120    # a guard against hanging, not a speed assert
    while len(os.listdir(pids)) < 2 and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.1)
    workers = [int((pids / f).read_text()) for f in os.listdir(pids)]
    assert len(workers) == 2, parent.stderr.read().decode()[-2000:]
    below = _descendants(parent.pid)
    assert set(workers) <= set(below)
    parent.send_signal(sig)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode != 0
    assert sig == signal.SIGKILL or b"KeyboardInterrupt" in err
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in below) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in below if _alive(p)] == []
    assert sorted(os.listdir(pids)) == ["s0.pid", "s1.pid"]   # the third never started

"""One job layer, three launchers: run many independent trainings (or any function of a
payload) inline, as worker processes on this machine, or as a Slurm job array (submitit).

    results = run_jobs(fn, [Job("cand0_seed0", payload0), ...], LaunchSettings(...))

`fn` is a top-level (picklable) function `fn(payload) -> dict` whose result is JSON-
serialisable. Every launcher runs the same wrapper (`run_job`) around it, which writes the
result to `<log_dir>/<name>.result.json` (atomically) when the job ends, with the torch
threads and the device it ran with (`ran_on`: on a CPU the numbers depend on the thread
count, and a rerun that would mix counts says so). run_jobs first
collects the jobs whose result file exists and runs only the rest, so a run killed half-way
and started again, with any launcher, trains only the unfinished jobs. The returned results
are read back from those files, so they are the same numbers whichever launcher ran them.

Where the jobs run (scripts take these through `launcher_args()` and `launch_settings()`):
- inline: one after another in this process, output on the console.
- local:  --jobs N worker processes (a fresh spawned process per job). On CUDA the workers
          are spread over the visible GPUs, --jobs_per_device K per GPU, each worker seeing
          exactly one (CUDA_VISIBLE_DEVICES), so `cuda` in a job means its own GPU. Threads per
          job = cores // N unless pinned. Each job's output goes to `<log_dir>/<name>.log`.
- slurm:  submitit's AutoExecutor, one job array; without Slurm, submitit's local executor
          runs the same path (how the tests exercise it).
"""
import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from blockswap.cli import at_least, progress as progress_bar
from blockswap.files import atomic_write
from models.blocks import UserError

LAUNCHERS = ("inline", "local", "slurm")
NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+=-]*$")   # becomes a file name
STOP_GRACE_S = 10   # seconds a stopped worker gets to clean up (DataLoader workers) before SIGKILL


@dataclass(frozen=True)
class Job:
    """One unit of work: a unique, file-name-safe `name` and the `payload` fn receives."""
    name: str
    payload: Any


@dataclass(frozen=True)
class LaunchSettings:
    """Where and how run_jobs runs the jobs (see the module docstring)."""
    launcher: str = "inline"
    jobs: int = 0                 # local: concurrent workers; 0: GPUs x jobs_per_device, or cores
    jobs_per_device: int = 1      # local on CUDA: workers sharing one GPU (small networks)
    threads: int = 0              # torch threads per job; 0: cores // jobs (slurm: its cores)
    log_dir: str = "jobs"         # <name>.log, <name>.result.json, submitit/
    device: str = "cpu"           # device kind the jobs use: cpu, cuda or mps
    slurm_partition: Optional[str] = None
    slurm_gpus_per_job: Optional[int] = None   # GPUs per array task; None: 1 on cuda, else 0
    slurm_time: int = 120         # minutes per job before Slurm kills it (a rerun resumes)
    slurm_parallel: int = 0       # array tasks running at once; 0: submitit's default (256)
    slurm_mem: int = 0            # GB of memory per array task; 0: the cluster's default

    def gpus_per_job(self) -> int:
        """GPUs a Slurm array task asks for: --slurm_gpus_per_job, else one per CUDA job."""
        if self.slurm_gpus_per_job is not None:
            return self.slurm_gpus_per_job
        return 1 if self.device == "cuda" else 0


@dataclass(frozen=True)
class Failure:
    name: str
    log: Optional[str]            # None: inline, the traceback is on the console
    reason: str


class JobsFailed(UserError):
    """Some jobs failed; `results` holds the ones that finished, `failures` the others."""

    def __init__(self, results: Dict[str, dict], failures: List[Failure]):
        self.results, self.failures = results, failures
        where = "; ".join(f"{f.name} ({f.reason}{', log: ' + f.log if f.log else ''})"
                          for f in failures[:5])
        more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
        super().__init__(f"{len(failures)} of {len(results) + len(failures)} jobs failed: "
                         f"{where}{more}")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

# The flag of each LaunchSettings field whose flag is not its own name.
LAUNCH_FLAGS = {"threads": "threads_per_job"}


def launcher_args() -> argparse.ArgumentParser:
    """--launcher, --jobs, --jobs_per_device, --threads_per_job and the --slurm_* flags (a
    parent parser; each default is LaunchSettings'); launch_settings() turns them into one."""
    D = LaunchSettings()
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("launcher (where the trainings run; docs/scale.md)")
    g.add_argument("--launcher", default=D.launcher, choices=LAUNCHERS,
                   help="inline: one after another here; local: --jobs worker processes; "
                        "slurm: a submitit job array (submitit's local executor without Slurm)")
    g.add_argument("--jobs", default=D.jobs, type=at_least(0),
                   help="local: workers at once (0: visible GPUs x --jobs_per_device, on a "
                        "CPU one per core)")
    g.add_argument("--jobs_per_device", default=D.jobs_per_device, type=at_least(1),
                   help="local on CUDA: workers per GPU, for networks too small to fill one")
    g.add_argument("--threads_per_job", default=D.threads, type=at_least(0),
                   help="torch threads per job (0: cores // --jobs; slurm: the task's cores)")
    g.add_argument("--slurm_partition", default=D.slurm_partition,
                   help="slurm: partition (None: the cluster's own)")
    g.add_argument("--slurm_gpus_per_job", default=D.slurm_gpus_per_job, type=at_least(0),
                   help="slurm: GPUs per array task (default: 1 with --device cuda, else 0)")
    g.add_argument("--slurm_time", default=D.slurm_time, type=at_least(1),
                   help="slurm: minutes per job before Slurm kills it (a rerun finishes it)")
    g.add_argument("--slurm_parallel", default=D.slurm_parallel, type=at_least(0),
                   help="slurm: array tasks running at once (0: submitit's limit, 256)")
    g.add_argument("--slurm_mem", default=D.slurm_mem, type=at_least(0),
                   help="slurm: GB of memory per array task (0: the cluster's default; the "
                        "decoded data set and the network must fit)")
    return p


def launch_settings(args, log_dir: str, device: str) -> LaunchSettings:
    """The LaunchSettings of parsed launcher_args() flags; `device` is the script's resolved
    device (cuda:1 counts as cuda: the local launcher hands each worker its own GPU)."""
    kind = torch.device(device).type
    for note in launch_notes(args, kind):
        print(note, flush=True)
    values = {f.name: getattr(args, LAUNCH_FLAGS.get(f.name, f.name))
              for f in dataclasses.fields(LaunchSettings) if f.name not in ("log_dir", "device")}
    return LaunchSettings(log_dir=log_dir, device=kind, **values)


def launch_notes(args, kind: str) -> List[str]:
    """One line for each launcher flag given that this launch ignores (`kind`: the device)."""
    notes = []
    if args.jobs_per_device != 1 and not (kind == "cuda" and args.launcher == "local"):
        notes.append(f"note: --jobs_per_device {args.jobs_per_device} applies to GPUs only "
                     f"(--launcher local --device cuda); ignored here (--launcher "
                     f"{args.launcher}, device {kind}): --jobs sets the local workers")
    if args.jobs and args.launcher == "inline":
        notes.append(f"note: --jobs {args.jobs} applies to --launcher local (and slurm's "
                     "waves without Slurm); --launcher inline runs one job at a time")
    return notes


def planned_threads(s: LaunchSettings) -> Optional[int]:
    """The torch threads each job of `s` runs with on a CPU (None: not known before it runs,
    a Slurm task's cores)."""
    if s.launcher == "inline":
        return s.threads or torch.get_num_threads()
    if s.launcher == "local":
        cores = len(os.sched_getaffinity(0))
        return s.threads or max(1, cores // (s.jobs or cores))   # worker_slots' rule
    return s.threads or None


def mixing_note(done: Sequence[dict], s: LaunchSettings, todo: int) -> Optional[str]:
    """One line when the finished jobs' result files say they ran on another device, or on a
    CPU with other torch threads, than the `todo` others will: on a CPU the numbers depend on
    the thread count, so one study or re-rank would mix them."""
    ran = [r["ran_on"] for r in done if "ran_on" in r]
    where = f"{len(ran)} finished jobs in {s.log_dir}"
    devices = sorted({r["device"] for r in ran} - {s.device})
    if devices:
        return (f"note: {where} ran on {', '.join(devices)}, the other {todo} run on "
                f"{s.device}: this run mixes numbers from two devices")
    threads = planned_threads(s)
    other = sorted({r["threads"] for r in ran} - {threads})
    if s.device != "cpu" or threads is None or not other:
        return None
    return (f"note: {where} ran with {'/'.join(map(str, other))} torch thread(s), the other "
            f"{todo} run with {threads}: on a CPU the numbers depend on the thread count, so "
            f"this run mixes them (--threads_per_job {other[0]} matches them)")


def crowding_note(s: LaunchSettings, workers: int, cores: int) -> Optional[str]:
    """One line when more CPU workers run at once than there are cores."""
    if s.device == "cuda" or workers <= cores:
        return None
    return (f"note: --jobs {s.jobs}: {workers} worker processes at once on {cores} cores; each "
            f"holds its own copy of the training data (CIFAR-10 decoded: 150 MB, "
            f"{0.15 * workers:.1f} GB for {workers}) and they share the cores")


# --------------------------------------------------------------------------------------------
# The job wrapper and its result files (the same in every launcher)
# --------------------------------------------------------------------------------------------

def result_path(log_dir: str, name: str) -> str:
    return os.path.join(log_dir, f"{name}.result.json")


def log_path(log_dir: str, name: str) -> str:
    return os.path.join(log_dir, f"{name}.log")


def _plain(payload) -> Any:
    """The payload as JSON data (a dataclass settings record as its fields), so a result file
    can say which payload it was computed for."""
    if dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        payload = dataclasses.asdict(payload)
    return json.loads(json.dumps(payload, sort_keys=True, default=repr))


def load_record(log_dir: str, job: Job) -> Optional[dict]:
    """The result file of `job` ({"name", "payload", "result", "ran_on"}), or None when it
    has not finished. A result file written for another payload (settings changed, same
    folder) is a UserError, never reused."""
    path = result_path(log_dir, job.name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get("payload") != _plain(job.payload):
        raise UserError(f"{path} holds job {job.name}'s result for other settings; pass "
                        f"another output folder, or delete the file to train it again")
    return record


def load_result(log_dir: str, job: Job) -> Optional[dict]:
    """The finished result of `job`, or None (load_record's rules)."""
    record = load_record(log_dir, job)
    return None if record is None else record["result"]


def ran_on(device: str) -> dict:
    """Where a job ran: torch's threads now and the device kind (with the GPU's name when
    this process has used CUDA)."""
    where = {"threads": torch.get_num_threads(), "device": device}
    if device == "cuda" and torch.cuda.is_initialized():
        where["gpu"] = torch.cuda.get_device_name()
    return where


def run_job(fn: Callable, job: Job, log_dir: str, threads: int = 0, device: str = "cpu") -> dict:
    """Run fn(job.payload) here and write its result file: the wrapper every launcher runs
    (in this process, in a worker, in a Slurm task). threads > 0 pins torch's threads;
    `device`: the kind the job runs on (LaunchSettings.device), recorded with the threads."""
    if threads > 0:
        torch.set_num_threads(threads)
    result = fn(job.payload)
    record = {"name": job.name, "payload": _plain(job.payload), "result": result,
              "ran_on": ran_on(device)}
    text = json.dumps(record, indent=1)   # a result that is not JSON data fails the job here
    atomic_write(result_path(log_dir, job.name), lambda f: f.write(text.encode()))
    return json.loads(text)["result"]


@contextlib.contextmanager
def _output_to(path: str):
    """stdout and stderr, at the file-descriptor level (C++ and subprocess output too),
    appended to `path` while the body runs; a rerun appends, nothing is lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab", buffering=0) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _header(job: Job, threads: int) -> str:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"== job {job.name}: started {time.strftime('%Y-%m-%d %H:%M:%S')}, pid "
            f"{os.getpid()}, torch threads {threads or torch.get_num_threads()}"
            f"{', CUDA_VISIBLE_DEVICES=' + gpu if gpu is not None else ''}")


def _announced(fn: Callable, job: Job, log_dir: str, threads: int, device: str) -> dict:
    """run_job between a header line and a done line (a worker's or a Slurm task's log)."""
    print(_header(job, threads), flush=True)
    result = run_job(fn, job, log_dir, threads, device)
    print(f"== job {job.name}: done {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    return result


def _logged_job(fn: Callable, job: Job, log_dir: str, threads: int, device: str) -> dict:
    """run_job with the job's output appended to <log_dir>/<name>.log (slurm)."""
    with _output_to(log_path(log_dir, job.name)):
        return _announced(fn, job, log_dir, threads, device)


def _slurm_task(fn: Callable, job: Job, log_dir: str, threads: int, device: str) -> dict:
    """A Slurm array task: threads default to the cores Slurm gave it (its CPU affinity)."""
    return _logged_job(fn, job, log_dir, threads or len(os.sched_getaffinity(0)), device)


# --------------------------------------------------------------------------------------------
# run_jobs
# --------------------------------------------------------------------------------------------

def _check_jobs(fn: Callable, jobs: Sequence[Job]) -> None:
    names = [j.name for j in jobs]
    bad = [n for n in names if not isinstance(n, str) or not NAME_OK.match(n)]
    if bad:
        raise ValueError(f"job names must be file-name safe ({NAME_OK.pattern}): {bad[:3]}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"job names must be unique: {dupes[:3]}")
    if getattr(fn, "__name__", "") == "<lambda>" or "<locals>" in getattr(fn, "__qualname__", ""):
        raise ValueError(f"fn must be a top-level function (worker processes import it): {fn!r}")


class _Collector:
    """The results and failures of one run_jobs call as its jobs end, and the caller's
    on_result hook (called here, in the calling process)."""

    def __init__(self, log_dir: str, on_result: Optional[Callable[[str, dict], None]]):
        self.log_dir, self.on_result = log_dir, on_result
        self.results: Dict[str, dict] = {}
        self.failures: List[Failure] = []

    def take(self, name: str, result: dict) -> None:
        self.results[name] = result
        if self.on_result is not None:
            self.on_result(name, result)

    def finished(self, job: Job) -> bool:
        """Take `job`'s result file (False, and a failure, when it has none)."""
        result = load_result(self.log_dir, job)
        if result is None:
            self.failed(job, log_path(self.log_dir, job.name), "no result file")
            return False
        self.take(job.name, result)
        return True

    def failed(self, job: Job, log: Optional[str], reason: str) -> None:
        self.failures.append(Failure(job.name, log, reason))

    def ended(self, job: Job, bar, reason: Optional[str] = None) -> None:
        """A worker's or a Slurm task's job has ended: counted on `bar`, then its result file
        taken (reason None) or a failure recorded with its log path and reported."""
        bar.update(1)
        if reason is None:
            self.finished(job)
        else:
            log = log_path(self.log_dir, job.name)
            self.failed(job, log, reason)
            bar.write(f"job {job.name} failed: see {log}")
        bar.set_postfix(failed=len(self.failures))


def run_jobs(fn: Callable, jobs: Sequence[Job], launcher: LaunchSettings,
             on_result: Optional[Callable[[str, dict], None]] = None,
             progress: bool = True) -> Dict[str, dict]:
    """{name: result} of every job, in the order of `jobs`: finished ones read from their
    result files, the rest run by `launcher`. on_result(name, result) is called in this
    process for each result, those finished before first, the others as they end (a study
    appends its rows and checks its noise there); an exception it raises stops the run like
    Ctrl-C does. Failed jobs do not stop the others; at the end they raise JobsFailed (which
    holds the finished results). Ctrl-C / SIGTERM stop every worker and re-raise
    KeyboardInterrupt."""
    _check_jobs(fn, jobs)
    os.makedirs(launcher.log_dir, exist_ok=True)
    collect = _Collector(launcher.log_dir, on_result)
    records = {j.name: load_record(launcher.log_dir, j) for j in jobs}
    todo = [j for j in jobs if records[j.name] is None]
    done = [r for r in records.values() if r is not None]
    if done and todo and progress:
        print(f"jobs: {len(done)} of {len(jobs)} already finished in "
              f"{launcher.log_dir}; running the other {len(todo)}", flush=True)
        note = mixing_note(done, launcher, len(todo))
        if note:
            print(note, flush=True)
    for job in jobs:
        if records[job.name] is not None:
            collect.take(job.name, records[job.name]["result"])
    run = {"inline": _run_inline, "local": _run_local, "slurm": _run_slurm}[launcher.launcher]
    if todo:
        run(fn, todo, launcher, progress, collect)
    results = {j.name: collect.results[j.name] for j in jobs if j.name in collect.results}
    if collect.failures:
        raise JobsFailed(results, collect.failures)
    return results


@contextlib.contextmanager
def _torch_threads(n: int):
    """Pin torch's threads to n (> 0) for the body, then restore them."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_inline(fn, todo, s: LaunchSettings, progress: bool, collect: _Collector) -> None:
    """One after another in this process; a job's exception is printed and the others go on
    (Ctrl-C is not an exception here: it stops the run)."""
    with _torch_threads(s.threads):
        for i, job in enumerate(todo):
            if progress:
                print(f"== job {i + 1}/{len(todo)}: {job.name}", flush=True)
            try:
                result = run_job(fn, job, s.log_dir, device=s.device)
            except Exception as e:
                traceback.print_exc()
                collect.failed(job, None, f"{type(e).__name__}: {e}")
                continue
            collect.take(job.name, result)


# --------------------------------------------------------------------------------------------
# local: worker processes
# --------------------------------------------------------------------------------------------

def _visible_gpus() -> List[str]:
    """The CUDA device ids this process may hand out (CUDA_VISIBLE_DEVICES's, if set)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def worker_slots(s: LaunchSettings, cores: int, gpus: Sequence[str]) -> Tuple[List[dict], int]:
    """(the environment of each concurrent worker, torch threads per job). On CUDA worker i
    sees GPU i // jobs_per_device only; threads = cores // workers unless pinned."""
    if s.device == "cuda":
        if not gpus:
            raise UserError("--launcher local with --device cuda: no CUDA device is visible")
        n = s.jobs or len(gpus) * s.jobs_per_device
        if n > len(gpus) * s.jobs_per_device:
            raise UserError(f"--jobs {n} needs more than the {len(gpus)} visible GPU(s) x "
                            f"--jobs_per_device {s.jobs_per_device}; raise --jobs_per_device")
        envs = [{"CUDA_VISIBLE_DEVICES": gpus[i // s.jobs_per_device]} for i in range(n)]
    else:
        n = s.jobs or cores
        envs = [{} for _ in range(n)]
    threads = s.threads or max(1, cores // n)
    for env in envs:   # read by OpenMP/MKL as torch loads, before set_num_threads runs
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return envs, threads


@contextlib.contextmanager
def _environment(env: Dict[str, str]):
    """os.environ with `env` while the body starts a process (which inherits it), restored
    after: a spawned worker must see its GPU and threads before it imports torch."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _watch_parent(parent: int) -> None:
    """Stop this worker (as SIGTERM would) when its parent dies, even by SIGKILL: no orphan
    keeps training for a run that is gone."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True).start()


def _worker(blob: bytes, log_dir: str, name: str, threads: int, parent: int,
            device: str) -> None:
    """A local worker process: output to its log, SIGTERM as KeyboardInterrupt (so `finally`
    blocks and DataLoader workers clean up), then the wrapped job; any failure is a traceback
    in the log and exit status 1."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    _watch_parent(parent)
    with _output_to(log_path(log_dir, name)):
        try:
            fn, job = pickle.loads(blob)   # imports fn's module: after the log is open
            _announced(fn, job, log_dir, threads, device)   # threads >= 1: run_job pins them
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)


def _stop(procs) -> None:
    """SIGTERM every live worker, give them STOP_GRACE_S to clean up, SIGKILL the rest, and
    reap them all."""
    procs = [p for p in procs if p.is_alive()]
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM to this process raises KeyboardInterrupt while the body runs (main thread
    only), so `kill <pid>` stops the workers like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _run_local(fn, todo, s: LaunchSettings, progress: bool, collect: _Collector) -> None:
    """A fresh spawned process per job, at most one per slot at a time."""
    cores = len(os.sched_getaffinity(0))
    envs, threads = worker_slots(s, cores, _visible_gpus())
    envs = envs[:len(todo)]   # never more workers than jobs (their threads stay as planned)
    note = crowding_note(s, len(envs), cores)
    if note and progress:
        print(note, flush=True)
    ctx, queue, free = multiprocessing.get_context("spawn"), list(todo), list(range(len(envs)))
    running = {}
    bar = progress_bar(total=len(todo), desc=f"jobs ({len(envs)} workers)", unit="job",
                       disable=not progress, dynamic_ncols=True)
    try:
        with _sigterm_as_interrupt():
            while queue or running:
                while queue and free:
                    slot, job = free.pop(0), queue.pop(0)
                    p = ctx.Process(target=_worker, name=f"job-{job.name}", args=(
                        pickle.dumps((fn, job)), s.log_dir, job.name, threads, os.getpid(),
                        s.device))
                    with _environment(envs[slot]):
                        p.start()
                    running[p.sentinel] = (p, job, slot)
                for sentinel in multiprocessing.connection.wait(list(running), timeout=1.0):
                    p, job, slot = running.pop(sentinel)
                    p.join()
                    free.append(slot)
                    collect.ended(job, bar, None if p.exitcode == 0
                                  else f"exit status {p.exitcode}")
    except BaseException:
        _stop(p for p, _, _ in running.values())
        raise
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------
# slurm: a submitit job array
# --------------------------------------------------------------------------------------------

def _executor(s: LaunchSettings):
    """submitit's AutoExecutor (Slurm where `srun` is found, else its local executor) with
    the job array's resources (cpus_per_task = --threads_per_job when set)."""
    import submitit   # only the slurm launcher needs it
    ex = submitit.AutoExecutor(folder=os.path.join(s.log_dir, "submitit"))
    params = dict(timeout_min=s.slurm_time, gpus_per_node=s.gpus_per_job(),
                  tasks_per_node=1, nodes=1, name="blockswap")
    if s.threads:
        params["cpus_per_task"] = s.threads
    if s.slurm_partition:
        params["slurm_partition"] = s.slurm_partition
    if s.slurm_parallel:
        params["slurm_array_parallelism"] = s.slurm_parallel
    if s.slurm_mem:
        params["mem_gb"] = s.slurm_mem
    ex.update_parameters(**params)
    return ex


def _import_path() -> str:
    """This process's import path as PYTHONPATH, so a job (on a node, or under submitit's
    local executor) imports fn's module as this process did, wherever it was started."""
    return os.pathsep.join(p or os.getcwd() for p in sys.path if os.path.isdir(p or "."))


def _waves(todo: List[Job], ex, s: LaunchSettings) -> List[List[Job]]:
    """One array on Slurm; submitit's local executor starts every job at once, so there the
    jobs go in waves of --slurm_parallel (or --jobs, or the cores)."""
    if ex.cluster == "slurm":
        return [todo]
    size = s.slurm_parallel or s.jobs or len(os.sched_getaffinity(0))
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def _run_slurm(fn, todo, s: LaunchSettings, progress: bool, collect: _Collector) -> None:
    import submitit
    ex, submitted = _executor(s), []
    bar = progress_bar(total=len(todo), desc="jobs (submitit)", unit="job",
                       disable=not progress, dynamic_ncols=True)
    poll = 10.0 if ex.cluster == "slurm" else 0.2   # seconds; squeue is not to be hammered
    try:
        for wave in _waves(todo, ex, s):
            n = len(wave)
            # clean_env: a driver that is itself a Slurm job (srun python study.py ...)
            # must not pass its own SLURM_* allocation on to the array
            with _environment({"PYTHONPATH": _import_path()}), submitit.helpers.clean_env():
                submitted = ex.map_array(_slurm_task, [fn] * n, wave, [s.log_dir] * n,
                                         [s.threads] * n, [s.device] * n)
            by_id = {id(j): job for j, job in zip(submitted, wave)}
            for j in submitit.helpers.as_completed(submitted, poll_frequency=poll):
                try:
                    j.result()
                    reason = None
                except Exception as e:   # FailedJobError, UncompletedJobError (timeout)
                    reason = f"{type(e).__name__}; submitit log {j.paths.stderr}"
                collect.ended(by_id[id(j)], bar, reason)
    except BaseException:
        for j in submitted:   # scancel the array's unfinished tasks / stop local controllers
            if not j.done():
                j.cancel(check=False)
        raise
    finally:
        bar.close()

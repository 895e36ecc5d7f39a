"""The device check: one command, under 9 minutes, on a machine with one GPU (docs/gpus.md).

    bash bench/device_check.sh [DATA]           # DATA: the CIFAR-10 pack (bench/pack_data.py)
    QUICK=1 bash bench/device_check.sh [DATA]   # the same path on a CPU, under 3 minutes

Its steps, each a process of its own with a time limit, in this order:
  1. smoke (30 s, bench/device_smoke.py): versions, one training step and one Fisher potential on
     the device; a failure ends the check there with one line.
  2. data: the pack unpacked and decoded once into the tensor cache (every later step reads it).
  3. the `gpu` tests (90 s): python -m pytest -m gpu.
  4. the device bench (2 min, bench/device_bench.py): eager rows, WRN-16-2 first.
  5. the GPU study (study.py) with the time that is left: its epochs, training images and
     candidates are chosen (plan_study) from the WRN-16-2 throughput and start-up time the bench
     has just measured, so that it ends in time; validated on the whole test split.
What comes back is under $OUT (a folder; without it WORK/out), flat, 6 files at most:
device_check.log (everything printed), device_check.md (the report), study.csv, summary.md,
study.png and state.tgz. The work itself is in WORK (results/device_check): a second call on the
same machine skips the tests and the bench it has and resumes the study with the same plan; on a
fresh machine, put state.tgz into WORK and carry WORK (docs/gpus.md).
"""
import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAFETY = 1.3       # predicted study time x this must fit: candidates at the budget are slower
#                    per image than the WRN-16-2 teacher the bench times (more, smaller kernels)
REPORT_S = 25      # kept back at the end: a stopped study's grace (15 s), the report, the state
SIZING_ROW = ("WRN-16-2 teacher", "off", "tensor")   # (network, compile, loader) of the sizing


def write_text(path: str, text: str) -> None:
    """Whole or not at all (a temporary file, then a rename): a second call reads these files'
    presence as 'done', so a kill mid-write must not leave half of one. (blockswap.files has
    atomic_write, but importing it brings torch into this torch-free driver.)"""
    tmp = os.path.join(os.path.dirname(path) or ".", "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Mode:
    """What differs between the GPU check and its CPU rehearsal (QUICK=1)."""
    device: str
    total_s: float                  # the whole command
    steps_s: Tuple[Tuple[str, float], ...]   # each step's time limit before the study
    bench: Tuple[str, ...]          # device_bench.py's row flags
    network: Tuple[str, ...]        # the study's network, budget and training flags
    launcher: Tuple[str, ...]       # the study's launcher flags
    jobs: int                       # trainings at once
    gain: float                     # assumed images/s of all jobs at once over one process's
    score_s: float                  # seconds to score one candidate with every proxy
    ladder: Tuple[Tuple[int, int], ...]   # (candidates, least images a training sees), best first
    epochs: Tuple[int, ...]
    images: Tuple[int, ...]
    seeds: int = 2


GPU = Mode(
    device="cuda", total_s=530,
    steps_s=(("smoke", 45), ("data", 60), ("tests", 90), ("bench", 120)),
    bench=("--networks", "WRN-16-2 teacher", "WRN-40-2 teacher", "bs800k student of WRN-40-2",
           "--amps", "bf16", "off", "--compiles", "off", "--loaders", "tensor", "pil",
           "--row_s", "45"),
    network=("--wrn_depth", "16", "--wrn_width", "2", "--param_goal", "300000",
             "--batch_size", "128", "--workers", "4", "--bootstrap", "1000"),
    launcher=("--launcher", "local", "--jobs_per_device", "8"), jobs=8,
    # 8 small trainings share one GPU: each leaves it mostly idle between kernel launches, so
    # together they run faster than one; 2x is a guess below what such GPUs usually give
    gain=2.0, score_s=1.5,
    ladder=((40, 50_000), (32, 50_000), (24, 50_000), (40, 20_000), (24, 20_000), (16, 5_000)),
    epochs=(30, 20, 15, 12, 10, 8, 6, 5, 4, 3, 2), images=(50_000, 20_000, 10_000, 5_000))
QUICK = Mode(
    device="cpu", total_s=170,
    steps_s=(("smoke", 60), ("data", 40), ("tests", 60), ("bench", 50)),
    bench=("--quick", "--networks", "WRN-16-2 teacher", "--amps", "off", "--compiles", "off",
           "--loaders", "tensor", "--no_epoch", "--no_search", "--row_s", "45"),
    network=("--wrn_depth", "10", "--wrn_width", "1", "--param_goal", "20000", "--tol", "0.5",
             "--batch_size", "16", "--workers", "0", "--bootstrap", "50",
             "--proxies", "fisher,params"),
    launcher=("--launcher", "local", "--jobs", "2", "--threads_per_job", "1"), jobs=2,
    gain=1.0, score_s=3.0, ladder=((4, 64), (3, 32)), epochs=(2, 1), images=(64, 32))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None,
                   help="CIFAR-10 pack or folder (default data/cifar10-pack; QUICK: synthetic)")
    p.add_argument("--quick", action="store_true", help="the same path on a CPU, tiny")
    p.add_argument("--work", default=None, help="default results/device_check[_quick]")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="what comes back (default $OUT, else WORK/out)")
    p.add_argument("--prepare_data", default=None, help=argparse.SUPPRESS)   # step 2's process
    return p


# --------------------------------------------------------------------------------------------
# Running a step: its output streamed to the console and the log, killed at its time limit.
# --------------------------------------------------------------------------------------------

class Console:
    """print() that also appends to <out>/device_check.log (flushed: what is there when the
    device tool stops the command still comes back)."""

    def __init__(self, out: str):
        self.log = open(os.path.join(out, "device_check.log"), "a", buffering=1)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def close(self) -> None:
        self.log.close()


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the step's process group (a study stops its workers on it), SIGKILL after."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(console: Console, argv: Sequence[str], limit_s: float) -> Tuple[int, str]:
    """(exit status, output) of argv run in the repository root; 124 when it was stopped at
    limit_s."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(list(argv), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    stopped = threading.Event()

    def stop():
        stopped.set()
        _stop(proc)
    timer = threading.Timer(max(1.0, limit_s), stop)
    timer.start()
    lines = []
    for line in proc.stdout:
        console.say(line.rstrip("\n"))
        lines.append(line)
    proc.wait()
    timer.cancel()
    return (124 if stopped.is_set() else proc.returncode), "".join(lines)


# --------------------------------------------------------------------------------------------
# Sizing the study from the bench's figures.
# --------------------------------------------------------------------------------------------

def sizing_figures(bench: Optional[dict]) -> Tuple[Optional[float], Optional[float]]:
    """(images/s of one WRN-16-2 training, seconds a training spends outside its epochs:
    start-up, data, the first epoch's warm-up) from device_bench's JSON, or (None, None)."""
    rows = [r for r in (bench or {}).get("rows", [])
            if (r["network"], r["compile"], r["loader"]) == SIZING_ROW and r.get("wall_s")]
    if not rows:
        return None, None
    r = rows[0]   # the first AMP the bench ran: the default one
    work = r["epochs"] * (r["images"] + r["val_images"] / 3) / r["img_s"]   # validation: 1/3
    return r["img_s"], max(2.0, r["wall_s"] - work)


def predict_s(mode: Mode, img_s: float, start_s: float, plan: Tuple[int, int, int],
              n_val: int) -> float:
    """Seconds of a study of (candidates, epochs, images) with mode.jobs trainings at once,
    each validating on n_val images per epoch (a third of a training image's cost)."""
    candidates, epochs, images = plan
    rate = min(img_s, img_s * mode.gain / mode.jobs)   # one training's images/s among the rest
    waves = math.ceil(candidates * mode.seeds / mode.jobs)
    one = start_s + epochs * (images + n_val / 3) / rate
    return SAFETY * (start_s + candidates * mode.score_s + waves * one)


def plan_study(mode: Mode, img_s: Optional[float], start_s: Optional[float], left_s: float,
               n_train: int, n_val: int) -> dict:
    """The study to run in left_s: down mode.ladder, the first (candidates, least images) for
    which some epochs x images (at least that many) fit, with the most images a training sees
    (ties: more distinct images). Without figures, or when nothing fits, the smallest study."""
    why = "sized from the bench"
    if img_s is not None:
        for candidates, least in mode.ladder:
            fits = [(e * n, n, e) for e in mode.epochs for n in mode.images
                    if n <= n_train and e * n >= least
                    and predict_s(mode, img_s, start_s, (candidates, e, n), n_val) <= left_s]
            if fits:
                _, images, epochs = max(fits)
                return _plan(mode, (candidates, epochs, images), img_s, start_s, left_s, n_val,
                             why)
        why = "nothing fits: the smallest study"
    else:
        why = "no WRN-16-2 figure from the bench: the smallest study"
    smallest = (mode.ladder[-1][0], min(mode.epochs), min(n for n in mode.images if n <= n_train)
                if any(n <= n_train for n in mode.images) else n_train)
    return _plan(mode, smallest, img_s, start_s, left_s, n_val, why)


def _plan(mode, plan, img_s, start_s, left_s, n_val, why) -> dict:
    candidates, epochs, images = plan
    predicted = predict_s(mode, img_s, start_s, plan, n_val) if img_s else None
    return dict(candidates=candidates, epochs=epochs, train_subset=images, seeds=mode.seeds,
                jobs=mode.jobs, val_images=n_val, img_s=img_s, start_s=start_s,
                gain=mode.gain, safety=SAFETY, left_s=round(left_s), why=why,
                predicted_s=None if predicted is None else round(predicted))


def describe_plan(p: dict) -> str:
    figures = (f"WRN-16-2 trains at {p['img_s']:,.0f} img/s in one process and takes "
               f"{p['start_s']:.0f} s outside its epochs; {p['jobs']} trainings at once are "
               f"assumed {p['gain']:g}x one; x{p['safety']:g} margin; predicted "
               f"{p['predicted_s']} s of the {p['left_s']} s left" if p["img_s"] else
               f"{p['left_s']} s left")
    return (f"Study plan ({p['why']}): {p['candidates']} candidates x {p['seeds']} training "
            f"seeds, {p['epochs']} epoch{'s' * (p['epochs'] != 1)} on {p['train_subset']:,} "
            f"training images, validated "
            f"on the whole test split ({p['val_images']:,} images), {p['jobs']} at once. "
            f"{figures}.")


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------

def prepare_data(data: str) -> dict:
    """Step 2, in its own process: read the data set (a pack is unpacked) and decode both splits
    into the tensor cache, with a worker per core. {train, test, seconds}."""
    sys.path.insert(0, ROOT)
    from blockswap.loaders import get_datasets, tensor_images
    start = time.perf_counter()
    train, test, _ = get_datasets("cifar10", data)
    for split in (train, test):
        tensor_images(split, workers=min(16, os.cpu_count() or 1))
    return {"train": len(train), "test": len(test),
            "seconds": round(time.perf_counter() - start, 1)}


def quick_data(work: str) -> str:
    """QUICK=1 without DATA: a synthetic CIFAR-sized image folder, packed as the real one is."""
    pack = os.path.join(work, "data", "pack")
    if not os.path.isdir(pack):
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        sys.path.insert(0, ROOT)
        from device_bench import synthetic_cifar
        from blockswap.packs import pack_folder
        folder = synthetic_cifar(os.path.join(work, "data", "images"), 256, 64)
        pack_folder(folder, pack)
    return pack


class Check:
    """One call of the device check: its mode, folders, clock and report pieces."""

    def __init__(self, mode: Mode, data: str, work: str, out: str):
        self.mode, self.data, self.work, self.out = mode, data, work, out
        self.deadline = time.monotonic() + mode.total_s
        self.console = Console(out)
        self.limits = dict(mode.steps_s)
        self.report = {}   # step -> its lines in device_check.md

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def path(self, *parts) -> str:
        return os.path.join(self.work, *parts)

    def python(self, name: str, argv: Sequence[str], limit_s: float) -> Tuple[int, str, float]:
        self.console.say(f"== {name} (limit {limit_s:.0f} s)")
        start = time.monotonic()
        rc, text = run_step(self.console, [sys.executable, *argv], limit_s)
        return rc, text, time.monotonic() - start

    def write_report(self) -> None:
        order = ("smoke", "data", "tests", "bench", "study")
        text = "# Device check\n\n" + "\n\n".join(self.report[k] for k in order
                                                  if k in self.report) + "\n"
        write_text(os.path.join(self.out, "device_check.md"), text)

    def smoke(self) -> bool:
        rc, text, s = self.python("smoke", ["bench/device_smoke.py", "--device", self.mode.device],
                                  self.limit("smoke"))
        lines = [line for line in text.splitlines() if line.strip()]
        if rc != 0:
            why = next((line for line in lines if line.startswith("smoke failed:")),
                       f"smoke failed: exit status {rc}" + (" (time limit)" if rc == 124 else ""))
            self.report["smoke"] = f"## Smoke: FAILED ({s:.0f} s)\n\n{why}"
            self.console.say(f"device check: {why}")
            return False
        self.report["smoke"] = f"## Smoke ({s:.0f} s)\n\n" + "\n".join(f"- {l}" for l in lines)
        return True

    def prepare(self) -> Optional[dict]:
        rc, text, s = self.python("data", [__file__, "--prepare_data", self.data],
                                  self.limit("data"))
        found = [line for line in text.splitlines() if line.startswith("{")]
        if rc != 0 or not found:
            self.report["data"] = f"## Data: FAILED ({self.data}, exit status {rc})"
            return None
        info = json.loads(found[-1])
        self.report["data"] = (f"## Data\n\n{self.data}: {info['train']:,} training and "
                               f"{info['test']:,} test images, read and decoded in "
                               f"{info['seconds']} s")
        return info

    def tests(self) -> None:
        saved = self.path("tests.md")
        if not os.path.exists(saved):
            tests = os.path.join(ROOT, "tests")
            marked = sorted(os.path.join("tests", f) for f in os.listdir(tests)   # only these
                            if f.startswith("test_") and f.endswith(".py")
                            and "mark.gpu" in open(os.path.join(tests, f)).read())
            argv = ["-m", "pytest", "-q", "-m", "gpu", "-rs", "--durations=5", *marked]
            if importlib.util.find_spec("pytest_timeout"):   # one stuck test fails alone
                argv[3:3] = ["--timeout", str(int(self.limit("tests") * 2 / 3))]
            rc, text, s = self.python("gpu tests", argv, self.limit("tests"))
            tail = "\n".join(text.strip().splitlines()[-12:])
            state = "exit 0" if rc == 0 else f"exit {rc}" + (" (time limit)" if rc == 124 else "")
            write_text(saved, f"## The gpu tests ({state}, {s:.0f} s)\n\n```\n{tail}\n```")
        else:
            self.console.say("== gpu tests: done in an earlier call")
        self.report["tests"] = open(saved).read()

    def bench(self) -> Optional[dict]:
        table, figures = self.path("bench.md"), self.path("bench.json")
        if not os.path.exists(figures):
            limit = self.limit("bench")
            argv = ["bench/device_bench.py", "--data_loc", self.data, "--work", self.path("bench"),
                    "--device", self.mode.device, "--budget_s", str(limit - 15),
                    "--json", figures, *self.mode.bench]
            rc, text, s = self.python("device bench", argv, limit)
            lines = text.splitlines()
            first = next((i for i, l in enumerate(lines) if l.startswith("| network")), None)
            last = next((i for i, l in enumerate(lines) if l.startswith("(batch")), len(lines))
            rows = lines[first:last + 1] if first is not None else ["(no table)"]
            write_text(table, f"## Device bench ({s:.0f} s, exit {rc})\n\n" + "\n".join(rows))
        else:
            self.console.say("== device bench: done in an earlier call")
        self.report["bench"] = open(table).read()
        return json.load(open(figures)) if os.path.exists(figures) else None

    def study(self, info: dict, figures: Optional[dict]) -> None:
        plan_file = self.path("plan.json")
        if os.path.exists(plan_file):   # a resumed study keeps its first call's settings
            plan = json.load(open(plan_file))
            self.console.say("== study: resuming with the plan of an earlier call")
        else:
            img_s, start_s = sizing_figures(figures)
            plan = plan_study(self.mode, img_s, start_s, self.left() - REPORT_S, info["train"],
                              info["test"])
            write_text(plan_file, json.dumps(plan, indent=1))
        line = describe_plan(plan)
        self.console.say(line)
        argv = ["study.py", "cifar10", "--data_loc", self.data, "--out", self.path("study"),
                *self.mode.network, "--candidates", str(plan["candidates"]),
                "--epochs", str(plan["epochs"]), "--train_subset", str(plan["train_subset"]),
                "--train_seeds", str(plan["seeds"]), *self.mode.launcher,
                "--device", self.mode.device]
        rc, _, s = self.python("study", argv, self.left() - REPORT_S)
        summary = self.path("study", "summary.md")
        if rc == 0 and os.path.exists(summary):
            with open(summary, "a") as f:   # what was chosen, in the study's own summary
                f.write(f"\n{line}\n")
            self.report["study"] = f"## GPU study (finished, {s:.0f} s)\n\n" + open(summary).read()
        else:
            done = max(0, len(open(self.path("study", "study.csv")).read().splitlines()) - 1) \
                if os.path.exists(self.path("study", "study.csv")) else 0
            how = "stopped at its time limit" if rc == 124 else f"exit status {rc}"
            self.report["study"] = (f"## GPU study ({how} after {s:.0f} s, {done} of "
                                    f"{plan['candidates']} candidates done: a second call "
                                    f"resumes it)\n\n{line}")
            self.console.say(f"study: {how}; {done} of {plan['candidates']} candidates in "
                             "study.csv; the same command again resumes it")

    def save_state(self) -> None:
        """state.tgz: WORK without the data, the bench's scratch, the checkpoints and OUT."""
        def keep(info):
            parts = info.name.split("/")
            drop = (parts[0] in ("data", "bench", "out", "state.tgz") or "checkpoints" in parts
                    or info.name.endswith(".lock"))
            return None if drop else info
        tmp = os.path.join(self.out, ".state.tgz.tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            for name in sorted(os.listdir(self.work)):
                tar.add(self.path(name), arcname=name, filter=keep)
        os.replace(tmp, os.path.join(self.out, "state.tgz"))

    def copy_study(self) -> None:
        for name in ("study.csv", "summary.md", "study.png"):
            if os.path.exists(self.path("study", name)):
                shutil.copyfile(self.path("study", name), os.path.join(self.out, name))

    def limit(self, step: str) -> float:
        return min(self.limits[step], self.left() - REPORT_S)


def restore(work: str) -> bool:
    """Unpack WORK/state.tgz (a first call's state, carried to a fresh machine) unless WORK
    already holds a plan."""
    state = os.path.join(work, "state.tgz")
    if not os.path.exists(state) or os.path.exists(os.path.join(work, "plan.json")):
        return False
    with tarfile.open(state) as tar:
        tar.extractall(work, filter="data")   # nothing outside WORK, no links out
    return True


def run_check(check: Check) -> int:
    """The steps in order (the module docstring); 1 when the smoke or the data fails."""
    if not check.smoke():
        return 1
    info = check.prepare()
    if info is None:
        check.console.say(f"device check: the data at {check.data} could not be read (above)")
        return 1
    check.tests()
    check.write_report()
    figures = check.bench()
    check.write_report()
    check.save_state()
    if check.left() - REPORT_S < 30:
        check.console.say("device check: no time left for the study; a second call runs it")
        return 0
    check.study(info, figures)
    return 0


def main(args) -> int:
    if args.prepare_data:
        print(json.dumps(prepare_data(args.prepare_data)), flush=True)
        return 0
    mode = QUICK if args.quick else GPU
    work = args.work or os.path.join("results", "device_check_quick" if args.quick
                                     else "device_check")   # relative: a resumed study's paths
    os.chdir(ROOT)                                           # are the same on another machine
    out = args.out or os.path.join(work, "out")
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"device check: OUT={out} is a file; it must be a folder", flush=True)
        return 2
    os.makedirs(out, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    restored = restore(work)
    data = args.data or (quick_data(work) if args.quick else os.path.join("data", "cifar10-pack"))
    check = Check(mode, data, work, out)
    check.console.say(f"device check ({'QUICK, ' if args.quick else ''}{mode.device}): data "
                      f"{data}, work {work}, out {out}, {mode.total_s:.0f} s in all"
                      f"{'; resuming from state.tgz' if restored else ''}")
    if not os.path.isdir(data):
        check.console.say(f"device check: no data at {data}: pack CIFAR-10 with "
                          "bench/pack_data.py and carry it (docs/gpus.md)")
        return 2
    start = time.monotonic()
    try:
        return run_check(check)
    finally:
        check.write_report()
        check.copy_study()
        check.save_state()
        check.console.say(f"device check: {time.monotonic() - start:.0f} s; files in {out}: "
                          f"{', '.join(sorted(os.listdir(out)))}")
        check.console.close()


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))

"""Every benchmark script has a --quick mode (tiny sizes, seconds), and it runs: a benchmark
nobody runs breaks silently (issue 21, item 16: bench_train.py failed on a moved name). Each
quick run is a subprocess; its last line must have the format the script's docstring gives."""
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

NUMBER = r"[0-9.]+(?:e[+-]?[0-9]+)?"
# script: (extra arguments ({tmp}: a temporary folder), the last line's pattern, slow)
QUICK = {
    "bench_train.py": ([], rf"(cpu|cuda|mps): fp32 {NUMBER} img/s, default {NUMBER} img/s, "
                           rf"ratio {NUMBER}x", False),
    "bench_data.py": ([], rf"data: tensor {NUMBER} img/s, pil {NUMBER} img/s, ratio {NUMBER}x",
                      False),
    "bench_fisher.py": ([], rf"  sampling 20 at 800K params and 100M MACs: {NUMBER} ms", False),
    "bench_families.py": ([], rf"families: resnet50 fisher {NUMBER}x fwd, mobilenet_v2 fisher "
                              rf"{NUMBER}x fwd", False),
    "fisher_layout.py": ([], rf"fisher: nchw {NUMBER} s, channels_last {NUMBER} s per candidate, "
                             rf"largest block relative difference {NUMBER}", False),
    # about a minute each on a shared CPU: run with -m slow
    "bench_latency.py": (["--cache_dir", "{tmp}/latency", "--out", "{tmp}/lat.png"],
                         r"-> .*lat\.png", True),
    "parity.py": ([], r"\d+,\d+,\"\[.*\]\",[-0-9.e]+", True),   # the student's genotype row
}
# scripts with a quick test of their own (tests/test_device_bench.py), or added by others
# (their last line's format is theirs to pin: here they only have to run)
OWN_TEST = {"device_bench.py", "device_check.py"}
# Tools that live beside the benchmarks but measure nothing (no --quick): each has a test file.
TOOLS = {"pack_data.py": "test_pack_data.py", "device_smoke.py": "test_device_check.py"}
OPTIONAL = {"bench_export.py", "bench_jobs.py"}


def bench_scripts():
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "bench", "*.py")))


def test_every_bench_script_has_a_quick_mode():
    for name in bench_scripts():
        if name in TOOLS:
            with open(os.path.join(ROOT, "tests", TOOLS[name])) as f:
                assert name in f.read(), f"tests/{TOOLS[name]} does not run bench/{name}"
            continue
        with open(os.path.join(ROOT, "bench", name)) as f:
            assert '"--quick"' in f.read(), f"bench/{name} has no --quick mode"
        assert name in QUICK or name in OWN_TEST or name in OPTIONAL, \
            f"bench/{name}: add its --quick run to tests/test_bench_quick.py"


def run_quick(name, extra, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join("bench", name), "--quick", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    return lines[-1]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if slow else n
                                  for n, (_, _, slow) in QUICK.items()])
def test_quick_mode_runs_and_ends_with_its_line(name, tmp_path):
    extra, pattern, _ = QUICK[name]
    last = run_quick(name, extra, tmp_path)
    assert re.fullmatch(pattern, last), last


@pytest.mark.parametrize("name", sorted(OPTIONAL))
def test_quick_mode_of_added_scripts_runs(name, tmp_path):
    if not os.path.isfile(os.path.join(ROOT, "bench", name)):
        pytest.skip(f"bench/{name} is not there yet")
    run_quick(name, [], tmp_path)

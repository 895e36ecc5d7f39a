"""bench/device_bench.py on CPU: the synthetic data set main.py reads, the parsing of main.py's
epoch line, the table; and (slow) its --quick mode end to end."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from blockswap.loaders import get_datasets

sys.path.insert(0, os.path.join(ROOT, "bench"))
import device_bench as B  # noqa: E402


def test_synthetic_data_is_a_cifar_sized_image_folder(tmp_path):
    root = B.synthetic_cifar(str(tmp_path / "data"), 30, 20)
    train, val, classes = get_datasets("cifar10", root)
    assert (len(train), len(val), classes) == (30, 20, 10)
    assert train[0][0].shape == (3, 32, 32)


def test_speed_is_read_from_main_epoch_line(tiny_imagefolder, tmp_path):
    # the line main.py prints, produced by main.py itself
    out = subprocess.run([sys.executable, "main.py", "cifar10", "teacher", "--wrn_depth", "10",
                          "--wrn_width", "1", "--data_loc", tiny_imagefolder, "--checkpoint_dir",
                          str(tmp_path), "--epochs", "1", "--workers", "0", "--no-plot",
                          "--batch_size", "20", "--amp", "off"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    assert len(B.SPEED.findall(out)) == 1 and float(B.SPEED.findall(out)[0]) > 0


def test_table_has_a_row_per_setting():
    args = B.get_args_parser().parse_args(["--quick", "--networks", "WRN-16-2 teacher"])
    ctx = {"size": B.SIZES["quick"], "workers": 1, "device": "cpu", "synthetic": True}
    speeds = {("WRN-16-2 teacher", "bf16", "off", "pil"): 1234.4}
    text = B.table(speeds, (2.5, "bf16", "pil"), 12.0, ctx, args)
    rows = [r for r in text.splitlines() if r.startswith("| WRN-16-2")]
    assert len(rows) == 4
    assert "| WRN-16-2 teacher | bf16 | off | not run | 1,234 |" in rows
    assert "2.5 s" in text and "12.0 s" in text


@pytest.mark.slow
def test_quick_mode_runs_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "bench/device_bench.py", "--quick", "--work",
                           str(tmp_path), "--networks", "WRN-16-2 teacher", "--amps", "bf16",
                           "--compiles", "off", "--budget_s", "1800",
                           "--row_s", "900"],   # generous: a shared CPU can be slow
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(r for r in proc.stdout.splitlines() if r.startswith("| WRN-16-2 teacher | bf16"))
    assert float(row.split("|")[-2].replace(",", "")) > 0        # the pil column has a figure
    assert "Fisher search, 8 candidates at 800K (whole fisher_rank.py run): " in proc.stdout
    assert "s\n" in proc.stdout.split("Fisher search")[1]


def test_gpu_study_script_runs_its_quick_mode_on_cpu(tiny_imagefolder, tmp_path):
    """bench/gpu_study.sh's CPU --quick path: the same study.py command line (local launcher,
    2 seeds) end to end, so the script is known to run before a GPU slot comes."""
    env = dict(os.environ, QUICK="1", STUDY_OUT=str(tmp_path / "study"))
    out = subprocess.run(["bash", "bench/gpu_study.sh", tiny_imagefolder], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gpu study:" in out.stdout
    lines = (tmp_path / "study" / "study.csv").read_text().splitlines()
    assert len(lines) == 4 and "val_error_0,val_error_1" in lines[0]
    assert (tmp_path / "study" / "summary.md").exists()

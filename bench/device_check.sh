#!/usr/bin/env bash
# One check of a machine with one GPU, under 8 minutes: the `gpu` tests, then a table of
# training images/s (WRN-40-2 / WRN-16-2 teachers, bs800k student; AMP off/bf16; compile
# off/on; tensor and PIL loaders), seconds per CIFAR-10 epoch, seconds for a 1000-candidate
# Fisher search at 800K.
#
#   bash bench/device_check.sh [DATA]   # DATA: CIFAR-10 folder; absent: synthetic images
#
# Output: the pytest summary, then the markdown table (also in device_check.md).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-${DATA:-../shared/data/cifar10-jpeg}}
OUT=${OUT:-device_check.md}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"

start=$(date +%s)
timeout 150 python -m pytest -q -m gpu -rs 2>&1 | tail -25
echo "pytest -m gpu: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s"

# what is left of 7.5 minutes, less 30 s for writing the synthetic data and the table
budget=$(( 450 - ($(date +%s) - start) - 30 ))
data_arg=()
if [ -d "$DATA" ]; then data_arg=(--data_loc "$DATA"); fi
python bench/device_bench.py "${data_arg[@]}" --budget_s "$budget" | tee "$OUT"
echo "total $(( $(date +%s) - start )) s"

# The GPU study (bench/gpu_study.sh): run when this machine is a GPU one.
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  bash bench/gpu_study.sh "$DATA"
fi

#!/usr/bin/env bash
# The GPU study (issue 19): does Fisher potential rank trained WRN-16-2 candidates on CIFAR-10?
# Sized for about 8 minutes on one large GPU: 40 candidates x 2 training seeds, trained 8 at a
# time on the one GPU (--launcher local --jobs_per_device 8), validated on the whole test split.
#
#   bash bench/gpu_study.sh [DATA]            # on the GPU machine, after device_check.sh
#   QUICK=1 bash bench/gpu_study.sh DATA      # the same path on a CPU in a minute (a test)
#
# Writes study.csv, summary.md and study.png under $STUDY_OUT (default: $OUT/gpu_study when
# the device tool's $OUT is set, else results/gpu_study). A rerun resumes (per-job results).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-${DATA:-../shared/data/cifar10-jpeg}}
STUDY_OUT=${STUDY_OUT:-${OUT:+$OUT/gpu_study}}
STUDY_OUT=${STUDY_OUT:-results/gpu_study}
if [ "${QUICK:-0}" = 1 ]; then
  ARGS=(--wrn_depth 10 --wrn_width 1 --param_goal 20000 --tol 0.5 --candidates 3 --epochs 1
        --train_subset 32 --val_subset 16 --batch_size 16 --launcher local --jobs 2
        --threads_per_job 1 --device cpu --bootstrap 50 --workers 0)
else
  # WRN-16-2 space at 300K params; 5,000 training images per epoch keeps 80 trainings of
  # EPOCHS epochs inside ~8 minutes at 8 jobs on one H200 (tensor loader, bf16).
  ARGS=(--wrn_depth 16 --wrn_width 2 --param_goal 300000 --candidates 40 --epochs "${EPOCHS:-4}"
        --train_subset "${TRAIN:-5000}" --batch_size 128 --launcher local --jobs_per_device 8
        --device cuda --train_seeds 2)
fi
start=$(date +%s)
python study.py cifar10 --data_loc "$DATA" --out "$STUDY_OUT" --train_seeds 2 "${ARGS[@]}"
echo "gpu study: $(( $(date +%s) - start )) s -> $STUDY_OUT"

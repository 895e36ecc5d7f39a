#!/usr/bin/env bash
# The GPU study alone (issue 19): does Fisher potential rank trained WRN-16-2 candidates on
# CIFAR-10? bench/device_check.sh runs it as its last step, sized to the time left; this runs
# it by hand with the sizes you give: 40 candidates x 2 training seeds, EPOCHS epochs on TRAIN
# images, 8 trainings at once on the one GPU, validated on the whole test split.
#
#   EPOCHS=10 TRAIN=20000 bash bench/gpu_study.sh [DATA]   # DATA: folder or pack of CIFAR-10
#   QUICK=1 bash bench/gpu_study.sh DATA                     # the same path on a CPU in a minute
#
# Writes study.csv, summary.md and study.png under $STUDY_OUT (default: $OUT/gpu_study when
# the device tool's $OUT is set, else results/gpu_study). A rerun resumes (per-job results).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
DATA=${1:-${DATA:-data/cifar10-pack}}
STUDY_OUT=${STUDY_OUT:-${OUT:+$OUT/gpu_study}}
STUDY_OUT=${STUDY_OUT:-results/gpu_study}
if [ "${QUICK:-0}" = 1 ]; then
  ARGS=(--wrn_depth 10 --wrn_width 1 --param_goal 20000 --tol 0.5 --candidates 3 --epochs 1
        --train_subset 32 --val_subset 16 --batch_size 16 --launcher local --jobs 2
        --threads_per_job 1 --device cpu --bootstrap 50 --workers 0)
else
  ARGS=(--wrn_depth 16 --wrn_width 2 --param_goal 300000 --candidates "${CANDIDATES:-40}"
        --epochs "${EPOCHS:-4}" --train_subset "${TRAIN:-5000}" --batch_size 128
        --launcher local --jobs_per_device 8 --device cuda)
fi
start=$(date +%s)
"$PY" study.py cifar10 --data_loc "$DATA" --out "$STUDY_OUT" --train_seeds 2 "${ARGS[@]}"
echo "gpu study: $(( $(date +%s) - start )) s -> $STUDY_OUT"

#!/usr/bin/env bash
# The device check (docs/gpus.md): one command, under 9 minutes, on a machine with one GPU:
# a 30-second smoke (versions, a training step, a Fisher potential), the gpu tests, the device
# bench, then the GPU study sized to the time left (bench/device_check.py says how).
#
#   bash bench/device_check.sh [DATA]            # DATA: the CIFAR-10 pack, default data/cifar10-pack
#   QUICK=1 bash bench/device_check.sh [DATA]    # the same path on a CPU in under 3 minutes
#
# Every file it writes for you is under $OUT (a folder; unset: results/device_check/out), at
# most 6, flat: device_check.log, device_check.md, study.csv, summary.md, study.png, state.tgz.
# It uses the python3 found here (the machine's own torch; it installs nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
args=()
if [ "${QUICK:-0}" = 1 ]; then args+=(--quick); fi
if [ $# -ge 1 ]; then args+=(--data "$1"); fi
if [ -n "${WORK:-}" ]; then args+=(--work "$WORK"); fi   # default results/device_check[_quick]
exec "$PY" -u bench/device_check.py ${args[@]+"${args[@]}"}

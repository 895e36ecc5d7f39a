#!/usr/bin/env bash
# Moonshine baselines (Crowley et al. 2018), as the original BlockSwap sweep: for each teacher
# WRN-40-2 number t, train uniform students of every cheap block type, plus the WRN-16-2,
# WRN-16-1 and WRN-40-1 students, all with attention transfer from checkpoints/wrn_40_2_$t.t7
# (the teacher is trained first if its checkpoint is missing). No search: no archs file is read.
# A run with a checkpoint is resumed (main.py --resume): a run killed before its last epoch is
# continued, a larger EPOCHS extends it, and a finished one is left as it is.
#
#   bash bash/moonshine.sh                        # the full sweep, sequentially on GPU 0
#   GPUS="0 1 2 3" bash bash/moonshine.sh         # one run per GPU at a time
#   QUICK=1 bash bash/moonshine.sh                # minutes on a CPU: 1 epoch on data subsets
#   DRY_RUN=1 bash bash/moonshine.sh              # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."

# --- settings ---------------------------------------------------------------------------
DATA=${DATA:-../shared/data/cifar10-jpeg}   # torchvision CIFAR folder or ImageFolder root
DATASET=${DATASET:-cifar10}
GPUS=${GPUS:-0}                          # runs go round-robin over these, one per GPU at a time
EPOCHS=${EPOCHS:-200}
DISTILL=${DISTILL:-}                     # student loss: at, kd, dkd, dist, at+dkd...; empty: at
TEACHERS=${TEACHERS:-"1 2 3"}
CONVS=${CONVS:-"DConv DConvG2 DConvG4 DConvG8 DConvG16 DConvA2 DConvA4 DConvA8 DConvA16
  A2B2 A4B2 A8B2 A16B2 G2B2 G4B2 G8B2 G16B2 ConvB2 ConvB4 DConvB2 DConvB4"}
SHAPES=${SHAPES:-"16_2 16_1 40_1"}       # plain (Conv) students of other depth_width
EXTRA=${EXTRA:-}                          # more main.py flags for every run, e.g. "--cosine --cutout"
QUICK=${QUICK:-0}
DRY_RUN=${DRY_RUN:-0}
CHECKPOINTS=${CHECKPOINTS:-checkpoints}

if [ "$QUICK" = 1 ]; then
  EPOCHS=1
  CHECKPOINTS=${QUICK_CHECKPOINTS:-checkpoints/quick}   # quick runs never mix with real ones
  TEACHERS=${QUICK_TEACHERS:-1}
  CONVS=${QUICK_CONVS:-"DConvG4 A4B2"}
  SHAPES=${QUICK_SHAPES:-"16_1"}
  EXTRA="$EXTRA --train_subset 256 --val_subset 128 --batch_size 64 --device cpu --workers 0"
fi
COMMON="--cifar_loc=$DATA --epochs $EPOCHS --checkpoint_dir $CHECKPOINTS $EXTRA"
STUDENT="${DISTILL:+--distill $DISTILL}"  # student runs only; their names end in .$DISTILL
M=${DISTILL:+.$DISTILL}

# --- runner: DRY_RUN prints; with several GPUs, runs go in parallel, one per GPU -----------
read -r -a GPU_LIST <<< "$GPUS"
slot=0
run() {  # run GPU_ID ARGS...
  local gpu=$1; shift
  if [ "$DRY_RUN" = 1 ]; then echo "python main.py $* --GPU $gpu"; return; fi
  if [ "${#GPU_LIST[@]}" -gt 1 ]; then
    python main.py "$@" --GPU "$gpu" &
    slot=$((slot + 1))
    if [ $((slot % ${#GPU_LIST[@]})) = 0 ]; then wait; fi
  else
    python main.py "$@" --GPU "$gpu"
  fi
}
next_gpu() { echo "${GPU_LIST[$(( slot % ${#GPU_LIST[@]} ))]}"; }
# --resume when the run has a checkpoint: main.py finishes or extends it, or says it is done
resume() { if [ -f "$CHECKPOINTS/$1.t7" ]; then echo --resume; fi; }

for t in $TEACHERS; do
  # shellcheck disable=SC2086,SC2046
  run "$(next_gpu)" $DATASET teacher --conv Conv -t "wrn_40_2_$t" --wrn_depth 40 --wrn_width 2 \
    $COMMON $(resume "wrn_40_2_$t")
  wait
  for conv in $CONVS; do
    # shellcheck disable=SC2086,SC2046
    run "$(next_gpu)" $DATASET student --moonshine --conv "$conv" -t "wrn_40_2_$t" \
      -s "wrn_40_2_$t.$conv$M" --wrn_depth 40 --wrn_width 2 $COMMON $STUDENT \
      $(resume "wrn_40_2_$t.$conv$M")
  done
  for shape in $SHAPES; do
    # shellcheck disable=SC2086,SC2046
    run "$(next_gpu)" $DATASET student --moonshine --conv Conv -t "wrn_40_2_$t" \
      -s "wrn_${shape}_$t$M" --wrn_depth 40 --wrn_width 2 --diff_shape \
      --stu_depth "${shape%_*}" --stu_width "${shape#*_}" $COMMON $STUDENT \
      $(resume "wrn_${shape}_$t$M")
  done
  wait
done
[ "$DRY_RUN" = 1 ] || python plots.py sweep "$CHECKPOINTS"   # table + error-vs-params plot

#!/usr/bin/env bash
# BlockSwap at the paper's budgets: for each parameter goal, rank random genotypes within
# +-2.5% by Fisher potential (fisher_rank.py), then train the best as a student of the teacher
# with attention transfer (main.py). The teacher is trained first if its checkpoint is missing.
# A run with a checkpoint is resumed (main.py --resume): a run killed before its last epoch is
# continued, a larger EPOCHS extends it, and a finished one is left as it is.
# Ends with the sweep table and error-vs-params plot of the checkpoint folder.
#
#   bash bash/blockswap.sh                        # the full sweep on GPU 0
#   QUICK=1 bash bash/blockswap.sh                # minutes on a CPU: 8 candidates, 1 epoch, subsets
#   DRY_RUN=1 bash bash/blockswap.sh              # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."

# --- settings ---------------------------------------------------------------------------
DATA=${DATA:-../shared/data/cifar10-jpeg}   # torchvision CIFAR folder or ImageFolder root
DATASET=${DATASET:-cifar10}
GPU=${GPU:-0}
TEACHER=${TEACHER:-wrn_40_2_1}            # checkpoints/$TEACHER.t7 (WRN-40-2)
BUDGETS=${BUDGETS:-"162000 217000 289000 404000 556000 811000"}   # the paper's students
SAMPLES=${SAMPLES:-1000}                  # candidates ranked per budget
EPOCHS=${EPOCHS:-200}
DISTILL=${DISTILL:-}                      # student loss: at, kd, dkd, dist, at+dkd...; empty: at
EXTRA=${EXTRA:-}                          # more main.py flags, e.g. "--cosine --cutout"
SEARCH_EXTRA=${SEARCH_EXTRA:-}            # more fisher_rank.py flags, e.g. "--seed 1"
ARCHS=${ARCHS:-none}                      # candidates: none = exact samples, or an archs file
QUICK=${QUICK:-0}
DRY_RUN=${DRY_RUN:-0}
CHECKPOINTS=${CHECKPOINTS:-checkpoints}
OUT=${OUT:-results}                       # search results; best genotypes go to genotypes/

GENOTYPES=genotypes
if [ "$QUICK" = 1 ]; then
  SAMPLES=8
  EPOCHS=1
  CHECKPOINTS=${QUICK_CHECKPOINTS:-checkpoints/quick}   # quick runs never mix with real ones
  OUT=${QUICK_OUT:-results/quick}                       # search results and genotypes
  GENOTYPES=$OUT/genotypes
  EXTRA="$EXTRA --train_subset 256 --val_subset 128 --batch_size 64 --device cpu --workers 0"
  SEARCH_EXTRA="$SEARCH_EXTRA --batch_size 64 --device cpu"
fi

say() { if [ "$DRY_RUN" = 1 ]; then echo "$*"; else "$@"; fi; }
# --resume when the run has a checkpoint: main.py finishes or extends it, or says it is done
resume() { if [ -f "$CHECKPOINTS/$1.t7" ]; then echo --resume; fi; }

# shellcheck disable=SC2086,SC2046
say python main.py "$DATASET" teacher --conv Conv -t "$TEACHER" --wrn_depth 40 --wrn_width 2 \
  --cifar_loc="$DATA" --epochs "$EPOCHS" --checkpoint_dir "$CHECKPOINTS" $EXTRA --GPU "$GPU" \
  $(resume "$TEACHER")

for goal in $BUDGETS; do
  best="$GENOTYPES/blockswap_$goal.csv"
  student="wrn_40_2_bs$goal${DISTILL:+.$DISTILL}"   # one checkpoint per method
  # shellcheck disable=SC2086
  say python fisher_rank.py "$DATASET" --data_loc="$DATA" --param_goal "$goal" \
    --samples "$SAMPLES" --results_dir "$OUT" --genotype_dir "$GENOTYPES" --best_file "$best" \
    --save_file "$ARCHS" $SEARCH_EXTRA
  # shellcheck disable=SC2086,SC2046
  say python main.py "$DATASET" student -t "$TEACHER" -s "$student" --wrn_depth 40 --wrn_width 2 \
    --cifar_loc="$DATA" --from_genotype "$best" --epochs "$EPOCHS" \
    --checkpoint_dir "$CHECKPOINTS" ${DISTILL:+--distill "$DISTILL"} $EXTRA --GPU "$GPU" \
    $(resume "$student")
done

say python plots.py sweep "$CHECKPOINTS"

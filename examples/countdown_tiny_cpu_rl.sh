#!/usr/bin/env bash
# RL on CPU from the demo's SFT checkpoint: RSPO by default, any baseline via ALGO / EXTRA.
#   bash examples/countdown_tiny_cpu_rl.sh                              # RSPO (GMPO + router shift)
#   ALGO=grpo bash examples/countdown_tiny_cpu_rl.sh                    # GRPO baseline
#   ALGO=grpo EXTRA="--router-shift" bash examples/countdown_tiny_cpu_rl.sh   # GRPO + RS plug-in
#   ALGO=gmpo EXTRA="--routing-replay" bash examples/countdown_tiny_cpu_rl.sh # routing replay baseline
# About 10 minutes on 2 CPU cores (300 iterations). RL_ITERS, LR, SEED, OUT, DATA override the defaults.
# Needs the SFT checkpoint: run examples/countdown_tiny_cpu.sh (make demo) first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/countdown_tiny}
DATA=${DATA:-data/countdown}
ALGO=${ALGO:-rspo}
RL_ITERS=${RL_ITERS:-300}
SEED=${SEED:-1234}
EXTRA=${EXTRA:-}
RUN=${RUN:-$OUT/rl_${ALGO}${EXTRA// /}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # lower it when the cores are shared: oversubscription is very slow
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}  # megatron-core's Apex/TE fallback notices
[ -d "$OUT/sft" ] || { echo "no SFT checkpoint at $OUT/sft: run examples/countdown_tiny_cpu.sh first"; exit 1; }

start=$(date +%s)
# Off-policy reuse: one rollout of 32 prompts x 8 samples feeds 4 mini-batch steps of 64 responses.
# shellcheck disable=SC2086
$PYTHON -m megatron_rspo.rl.trainer --init-from "$OUT/sft" --rl-algorithm "$ALGO" $EXTRA \
    --train-data "$DATA/train.jsonl" --test-data "$DATA/test.jsonl" --tokenizer-model "$DATA/tokenizer.model" \
    --train-iters "$RL_ITERS" --rollout-batch-size 32 --num-generations 8 --max-new-tokens 16 \
    --num-minibatches 4 --ppo-epochs 1 --lr "${LR:-2e-5}" --lr-warmup-iters 10 --lr-decay-style constant --clip-grad 1.0 \
    --eval-interval 100 --eval-samples 2000 --log-interval 10 --seed "$SEED" \
    --save "$RUN" --save-interval 50 --keep-last 2 --tensorboard-dir "$OUT/tb/$(basename "$RUN")"
echo "RL ($ALGO $EXTRA) finished in $(( $(date +%s) - start )) s; checkpoints in $RUN"

#!/usr/bin/env bash
# Countdown RL (or SFT) on one node under torchrun, in any parallel layout chosen by env vars.
# Data parallelism is what is left: DP = NPROC / (TP * PP); EP is carved from the DP*TP ranks.
#   NPROC=2 bash examples/torchrun_countdown_rl.sh                       # DP=2
#   NPROC=2 EP=2 DISPATCHER=alltoall bash examples/torchrun_countdown_rl.sh
#   NPROC=2 TP=2 bash examples/torchrun_countdown_rl.sh                  # TP=2 + sequence parallelism
#   NPROC=4 TP=2 EP=2 bash examples/torchrun_countdown_rl.sh             # DP=2 x TP=2, EP=2
#   NPROC=2 PP=2 MICROBATCHES=2 STAGE=sft bash examples/torchrun_countdown_rl.sh   # RL needs PP=1
#   NPROC=2 EP=2 bash examples/torchrun_countdown_rl.sh --rl-algorithm grpo --router-shift   # extra flags
# RL starts from the SFT checkpoint of the CPU demo (examples/countdown_tiny_cpu.sh); on GPUs point
# INIT at any converted checkpoint (docs/conversion.md). See docs/parallelism.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-2}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-1}
DISPATCHER=${DISPATCHER:-allgather}
MICROBATCHES=${MICROBATCHES:-1}
STAGE=${STAGE:-rl}
ALGO=${ALGO:-rspo}
OUT=${OUT:-runs/countdown_tiny}
DATA=${DATA:-data/countdown}
INIT=${INIT:-$OUT/sft}
RUN=${RUN:-$OUT/${STAGE}_${ALGO}_np${NPROC}_tp${TP}_pp${PP}_ep${EP}}
ITERS=${ITERS:-20}
SEED=${SEED:-1234}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron's TP/SP comm ordering on GPU

LAYOUT=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
        --expert-model-parallel-size "$EP" --moe-token-dispatcher-type "$DISPATCHER"
        --num-microbatches "$MICROBATCHES")
if [ "$TP" -gt 1 ]; then LAYOUT+=(--sequence-parallel); fi  # MoE with TP needs SP
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
COMMON=(--train-data "$DATA/train.jsonl" --test-data "$DATA/test.jsonl" --tokenizer-model "$DATA/tokenizer.model"
        --seed "$SEED" --save "$RUN" --tensorboard-dir "$OUT/tb/$(basename "$RUN")" --log-interval 5)

start=$(date +%s)
if [ "$STAGE" = sft ]; then
    # The demo's model (examples/countdown_tiny_cpu.sh); the layout decides how it is split.
    "${TORCHRUN[@]}" -m megatron_rspo.sft "${LAYOUT[@]}" "${COMMON[@]}" \
        --num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 256 --num-experts 8 \
        --moe-router-topk 2 --moe-ffn-hidden-size 128 --max-position-embeddings 64 \
        --train-iters "$ITERS" --micro-batch-size 16 --lr 2e-3 --eval-interval "$ITERS" "$@"
else
    [ -d "$INIT" ] || { echo "no initial checkpoint at $INIT: run examples/countdown_tiny_cpu.sh first"; exit 1; }
    # --rollout-batch-size is over all DP ranks; responses per rank must split into
    # --num-minibatches x --num-microbatches.
    "${TORCHRUN[@]}" -m megatron_rspo.rl.trainer "${LAYOUT[@]}" "${COMMON[@]}" --init-from "$INIT" \
        --rl-algorithm "$ALGO" --train-iters "$ITERS" --rollout-batch-size 16 --num-generations 8 \
        --max-new-tokens 16 --num-minibatches 4 --lr 1e-4 --lr-decay-style constant --eval-interval "$ITERS" "$@"
fi
echo "$STAGE ($ALGO) on $NPROC ranks (TP=$TP PP=$PP EP=$EP) finished in $(( $(date +%s) - start )) s; output in $RUN"

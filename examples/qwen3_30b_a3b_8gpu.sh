#!/usr/bin/env bash
# RSPO on Qwen3-30B-A3B, one node of 8 H100s (80 GB), MATH-style data, vLLM rollouts. The flags are the ones
# the memory planner says fit (docs/scaling.md §8: train 37.1 GiB, rollout 71.9 GiB of 79.6 per GPU):
#   bf16 + the distributed optimizer; experts over 8 GPUs (EP 8); Adam on the host (Megatron's
#   HybridDeviceOptimizer: on one node the experts' Adam state is not sharded and would take 43 GiB per GPU);
#   full recompute and fused log-probs (4k-token responses); four vLLM engines of TP 2 on the trainer's GPUs,
#   asleep while the trainer trains, with the gradient buffers handed over while they generate.
#
#   HF=/models/Qwen3-30B-A3B DATA=/data/math bash examples/qwen3_30b_a3b_8gpu.sh [extra trainer flags]
#
# Steps: (1) convert the HF checkpoint once (8 ranks, each converts its shard), (2) ask the planner with the
# run's own flags (exit 3: it does not fit; nothing is started), (3) train. DATA holds train.parquet and
# test.parquet in the MATH layout (problem, solution) or JSONL; the tokenizer and chat template are the HF
# directory's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
HF=${HF:?set HF to the Hugging Face Qwen3-30B-A3B directory (config.json, safetensors, tokenizer)}
DATA=${DATA:?set DATA to a folder with train.parquet and test.parquet (MATH-style)}
CKPT=${CKPT:-ckpt/qwen3-30b-a3b}
RUN=${RUN:-runs/qwen3_30b_a3b_rspo}
NPROC=${NPROC:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} PYTHONUNBUFFERED=1

FLAGS=(
  --bf16 --use-distributed-optimizer --expert-model-parallel-size 8 --moe-token-dispatcher-type alltoall
  --moe-grouped-gemm --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
  --optimizer-cpu-offload --use-precision-aware-optimizer --overlap-cpu-optimizer-d2h-h2d
  --fused-logprobs --micro-batch-size 2
  --rollout-engine vllm --rollout-tensor-parallel-size 2 --vllm-gpu-memory-utilization 0.75
  --offload-grads-during-rollout
  --rl-algorithm rspo --rollout-batch-size 64 --num-generations 8 --max-new-tokens 4096 --num-minibatches 4
  --lr 1e-6 --lr-decay-style constant --clip-grad 1.0 --train-iters 300
)

if [ ! -d "$CKPT" ]; then
  "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" tools/convert_hf_to_megatron.py \
    --hf-dir "$HF" --save "$CKPT" --expert-model-parallel-size 8
fi

"$PYTHON" tools/plan_memory.py --hf-config "$HF/config.json" --world-size "$NPROC" "${FLAGS[@]}" "$@"

"$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" -m megatron_rspo.rl.trainer "${FLAGS[@]}" \
  --init-from "$CKPT" --tokenizer-model "$HF" --task math --template chat \
  --train-data "$DATA/train.parquet" --test-data "$DATA/test.parquet" \
  --save "$RUN" --save-interval 25 --keep-last 3 --tensorboard-dir "$RUN/tb" --log-interval 1 \
  --eval-interval 25 --eval-samples 500 --no-progress "$@"

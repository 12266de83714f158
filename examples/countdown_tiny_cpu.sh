#!/usr/bin/env bash
# The tiny CPU demo, end to end: Countdown data -> sentencepiece tokenizer -> SFT of a tiny
# Megatron-Core MoE (4 layers, 8 experts, top-2 by default) -> held-out accuracy by greedy sampling.
# About 4 minutes on 2 CPU cores. Override any step with env vars, e.g. SFT_ITERS=300; the router-shift
# sweep's 32-expert model is OUT=runs/countdown_e32 EXPERTS=32 TOPK=4 MOE_FFN=64 bash examples/countdown_tiny_cpu.sh;
# study v2's Qwen3-like routing geometry (64 fine-grained experts, top-8, 8 layers) is
# OUT=runs/countdown_q64 LAYERS=8 EXPERTS=64 TOPK=8 MOE_FFN=32 bash examples/countdown_tiny_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/countdown_tiny}
DATA=${DATA:-data/countdown}
SFT_ITERS=${SFT_ITERS:-1500}
SEED=${SEED:-1234}
EXPERTS=${EXPERTS:-8}
TOPK=${TOPK:-2}
MOE_FFN=${MOE_FFN:-128}  # per-expert FFN width; keep TOPK x MOE_FFN fixed to keep the active FFN size
LAYERS=${LAYERS:-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # lower it when the cores are shared: oversubscription is very slow
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}  # megatron-core's Apex/TE fallback notices

start=$(date +%s)
echo "== 1/3 data + tokenizer -> $DATA"
$PYTHON tools/make_countdown_data.py --out-dir "$DATA" --num-train 12000 --num-test 2000 \
    --num-numbers 3 --max-number 20 --max-target 100 --vocab-size 64 --seed "$SEED"

# The tiny policy: a Qwen-MoE-like decoder (RMSNorm, RoPE, SwiGLU experts), every layer MoE.
MODEL_ARGS=(--num-layers "$LAYERS" --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 256
            --num-experts "$EXPERTS" --moe-router-topk "$TOPK" --moe-ffn-hidden-size "$MOE_FFN" --max-position-embeddings 64)

echo "== 2/3 SFT warm-up ($SFT_ITERS iterations) -> $OUT/sft"
$PYTHON -m megatron_rspo.sft "${MODEL_ARGS[@]}" \
    --train-data "$DATA/train.jsonl" --test-data "$DATA/test.jsonl" --tokenizer-model "$DATA/tokenizer.model" \
    --train-iters "$SFT_ITERS" --micro-batch-size 64 --lr 2e-3 --lr-warmup-iters 50 --min-lr 1e-4 \
    --eval-interval 500 --eval-samples 500 --log-interval 100 --seed "$SEED" \
    --save "$OUT/sft" --tensorboard-dir "$OUT/tb/sft"

echo "== 3/3 held-out evaluation of the saved checkpoint"
$PYTHON tools/eval_countdown.py --load "$OUT/sft" --test-data "$DATA/test.jsonl" \
    --tokenizer-model "$DATA/tokenizer.model" --num-samples 2000 | tee "$OUT/eval_sft.json"
echo "demo finished in $(( $(date +%s) - start )) s; tensorboard --logdir $OUT/tb"

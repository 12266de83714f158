#!/usr/bin/env bash
# The GPU check: one prepared run on a CUDA machine (<= 8 minutes on one H100), every step run even after a
# failure, a summary table at the end, the log and a JSON summary in --out (default: $OUT when set).
#
# usage: tools/gpu_check.sh [--wheels DIR] [--out DIR] [--skip-install] [--budget SECONDS]
#
#   --wheels DIR     offline install: `pip install --no-index --no-deps --target <tmp>` of the wheels in DIR
#                    (made by tools/fetch_gpu_wheels.sh on a machine with PyPI), put on PYTHONPATH with this
#                    repository. Nothing already installed is touched (the machine's CUDA torch above all).
#   (no --wheels)    online install: pip install -e '.[test,hf]' (+ '[gpu]' when TE is absent and
#                    INSTALL_TE=1, '[vllm]' with INSTALL_VLLM=1), keeping the machine's CUDA torch.
#   --skip-install   use the environment as it is.
#   --out DIR        write gpu_check.log and gpu_check.json there.
#   --budget S       wall-clock budget for all steps (default 480); each step has its own share.
#
# Steps (tests/test_gpu.py unless named): capability probe; TE spec vs local spec and a TE checkpoint loaded
# into the local spec (skipped without TE, with the reason); bf16 train step with fp32 main params and the
# distributed optimizer on the local spec; CUDA generation vs the cache-free reference; 3 RL iterations of
# copy_digits (rewards non-zero for a random policy) asserting changed weights, finite losses and rollouts
# sampled with the new weights, for fp32, bf16, and fused log-probs + KL; EP=2 over NCCL (>= 2 GPUs); the
# vLLM steps (only where vllm imports); step time, tokens/s and peak memory of a Qwen3-like layer stack at
# 1k tokens per row (benchmarks/gpu_step.py --qwen3-like).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
WHEELS="" OUTDIR=${OUT:-} SKIP_INSTALL=${SKIP_INSTALL:-} BUDGET=480
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        --out) OUTDIR=$2; shift 2 ;;
        --skip-install) SKIP_INSTALL=1; shift ;;
        --budget) BUDGET=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
LOG=$(mktemp)
[ -n "$OUTDIR" ] && { mkdir -p "$OUTDIR"; LOG="$OUTDIR/gpu_check.log"; : > "$LOG"; }
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1
START=$(date +%s)
NAMES=() STATUS=() SECS=() NOTES=()

log() { echo "$@" | tee -a "$LOG"; }

# step NAME SHARE_SECONDS CMD...: run CMD with a timeout (its share, capped by what is left of the budget);
# pass / fail / skip / timeout from its exit code and, for pytest, its summary line.
step() {
    local name=$1 share=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    local t0 out rc status note limit=$(( share < left ? share : left ))
    if [ "$limit" -le 5 ]; then
        NAMES+=("$name"); STATUS+=("timeout"); SECS+=(0); NOTES+=("no budget left"); log "== $name: no budget left"; return
    fi
    log "== $name (limit ${limit}s): $*"
    t0=$(date +%s)
    out=$(timeout --kill-after=10 "$limit" "$@" 2>&1); rc=$?
    printf '%s\n' "$out" | tail -n 60 | tee -a "$LOG" >/dev/null
    printf '%s\n' "$out" | tail -n 25
    note=$(printf '%s\n' "$out" | grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' | tail -n 1 | tr -d '=' | xargs)
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout
    elif [ $rc -ne 0 ]; then status=fail
    elif printf '%s' "$note" | grep -q skipped && ! printf '%s' "$note" | grep -q passed; then
        status=skip; note=$(printf '%s\n' "$out" | grep -E 'SKIPPED' | head -n 1 | cut -c1-160)
    else status=pass
    fi
    NAMES+=("$name"); STATUS+=("$status"); SECS+=($(( $(date +%s) - t0 ))); NOTES+=("${note:-rc $rc}")
}

install() {
    if [ -n "$SKIP_INSTALL" ]; then echo "using the environment as it is"; return 0; fi
    if [ -n "$WHEELS" ]; then
        local target; target=$(mktemp -d)
        "$PY" -m pip install --quiet --no-index --no-deps --target "$target" "$WHEELS"/*.whl || return 1
        echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $target (offline, --no-deps)"
        echo "PYTHONPATH=$target:$REPO" > "$REPO/.gpu_check_env"
        return 0
    fi
    local extras="test,hf"
    [ -n "${INSTALL_TE:-}" ] && ! "$PY" -c "import transformer_engine" 2>/dev/null && extras="$extras,gpu"
    [ -n "${INSTALL_VLLM:-}" ] && extras="$extras,vllm"
    "$PY" -m pip install --quiet -e ".[$extras]"
}

export -f install
export PY REPO WHEELS SKIP_INSTALL
rm -f "$REPO/.gpu_check_env"
log "gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" \
    || log "nvidia-smi failed: no NVIDIA GPU?"
step install 150 bash -c install
[ -f "$REPO/.gpu_check_env" ] && export "$(cat "$REPO/.gpu_check_env")" && export -f install
export PY REPO WHEELS SKIP_INSTALL
rm -f "$REPO/.gpu_check_env"
export PYTHONPATH=${PYTHONPATH:-$REPO}
step probe 40 "$PY" -c "
import torch, megatron.core
from megatron_rspo.capabilities import probe
from megatron_rspo.compat.cpu import patches_for
c = probe()
print(f'torch {torch.__version__} CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}')
print('megatron-core', megatron.core.__version__, '| capabilities', c.summary())
print('spec (auto):', 'transformer_engine' if c.use_transformer_engine('auto') else 'local', '| fusions', c.fusions())
print('shims:', patches_for(c))
assert c.cuda, 'torch sees no CUDA device'"
T="$PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py -k"
step te_vs_local 60 $T "transformer_engine"
step bf16_dist_optimizer 70 $T "bf16_train_step"
step memory_plan 60 $T "memory_plan" -s
step generation 50 $T "generation"
step rl_real_update 150 $T "real_update"
step ep2_nccl 90 $T "ep2"
step vllm 120 $T "vllm"
step qwen3_like_step 120 "$PY" benchmarks/gpu_step.py --qwen3-like

total=$(( $(date +%s) - START ))
log ""
log "| step | status | seconds | note |"
log "|---|---|---:|---|"
json="{\"seconds\": $total, \"steps\": ["
failed=0
for i in "${!NAMES[@]}"; do
    log "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${NOTES[$i]//|//} |"
    [ "${STATUS[$i]}" = fail ] || [ "${STATUS[$i]}" = timeout ] && failed=$((failed + 1))
    note=${NOTES[$i]//\\/\\\\}; note=${note//\"/\\\"}
    json+="$([ "$i" -gt 0 ] && echo ", "){\"step\": \"${NAMES[$i]}\", \"status\": \"${STATUS[$i]}\", \"seconds\": ${SECS[$i]}, \"note\": \"$note\"}"
done
json+="], \"failed\": $failed}"
log "gpu_check finished in ${total} s: $failed step(s) failed or timed out"
[ -n "$OUTDIR" ] && printf '%s\n' "$json" > "$OUTDIR/gpu_check.json"
[ "$failed" -eq 0 ]

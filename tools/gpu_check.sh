#!/usr/bin/env bash
# The GPU check, prepared to run once on a CUDA machine (<= 8 min on one H200-class GPU):
#   1. install the project next to the machine's CUDA torch (an NGC image's, or pip's CUDA build),
#   2. run the tests marked `gpu` (TE spec vs local spec, bf16 train step, generation on CUDA, one RL
#      iteration, EP=2 over NCCL with >= 2 GPUs),
#   3. print step time, tokens/s and peak memory of an RL-sized train step (benchmarks/gpu_step.py).
#   4. with vLLM installed (INSTALL_VLLM=1 adds .[vllm]), the vLLM CUDA steps: mismatch metrics with the
#      engine's routed experts, and R3 (--routing-replay-source rollout) end to end.
# Offline machines: WHEELS=/path/to/wheels installs from that folder only (pip --no-index).
# SKIP_INSTALL=1 uses the current environment as it is.   Usage: bash tools/gpu_check.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU"; exit 1; }
if [ -z "${SKIP_INSTALL:-}" ]; then
    PIP=("$PY" -m pip install -q)
    [ -n "${WHEELS:-}" ] && PIP+=(--no-index --find-links "$WHEELS")
    # Keep a CUDA torch the machine already has (NGC images); otherwise pip's default build is CUDA.
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || "${PIP[@]}" torch
    extras="test,hf"
    "$PY" -c "import transformer_engine" 2>/dev/null || extras="$extras,gpu"  # TE unless the image has it
    [ -n "${INSTALL_VLLM:-}" ] && extras="$extras,vllm"
    "${PIP[@]}" -e ".[$extras]" || { echo "install of .[$extras] failed; retrying without TE"; "${PIP[@]}" -e ".[test,hf]"; }
fi
"$PY" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
try:
    import transformer_engine
    print("transformer-engine", transformer_engine.__version__)
except ImportError:
    print("transformer-engine: not installed (the TE parity test will skip)")
PY
"$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider "$@" 2>&1 | tail -n 40
[ -n "${NO_VLLM:-}" ] || "$PY" -c "import vllm" 2>/dev/null || echo "vLLM not installed: the vLLM CUDA tests skipped (pip install -e .[vllm])"
"$PY" benchmarks/gpu_step.py
echo "gpu_check finished in $(( $(date +%s) - start )) s"

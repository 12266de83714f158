#!/usr/bin/env bash
# Download the wheels a bare, offline GPU machine lacks to run this project and its GPU check
# (tools/gpu_check.sh --wheels DIR). Run it on any machine with PyPI access; copy DIR over.
#
# The target machine: Python 3.12, x86_64 Linux, a CUDA torch preinstalled (e.g. 2.11.0+cu130) with nvcc,
# Triton, pytest, tensorboard, transformers, sentencepiece, safetensors (and their dependencies: numpy,
# packaging, sympy, tqdm, ...). No transformer-engine, apex, megatron-core or vLLM, no network.
# What it lacks, exactly (pinned to what this project is tested with; --no-deps: nothing else comes along,
# torch above all):
#   megatron-core 0.16.1        the model (its cp312 manylinux wheel, 2.6 MB)
#   math-verify + latex2sympy2_extended + antlr4-python3-runtime   MATH answers (tasks/math.py)
#   psutil                       dist_checkpointing
#   pytest-timeout               the suite's hang guard (pyproject's `timeout`)
# transformer-engine is not fetched: its wheels must match the machine's CUDA and torch builds (hundreds of MB,
# over the 64 MiB a bare machine is given); without it the local spec runs (capabilities.py).
#
#   usage: tools/fetch_gpu_wheels.sh [DIR]     (default: gpu_wheels/; PYTHON_VERSION=3.12 PLATFORM=... override)
set -euo pipefail
case "${1:-}" in -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;; esac
dir=${1:-gpu_wheels}
py=${PYTHON:-python3}
pyver=${PYTHON_VERSION:-3.12}
platform=${PLATFORM:-manylinux_2_28_x86_64}
mkdir -p "$dir"
pkgs=(
    "megatron-core==0.16.1"
    "math-verify==0.9.0"
    "latex2sympy2_extended==1.11.0"
    "antlr4-python3-runtime==4.13.2"
    "psutil==7.2.2"
    "pytest-timeout==2.4.0"
)
# manylinux_2_28 accepts the older manylinux tags too; pure-Python wheels are platform-independent.
"$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir" --python-version "$pyver" \
    --implementation cp --abi "cp${pyver/./}" --abi abi3 --abi none \
    --platform "$platform" --platform manylinux2014_x86_64 --platform any "${pkgs[@]}"
n=$(find "$dir" -maxdepth 1 -name '*.whl' | wc -l)
bytes=$(find "$dir" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s+=$1} END {print s+0}')
ls -l "$dir"/*.whl | awk '{printf "  %8.1f KiB  %s\n", $5 / 1024, $NF}'
awk -v n="$n" -v b="$bytes" 'BEGIN {printf "%d wheels, %.2f MiB in all (limit: 64 MiB)\n", n, b / 1048576}'
[ "$bytes" -le $((64 << 20)) ] || { echo "over 64 MiB" >&2; exit 1; }

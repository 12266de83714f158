"""The planner's verdicts for the paper's model and the next size, the tables of docs/scaling.md §8.

    python benchmarks/memory_plans.py

Each row is one ``tools/plan_memory.py`` command line (printed with it): per-GPU GiB of the worst pipeline stage
in the train and rollout phases, the largest categories, the verdict and the largest micro-batch that fits.
H100 80GB (79.6 GiB), transformer-engine and apex assumed on the GPUs, 4,096 new tokens after a 256-token
prompt, RSPO with vLLM engines of TP 2 colocated (sleep level 2 while training).
"""

from __future__ import annotations

import argparse
import shlex
import warnings

warnings.filterwarnings("ignore")

COMMON = ("--bf16 --use-distributed-optimizer --rollout-engine vllm --rollout-tensor-parallel-size 2 "
          "--max-new-tokens 4096 --rollout-batch-size 64 --num-generations 8 --micro-batch-size 1 --rl-algorithm rspo")
RECOMPUTE = "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1 --fused-logprobs"
HOST_ADAM = "--optimizer-cpu-offload --use-precision-aware-optimizer --offload-grads-during-rollout"
TP4_EP64 = ("--tensor-model-parallel-size 4 --sequence-parallel --expert-model-parallel-size 64 "
            "--rollout-tensor-parallel-size 8")  # vLLM engines of one node each (TP 8)
Q30, Q235 = "examples/configs/qwen3_30b_a3b.json", "examples/configs/qwen3_235b_a22b.json"
ROWS = [
    ("30B-A3B, 8 GPUs, EP 8", Q30, 8, "--expert-model-parallel-size 8 --vllm-gpu-memory-utilization 0.5"),
    ("+ recompute, fused log-probs", Q30, 8, f"--expert-model-parallel-size 8 {RECOMPUTE} "
                                             "--vllm-gpu-memory-utilization 0.5"),
    ("+ Adam on the host (the recipe)", Q30, 8, f"--expert-model-parallel-size 8 {RECOMPUTE} {HOST_ADAM} "
                                                "--vllm-gpu-memory-utilization 0.75"),
    ("30B-A3B, 4 x 8 GPUs, EP 8", Q30, 32, "--expert-model-parallel-size 8 --vllm-gpu-memory-utilization 0.5"),
    ("+ recompute, grads handed over", Q30, 32, f"--expert-model-parallel-size 8 {RECOMPUTE} "
                                                "--offload-grads-during-rollout --offload-optimizer-during-rollout "
                                                "--vllm-gpu-memory-utilization 0.6"),
    ("235B-A22B, 8 x 8 GPUs, TP 4 EP 64", Q235, 64, f"{TP4_EP64} {RECOMPUTE} --vllm-gpu-memory-utilization 0.8"),
    ("+ Adam on the host", Q235, 64, f"{TP4_EP64} {RECOMPUTE} {HOST_ADAM} --vllm-gpu-memory-utilization 0.8"),
]


def _top(cats: dict[str, int], n: int = 3) -> str:
    from megatron_rspo.planning.plan import GIB

    return ", ".join(f"{k} {v / GIB:.1f}" for k, v in sorted(cats.items(), key=lambda kv: -kv[1])[:n] if v)


def main() -> None:
    from megatron_rspo.planning.plan import GIB
    from megatron_rspo.rl.memory_check import plan_for, planner_parser

    print("| layout | train GiB | rollout GiB | largest (train) | verdict | largest micro-batch (train phase) |")
    print("|---|---:|---:|---|---|---:|")
    commands = []
    for name, hf, world, flags in ROWS:
        argv = ["--hf-config", hf, "--world-size", str(world), *shlex.split(COMMON), *shlex.split(flags)]
        args = planner_parser(argparse.ArgumentParser()).parse_args(argv)
        plans, fits = plan_for(args)
        worst = max(range(len(plans)), key=lambda k: max(plans[k].total("train"), plans[k].total("rollout")))
        plan = plans[worst]
        verdict = "fits" if all(p.fits() for p in plans) else "does not fit"
        print(f"| {name} | {plan.total('train') / GIB:.1f} | {plan.total('rollout') / GIB:.1f} | {_top(plan.train)} "
              f"| {verdict} | {min(fits)} |")
        commands.append(f"python tools/plan_memory.py {shlex.join(argv)}")
    print("\nCommands:\n")
    for c in commands:
        print(f"    {c}")


if __name__ == "__main__":
    main()

"""Will this RL run fit? Per-GPU memory by category and phase, before renting the GPUs.

    python tools/plan_memory.py --hf-config examples/configs/qwen3_30b_a3b.json --world-size 8 \\
        --expert-model-parallel-size 8 --bf16 --use-distributed-optimizer --rollout-engine vllm \\
        --gpu-memory-gib 80 [--optimizer-cpu-offload --use-precision-aware-optimizer ...]
    python tools/plan_memory.py --validate      # the planner against measured steps on this machine

Takes the trainer's own flags (model, layout, optimizer, RL) plus ``--world-size`` and the GPU's memory; the
model from ``--hf-config`` (a Hugging Face config.json: Qwen3-MoE, Qwen2-MoE, Mixtral) or from the model
flags. Each pipeline stage's share is counted by Megatron building that rank's model on the meta device;
activations come from measured per-tensor constants (megatron_rspo/planning/activations.py). Prints both
phases (train; rollout with the engine's share), the verdict and the largest micro-batch that fits;
``--json`` for a machine-readable plan. Exit status 0 fits, 3 does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from megatron_rspo.cli import HelpFormatter, run_cli
from megatron_rspo.planning.plan import GIB, MemoryPlan
from megatron_rspo.rl.memory_check import plan_for, planner_parser
from megatron_rspo.validation import raise_errors


def _table(plans: list[MemoryPlan], fits: list[int]) -> str:
    lines = []
    for plan, fit in zip(plans, fits):
        i = plan.inputs
        lines.append(f"\nrank {i.share.rank} (pipeline stage {i.share.pipeline_stage}): {i.share.total / 1e9:.3f} B "
                     f"parameters ({i.share.dense / 1e9:.3f} B dense, {i.share.expert / 1e9:.3f} B expert); "
                     f"micro-batch {i.micro_batch_rows} x {i.seq_length} tokens")
        lines.append("| category | train GiB | rollout GiB |\n|---|---:|---:|")
        for cat in dict.fromkeys([*plan.train, *plan.rollout]):
            lines.append(f"| {cat} | {plan.train.get(cat, 0) / GIB:.2f} | {plan.rollout.get(cat, 0) / GIB:.2f} |")
        lines.append(f"| **total** (of {i.gpu_gib:.1f}) | **{plan.total('train') / GIB:.2f}** | "
                     f"**{plan.total('rollout') / GIB:.2f}** |")
        lines.append(f"verdict: {'fits' if plan.fits() else 'DOES NOT FIT: ' + plan.overflow()}; largest micro-batch "
                     f"that fits: {fit} rows")
        lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _validate() -> int:
    from megatron_rspo.planning.validate import validate

    print("| layout | predicted MiB | measured MiB | predicted / measured |\n|---|---:|---:|---:|")
    worst = 0.0
    for name, predicted, measured in validate():
        worst = max(worst, abs(predicted / measured - 1))
        print(f"| {name} | {predicted / 2**20:.2f} | {measured / 2**20:.2f} | {predicted / measured:.3f} |")
    print(f"largest deviation: {worst:.1%}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = planner_parser(argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter))
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--validate", action="store_true", help="compare the planner with measured steps on this machine")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")  # Megatron's notes on missing GPU packages: the plan says what it assumes
    if args.validate:
        return _validate()
    errors = [] if args.hf_config or args.vocab_size else ["--vocab-size (or --hf-config) is needed"]
    if args.world_size < 1:
        errors.append(f"--world-size must be >= 1 (got {args.world_size})")
    raise_errors(errors)
    plans, fits = plan_for(args)
    if args.json:
        print(json.dumps([{"rank": pl.inputs.share.rank, "stage": pl.inputs.share.pipeline_stage,
                           "parameters": {"dense": pl.inputs.share.dense, "expert": pl.inputs.share.expert},
                           "train": pl.train, "rollout": pl.rollout, "fits": pl.fits(),
                           "largest_micro_batch": f, "notes": pl.notes} for pl, f in zip(plans, fits)], indent=2))
    else:
        print(_table(plans, fits))
    return 0 if all(pl.fits() for pl in plans) else 3


if __name__ == "__main__":
    sys.exit(run_cli(main))

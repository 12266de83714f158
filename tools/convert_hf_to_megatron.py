"""Convert an HF Qwen3-MoE / Qwen2-MoE / Mixtral checkpoint (safetensors) into a Megatron checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen3-30B-A3B --save ckpt/qwen3 \
        --tensor-model-parallel-size 2 --expert-model-parallel-size 8

On one process the whole model is built (TP=EP=PP=1) and the layout flags are only validated and
recorded. Under torchrun the flags are the real layout (world size = TP x PP x DP) and each rank
converts only its shard, so memory per rank is about model / (TP x EP x PP shards) + one HF layer:

    torchrun --nproc-per-node=8 tools/convert_hf_to_megatron.py --hf-dir Qwen3-30B-A3B --save ckpt/qwen3 \
        --tensor-model-parallel-size 2 --expert-model-parallel-size 8

Either way the result is a model-only distributed checkpoint (iteration 0) that loads into any TP/EP/PP
layout (dist_checkpointing reshards at load). See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    from megatron_rspo.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--save", required=True, help="output checkpoint root (iter_0000000/ is written)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="target tensor-parallel size")
    p.add_argument("--expert-model-parallel-size", type=int, default=1, help="target expert-parallel size")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="target pipeline-parallel size")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="parameter dtype of the checkpoint (auto: bf16 if the HF config says so, else fp32)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|deprecated).*")

    from megatron_rspo.config import ParallelConfig
    from megatron_rspo.convert import ConversionError, convert_hf_to_megatron

    parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                              expert_model_parallel_size=args.expert_model_parallel_size,
                              pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    rc = 0
    try:
        convert_hf_to_megatron(args.hf_dir, args.save, parallel, dtype=args.dtype)
    except ConversionError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        rc = 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: leave the process group cleanly
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return rc


if __name__ == "__main__":  # dist_checkpointing spawns worker processes
    from megatron_rspo.cli import run_cli

    run_cli(main)

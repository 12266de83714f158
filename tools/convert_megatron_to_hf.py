"""Export a Megatron checkpoint (saved with any TP/EP/PP layout) as an HF safetensors model.

    python tools/convert_megatron_to_hf.py --load ckpt/run1 --hf-dir out/hf \
        --hf-config-from Qwen3-30B-A3B --max-shard-size 5GB

Writes config.json, model-0000x-of-0000y.safetensors (one tensor per expert, as published) and
model.safetensors.index.json; tokenizer and generation files are copied from --hf-config-from. Without
it, the HF config recorded at conversion is used, else one is derived from run_config.json.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    from megatron_rspo.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint root (latest iteration) or an iter_* directory")
    p.add_argument("--hf-dir", required=True, help="output directory")
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    p.add_argument("--hf-config-from", default=None, help="original HF model dir: config.json + tokenizer files")
    p.add_argument("--model-type", choices=["qwen3_moe", "qwen2_moe", "mixtral"], default=None,
                   help="HF family when no HF config is available (default: inferred)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="output dtype (default: as stored)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|deprecated|DTensor).*")

    from megatron_rspo.checkpoint import CheckpointError
    from megatron_rspo.convert import ConversionError, convert_megatron_to_hf

    try:
        convert_megatron_to_hf(args.load, args.hf_dir, args.max_shard_size, args.hf_config_from, args.model_type,
                               args.dtype, args.iteration)
    except (ConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # dist_checkpointing may spawn worker processes
    from megatron_rspo.cli import run_cli

    run_cli(main)

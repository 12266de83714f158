"""Held-out Countdown accuracy of a checkpoint (greedy), next to an untrained model of the same shape.

    python tools/eval_countdown.py --load runs/countdown_tiny/sft --test-data data/countdown/test.jsonl \
        --tokenizer-model data/countdown/tokenizer.model
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

from megatron_rspo import checkpoint
from megatron_rspo.cli import HelpFormatter, run_cli
from megatron_rspo.config import ModelConfig, ParallelConfig
from megatron_rspo.evaluation import evaluate_countdown
from megatron_rspo.model.provider import build_model, init_distributed, shutdown_distributed
from megatron_rspo.rl.config import with_runtime_fields
from megatron_rspo.tasks import countdown
from megatron_rspo.tokenizer import load_tokenizer
from megatron_rspo.validation import data_file_errors, raise_errors


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint root or iter_* directory")
    p.add_argument("--test-data", required=True, help="Countdown instances (JSONL)")
    p.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file or HF tokenizer directory")
    p.add_argument("--template", default="tiny", choices=countdown.TEMPLATES, help="prompt template")
    p.add_argument("--num-samples", type=int, default=500, help="instances to evaluate (the file's first N)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="maximum generated tokens per answer")
    p.add_argument("--seed", type=int, default=1234, help="seed of the untrained baseline's initialisation")
    p.add_argument("--no-baseline", action="store_true", help="skip the untrained-model baseline")
    args = p.parse_args(argv)
    errors = data_file_errors(test_data=args.test_data, tokenizer_model=args.tokenizer_model)
    errors += [f"--{k.replace('_', '-')} must be >= 1 (got {getattr(args, k)})"
               for k in ("num_samples", "max_new_tokens") if getattr(args, k) < 1]
    raise_errors(errors)

    tok = load_tokenizer(args.tokenizer_model)
    path = checkpoint.resolve_checkpoint_dir(args.load)
    # The saved architecture, run the default way here (its grouped GEMM / recompute choices were the run's).
    model_cfg = with_runtime_fields(checkpoint.read_model_config(path), ModelConfig())
    test = countdown.load_jsonl(args.test_data)[: args.num_samples]
    init_distributed(ParallelConfig(), seed=args.seed)
    out: dict = {"checkpoint": path, "num_samples": len(test)}
    if not args.no_baseline:
        untrained = build_model(model_cfg, ParallelConfig())
        res = evaluate_countdown(untrained, tok, test, args.template, args.max_new_tokens)
        out.update({f"untrained_{k}": v for k, v in res.items()})
    model = build_model(model_cfg, ParallelConfig())
    checkpoint.load_checkpoint(path, model, load_rng=False, model_config=model_cfg)
    t0 = time.time()
    out.update(evaluate_countdown(model, tok, test, args.template, args.max_new_tokens))
    out["eval_seconds"] = round(time.time() - t0, 2)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    run_cli(main, after=shutdown_distributed)

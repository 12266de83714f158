"""Make a Countdown data set: train.jsonl, test.jsonl and a sentencepiece tokenizer.model.

    python tools/make_countdown_data.py --out-dir data/countdown --num-train 20000 --num-test 500 \
        --num-numbers 3 4 --max-number 9 --max-target 100 --vocab-size 64

At most about 2.1k unique instances exist for 3 numbers in 1..9 (targets 1..100), 26k for 3-4 numbers;
raise --max-number for more (50k of 3-4 numbers in 1..20 take ~10 s).

The tokenizer is trained on the prompt + completion texts of both splits, so that every character the
model will see is in its vocabulary (a tokenizer learns no answers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from megatron_rspo.cli import HelpFormatter, run_cli
from megatron_rspo.config import ConfigError
from megatron_rspo.tasks.countdown import (
    TEMPLATES,
    CountdownConfig,
    format_prompt,
    generate_splits,
    save_jsonl,
    sft_completion,
)
from megatron_rspo.tokenizer import train_sentencepiece


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out-dir", required=True, type=Path, help="where train.jsonl, test.jsonl, tokenizer.model go")
    p.add_argument("--num-train", type=int, default=20000, help="training instances")
    p.add_argument("--num-test", type=int, default=500, help="held-out instances (disjoint from training)")
    p.add_argument("--seed", type=int, default=0, help="generation seed")
    p.add_argument("--num-numbers", type=int, nargs="+", default=[3, 4], help="numbers per instance (e.g. 3 4)")
    p.add_argument("--min-number", type=int, default=1, help="smallest number")
    p.add_argument("--max-number", type=int, default=9, help="largest number")
    p.add_argument("--min-target", type=int, default=1, help="smallest target")
    p.add_argument("--max-target", type=int, default=100, help="largest target")
    p.add_argument("--sorted-numbers", action="store_true", help="present the numbers sorted in prompts")
    p.add_argument("--vocab-size", type=int, default=64, help="sentencepiece vocab size (soft limit)")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "char", "unigram"], help="sentencepiece model type")
    p.add_argument("--template", default="tiny", choices=TEMPLATES, help="template the tokenizer is trained on")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.num_train < 1 or args.num_test < 0:
        raise ConfigError(f"--num-train must be >= 1 and --num-test >= 0 (got {args.num_train}, {args.num_test})")
    t0 = time.time()
    cfg = CountdownConfig(
        num_numbers=tuple(args.num_numbers),
        min_number=args.min_number,
        max_number=args.max_number,
        min_target=args.min_target,
        max_target=args.max_target,
        sorted_numbers=args.sorted_numbers,
    )
    try:
        cfg.validate()
        train, test = generate_splits(args.num_train, args.num_test, seed=args.seed, config=cfg)
    except ValueError as e:  # bad ranges, or too few unique instances for them: the flags' fault
        raise ConfigError(str(e)) from None
    t_gen = time.time() - t0

    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_jsonl(train, args.out_dir / "train.jsonl")
    save_jsonl(test, args.out_dir / "test.jsonl")
    texts = [format_prompt(i, args.template) + sft_completion(i, args.template) for i in train + test]
    tok = train_sentencepiece(texts, args.out_dir / "tokenizer", vocab_size=args.vocab_size, model_type=args.model_type)
    (args.out_dir / "config.json").write_text(json.dumps({**vars(args), "out_dir": str(args.out_dir)}, indent=2))

    lengths = [len(tok.encode(t)) for t in texts]
    ex = train[0]
    print(f"wrote {len(train)} train / {len(test)} test instances to {args.out_dir} ({t_gen:.1f}s generation)")
    print(f"tokenizer.model: {tok.vocab_size} pieces; tokens per example: mean {sum(lengths) / len(lengths):.1f}, "
          f"max {max(lengths)}")
    print(f"example: {format_prompt(ex, args.template)!r} -> {sft_completion(ex, args.template)!r}")
    print(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_cli(main)

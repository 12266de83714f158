"""RSPO vs GMPO: train-step time (and GPU memory when CUDA is present), side by side in one run, and the
routing record's bytes per token.

For each model shape, one engine (model + Megatron DDP + optimizer) trains on the same synthetic rollout
with each variant, interleaved round-robin so machine noise hits all alike; the ratio of medians is the
overhead. Variants: ``gmpo`` (plain: no routing records, Megatron's own routing), ``gmpo+diag`` (GMPO with
the router diagnostics the trainer logs: scores at the old ids, expert-set change), ``rspo`` (the
same scores, turned into gamma). RSPO's extra work per step is the router log-scores at the recorded ids
in the training forward (a log-softmax over E and a gather of K per token and layer) and gamma.

    python benchmarks/overhead.py --out docs/overhead.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch

from megatron_rspo.config import ModelConfig, OptimConfig, ParallelConfig
from megatron_rspo.engine import Engine
from megatron_rspo.model.logprobs import forward_logits
from megatron_rspo.model.provider import count_parameters, init_distributed, num_moe_layers
from megatron_rspo.model.routing import RoutingSession, routing_session
from megatron_rspo.rl.experience import Experience
from megatron_rspo.rl.losses import PolicyLossConfig
from megatron_rspo.rl.router_shift import RouterShiftConfig
from megatron_rspo.rl.step import StepOptions, loss_units, make_old_policy_step, make_train_step


@dataclass
class Shape:
    name: str
    layers: int
    hidden: int
    experts: int
    topk: int


SHAPES = [
    Shape("small E=8", 2, 64, 8, 2),
    Shape("small E=32", 2, 64, 32, 4),
    Shape("medium E=8", 4, 256, 8, 2),
    Shape("medium E=32", 4, 256, 32, 4),
]


def synthetic_experience(model, cfg: ModelConfig, rows: int, seq: int, gen: torch.Generator) -> Experience:
    tokens = torch.randint(1, cfg.vocab_size, (rows, seq), generator=gen)
    mask = torch.zeros(rows, seq - 1)
    mask[:, seq // 4:] = 1.0  # the last 3/4 of each row is "response"
    with torch.no_grad(), routing_session(model, RoutingSession(record=True)) as s:
        forward_logits(model, tokens)
    ids = RoutingSession.stack(s.recorded_ids, num_moe_layers(cfg))
    adv = torch.randn(rows, generator=gen)
    return Experience(tokens=tokens, response_mask=mask, advantages=adv, rewards=adv, routing_ids=ids)


def bench_shape(shape: Shape, rows: int, seq: int, repeats: int) -> dict:
    cfg = ModelConfig(num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=4,
                      ffn_hidden_size=2 * shape.hidden, moe_ffn_hidden_size=shape.hidden, num_experts=shape.experts,
                      moe_router_topk=shape.topk, vocab_size=512, max_position_embeddings=max(seq, 64))
    par = ParallelConfig()
    init_distributed(par, seed=1)
    engine = Engine(cfg, par, OptimConfig(lr=1e-5), train_iters=10 * repeats)
    exp = synthetic_experience(engine.module, cfg, rows, seq, torch.Generator().manual_seed(0))
    variants = ("gmpo", "gmpo+diag", "rspo")
    opts = {v: StepOptions(algorithm=v.split("+")[0], loss=PolicyLossConfig(), routing_replay=False, temperature=1.0,
                           router_shift=RouterShiftConfig(enabled=v == "rspo"), num_moe_layers=num_moe_layers(cfg))
            for v in variants}
    outs = engine.forward_only(make_old_policy_step(opts["rspo"], need_scores=True), [exp], seq - 1, rows)
    exp.old_logp, exp.old_log_scores = outs[0]["logp"], outs[0]["log_scores"]
    data = {"gmpo": replace(exp, routing_ids=None, old_log_scores=None), "gmpo+diag": exp, "rspo": exp}
    times: dict[str, list[float]] = {v: [] for v in variants}
    mem: dict[str, float] = {}
    for i in range(repeats + 1):
        for v in variants[i % 3:] + variants[: i % 3]:
            step = make_train_step(opts[v], loss_units("gmpo", opts[v].loss, exp.response_mask), engine.loss_scale)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            engine.train_step(step, [data[v]], seq - 1, rows)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                mem[v] = torch.cuda.max_memory_allocated() / 2**20
            if i > 0:  # the first round is warm-up
                times[v].append(time.perf_counter() - t0)
    g, d, r = (statistics.median(times[v]) for v in variants)
    ids, scores = exp.routing_ids, exp.old_log_scores
    per_tok = ids[0, 0].numel() * ids.element_size() + scores[0, 0].numel() * scores.element_size()
    return {"shape": shape.name, "params": count_parameters(engine.module),
            "L x K": f"{num_moe_layers(cfg)} x {shape.topk}", "gmpo_ms": 1e3 * g, "diag_ms": 1e3 * d,
            "rspo_ms": 1e3 * r, "ratio": r / g, "ratio_diag": r / d, "record_bytes_per_token": per_tok,
            "ids_bytes_per_token": ids[0, 0].numel() * ids.element_size(),
            "gpu_mem_mib": f"{mem['gmpo']:.0f} / {mem['rspo']:.0f}" if mem else "n/a (no GPU)"}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32, help="responses per train step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", default=None, help="write a markdown table here")
    p.add_argument("--shapes", nargs="+", default=[s.name for s in SHAPES], choices=[s.name for s in SHAPES])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [bench_shape(s, args.rows, args.seq, args.repeats) for s in SHAPES if s.name in args.shapes]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"# RSPO vs GMPO train-step overhead ({device})", "",
        f"Command: `python benchmarks/overhead.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        f"{args.rows} responses x {args.seq} tokens per step (3/4 response), fp32, one optimizer step each; "
        f"medians of {args.repeats} interleaved steps after a warm-up.", "",
        "| shape | params | MoE layers x top-k | GMPO ms | GMPO+diag ms | RSPO ms | RSPO/GMPO | RSPO/GMPO+diag "
        "| record bytes/token (ids + old scores) | GPU peak MiB GMPO / RSPO |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(f"| {r['shape']} | {r['params']:,} | {r['L x K']} | {r['gmpo_ms']:.1f} | {r['diag_ms']:.1f} | "
                     f"{r['rspo_ms']:.1f} | {r['ratio']:.3f} | {r['ratio_diag']:.3f} | "
                     f"{r['record_bytes_per_token']} ({r['ids_bytes_per_token']} ids) | "
                     f"{r['gpu_mem_mib']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return results


if __name__ == "__main__":
    main()

"""Generation memory per row: stated analytically for a Qwen3-MoE shape, measured on a tiny model.

Analytic: per row of a generation chunk, at prompt+response width W, the bytes that ``generate`` holds
(KV cache, token / log-prob / uniform buffers, routing records) and the [V]-sized sampling
temporaries of one decode step, before (commit a2f945c) and after the at-size changes.

Measured: each configuration runs in a fresh process (glibc mmaps every buffer >= 64 KiB, so freed
tensors leave RSS); the peak RSS growth of one ``generate`` call (VmHWM, reset through
/proc/self/clear_refs) at two row counts gives the marginal bytes per row (the slope), free of
constant costs. ``--before-root`` also measures another tree, e.g. the code before the changes::

    mkdir -p /tmp/before && git archive a2f945c megatron_rspo | tar -x -C /tmp/before
    python benchmarks/generation_memory.py --before-root /tmp/before --out /tmp/generation_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

KIB, MIB = 1024, 1024**2


@dataclass
class Shape:
    name: str
    layers: int
    moe_layers: int
    experts: int
    topk: int
    vocab: int
    kv_groups: int
    head_dim: int
    hidden: int = 0
    moe_ffn: int = 0
    kv_bytes: int = 2  # bf16 KV cache (the model's dtype)
    grouped_experts: bool = True  # grouped GEMM (TE): every expert's fc1 output exists at once

    @property
    def prefill_bytes_per_token(self) -> int:
        """~Activations of one MoE layer per prefill token (model dtype, no grad: layers run one after
        another): the K routed copies in and out, ~8 hidden-sized tensors, and with grouped experts the
        K copies through fc1 (2f, SwiGLU) and the activation (a sequential expert loop holds one
        expert's at a time)."""
        routed = 2 * self.hidden + (3 * self.moe_ffn if self.grouped_experts else 0)
        return self.kv_bytes * (self.topk * routed + 8 * self.hidden)


QWEN3_30B_A3B = Shape("Qwen3-30B-A3B", layers=48, moe_layers=48, experts=128, topk=8, vocab=151936, kv_groups=4,
                      head_dim=128, hidden=2048, moe_ffn=768)
QWEN3_235B_A22B = Shape("Qwen3-235B-A22B", layers=94, moe_layers=94, experts=128, topk=8, vocab=151936, kv_groups=4,
                        head_dim=128, hidden=4096, moe_ffn=1536)


def per_row(shape: Shape, width: int, *, after: bool, record_scores: bool, sampled: bool = True) -> dict[str, int]:
    """Bytes per row of a chunk at width W = prompt + max_new_tokens (the work buffers' width)."""
    lk = shape.moe_layers * shape.topk
    id_bytes = (1 if shape.experts <= 256 else 2) if after else (1 if shape.experts <= 127 else 2)
    scores = record_scores or not after  # before: always recorded
    record = lk * (id_bytes + (4 if scores else 0))
    v = shape.vocab
    return {
        "kv_cache": 2 * shape.layers * shape.kv_groups * shape.head_dim * shape.kv_bytes * width,
        "token_logprob_buffers": 12 * width + (8 * width if after and sampled else 0),  # int64 + fp32 (+ f64 u)
        # Work buffers [W] and the assembled copy [S <= W] exist together while the rollout is cut.
        "routing_work": record * width,
        "routing_out": record * width,
        # One sampling step (no top-p), per row: the fp32 logits plus the draw's live buffers. Before: logits/T,
        # probs, race, probs/race (+ a host race and its copy with a CPU generator). After: at most one fp32
        # (logits/T, then probs) and the float64 cdf, built in place.
        "sampling_step": (4 + 4 + 8) * v if after else (4 + 4 + 4 + 4 + 4) * v,
    }


def peak_bytes(shape: Shape, prompt: int, width: int, rows: int, chunk: Optional[int], *, after: bool,
               record_scores: bool) -> int:
    """Peak of one generate() call over ``rows`` rows: the worse of the generation phase of the last chunk
    (its KV cache, buffers, routing work and the prefill activations or a sampling step, next to the
    finished chunks' records) and the assembly (work + cut copy; before, the KV cache was still alive;
    after with chunks, the concatenation holds the chunks' records and the joined copy)."""
    b = per_row(shape, width, after=after, record_scores=record_scores)
    c = rows if chunk is None else chunk
    step = max(b["sampling_step"], prompt * shape.prefill_bytes_per_token)
    uniforms = 8 * width * rows if after else 0
    per_chunk_row = b["kv_cache"] + b["token_logprob_buffers"] - (8 * width if after else 0) + b["routing_work"]
    finished = (rows - c) * b["routing_out"]
    gen = c * (per_chunk_row + step) + finished + uniforms
    asm = c * (per_chunk_row + b["routing_out"] - (b["kv_cache"] if after else 0)) + finished + uniforms
    concat = 2 * rows * b["routing_out"] + uniforms if c < rows else 0
    mask = 0 if after else width * width  # the [max_len, max_len] bool causal mask
    return max(gen, asm, concat) + mask


def analytic_table(shape: Shape, prompt: int, width: int, rows: int, chunk: int) -> list[str]:
    cases = [("before", False, True, None), ("after, record_scores=True", True, True, None),
             ("after, record_scores=False", True, False, None),
             (f"after, ids only, max_batch_rows={chunk}", True, False, chunk)]
    lines = [f"{shape.name}: {shape.layers} layers ({shape.moe_layers} MoE), E={shape.experts}, top-{shape.topk}, "
             f"V={shape.vocab}, {shape.kv_groups} KV groups x {shape.head_dim}, bf16 KV; prompt {prompt}, "
             f"W={width} tokens (prompt + max_new_tokens), {rows} rows per rank. Prefill activations "
             f"~{shape.prefill_bytes_per_token / KIB:.0f} KiB per prompt token and row (one layer at a time).", "",
             "| case | KV cache / row | routing records / row (work + out) | sampling step / row | "
             f"peak at {rows} rows |", "|---|---:|---:|---:|---:|"]
    for name, after, scores, chunk_rows in cases:
        b = per_row(shape, width, after=after, record_scores=scores)
        peak = peak_bytes(shape, prompt, width, rows, chunk_rows, after=after, record_scores=scores)
        lines.append(f"| {name} | {b['kv_cache'] / MIB:.0f} MiB | {(b['routing_work'] + b['routing_out']) / MIB:.1f} "
                     f"MiB | {b['sampling_step'] / MIB:.2f} MiB | {peak / 1024**3:.1f} GiB |")
    return lines


# ----------------------------------------------------------------------------------------- measured
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(spec: dict) -> dict:
    """One measurement in this (fresh) process; ``spec`` from ``measure``."""
    if spec.get("code_root"):
        sys.path.insert(0, spec["code_root"])
    import gc
    import inspect
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from megatron_rspo.config import ModelConfig, ParallelConfig
    from megatron_rspo.model.provider import build_model, init_distributed
    from megatron_rspo.rollout.generate import SamplingParams, generate

    m = spec["model"]
    cfg = ModelConfig(num_layers=m["layers"], hidden_size=m["hidden"], ffn_hidden_size=2 * m["hidden"],
                      num_attention_heads=m["heads"], num_experts=m["experts"], moe_router_topk=m["topk"],
                      vocab_size=m["vocab"], max_position_embeddings=spec["prompt"] + spec["new"])
    init_distributed(ParallelConfig(), seed=1)
    model = build_model(cfg, ParallelConfig())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, m["vocab"], (spec["prompt"],), generator=g).tolist() for _ in range(spec["rows"])]
    params = SamplingParams(max_new_tokens=spec["new"], temperature=1.0)
    accepted = inspect.signature(generate).parameters
    kwargs = {k: v for k, v in spec["kwargs"].items() if k in accepted}
    generate(model, prompts[:2], SamplingParams(max_new_tokens=4), None, 0, **kwargs)  # warm-up
    gc.collect()
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    r = generate(model, prompts, params, None, 0, generator=torch.Generator().manual_seed(1), **kwargs)
    peak = _rss_kib("VmHWM")
    records = sum(t.nbytes for t in (r.routing_ids, r.routing_log_scores) if t is not None)
    return {"peak_growth": (peak - base) * KIB, "records": records, "width": int(r.tokens.shape[1]),
            "ids_dtype": str(r.routing_ids.dtype)}


def measure(spec: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=8, help="short: the decode phase, not the prefill, peaks")
    p.add_argument("--new", type=int, default=120, help="max_new_tokens (no EOS: every row runs to it)")
    p.add_argument("--rows", type=int, nargs=2, default=[8, 32], help="two row counts; per row = the slope")
    p.add_argument("--chunk", type=int, default=8, help="max_batch_rows of the chunked case")
    p.add_argument("--before-root", default=None, help="a tree with the old code (see the example) to measure too")
    p.add_argument("--analytic-prompt", type=int, default=1024, help="analytic: prompt length")
    p.add_argument("--analytic-new", type=int, default=4096, help="analytic: max_new_tokens")
    p.add_argument("--rows-per-rank", type=int, default=512, help="analytic: rows generated per rank")
    p.add_argument("--out", default=None, help="write a markdown report here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    model = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "experts": args.experts,
             "topk": args.topk, "vocab": args.vocab}
    cases = [("after, record_scores=True", None, {}),
             ("after, record_scores=False", None, {"record_scores": False}),
             (f"after, ids only, max_batch_rows={args.chunk}", None,
              {"record_scores": False, "max_batch_rows": args.chunk})]
    if args.before_root:
        cases.insert(0, ("before", args.before_root, {}))
    tiny = Shape("tiny", args.layers, args.layers, args.experts, args.topk, args.vocab, args.heads,
                 args.hidden // args.heads, hidden=args.hidden, moe_ffn=2 * args.hidden, kv_bytes=4,
                 grouped_experts=False)  # local SequentialMLP on CPU
    width = args.prompt + args.new
    results = {}
    lines = ["| case | ids | peak growth, rows " + " / ".join(map(str, args.rows)) + " | measured / row | "
             "predicted / row |", "|---|---|---:|---:|---:|"]
    for name, root, kwargs in cases:
        runs = [measure({"model": model, "prompt": args.prompt, "new": args.new, "rows": n, "kwargs": kwargs,
                         "code_root": root}) for n in args.rows]
        slope = (runs[1]["peak_growth"] - runs[0]["peak_growth"]) / (args.rows[1] - args.rows[0])
        after, scores, chunk = name != "before", kwargs.get("record_scores", True), kwargs.get("max_batch_rows")
        predicted = [peak_bytes(tiny, args.prompt, width, n, chunk if chunk and chunk < n else None, after=after,
                                record_scores=scores) for n in args.rows]
        predicted = (predicted[1] - predicted[0]) / (args.rows[1] - args.rows[0])
        results[name] = {"per_row": slope, "predicted": predicted, "runs": runs}
        lines.append(f"| {name} | {runs[0]['ids_dtype']} | "
                     + " / ".join(f"{r['peak_growth'] / MIB:.1f} MiB" for r in runs)
                     + f" | {slope / KIB:.0f} KiB | {predicted / KIB:.0f} KiB |")
        print(lines[-1], flush=True)

    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    report = ["# Generation memory per row", "", f"Command: `{cmd}`", "",
              "## Analytic, real shapes", ""]
    for shape in (QWEN3_30B_A3B, QWEN3_235B_A22B):
        report += analytic_table(shape, args.analytic_prompt, args.analytic_prompt + args.analytic_new,
                                 args.rows_per_rank, 64) + [""]
    report += ["## Measured, tiny model (CPU, fp32)", "",
               f"{args.layers} layers (all MoE), hidden {args.hidden}, {args.heads} heads, E={args.experts}, "
               f"top-{args.topk}, V={args.vocab}; prompts {args.prompt} + {args.new} sampled tokens (T=1, no "
               f"EOS). Peak RSS growth of one generate() call; per row = slope between the two row counts; "
               f"predicted = the analytic per-row terms for this shape (fp32 KV).", ""] + lines
    print("\n".join(report))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(report) + "\n")
    return results


if __name__ == "__main__":
    main()

"""Peak memory of token log-probs per logit: the old way, the one-buffer standard path, the fused path.

One measured step = log-probs + entropy (for logging) + a masked policy-gradient-like loss + backward, at
vocabulary V and 2 x S tokens, temperature 0.7. Each measurement runs in a fresh process: the peak RSS
growth (``ru_maxrss`` after the step minus the RSS before it; inputs already allocated, glibc told to
give big blocks back with ``MALLOC_MMAP_THRESHOLD_``) divided by tokens x V. With ``--device cuda`` the
peak of ``torch.cuda.max_memory_allocated`` above the inputs is used instead.

  old       logits / T, an fp32 clone into Megatron's vocab_parallel_cross_entropy, the old entropy formula
            (differentiable, kept alive like the old train step's metric); logits [B, S, V] fp32 leaf
  standard  token_logprobs_and_entropy (entropy detached); logits leaf
  std+Hgrad the same with entropy_grad=True and 0.01 x entropy in the loss
  fused     fused_token_logprobs(hidden [B, S, H], weight [V, H]) with entropy; hidden and weight leaves
            (weight.grad [V, H] counts; the logits never exist)

    python benchmarks/logprob_memory.py --seq 256 512 1024     # the table in docs/scaling.md
    python benchmarks/logprob_memory.py --one standard --seq 512     # one measurement, JSON on stdout
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron_rspo.model.logprobs import CHUNK_ELEMENTS, token_logprobs_and_entropy

VOCAB = 152_064  # Qwen2/Qwen3
HIDDEN = 64  # fused path: small, so that weight.grad (4 V H bytes) stays a small part of the count
TEMPERATURE = 0.7
MODES = ["old", "standard", "std+Hgrad", "fused"]


def old_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logprobs.py before the one-buffer path: an fp32 clone into Megatron's in-place cross-entropy."""
    from megatron.core import tensor_parallel

    x = logits.float()
    if x.data_ptr() == logits.data_ptr():
        x = x.clone()
    return -tensor_parallel.vocab_parallel_cross_entropy(x, labels)


def old_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The old differentiable entropy (TP=1 form)."""
    logits = logits.float()
    m = logits.max(dim=-1, keepdim=True).values.detach()
    shifted = logits - m
    e = shifted.exp()
    sum_e = e.sum(-1)
    return sum_e.log() - (e * shifted).sum(-1) / sum_e


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _init_single_rank() -> None:
    """One gloo rank + Megatron's parallel state (TP=1): the old path's cross-entropy needs the TP group."""
    import tempfile

    import torch.distributed as dist
    from megatron.core import parallel_state

    store = tempfile.NamedTemporaryFile(prefix="logprob_memory_", delete=False).name  # no port to pick
    atexit.register(lambda: os.path.exists(store) and os.unlink(store))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()


def _step(mode: str, inputs: dict, chunk: int) -> None:
    from megatron_rspo.model.fused_logprobs import fused_token_logprobs

    labels, mask = inputs["labels"], inputs["mask"]
    if mode == "old":
        scaled = inputs["logits"] / TEMPERATURE
        logp, entropy = old_token_logprobs(scaled, labels), old_token_entropy(scaled)
    elif mode in ("standard", "std+Hgrad"):
        logp, entropy = token_logprobs_and_entropy(inputs["logits"], labels, TEMPERATURE,
                                                   entropy_grad=mode == "std+Hgrad")
    else:
        logp, entropy = fused_token_logprobs(inputs["hidden"], inputs["weight"], labels, TEMPERATURE,
                                             chunk_tokens=chunk, with_entropy=True)
    loss = -(logp * mask).sum() / mask.sum()
    if mode == "std+Hgrad":
        loss = loss - 0.01 * (entropy * mask).sum() / mask.sum()
    metric = (entropy * mask).sum() / mask.sum()  # logged; alive through the backward, as in a train step
    loss.backward()
    del metric


def _inputs(mode: str, rows: int, seq: int, vocab: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (rows, seq), generator=g).to(device)
    mask = (torch.rand(rows, seq, generator=g) < 0.75).float().to(device)
    if mode == "fused":
        hidden = torch.randn(rows, seq, HIDDEN, generator=g).to(device).requires_grad_()
        weight = (torch.randn(vocab, HIDDEN, generator=g) * 0.3).to(device).requires_grad_()
        return {"labels": labels, "mask": mask, "hidden": hidden, "weight": weight}
    logits = (torch.randn(rows, seq, vocab, generator=g) * 2).to(device).requires_grad_()
    return {"labels": labels, "mask": mask, "logits": logits}


def measure_one(mode: str, rows: int, seq: int, vocab: int, chunk: int, device: str) -> dict:
    """In this process: warm up on a tiny case, then measure one step; bytes per logit above the inputs."""
    _init_single_rank()
    _step(mode, _inputs(mode, 2, 4, 97, device), chunk=3)  # first-call allocations (thread pools, modules)
    inputs = _inputs(mode, rows, seq, vocab, device)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _rss_bytes()
    t0 = time.perf_counter()
    _step(mode, inputs, chunk)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    seconds = time.perf_counter() - t0
    logits = rows * seq * vocab
    return {"mode": mode, "rows": rows, "seq": seq, "vocab": vocab, "chunk": chunk, "device": device,
            "bytes_per_logit": (peak - before) / logits, "peak_above_inputs_mib": (peak - before) / 2**20,
            "seconds": seconds}


def measure(mode: str, seq: int, rows: int = 2, vocab: int = VOCAB, chunk: int = 64, threads: int = 2,
            device: str = "cpu", timeout: float = 600) -> dict:
    """``measure_one`` in a fresh interpreter (its peak RSS is then this step's alone)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads),
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", mode, "--rows", str(rows), "--seq", str(seq),
           "--vocab", str(vocab), "--chunk", str(chunk), "--threads", str(threads), "--device", device]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", choices=MODES, help="run one measurement in this process, print JSON")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq", type=int, nargs="+", default=[256, 512], help="tokens per row (table: each)")
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--chunk", type=int, default=64, help="fused path: chunk_tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    if args.one:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure_one(args.one, args.rows, args.seq[0], args.vocab, args.chunk, args.device)))
        return
    results = [measure(mode, seq, args.rows, args.vocab, args.chunk, args.threads, args.device)
               for seq in args.seq for mode in MODES]
    lines = [f"| tokens | {' | '.join(MODES)} |", "|---:|" + "---:|" * len(MODES)]
    for seq in args.seq:
        row = {r["mode"]: r for r in results if r["seq"] == seq}
        cells = [f"{row[m]['bytes_per_logit']:.2f} ({row[m]['peak_above_inputs_mib']:.0f} MiB, "
                 f"{row[m]['seconds']:.1f} s)" for m in MODES]
        lines.append(f"| {args.rows} x {seq} | {' | '.join(cells)} |")
    command = "python benchmarks/logprob_memory.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    text = "\n".join([
        f"# Token log-prob memory, bytes per logit above the inputs (V = {args.vocab:,}, T = {TEMPERATURE}, "
        f"{args.device}, {args.threads} threads)", "",
        f"Command: `{command.strip()}`", "",
        "One step: log-probs + entropy (logged) + masked loss + backward; peak memory growth over the step "
        "(fresh process each; peak RSS on CPU) / (tokens x V), then MiB and the step's wall time. "
        f"Fused: hidden size H = {HIDDEN}, chunk_tokens = {args.chunk}; its count includes weight.grad "
        f"(4 V H bytes = {4 * args.vocab * HIDDEN / 2**20:.0f} MiB).", "",
        *lines, "",
        "Where the bytes go. old: logits / T (4) + the fp32 clone Megatron's cross-entropy turns into its saved "
        "softmax (4) + the old entropy's shifted logits, exp and product (12, saved for its backward while the "
        "metric lives). standard: one fp32 buffer (the softmax, turned into the gradient in place, which the "
        f"leaf's .grad takes over) + row-chunk temporaries of {CHUNK_ELEMENTS:,} logits; the entropy gradient "
        "costs time (a chunked xlogy pass), not memory. fused: two [chunk_tokens, V/TP] fp32 buffers (forward "
        "with entropy) or one + weight.grad (backward), whatever the token count, so per logit it falls as "
        "tokens grow (the default chunk_tokens = 1024 is 2 x 0.6 GB at this V). Wall times are 2-thread CPU "
        "times; `--device cuda` measures torch.cuda.max_memory_allocated instead of RSS.", ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

"""Where the planner's activation constants come from (megatron_rspo/planning/activations.py): one- and two-layer
models on this CPU, one dimension varied at a time, every allocation of one forward+backward tracked
(planning/measure.PeakTracker); the per-layer part (two layers minus one) fitted to the shapes of the saved
tensors by least squares.

    python benchmarks/activation_probe.py

Prints each measurement (fp32 elements per token), the fitted constants and the fit's residuals.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")

BASE = dict(h=128, a=4, g=None, E=8, k=2, F=256, S=128, V=512)
VARIATIONS = [{}, {"h": 256}, {"a": 8}, {"g": 2}, {"k": 4}, {"F": 512}, {"E": 32}, {"S": 256}, {"V": 2048},
              {"h": 256, "a": 8}, {"E": 16, "k": 4, "F": 128}, {"S": 64, "h": 192, "a": 6, "g": 3}]
TERMS = ["h", "kv", "a_s", "k_h", "k_f", "E"]


def elements_per_token(layers: int, h: int, a: int, g, E: int, k: int, F: int, S: int, V: int, rows: int = 2) -> float:
    from megatron_rspo.config import ModelConfig, OptimConfig, ParallelConfig
    from megatron_rspo.engine import Engine
    from megatron_rspo.model.logprobs import forward_logits, token_logprobs
    from megatron_rspo.planning.measure import PeakTracker

    m = ModelConfig(vocab_size=V, hidden_size=h, num_attention_heads=a, num_query_groups=g, ffn_hidden_size=F,
                    num_experts=E, moe_router_topk=k, num_layers=layers, max_position_embeddings=1024)
    engine = Engine(m, ParallelConfig(), OptimConfig(lr=1e-3), train_iters=2)
    tokens = torch.randint(0, V, (rows, S + 1), generator=torch.Generator().manual_seed(0))

    def step(data_iterator, model):
        b = next(data_iterator)
        return forward_logits(model, b[:, :-1]), lambda out: (-token_logprobs(out, b[:, 1:]).mean(), {})

    resident = [*engine.module.parameters(), *(b.grad_data for b in engine.ddp.buffers)]
    with PeakTracker(resident) as tracker:
        engine.forward_backward(step, [tokens], seq_length=S, micro_batch_size=rows)
    return tracker.transient_peak / (rows * S) / 4


def main() -> None:
    from megatron_rspo.config import ParallelConfig
    from megatron_rspo.model.provider import init_distributed

    init_distributed(ParallelConfig(), seed=5)
    rows, ys = [], []
    print("| variation | per layer | rest (loss side, last backward) |\n|---|---:|---:|")
    for v in VARIATIONS:
        c = {**BASE, **v}
        one, two = elements_per_token(1, **c), elements_per_token(2, **c)
        print(f"| {v or 'base'} | {two - one:.0f} | {2 * one - two:.0f} |", flush=True)
        g = c["g"] or c["a"]
        rows.append([c["h"], g * c["h"] / c["a"], c["a"] * c["S"], c["k"] * c["h"], c["k"] * c["F"], c["E"]])
        ys.append(two - one)
    x, y = np.array(rows, float), np.array(ys)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    print("\nper layer, elements per token = " + " + ".join(f"{c:.2f} {t}" for c, t in zip(coef, TERMS)))
    print("residuals: " + ", ".join(f"{r:+.1f}%" for r in (x @ coef - y) / y * 100))


if __name__ == "__main__":
    main()

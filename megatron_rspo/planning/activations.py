"""Activation memory of one training micro-batch, per rank: a structural model whose constants are measured.

Per token and layer, the forward saves for the backward (elements; ``PER_LAYER``):

    8.24 h          layer inputs, norm outputs, residuals, the attention output, the MoE layer's input
    4.09 kv         keys and values (kv = query groups x head dim), kept before and after RoPE
    1.00 a s        the attention probabilities (a heads x s positions) -- only without a fused attention
                    kernel (Megatron's local DotProductAttention); flash attention keeps a few floats per head
    1.04 k h        the tokens permuted to their k experts
    6.05 k f        each routed token's expert intermediate (fc1's 2f outputs, the SwiGLU's f, their grads)
    2.42 E          router logits and probabilities

and the loss side keeps two fp32 copies of the logits per token (``LOGIT_COPIES``: the output layer's
logits and the log-softmax buffer, which becomes their gradient in place), or two
``--logprob-chunk-tokens`` chunks with ``--fused-logprobs``.

The per-layer constants come from ``benchmarks/activation_probe.py``: 12 one- and two-layer models on CPU,
one dimension varied at a time, every allocation of a forward+backward tracked (``planning/measure.py``);
the layer model fits those 12 within 0.5 %. They count saved tensors of each shape, so they carry over to
other sizes. The loss side's 2 is the count of buffers on that code path (fitting the probe's two-layer
residuals gave 3.1, which also took in the last layer's backward temporaries; the held-out layouts of
``planning/validate.py`` agree with 2). Measured with the local spec in fp32; on GPU the
transformer-engine spec fuses some of them: unmeasured here, and the planner says so.

Parallelism per rank: tensor parallelism with sequence parallelism divides every term by TP; experts see
on average k tokens per token of the rank whatever EP is (times ``imbalance`` for uneven routing); a
pipeline stage holds its layers' activations for up to PP micro-batches at once (1F1B warm-up); full
recomputation keeps only each layer's input (h), and rebuilds one layer's activations during its backward,
after the loss's buffers are gone (the peak is the larger of the two moments); selective recomputation
drops the attention probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PER_LAYER = {"h": 8.24, "kv": 4.09, "a_s": 1.00, "k_h": 1.04, "k_f": 6.05, "E": 2.42}
LOGIT_COPIES = 2.0  # fp32 [tokens, V/TP] buffers alive at the loss's peak (standard log-prob path)
FUSED_LOGIT_BUFFERS = 2  # [chunk, V/TP] fp32 buffers of the fused path
FLASH_STATS_PER_HEAD = 1.0  # fp32 softmax statistics per head and token (flash attention)


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    heads: int
    query_groups: int
    head_dim: int
    experts: int  # 0: a dense MLP layer
    topk: int
    expert_ffn: int  # routed expert width (dense MLP width when experts == 0)
    shared_ffn: int = 0  # shared expert width (Qwen2-MoE)


def layer_shape(model: Any) -> LayerShape:
    """The planner's view of one decoder layer of a ModelConfig."""
    heads = model.num_attention_heads
    return LayerShape(hidden=model.hidden_size, heads=heads, query_groups=model.num_query_groups or heads,
                      head_dim=model.kv_channels or model.hidden_size // heads, experts=model.num_experts or 0,
                      topk=model.moe_router_topk, expert_ffn=model.moe_ffn_hidden_size or model.ffn_hidden_size,
                      shared_ffn=model.moe_shared_expert_intermediate_size or 0)


def per_token_layer_elements(s: LayerShape, seq: int, flash: bool, selective_recompute: bool = False) -> float:
    """Elements one layer keeps per token of the micro-batch (one rank, before TP division)."""
    c = PER_LAYER
    attn = 0.0 if (flash or selective_recompute) else c["a_s"] * s.heads * seq
    if flash:
        attn += FLASH_STATS_PER_HEAD * s.heads
    routed, width = (s.topk, s.expert_ffn) if s.experts else (1, s.expert_ffn)
    mlp = c["k_h"] * routed * s.hidden + c["k_f"] * (routed * width + s.shared_ffn) + c["E"] * s.experts
    return c["h"] * s.hidden + c["kv"] * s.query_groups * s.head_dim + attn + mlp


@dataclass(frozen=True)
class ActivationInputs:
    shape: LayerShape
    layers: int  # layers on this rank (its pipeline stage)
    tokens: int  # tokens of one micro-batch (rows x forward length)
    seq: int  # forward length
    act_bytes: int  # bytes per activation element (2 for bf16, 4 for fp32)
    tp: int = 1
    pipeline: int = 1
    microbatches: int = 1
    recompute: str | None = None  # None, "full" or "selective"
    flash: bool = False
    imbalance: float = 1.0  # the busiest rank's routed tokens / the average (1: perfectly balanced)


def activation_bytes(a: ActivationInputs) -> tuple[int, int]:
    """(bytes a rank keeps through the backward, bytes of the one layer full recomputation rebuilds at a time)
    for one micro-batch: all layers of the stage, times the micro-batches in flight."""
    s = a.shape
    per_token = per_token_layer_elements(s, a.seq, a.flash, a.recompute == "selective")
    if s.experts and a.imbalance != 1.0:  # the routed terms scale with the rank's share of tokens
        routed = PER_LAYER["k_h"] * s.topk * s.hidden + PER_LAYER["k_f"] * s.topk * s.expert_ffn
        per_token += routed * (a.imbalance - 1.0)
    in_flight = min(a.pipeline, a.microbatches) if a.pipeline > 1 else 1
    scale = a.tokens * a.act_bytes / a.tp
    if a.recompute == "full":
        return int(s.hidden * a.layers * scale * in_flight), int(per_token * scale)
    return int(per_token * a.layers * scale * in_flight), 0


def logit_bytes(tokens: int, vocab_rows: int, fused: bool, chunk_tokens: int) -> int:
    """The loss side's log-prob buffers on the rank that holds the output layer (``vocab_rows`` = V / TP)."""
    if vocab_rows == 0:
        return 0
    if fused:
        return int(FUSED_LOGIT_BUFFERS * min(chunk_tokens, tokens) * vocab_rows * 4)
    return int(LOGIT_COPIES * tokens * vocab_rows * 4)

"""Tensor names, shapes and transforms between HF and Megatron's GLOBAL (checkpoint) view, per layer.

Megatron names below are the keys of Megatron's sharded state dict with the ``decoder.layers.``
prefix removed; a checkpoint stores them stacked over layers (and experts), independently of the
TP/EP/PP layout and of local vs transformer-engine modules:

  self_attention.linear_qkv.layer_norm_weight   input RMSNorm              [H]
  self_attention.linear_qkv.weight (.bias)      fused QKV, per query group [ng * (nq/ng + 2) * hd, H]
  self_attention.{q,k}_layernorm.weight         Qwen3 QK-norm              [hd]
  self_attention.linear_proj.weight             o_proj                     [H, nq * hd]
  mlp.linear_fc1.layer_norm_weight              post-attention RMSNorm     [H]
  mlp.router.weight                             router                     [E, H]
  mlp.experts.experts.linear_fc1.weight         [gate; up] per expert      [E, 2I, H]
  mlp.experts.experts.linear_fc2.weight         down per expert            [E, H, I]
  mlp.shared_experts.linear_fc{1,2}.weight, mlp.shared_experts.gate_weight [1, H]

QKV: Megatron interleaves per query group g: [q heads of g (nq/ng of them), k_g, v_g], each hd rows
(``SelfAttention.get_query_key_value_tensors``). SwiGLU fc1: the first half is the gate (``glu``
chunks x into (gate, linear) and returns silu(gate) * linear) — HF's gate_proj, then up_proj.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_rspo.config import ModelConfig
from megatron_rspo.convert.arch import HFArch

GLOBAL = {  # non-layer tensors: Megatron key -> HF name
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
LAYER_PREFIX = "decoder.layers."
EXPERT_KEYS = ("mlp.experts.experts.linear_fc1.weight", "mlp.experts.experts.linear_fc2.weight")


def _dims(m: ModelConfig) -> tuple[int, int, int, int, int, int]:
    nq = m.num_attention_heads
    ng = m.num_query_groups or nq
    hd = m.kv_channels or m.hidden_size // nq
    return m.hidden_size, nq, ng, hd, m.moe_ffn_hidden_size or m.ffn_hidden_size, m.num_experts


def hf_layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def hf_layer_shapes(arch: HFArch, m: ModelConfig, layer: int, fused_experts: bool = False) -> dict[str, tuple]:
    """Every HF tensor of one decoder layer with its expected shape, in the published order."""
    h, nq, ng, hd, inter, e = _dims(m)
    p = hf_layer_prefix(layer)
    a, moe = p + "self_attn.", p + arch.moe_prefix + "."
    s: dict[str, tuple] = {p + "input_layernorm.weight": (h,)}
    s.update({a + "q_proj.weight": (nq * hd, h), a + "k_proj.weight": (ng * hd, h), a + "v_proj.weight": (ng * hd, h)})
    if m.add_qkv_bias:
        s.update({a + "q_proj.bias": (nq * hd,), a + "k_proj.bias": (ng * hd,), a + "v_proj.bias": (ng * hd,)})
    s[a + "o_proj.weight"] = (h, nq * hd)
    if m.qk_layernorm:
        s.update({a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)})
    s[p + "post_attention_layernorm.weight"] = (h,)
    s[moe + "gate.weight"] = (e, h)
    if fused_experts:  # transformers' in-memory layout, accepted on read
        s.update({moe + "experts.gate_up_proj": (e, 2 * inter, h), moe + "experts.down_proj": (e, h, inter)})
    else:
        g, u, d = arch.expert_names
        for i in range(e):
            x = f"{moe}experts.{i}."
            s.update({x + g + ".weight": (inter, h), x + u + ".weight": (inter, h), x + d + ".weight": (h, inter)})
    if arch.shared_expert:
        si = m.moe_shared_expert_intermediate_size
        x = moe + "shared_expert."
        s.update({x + "gate_proj.weight": (si, h), x + "up_proj.weight": (si, h), x + "down_proj.weight": (h, si),
                  moe + "shared_expert_gate.weight": (1, h)})
    return s


def hf_global_shapes(m: ModelConfig) -> dict[str, tuple]:
    s = {"model.embed_tokens.weight": (m.vocab_size, m.hidden_size), "model.norm.weight": (m.hidden_size,)}
    if m.untie_embeddings_and_output_weights:
        s["lm_head.weight"] = (m.vocab_size, m.hidden_size)
    return s


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """HF q/k/v (weight [out, H] or bias [out]) -> Megatron's per-group interleaved fused tensor."""
    _, nq, ng, hd, _, _ = _dims(m)
    rest = q.shape[1:]
    parts = (q.reshape(ng, nq // ng * hd, *rest), k.reshape(ng, hd, *rest), v.reshape(ng, hd, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, nq, ng, hd, _, _ = _dims(m)
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(ng, (nq // ng + 2) * hd, *rest).split([nq // ng * hd, hd, hd], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def expert_to_megatron(arch: HFArch, layer: int, expert: int, get: Callable[[str], torch.Tensor],
                       fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """One routed expert's HF tensors -> ``{fc1 key: [gate; up] (2I, H), fc2 key: down (H, I)}``."""
    moe = hf_layer_prefix(layer) + arch.moe_prefix + "."
    if fused_experts:
        return {EXPERT_KEYS[0]: get(moe + "experts.gate_up_proj")[expert],
                EXPERT_KEYS[1]: get(moe + "experts.down_proj")[expert]}
    g, u, d = arch.expert_names
    x = f"{moe}experts.{expert}."
    return {EXPERT_KEYS[0]: torch.cat([get(x + g + ".weight"), get(x + u + ".weight")]),
            EXPERT_KEYS[1]: get(x + d + ".weight")}


def layer_to_megatron(arch: HFArch, m: ModelConfig, layer: int, get: Callable[[str], torch.Tensor],
                      fused_experts: bool = False, with_experts: bool = True) -> dict[str, torch.Tensor]:
    """One layer's HF tensors (fetched with ``get``) -> Megatron global names (without the layer prefix).

    ``with_experts=False`` leaves out the routed experts (convert them one at a time with
    ``expert_to_megatron``)."""
    p = hf_layer_prefix(layer)
    a, moe = p + "self_attn.", p + arch.moe_prefix + "."
    out = {"self_attention.linear_qkv.layer_norm_weight": get(p + "input_layernorm.weight"),
           "self_attention.linear_qkv.weight": fuse_qkv(get(a + "q_proj.weight"), get(a + "k_proj.weight"),
                                                        get(a + "v_proj.weight"), m)}
    if m.add_qkv_bias:
        out["self_attention.linear_qkv.bias"] = fuse_qkv(get(a + "q_proj.bias"), get(a + "k_proj.bias"),
                                                         get(a + "v_proj.bias"), m)
    if m.qk_layernorm:
        out["self_attention.q_layernorm.weight"] = get(a + "q_norm.weight")
        out["self_attention.k_layernorm.weight"] = get(a + "k_norm.weight")
    out["self_attention.linear_proj.weight"] = get(a + "o_proj.weight")
    out["mlp.linear_fc1.layer_norm_weight"] = get(p + "post_attention_layernorm.weight")
    out["mlp.router.weight"] = get(moe + "gate.weight")
    if not with_experts:
        pass
    elif fused_experts:
        out[EXPERT_KEYS[0]] = get(moe + "experts.gate_up_proj")
        out[EXPERT_KEYS[1]] = get(moe + "experts.down_proj")
    else:
        g, u, d = arch.expert_names
        x = moe + "experts.{}.{}.weight"
        out[EXPERT_KEYS[0]] = torch.stack([torch.cat([get(x.format(i, g)), get(x.format(i, u))])
                                           for i in range(m.num_experts)])
        out[EXPERT_KEYS[1]] = torch.stack([get(x.format(i, d)) for i in range(m.num_experts)])
    if arch.shared_expert:
        x = moe + "shared_expert."
        gate_up = [get(x + "gate_proj.weight"), get(x + "up_proj.weight")]
        out["mlp.shared_experts.linear_fc1.weight"] = torch.cat(gate_up)
        out["mlp.shared_experts.linear_fc2.weight"] = get(x + "down_proj.weight")
        out["mlp.shared_experts.gate_weight"] = get(moe + "shared_expert_gate.weight")
    return out


def megatron_layer_keys(m: ModelConfig) -> list[str]:
    """The Megatron global names of one layer (what ``layer_to_megatron`` returns)."""
    keys = ["self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight"]
    keys += ["self_attention.linear_qkv.bias"] if m.add_qkv_bias else []
    keys += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"] if m.qk_layernorm else []
    keys += ["self_attention.linear_proj.weight", "mlp.linear_fc1.layer_norm_weight", "mlp.router.weight", *EXPERT_KEYS]
    if m.moe_shared_expert_intermediate_size:
        keys += ["mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight"]
        keys += ["mlp.shared_experts.gate_weight"] if m.moe_shared_expert_gate else []
    return keys


def layer_to_hf(arch: HFArch, m: ModelConfig, layer: int, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron global tensors of one layer -> HF tensors in the published per-expert layout."""
    p = hf_layer_prefix(layer)
    a, moe = p + "self_attn.", p + arch.moe_prefix + "."
    out = {p + "input_layernorm.weight": t["self_attention.linear_qkv.layer_norm_weight"]}
    q, k, v = split_qkv(t["self_attention.linear_qkv.weight"], m)
    out.update({a + "q_proj.weight": q, a + "k_proj.weight": k, a + "v_proj.weight": v})
    if m.add_qkv_bias:
        q, k, v = split_qkv(t["self_attention.linear_qkv.bias"], m)
        out.update({a + "q_proj.bias": q, a + "k_proj.bias": k, a + "v_proj.bias": v})
    out[a + "o_proj.weight"] = t["self_attention.linear_proj.weight"]
    if m.qk_layernorm:
        out[a + "q_norm.weight"] = t["self_attention.q_layernorm.weight"]
        out[a + "k_norm.weight"] = t["self_attention.k_layernorm.weight"]
    out[p + "post_attention_layernorm.weight"] = t["mlp.linear_fc1.layer_norm_weight"]
    out[moe + "gate.weight"] = t["mlp.router.weight"]
    g, u, d = arch.expert_names
    fc1, fc2 = t[EXPERT_KEYS[0]], t[EXPERT_KEYS[1]]
    for i in range(m.num_experts):
        gate, up = fc1[i].chunk(2, dim=0)
        x = f"{moe}experts.{i}."
        out.update({x + g + ".weight": gate, x + u + ".weight": up, x + d + ".weight": fc2[i]})
    if arch.shared_expert:
        x = moe + "shared_expert."
        gate, up = t["mlp.shared_experts.linear_fc1.weight"].chunk(2, dim=0)
        out.update({x + "gate_proj.weight": gate, x + "up_proj.weight": up,
                    x + "down_proj.weight": t["mlp.shared_experts.linear_fc2.weight"],
                    moe + "shared_expert_gate.weight": t["mlp.shared_experts.gate_weight"]})
    return out

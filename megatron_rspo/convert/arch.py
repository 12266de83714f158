"""HF ``config.json`` <-> ModelConfig for the supported MoE architectures (Qwen3-MoE, Qwen2-MoE, Mixtral).

Router semantics: HF computes softmax over all experts, then top-k, then (``norm_topk_prob``)
renormalises. Renormalised = Megatron's default (top-k on logits, softmax over the k: the same
numbers); not renormalised = ``moe_router_pre_softmax`` (softmax over all, top-k, no renorm).
Mixtral always renormalises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_rspo.config import ModelConfig
from megatron_rspo.convert.common import DTYPES, UnsupportedModelError, dtype_name


@dataclass(frozen=True)
class HFArch:
    model_type: str
    architecture: str
    moe_prefix: str  # module holding router + experts: "mlp" or "block_sparse_moe"
    expert_names: tuple[str, str, str]  # (gate, up, down) projections of one expert
    num_experts_key: str
    qk_norm: bool = False
    shared_expert: bool = False


ARCHS = {
    "qwen3_moe": HFArch("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                        "num_experts", qk_norm=True),
    "qwen2_moe": HFArch("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                        "num_experts", shared_expert=True),
    "mixtral": HFArch("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts"),
}
# Why some well-known MoE families are refused (so the error says what is missing, not just "unknown").
_WHY_NOT = {
    "deepseek_v2": "multi-head latent attention (MLA)", "deepseek_v3": "multi-head latent attention (MLA)",
    "qwen3_next": "hybrid linear attention (Gated DeltaNet)", "gpt_oss": "attention sinks and sliding window",
    "olmoe": "a different QK-norm layout", "phimoe": "sparse-mixer routing", "qwen3_5_moe": "hybrid linear attention",
}


def _rope_theta(cfg: dict[str, Any], problems: list[str]) -> int:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    rope_type = params.get("rope_type", "default")
    if scaling or rope_type != "default":
        problems.append(f"RoPE scaling ({scaling or rope_type!r}) is not supported")
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    if float(theta) != int(theta):
        problems.append(f"non-integer rope_theta {theta}")
    return int(theta)


def arch_of(cfg: dict[str, Any]) -> HFArch:
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        why = f": {_WHY_NOT[mt]} is not supported" if mt in _WHY_NOT else ""
        raise UnsupportedModelError(f"unsupported HF model_type {mt!r}{why} (supported: {', '.join(sorted(ARCHS))})")
    return ARCHS[mt]


def hf_to_model_config(cfg: dict[str, Any], dtype: str = "auto") -> tuple[HFArch, ModelConfig]:
    """ModelConfig for an HF config dict; UnsupportedModelError lists every feature we cannot map."""
    arch = arch_of(cfg)
    problems: list[str] = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg['hidden_act']!r} (only SwiGLU/silu experts are supported)")
    if cfg.get("use_sliding_window") or (arch.model_type == "mixtral" and cfg.get("sliding_window")):
        problems.append(f"sliding-window attention (sliding_window={cfg.get('sliding_window')})")
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        problems.append(f"layer_types {sorted(set(cfg['layer_types']))} (only full_attention)")
    if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        problems.append("dense MLP layers between MoE layers (decoder_sparse_step != 1 or mlp_only_layers)")
    if cfg.get("attention_bias"):
        problems.append("attention_bias=True (bias on o_proj has no Megatron equivalent here)")
    if arch.shared_expert and not cfg.get("shared_expert_intermediate_size"):
        problems.append("qwen2_moe without a shared expert (shared_expert_intermediate_size=0)")
    theta = _rope_theta(cfg, problems)
    if problems:
        raise UnsupportedModelError(f"cannot convert {arch.model_type}: " + "; ".join(problems))

    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    renorm = True if arch.model_type == "mixtral" else bool(cfg.get("norm_topk_prob", False))
    hf_dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    if dtype == "auto":
        bf16 = hf_dtype == "bfloat16"
    else:
        bf16 = DTYPES[dtype] == torch.bfloat16
    moe_ffn = cfg["intermediate_size"] if arch.model_type == "mixtral" else cfg["moe_intermediate_size"]
    # transformers 5 may write either spelling (attribute_map aliases) whatever the family
    num_experts = cfg.get(arch.num_experts_key) or cfg.get("num_experts") or cfg.get("num_local_experts")
    model = ModelConfig(
        num_layers=cfg["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads, num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=head_dim if head_dim * heads != hidden else None,
        num_experts=num_experts, moe_router_topk=cfg["num_experts_per_tok"],
        moe_ffn_hidden_size=moe_ffn, moe_layer_freq=1, moe_router_score_function="softmax",
        moe_router_pre_softmax=not renorm,
        moe_shared_expert_intermediate_size=cfg["shared_expert_intermediate_size"] if arch.shared_expert else None,
        moe_shared_expert_gate=arch.shared_expert, qk_layernorm=arch.qk_norm,
        add_qkv_bias=bool(cfg.get("qkv_bias", True)) if arch.model_type == "qwen2_moe" else False,
        normalization="RMSNorm", norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)), swiglu=True,
        position_embedding_type="rope", rotary_base=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)), vocab_size=cfg["vocab_size"],
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        moe_aux_loss_coeff=0.0, bf16=bf16,
    )
    return arch, model


def infer_model_type(model: ModelConfig) -> str:
    """Best guess of the HF family of a ModelConfig (when no HF config is at hand)."""
    if model.moe_shared_expert_intermediate_size:
        return "qwen2_moe"
    return "qwen3_moe" if model.qk_layernorm else "mixtral"


def model_config_to_hf(model: ModelConfig, model_type: Optional[str] = None,
                       dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A minimal HF config.json for ``model`` (used when the original config is not available)."""
    arch = ARCHS[model_type or infer_model_type(model)]
    heads = model.num_attention_heads
    head_dim = model.kv_channels or model.hidden_size // heads
    cfg: dict[str, Any] = {
        "architectures": [arch.architecture], "model_type": arch.model_type, "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size, "num_hidden_layers": model.num_layers, "num_attention_heads": heads,
        "num_key_value_heads": model.num_query_groups or heads, "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings, "rms_norm_eps": model.norm_epsilon,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "rope_theta": float(model.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(model.rotary_base)},
        "num_experts_per_tok": model.moe_router_topk, arch.num_experts_key: model.num_experts,
        "dtype": dtype_name(dtype), "attention_dropout": 0.0, "initializer_range": model.init_method_std,
    }
    moe_ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size
    if arch.model_type == "mixtral":
        if model.moe_router_pre_softmax:
            raise UnsupportedModelError("Mixtral always renormalises the top-k weights (moe_router_pre_softmax=True)")
        cfg.update(intermediate_size=moe_ffn, sliding_window=None, router_jitter_noise=0.0)
    else:
        cfg.update(intermediate_size=model.ffn_hidden_size, moe_intermediate_size=moe_ffn,
                   norm_topk_prob=not model.moe_router_pre_softmax, decoder_sparse_step=1, mlp_only_layers=[],
                   use_sliding_window=False, sliding_window=None)
    if arch.model_type == "qwen3_moe":
        cfg.update(head_dim=head_dim, attention_bias=False)
    if arch.model_type == "qwen2_moe":
        cfg.update(shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
                   qkv_bias=model.add_qkv_bias)
    return cfg

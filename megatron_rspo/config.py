"""Dataclass configs with Megatron-style command-line flags, validated before any work starts.

Each dataclass field ``foo_bar`` is the flag ``--foo-bar`` (Megatron's spelling where Megatron has
the option). Booleans are ``--flag`` / ``--no-flag``. ``validate`` checks every cross-field and
parallel-layout constraint up front, so a bad combination fails before a model is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypeVar, get_args, get_origin


class ConfigError(ValueError):
    """An invalid or incompatible setting; raised before any work starts."""


@dataclass
class ModelConfig:
    """A Qwen-MoE-like decoder: RMSNorm, RoPE, SwiGLU, every ``moe_layer_freq``-th layer MoE."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128  # dense layers (when moe_layer_freq > 1)
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA; None = MHA
    kv_channels: Optional[int] = None  # head dim; None = hidden/heads
    num_experts: int = 4
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # None = ffn_hidden_size
    moe_layer_freq: int = 1  # 1: every layer is MoE
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    moe_router_pre_softmax: bool = False  # softmax over all experts before top-k (no renorm)
    moe_router_topk_scaling_factor: Optional[float] = None
    moe_router_enable_expert_bias: bool = False
    moe_aux_loss_coeff: float = 0.0
    moe_router_load_balancing_type: str = "aux_loss"
    moe_token_dispatcher_type: Literal["allgather", "alltoall"] = "allgather"
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: bool = False
    qk_layernorm: bool = False
    add_qkv_bias: bool = False  # bias on the fused QKV projection only (Qwen2 attention)
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-6
    swiglu: bool = True
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: int = 10000
    max_position_embeddings: int = 256
    vocab_size: int = 0  # 0 = take it from the tokenizer
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    bf16: bool = False

    def moe_layer_numbers(self) -> list[int]:
        """1-based numbers of the MoE layers (Megatron's layer_number)."""
        return [n for n in range(1, self.num_layers + 1) if (n - 1) % self.moe_layer_freq == 0]


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    num_microbatches: int = 1  # micro-batches per step through the pipeline schedule
    # None: 1 with expert parallelism (EP groups carved from DP*TP ranks), else TP (experts split like dense MLPs)
    expert_tensor_parallel_size: Optional[int] = None

    def expert_tp(self) -> int:
        """The expert tensor-parallel size in effect."""
        if self.expert_tensor_parallel_size is not None:
            return self.expert_tensor_parallel_size
        return 1 if self.expert_model_parallel_size > 1 else self.tensor_model_parallel_size


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: Literal["constant", "cosine", "linear"] = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class RunConfig:
    seed: int = 1234
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: int = 0  # 0: save at the end only
    keep_last: Optional[int] = None  # keep only the newest N complete checkpoints
    tensorboard_dir: Optional[str] = None
    log_interval: int = 10
    eval_interval: int = 0
    tokenizer_model: Optional[str] = None  # sentencepiece .model file or HF tokenizer directory
    progress: bool = True


C = TypeVar("C")


def _base_type(tp: Any) -> Any:
    """``Optional[int]`` -> int, ``Literal[...]`` stays Literal."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """Add one ``--flag`` per field of ``cls`` (dest = field name)."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
        elif get_origin(tp) is Literal:
            choices = list(get_args(tp))
            group.add_argument(flag, dest=f.name, choices=choices, type=type(choices[0]), default=default)
        elif get_origin(tp) is list:
            (item,) = get_args(tp)
            group.add_argument(flag, dest=f.name, nargs="+", type=item, default=default)
        else:
            group.add_argument(flag, dest=f.name, type=tp, default=default)


def from_args(cls: type[C], ns: argparse.Namespace) -> C:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})  # type: ignore[call-arg]


def to_dict(*configs: Any) -> dict[str, dict[str, Any]]:
    return {type(c).__name__: dataclasses.asdict(c) for c in configs}


def save_json(path: str, *configs: Any) -> None:
    with open(path, "w") as fh:
        json.dump(to_dict(*configs), fh, indent=2, sort_keys=True)


def load_model_config(path: str) -> ModelConfig:
    """Read the ModelConfig section of a run's ``config.json``."""
    with open(path) as fh:
        data = json.load(fh)
    return ModelConfig(**data["ModelConfig"])


def validate(model: ModelConfig, parallel: ParallelConfig, world_size: int = 1) -> None:
    """Raise ConfigError naming the offending flags for any invalid combination."""
    errors: list[str] = []
    tp, pp, ep = (
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.expert_model_parallel_size,
    )
    for name, v in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                    ("--expert-model-parallel-size", ep), ("--num-layers", model.num_layers),
                    ("--hidden-size", model.hidden_size), ("--num-attention-heads", model.num_attention_heads),
                    ("--num-microbatches", parallel.num_microbatches)):
        if v < 1:
            errors.append(f"{name} must be >= 1 (got {v})")
    if errors:
        raise ConfigError("; ".join(errors))
    if model.num_experts < 1:
        errors.append(f"--num-experts must be >= 1 (got {model.num_experts})")
    if not 1 <= model.moe_router_topk <= max(model.num_experts, 1):
        errors.append(f"--moe-router-topk ({model.moe_router_topk}) must be in [1, --num-experts={model.num_experts}]")
    if model.num_experts > 32767:
        errors.append("--num-experts > 32767 cannot be recorded as int16 expert ids")
    etp = parallel.expert_tp()
    if etp < 1 or tp % etp:
        errors.append(f"--expert-tensor-parallel-size ({etp}) must divide --tensor-model-parallel-size ({tp})")
        etp = 1
    elif ep == 1 and etp != tp:
        # With EP = 1 Megatron treats expert weights as dense ones and reduces their grads over the dense DP
        # group only, which misses the TP peers that routed other tokens through the same (replicated) experts.
        errors.append(f"--expert-tensor-parallel-size ({etp}) must equal --tensor-model-parallel-size ({tp}) "
                      "when --expert-model-parallel-size is 1")
    if (model.moe_ffn_hidden_size or model.ffn_hidden_size) % etp:
        errors.append(f"the expert FFN size is not divisible by the expert tensor-parallel size ({etp})")
    if model.num_experts % ep:
        errors.append(f"--num-experts ({model.num_experts}) is not divisible by --expert-model-parallel-size ({ep})")
    if model.hidden_size % model.num_attention_heads and model.kv_channels is None:
        errors.append(f"--hidden-size ({model.hidden_size}) is not divisible by --num-attention-heads "
                      f"({model.num_attention_heads}); set --kv-channels")
    if model.num_attention_heads % tp:
        errors.append(f"--num-attention-heads ({model.num_attention_heads}) is not divisible by "
                      f"--tensor-model-parallel-size ({tp})")
    groups = model.num_query_groups or model.num_attention_heads
    if model.num_attention_heads % groups:
        errors.append(f"--num-attention-heads ({model.num_attention_heads}) is not divisible by "
                      f"--num-query-groups ({groups})")
    if groups % tp:
        errors.append(f"--num-query-groups ({groups}) is not divisible by --tensor-model-parallel-size ({tp})")
    if tp > 1 and model.num_experts > 0 and not parallel.sequence_parallel:
        errors.append("MoE with --tensor-model-parallel-size > 1 requires --sequence-parallel")
    if parallel.sequence_parallel and tp == 1:
        errors.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if model.num_layers % pp:
        errors.append(f"--num-layers ({model.num_layers}) is not divisible by --pipeline-model-parallel-size ({pp})")
    if model.moe_layer_freq < 1:
        errors.append("--moe-layer-freq must be >= 1")
    if model.moe_router_score_function == "sigmoid" and model.moe_router_pre_softmax:
        errors.append("--moe-router-pre-softmax only applies to --moe-router-score-function softmax")
    if model.moe_router_enable_expert_bias and model.moe_router_score_function != "sigmoid":
        errors.append("--moe-router-enable-expert-bias requires --moe-router-score-function sigmoid")
    if model.moe_router_load_balancing_type == "sinkhorn":
        errors.append("--moe-router-load-balancing-type sinkhorn is not supported (routing records need top-k)")
    if model.moe_shared_expert_gate and model.moe_shared_expert_intermediate_size is None:
        errors.append("--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size")
    if world_size % (tp * pp):
        errors.append(f"world size {world_size} is not divisible by TP*PP = {tp * pp}")
    else:
        dp = world_size // (tp * pp)
        # Megatron carves the expert groups (expert TP x EP) from the DP*TP ranks of a stage.
        if (dp * tp) % (etp * ep):
            errors.append(f"--expert-model-parallel-size ({ep}) x expert TP ({etp}) must divide DP*TP = {dp * tp} "
                          f"(world size {world_size}, TP {tp}, PP {pp})")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


__all__ = [
    "ConfigError", "ModelConfig", "ParallelConfig", "OptimConfig", "RunConfig", "add_dataclass_args",
    "from_args", "to_dict", "save_json", "load_model_config", "validate", "field",
]

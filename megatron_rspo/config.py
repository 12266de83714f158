"""Dataclass configs with Megatron-style command-line flags, validated before any work starts.

Each dataclass field ``foo_bar`` is the flag ``--foo-bar`` (Megatron's spelling where Megatron has
the option), with its ``--help`` text in the field's metadata (``arg(default, help)``). Booleans are
``--flag`` / ``--no-flag``. ``validate`` (``megatron_rspo.validation``) checks every cross-field and
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

from megatron_rspo.errors import ConfigError, UserError


def arg(default: Any, help: str) -> Any:
    """A dataclass field whose ``--help`` text is ``help`` (argparse appends the default)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """A Qwen-MoE-like decoder: RMSNorm, RoPE, SwiGLU, every ``moe_layer_freq``-th layer MoE."""

    num_layers: int = arg(2, "Number of transformer layers.")
    hidden_size: int = arg(64, "Transformer hidden size.")
    ffn_hidden_size: int = arg(128, "Transformer feed-forward network hidden size (dense layers; the experts' "
                                    "default).")
    num_attention_heads: int = arg(4, "Number of transformer attention heads.")
    num_query_groups: Optional[int] = arg(None, "Number of query groups for group-query attention (None: MHA).")
    kv_channels: Optional[int] = arg(None, "Projection weights dimension in multi-head attention (head dim; None: "
                                           "hidden-size // num-attention-heads).")
    num_experts: int = arg(4, "Number of experts in each MoE layer.")
    moe_router_topk: int = arg(2, "Number of experts to route to for each token.")
    moe_ffn_hidden_size: Optional[int] = arg(None, "The hidden size of each expert's feed-forward network (None: "
                                                   "--ffn-hidden-size).")
    moe_layer_freq: int = arg(1, "Frequency between MoE layers and dense layers: every N-th layer is MoE (1: all).")
    moe_router_score_function: Literal["softmax", "sigmoid"] = arg("softmax", "Score function for MoE top-k routing.")
    moe_router_pre_softmax: bool = arg(False, "Softmax over all experts before the top-k selection (no "
                                              "renormalisation of the top-k weights).")
    moe_router_topk_scaling_factor: Optional[float] = arg(None, "Scaling factor for the routing score in top-k "
                                                                "selection (None: no scaling).")
    moe_router_enable_expert_bias: bool = arg(False, "Top-k routing with a dynamic per-expert bias (aux-loss-free "
                                                     "load balancing; sigmoid routers).")
    moe_aux_loss_coeff: float = arg(0.0, "Scaling coefficient for the load-balancing aux loss.")
    moe_router_load_balancing_type: str = arg("aux_loss", "Load-balancing strategy of the router: aux_loss, "
                                                          "seq_aux_loss, global_aux_loss or none.")
    moe_token_dispatcher_type: Optional[Literal["allgather", "alltoall"]] = arg(
        None, "The type of token dispatcher (None: alltoall with --expert-model-parallel-size > 1, else allgather).")
    moe_shared_expert_intermediate_size: Optional[int] = arg(None, "Shared expert total FFN hidden size (None: no "
                                                                   "shared expert).")
    moe_shared_expert_gate: bool = arg(False, "Sigmoid gate on the shared expert's output (Qwen2-MoE).")
    moe_grouped_gemm: bool = arg(False, "Run the local experts of a rank as one grouped GEMM (TransformerEngine's "
                                        "TEGroupedMLP, or GroupedMLP with the grouped_gemm package). Needs CUDA.")
    qk_layernorm: bool = arg(False, "Layer-normalise the query and key attention embeddings (Qwen3).")
    add_qkv_bias: bool = arg(False, "Bias on the fused QKV projection only (Qwen2 attention).")
    normalization: Literal["RMSNorm", "LayerNorm"] = arg("RMSNorm", "Which normalisation technique to use.")
    norm_epsilon: float = arg(1e-6, "Epsilon for layer norm and RMS norm.")
    swiglu: bool = arg(True, "Gated linear units with SiLU activation (--no-swiglu: GeLU).")
    position_embedding_type: Literal["rope", "learned_absolute"] = arg("rope", "Position embedding type.")
    rotary_base: int = arg(10000, "Base of the rotary positional embeddings.")
    max_position_embeddings: int = arg(256, "Maximum sequence length (size of the position embedding table).")
    vocab_size: int = arg(0, "Vocabulary size (0: the tokenizer's).")
    untie_embeddings_and_output_weights: bool = arg(True, "Untie the embeddings and the output weights.")
    init_method_std: float = arg(0.02, "Standard deviation of the zero-mean normal weight initialisation.")
    hidden_dropout: float = arg(0.0, "Dropout probability for the hidden state.")
    attention_dropout: float = arg(0.0, "Post-attention dropout probability.")
    transformer_impl: Literal["auto", "local", "transformer_engine"] = arg(
        "auto", "Which transformer implementation to use (auto: transformer_engine when installed and on CUDA).")
    bf16: bool = arg(False, "Run the model in bfloat16; Megatron's optimizer keeps fp32 main params and "
                            "grads. Needs CUDA.")
    recompute_granularity: Optional[Literal["full", "selective"]] = arg(
        None, "Activation recomputation: full (whole transformer layers, see --recompute-method) or selective "
              "(core attention only). None: keep all activations.")
    recompute_method: Optional[Literal["uniform", "block"]] = arg(
        None, "With --recompute-granularity full: uniform (recompute chunks of --recompute-num-layers layers) or "
              "block (recompute the first --recompute-num-layers layers of each pipeline stage).")
    recompute_num_layers: Optional[int] = arg(None, "Layers per recompute chunk (uniform) or recomputed layers per "
                                                    "pipeline stage (block).")

    def moe_layer_numbers(self) -> list[int]:
        """1-based numbers of the MoE layers (Megatron's layer_number)."""
        return [n for n in range(1, self.num_layers + 1) if (n - 1) % self.moe_layer_freq == 0]

    def token_dispatcher(self, parallel: ParallelConfig) -> str:
        """The token dispatcher in effect: the flag's, else alltoall with EP > 1 (tokens go only to the
        ranks that own their experts) and allgather without (nothing to exchange)."""
        if self.moe_token_dispatcher_type is not None:
            return self.moe_token_dispatcher_type
        return "alltoall" if parallel.expert_model_parallel_size > 1 else "allgather"


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = arg(1, "Degree of tensor model parallelism.")
    pipeline_model_parallel_size: int = arg(1, "Degree of pipeline model parallelism.")
    expert_model_parallel_size: int = arg(1, "Degree of expert model parallelism.")
    sequence_parallel: bool = arg(False, "Enable sequence parallelism (needed by MoE with TP > 1).")
    num_microbatches: int = arg(1, "Micro-batches per step through the pipeline schedule.")
    expert_tensor_parallel_size: Optional[int] = arg(
        None, "Degree of expert tensor parallelism (None: 1 with expert parallelism, whose groups are carved from "
              "the DP*TP ranks, else --tensor-model-parallel-size, experts split like dense MLPs).")
    use_distributed_optimizer: bool = arg(False, "Use Megatron's distributed optimizer (optimizer state and main "
                                                 "params sharded over data-parallel ranks). Needs CUDA.")
    overlap_grad_reduce: bool = arg(False, "Overlap the DDP gradient reduction with the backward pass.")
    overlap_param_gather: bool = arg(False, "Overlap the distributed optimizer's parameter all-gather with the next "
                                            "forward pass (needs --use-distributed-optimizer).")
    distributed_timeout_minutes: int = arg(60, "Timeout of torch.distributed collectives (NCCL's watchdog), in "
                                               "minutes. Ranks wait in a collective while one rank generates a "
                                               "rollout, evaluates or saves: NCCL's own 10 minutes are too short.")

    def expert_tp(self) -> int:
        """The expert tensor-parallel size in effect."""
        if self.expert_tensor_parallel_size is not None:
            return self.expert_tensor_parallel_size
        return 1 if self.expert_model_parallel_size > 1 else self.tensor_model_parallel_size


@dataclass
class OptimConfig:
    lr: float = arg(1e-3, "Peak learning rate (after warm-up).")
    min_lr: float = arg(0.0, "Minimum learning rate; the scheduler clips values below it.")
    lr_warmup_iters: int = arg(0, "Optimizer steps to linearly warm the learning rate up over.")
    lr_decay_style: Literal["constant", "cosine", "linear"] = arg("cosine", "Learning-rate decay function.")
    weight_decay: float = arg(0.0, "Weight-decay coefficient (decoupled, AdamW).")
    adam_beta1: float = arg(0.9, "Adam: first coefficient for the running averages of the gradient.")
    adam_beta2: float = arg(0.95, "Adam: second coefficient for the running averages of its square.")
    adam_eps: float = arg(1e-8, "Adam: term added to the denominator for numerical stability.")
    clip_grad: float = arg(1.0, "Gradient clipping on the global L2 norm (0: off).")
    # Megatron-Core's optimizer offload and precision-aware optimizer (CUDA, the distributed optimizer)
    optimizer_cpu_offload: bool = arg(False, "Keep Adam's state and main params on the host and step there (Megatron's "
                                             "HybridDeviceOptimizer; needs --use-precision-aware-optimizer).")
    optimizer_offload_fraction: float = arg(1.0, "With --optimizer-cpu-offload: the share of the optimizer state "
                                                 "kept on the host (the rest stays on the GPU).")
    overlap_cpu_optimizer_d2h_h2d: bool = arg(False, "With --optimizer-cpu-offload: overlap the host step with the "
                                                     "device<->host copies.")
    use_precision_aware_optimizer: bool = arg(False, "Optimizer state and main params in the dtypes below (TE's "
                                                     "FusedAdam, or the host optimizer with --optimizer-cpu-offload); "
                                                     "needs --use-distributed-optimizer.")
    main_grads_dtype: Literal["fp32", "bf16"] = arg("fp32", "Main gradients' dtype (precision-aware optimizer).")
    main_params_dtype: Literal["fp32", "fp16"] = arg("fp32", "Main parameters' dtype (precision-aware optimizer).")
    exp_avg_dtype: Literal["fp32", "fp16", "bf16", "fp8"] = arg("fp32", "Adam's first moment dtype (precision-aware "
                                                                        "optimizer).")
    exp_avg_sq_dtype: Literal["fp32", "fp16", "bf16", "fp8"] = arg("fp32", "Adam's second moment dtype "
                                                                           "(precision-aware optimizer).")


@dataclass
class RunConfig:
    seed: int = arg(1234, "Random seed (python, torch, Megatron's RNG tracker, data order).")
    save: Optional[str] = arg(None, "Directory to save checkpoints to.")
    load: Optional[str] = arg(None, "Directory of a checkpoint to resume from (a fresh run when it holds none).")
    save_interval: int = arg(0, "Iterations between checkpoint saves (0: save at the end only).")
    keep_last: Optional[int] = arg(None, "Keep only the newest N complete checkpoints (None: keep all).")
    tensorboard_dir: Optional[str] = arg(None, "Write tensorboard logs to this directory.")
    wandb_project: Optional[str] = arg(None, "Also log to Weights & Biases, in this project (pip install -e .[wandb]).")
    wandb_run_name: Optional[str] = arg(None, "The W&B run's name (None: W&B picks one).")
    wandb_mode: Literal["online", "offline"] = arg("online", "offline: write the run to --wandb-dir only (no network; "
                                                             "upload later with `wandb sync`).")
    wandb_dir: Optional[str] = arg(None, "Where W&B keeps its files (None: --save, else the current directory).")
    log_interval: int = arg(10, "Iterations between console metric lines.")
    eval_interval: int = arg(0, "Iterations between held-out evaluations (0: none during training).")
    tokenizer_model: Optional[str] = arg(None, "Sentencepiece .model file or Hugging Face tokenizer directory "
                                               "(required).")
    progress: bool = arg(True, "Show a progress bar.")


C = TypeVar("C")


def _base_type(tp: Any) -> Any:
    """``Optional[int]`` -> int, ``Literal[...]`` stays Literal."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def field_help(f: dataclasses.Field) -> str:
    """A field's help text (empty when it has none)."""
    return str(f.metadata.get("help", ""))


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """Add one ``--flag`` per field of ``cls`` (dest = field name, help from the field's metadata)."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": field_help(f).replace("%", "%%")}
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif get_origin(tp) is Literal:
            choices = list(get_args(tp))
            group.add_argument(flag, choices=choices, type=type(choices[0]), **kw)
        elif get_origin(tp) is list:
            (item,) = get_args(tp)
            group.add_argument(flag, nargs="+", type=item, **kw)
        else:
            group.add_argument(flag, type=tp, **kw)


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

__all__ = [
    "ConfigError", "UserError", "ModelConfig", "ParallelConfig", "OptimConfig", "RunConfig", "add_dataclass_args",
    "arg", "field_help", "from_args", "to_dict", "save_json", "load_model_config", "field",
]

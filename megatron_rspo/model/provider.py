"""Build the policy: a Megatron-Core GPTModel with MoE layers whose routers are RecordingTopKRouter.

The local spec runs everywhere (CPU included); the transformer-engine spec is used when TE imports and
``--transformer-impl`` is ``auto`` (on CUDA) or ``transformer_engine``. Fusions, norms and shims follow
the capability probe (``megatron_rspo.capabilities``), never "CUDA ⇒ everything".
"""

from __future__ import annotations

import datetime
import os
from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_rspo import distributed
from megatron_rspo.capabilities import Capabilities, probe
from megatron_rspo.compat.cpu import apply_compat_patches, cuda_available
from megatron_rspo.config import ConfigError, ModelConfig, ParallelConfig
from megatron_rspo.model.routing import RecordingTopKRouter
from megatron_rspo.validation import validate

_LAYOUT: tuple[int, ...] | None = None  # the (TP, PP, EP, ETP) layout the parallel groups were built for


def init_distributed(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) and Megatron's parallel groups.

    Works without a launcher (single process) and under torchrun/srun (reads the env vars).
    """
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        timeout = datetime.timedelta(minutes=parallel.distributed_timeout_minutes)
        if cuda_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            # device_id binds the NCCL communicator to this GPU at init (eager init, no guessing later)
            dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    apply_compat_patches()
    layout = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
              parallel.expert_model_parallel_size, parallel.expert_tp())
    global _LAYOUT
    if not parallel_state.model_parallel_is_initialized() or _LAYOUT != layout:
        # Re-creating the groups is avoided when the layout is unchanged: destroy_model_parallel drops
        # gloo groups without closing their sockets (~70 fds per re-initialisation).
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout[0],
            pipeline_model_parallel_size=layout[1],
            expert_model_parallel_size=layout[2],
            expert_tensor_parallel_size=layout[3],
        )
        _LAYOUT = layout
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown_distributed() -> None:
    """End of an entry point: wait for every rank, then tear the process groups down explicitly (left to
    interpreter exit, gloo's worker threads can abort the process: "terminate called without an active
    exception")."""
    global _LAYOUT
    if dist.is_initialized():
        distributed.barrier()
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    _LAYOUT = None


def _fused_rope() -> bool:
    """megatron-core 0.16.1 finds a fused RoPE kernel (transformer-engine's or apex's) itself."""
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None


def transformer_config(model: ModelConfig, parallel: ParallelConfig, *, ddp: bool = False,
                       caps: Capabilities | None = None) -> TransformerConfig:
    """Megatron TransformerConfig for our ModelConfig. Each fusion is on where CUDA exists and its kernel
    imports (``caps``, default: the probe), off on CPU. ``ddp``: the model will be wrapped in Megatron's
    DDP, whose ``main_grad`` buffers the gradient-accumulation fusion writes into (a bare model's backward
    would fail)."""
    caps = caps or probe()
    on_gpu = caps.cuda
    fusions = caps.fusions()
    dtype = torch.bfloat16 if model.bf16 else torch.float32
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size or model.ffn_hidden_size,
        moe_layer_freq=model.moe_layer_freq,
        moe_router_score_function=model.moe_router_score_function,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
        moe_router_load_balancing_type=model.moe_router_load_balancing_type,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_token_dispatcher_type=model.token_dispatcher(parallel),
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=model.moe_shared_expert_gate,
        moe_grouped_gemm=model.moe_grouped_gemm,  # the block spec follows config.moe_grouped_gemm
        moe_router_dtype="fp32",
        qk_layernorm=model.qk_layernorm,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=torch.nn.functional.silu if model.swiglu else torch.nn.functional.gelu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tp(),
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        bf16=model.bf16,
        pipeline_dtype=dtype,
        recompute_granularity=model.recompute_granularity,
        recompute_method=model.recompute_method,
        recompute_num_layers=model.recompute_num_layers,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        gradient_accumulation_fusion=ddp and fusions["gradient_accumulation_fusion"],
        # Megatron's fused bias+GeLU needs a bias; SwiGLU's fused kernel works without one.
        bias_activation_fusion=fusions["bias_activation_fusion"] and model.swiglu,
        masked_softmax_fusion=fusions["masked_softmax_fusion"],
        bias_dropout_fusion=fusions["bias_dropout_fusion"],
        apply_rope_fusion=on_gpu and model.position_embedding_type == "rope" and _fused_rope(),
        persist_layer_norm=fusions["persist_layer_norm"],
    )


def use_transformer_engine(model: ModelConfig, caps: Capabilities | None = None) -> bool:
    caps = caps or probe()
    if model.transformer_impl == "transformer_engine" and caps.transformer_engine is None:
        raise ConfigError("--transformer-impl transformer_engine needs the transformer-engine package, which does "
                          "not import here")
    return caps.use_transformer_engine(model.transformer_impl)


def _local_norms(spec: object, normalization: str, caps: Capabilities) -> None:
    """Put every norm of a local-spec block on a module this machine can run. megatron-core 0.16.1 picks
    apex's FusedLayerNorm whenever ``import apex`` works: for the block's final norm even with RMSNorm
    (gpt_layer_specs.py:640-648; FusedLayerNorm then asserts "RMSNorm is not supported"), and for LayerNorm
    even where apex was built without its CUDA kernels. Those become WrappedTorchNorm (torch's norm)."""
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

    if caps.fused_layer_norm_for(normalization):
        return
    stack, seen = [spec], set()
    while stack:  # specs and submodule dataclasses (a ModuleSpec's ``module`` is one of its fields)
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for name, value in vars(node).items():
            if value is FusedLayerNorm:
                setattr(node, name, WrappedTorchNorm)
            elif isinstance(value, (list, tuple)):
                stack.extend(v for v in value if hasattr(v, "__dict__"))
            elif hasattr(value, "__dict__") and type(value).__module__.startswith("megatron"):
                stack.append(value)


def block_spec(model: ModelConfig, config: TransformerConfig, caps: Capabilities | None = None):
    """The decoder block spec: TE's or the local one (norms on what runs here), routers that record."""
    caps = caps or probe()
    use_te = use_transformer_engine(model, caps)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=model.normalization)
    if not use_te:
        _local_norms(block, model.normalization, caps)
    for spec in block.layer_specs:
        mlp = spec.submodules.mlp
        if isinstance(getattr(mlp, "submodules", None), MoESubmodules):
            mlp.submodules = replace(mlp.submodules, router=RecordingTopKRouter)
    return block


def build_model(model: ModelConfig, parallel: ParallelConfig, init_weights: bool = True, *,
                ddp: bool = False, to_device: bool = True) -> GPTModel:
    """The GPTModel of this rank (its pipeline stage), with recording routers.

    Parallel state must be initialised (``init_distributed``). ``init_weights=False`` skips the random
    initialisation (weights are loaded right after, e.g. by checkpoint conversion). ``ddp``: the caller
    wraps the model in Megatron's DDP (enables the gradient-accumulation fusion where available).
    ``to_device=False`` leaves it where it was built (e.g. the meta device, to count a rank's share).
    """
    if model.vocab_size <= 0:
        raise ConfigError("--vocab-size is unset (take it from the tokenizer)")
    validate(model, parallel, dist.get_world_size() if dist.is_initialized() else 1)
    config = transformer_config(model, parallel, ddp=ddp)
    config.perform_initialization = init_weights
    if not to_device:  # e.g. under torch.device("meta"): Megatron's CUDA initialisation would pass device=cuda
        config.use_cpu_initialization = True
    block = block_spec(model, config)
    moe_numbers = model.moe_layer_numbers()
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_base=model.rotary_base,
    )
    for r in gpt.modules():
        if isinstance(r, RecordingTopKRouter):
            r.moe_index = moe_numbers.index(r.layer_number)
    if to_device and cuda_available():
        gpt.cuda()
    return gpt


def num_moe_layers(model: ModelConfig) -> int:
    return len(model.moe_layer_numbers())


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

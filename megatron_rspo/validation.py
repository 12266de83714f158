"""Up-front checks of the configs: every problem is collected, then reported in one ``ConfigError``.

The ``*_errors`` functions return lists of messages (each naming its flags) so that an entry point can
report the model, parallel, optimizer, run and task problems of a command line together. Nothing
here needs a process group, a model or a GPU; ``cuda`` (default: ``torch.cuda.is_available()``) says
whether the run will be on CUDA, for the flags that need it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Optional

from megatron_rspo.capabilities import probe
from megatron_rspo.errors import ConfigError

if TYPE_CHECKING:
    from megatron_rspo.config import ModelConfig, OptimConfig, ParallelConfig, RunConfig

LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


def cuda_default(cuda: Optional[bool]) -> bool:
    if cuda is not None:
        return cuda
    import torch

    return torch.cuda.is_available()


def uses_transformer_engine(model: ModelConfig, cuda: bool) -> bool:
    """The spec a run on ``cuda`` (or not) will use: ``Capabilities.use_transformer_engine`` for that device."""
    return dataclasses.replace(probe(), cuda=cuda).use_transformer_engine(model.transformer_impl)


def raise_errors(errors: list[str], what: str = "invalid configuration") -> None:
    if errors:
        raise ConfigError(f"{what}:\n  - " + "\n  - ".join(errors))


def _at_least(errors: list[str], pairs: tuple[tuple[str, float | None], ...], low: float) -> None:
    for name, v in pairs:
        if v is not None and v < low:
            errors.append(f"{name} must be >= {low:g} (got {v})")


def model_parallel_errors(model: ModelConfig, parallel: ParallelConfig, world_size: int = 1,
                          cuda: Optional[bool] = None) -> list[str]:
    """Model/parallel-layout problems: what Megatron would reject (or silently get wrong) at build time."""
    errors: list[str] = []
    tp, pp, ep = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.expert_model_parallel_size)
    sizes = (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
             ("--expert-model-parallel-size", ep), ("--num-layers", model.num_layers),
             ("--hidden-size", model.hidden_size), ("--num-attention-heads", model.num_attention_heads),
             ("--num-microbatches", parallel.num_microbatches), ("--num-experts", model.num_experts),
             ("--ffn-hidden-size", model.ffn_hidden_size), ("--moe-ffn-hidden-size", model.moe_ffn_hidden_size),
             ("--num-query-groups", model.num_query_groups), ("--kv-channels", model.kv_channels),
             ("--expert-tensor-parallel-size", parallel.expert_tensor_parallel_size),
             ("--max-position-embeddings", model.max_position_embeddings),
             ("--moe-layer-freq", model.moe_layer_freq), ("--recompute-num-layers", model.recompute_num_layers),
             ("--distributed-timeout-minutes", parallel.distributed_timeout_minutes))
    _at_least(errors, sizes, 1)
    _at_least(errors, (("--vocab-size", model.vocab_size), ("--moe-aux-loss-coeff", model.moe_aux_loss_coeff)), 0)
    for name, p in (("--hidden-dropout", model.hidden_dropout), ("--attention-dropout", model.attention_dropout)):
        if not 0.0 <= p < 1.0:
            errors.append(f"{name} must be in [0, 1) (got {p})")
    for name, v in (("--norm-epsilon", model.norm_epsilon), ("--init-method-std", model.init_method_std)):
        if not v > 0:
            errors.append(f"{name} must be > 0 (got {v})")

    def ok(*values: int | None) -> bool:  # a divisibility check needs positive sizes (reported above if not)
        return all(v is None or v >= 1 for v in values)

    if ok(model.num_experts) and not 1 <= model.moe_router_topk <= model.num_experts:
        errors.append(f"--moe-router-topk ({model.moe_router_topk}) must be in [1, --num-experts={model.num_experts}]")
    if model.num_experts > 32767:
        errors.append("--num-experts > 32767 cannot be recorded as int16 expert ids")
    etp = parallel.expert_tp()
    if not ok(tp, ep, etp, model.ffn_hidden_size, model.moe_ffn_hidden_size, model.num_experts):
        etp = 0
    elif tp % etp:
        errors.append(f"--expert-tensor-parallel-size ({etp}) must divide --tensor-model-parallel-size ({tp})")
        etp = 1
    elif ep == 1 and etp != tp:
        # With EP = 1 Megatron treats expert weights as dense ones and reduces their grads over the dense DP
        # group only, which misses the TP peers that routed other tokens through the same (replicated) experts.
        errors.append(f"--expert-tensor-parallel-size ({etp}) must equal --tensor-model-parallel-size ({tp}) "
                      "when --expert-model-parallel-size is 1")
    if etp and (model.moe_ffn_hidden_size or model.ffn_hidden_size) % etp:
        errors.append(f"the expert FFN size is not divisible by the expert tensor-parallel size ({etp})")
    if etp and model.num_experts % ep:
        errors.append(f"--num-experts ({model.num_experts}) is not divisible by --expert-model-parallel-size ({ep})")
    heads, groups = model.num_attention_heads, model.num_query_groups or model.num_attention_heads
    if ok(heads, groups, tp, model.hidden_size):
        if model.hidden_size % heads and model.kv_channels is None:
            errors.append(f"--hidden-size ({model.hidden_size}) is not divisible by --num-attention-heads "
                          f"({heads}); set --kv-channels")
        if heads % tp:
            errors.append(f"--num-attention-heads ({heads}) is not divisible by --tensor-model-parallel-size ({tp})")
        if heads % groups:
            errors.append(f"--num-attention-heads ({heads}) is not divisible by --num-query-groups ({groups})")
        if groups % tp:
            errors.append(f"--num-query-groups ({groups}) is not divisible by --tensor-model-parallel-size ({tp})")
    if tp > 1 and not parallel.sequence_parallel:
        errors.append("MoE with --tensor-model-parallel-size > 1 requires --sequence-parallel")
    if parallel.sequence_parallel and tp == 1:
        errors.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if ok(pp, model.num_layers) and model.num_layers % pp:
        errors.append(f"--num-layers ({model.num_layers}) is not divisible by --pipeline-model-parallel-size ({pp})")
    if model.moe_router_score_function == "sigmoid" and model.moe_router_pre_softmax:
        errors.append("--moe-router-pre-softmax only applies to --moe-router-score-function softmax")
    if model.moe_router_enable_expert_bias and model.moe_router_score_function != "sigmoid":
        errors.append("--moe-router-enable-expert-bias requires --moe-router-score-function sigmoid")
    if model.moe_router_load_balancing_type == "sinkhorn":
        errors.append("--moe-router-load-balancing-type sinkhorn is not supported (routing records need top-k)")
    elif model.moe_router_load_balancing_type not in LOAD_BALANCING:
        errors.append(f"--moe-router-load-balancing-type {model.moe_router_load_balancing_type!r} is not one of "
                      f"{', '.join(LOAD_BALANCING)}")
    if model.moe_shared_expert_gate and model.moe_shared_expert_intermediate_size is None:
        errors.append("--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size")
    if ok(pp, model.num_layers):
        errors += _recompute_errors(model, pp)
    errors += _implementation_errors(model, cuda_default(cuda))
    if not ok(tp, pp, ep, world_size) or not etp:
        return errors
    if world_size % (tp * pp):
        errors.append(f"world size {world_size} is not divisible by TP*PP = {tp * pp}")
    else:
        dp = world_size // (tp * pp)
        # Megatron carves the expert groups (expert TP x EP) from the DP*TP ranks of a stage.
        if (dp * tp) % (etp * ep):
            errors.append(f"--expert-model-parallel-size ({ep}) x expert TP ({etp}) must divide DP*TP = {dp * tp} "
                          f"(world size {world_size}, TP {tp}, PP {pp})")
    return errors


def _recompute_errors(model: ModelConfig, pp: int) -> list[str]:
    """Megatron's rules (TransformerConfig.__post_init__), with our flag names."""
    gran, method, n = model.recompute_granularity, model.recompute_method, model.recompute_num_layers
    errors = []
    if gran != "full" and (method is not None or n is not None):
        given = [f for f, v in (("--recompute-method", method), ("--recompute-num-layers", n)) if v is not None]
        errors.append(f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} --recompute-granularity full"
                      + (" (selective recompute takes neither)" if gran == "selective" else ""))
    if gran == "full":
        per_stage = model.num_layers // pp
        if method is None:
            errors.append("--recompute-granularity full needs --recompute-method uniform or block")
        if n is None:
            errors.append(f"--recompute-granularity full needs --recompute-num-layers (1..{per_stage}, the layers "
                          "per pipeline stage)")
        elif n > per_stage:
            errors.append(f"--recompute-num-layers ({n}) exceeds the layers per pipeline stage ({per_stage})")
    return errors


def _implementation_errors(model: ModelConfig, cuda: bool) -> list[str]:
    """Flags that need a package or CUDA which this machine lacks (the capability probe decides)."""
    caps = probe()
    errors = []
    if model.transformer_impl == "transformer_engine":
        if caps.transformer_engine is None:
            errors.append("--transformer-impl transformer_engine needs the transformer-engine package "
                          "(pip install -e '.[gpu]'), which does not import here")
        elif not cuda:
            errors.append("--transformer-impl transformer_engine needs CUDA (transformer-engine has no CPU kernels)")
    if model.moe_grouped_gemm:
        if not cuda:
            errors.append("--moe-grouped-gemm needs CUDA: its kernels (TransformerEngine's GroupedLinear, or the "
                          "grouped_gemm package behind Megatron's GroupedMLP) are CUDA-only")
        elif not uses_transformer_engine(model, cuda) and not caps.grouped_gemm:
            errors.append("--moe-grouped-gemm without transformer-engine needs the grouped_gemm package (Megatron's "
                          "GroupedMLP; pip install git+https://github.com/fanshiqing/grouped_gemm@v1.1.4), which "
                          "does not import here; or install transformer-engine (its TEGroupedMLP)")
    return errors


def training_errors(model: ModelConfig, parallel: ParallelConfig, cuda: Optional[bool] = None,
                    opt: Optional[OptimConfig] = None) -> list[str]:
    """Problems of the training setup (DDP, optimizer) beyond building the model. The model alone may be
    bf16 on CPU (checkpoint conversion builds one); training it may not."""
    cuda = cuda_default(cuda)
    errors = offload_errors(opt, parallel, cuda) if opt is not None else []
    if parallel.overlap_param_gather and not parallel.use_distributed_optimizer:
        errors.append("--overlap-param-gather requires --use-distributed-optimizer")
    if not cuda:
        # Tried on CPU with megatron-core 0.16.1: Float16OptimizerWithFloat16Params and DistributedOptimizer
        # accept only torch.cuda.{Float,Half,BFloat16}Tensor parameters (TypeError for CPU tensors).
        # Activation recomputation runs on CPU through compat/cpu.py's recompute_without_cuda_rng.
        why = "parameters (TypeError for CPU tensors in megatron-core 0.16.1)"
        if model.bf16:
            errors.append("--bf16 needs CUDA: Megatron's mixed-precision optimizer (fp32 main params) only accepts "
                          f"torch.cuda.* {why}")
        if parallel.use_distributed_optimizer:
            errors.append(f"--use-distributed-optimizer needs CUDA: Megatron's DistributedOptimizer only accepts "
                          f"torch.cuda.* {why}")
    return errors


def offload_errors(opt: OptimConfig, parallel: ParallelConfig, cuda: bool) -> list[str]:
    """The optimizer offload and precision-aware flags, as megatron-core 0.16.1 needs them (its asserts, said
    before any model is built)."""
    errors = []
    low = [f"--{n.replace('_', '-')} {getattr(opt, n)}" for n in ("main_grads_dtype", "main_params_dtype",
                                                                 "exp_avg_dtype", "exp_avg_sq_dtype")
           if getattr(opt, n) != "fp32"]
    if low and not opt.use_precision_aware_optimizer:
        errors.append(f"{', '.join(low)} need --use-precision-aware-optimizer")
    if not 0.0 <= opt.optimizer_offload_fraction <= 1.0:
        errors.append(f"--optimizer-offload-fraction must be in [0, 1] (got {opt.optimizer_offload_fraction})")
    if not opt.optimizer_cpu_offload and (opt.optimizer_offload_fraction != 1.0 or opt.overlap_cpu_optimizer_d2h_h2d):
        errors.append("--optimizer-offload-fraction and --overlap-cpu-optimizer-d2h-h2d only apply with "
                      "--optimizer-cpu-offload")
    if opt.optimizer_cpu_offload and not opt.use_precision_aware_optimizer:
        errors.append("--optimizer-cpu-offload needs --use-precision-aware-optimizer (Megatron's host optimizer "
                      "runs on that code path)")
    wants = [f for f, on in (("--optimizer-cpu-offload", opt.optimizer_cpu_offload),
                             ("--use-precision-aware-optimizer", opt.use_precision_aware_optimizer)) if on]
    if wants and not parallel.use_distributed_optimizer:
        errors.append(f"{' and '.join(wants)} need --use-distributed-optimizer")
    if wants and not cuda:
        errors.append(f"{' and '.join(wants)} need CUDA (megatron-core 0.16.1's host optimizer takes CUDA streams; "
                      "the distributed optimizer only accepts CUDA parameters)")
    elif opt.use_precision_aware_optimizer:
        from megatron_rspo.capabilities import probe

        if not probe().transformer_engine:
            # its FusedAdam; and megatron-core 0.16.1's OptimizerConfig reads TE's version even for the host
            # optimizer (a TypeError without TE)
            errors.append("--use-precision-aware-optimizer needs transformer-engine (pip install -e .[gpu])")
    return errors


def optim_errors(opt: OptimConfig) -> list[str]:
    errors = []
    _at_least(errors, (("--min-lr", opt.min_lr), ("--lr-warmup-iters", opt.lr_warmup_iters),
                       ("--weight-decay", opt.weight_decay), ("--clip-grad", opt.clip_grad)), 0)
    if not opt.lr > 0:
        errors.append(f"--lr must be > 0 (got {opt.lr}): with 0 every step would leave the weights as they are")
    if opt.min_lr > opt.lr >= 0:
        errors.append(f"--min-lr ({opt.min_lr}) exceeds --lr ({opt.lr})")
    for name, b in (("--adam-beta1", opt.adam_beta1), ("--adam-beta2", opt.adam_beta2)):
        if not 0.0 <= b < 1.0:
            errors.append(f"{name} must be in [0, 1) (got {b})")
    if not opt.adam_eps > 0:
        errors.append(f"--adam-eps must be > 0 (got {opt.adam_eps})")
    return errors


def _file_errors(flag: str, path: Optional[str], kind: str = "file") -> list[str]:
    if path is None:
        return []
    if not os.path.exists(path):
        return [f"{flag} {path}: no such {kind}"]
    if kind == "directory" and not os.path.isdir(path):
        return [f"{flag} {path}: not a directory"]
    if not os.access(path, os.R_OK):
        return [f"{flag} {path}: not readable"]
    return []


def run_errors(run: RunConfig, check_files: bool = True) -> list[str]:
    """RunConfig problems; the tokenizer is required. ``check_files``: paths must exist (--load may not:
    a fresh run starts there)."""
    errors = []
    _at_least(errors, (("--save-interval", run.save_interval), ("--eval-interval", run.eval_interval),
                       ("--seed", run.seed)), 0)
    _at_least(errors, (("--log-interval", run.log_interval), ("--keep-last", run.keep_last)), 1)
    if not run.tokenizer_model:
        errors.append("--tokenizer-model is required")
    elif check_files:
        errors += _file_errors("--tokenizer-model", run.tokenizer_model, "tokenizer file or directory")
    if check_files and run.load and os.path.exists(run.load) and not os.path.isdir(run.load):
        errors.append(f"--load {run.load}: not a directory")
    if run.wandb_project:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            errors.append("--wandb-project needs the wandb package: pip install -e .[wandb]")
    if run.save and os.path.exists(run.save) and not os.path.isdir(run.save):
        errors.append(f"--save {run.save}: exists and is not a directory")
    elif run.save and not _writable_dir(run.save):
        errors.append(f"--save {run.save}: cannot write there (read-only file system or no permission); checked "
                      "before any work so that no run ends without its checkpoint")
    return errors


def _writable_dir(path: str) -> bool:
    """Whether ``path`` (or, when it does not exist yet, its nearest existing parent) accepts new files."""
    here = os.path.abspath(path)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    return os.path.isdir(here) and os.access(here, os.W_OK | os.X_OK)


def data_file_errors(**paths: Optional[str]) -> list[str]:
    """``train_data="x.jsonl"`` -> a message naming ``--train-data`` when x.jsonl is missing/unreadable."""
    return [e for name, p in paths.items() for e in _file_errors("--" + name.replace("_", "-"), p)]


def validate(model: ModelConfig, parallel: ParallelConfig, world_size: int = 1, cuda: Optional[bool] = None) -> None:
    """Raise ConfigError naming the offending flags for any invalid model/parallel combination."""
    raise_errors(model_parallel_errors(model, parallel, world_size, cuda))


__all__ = ["validate", "model_parallel_errors", "training_errors", "optim_errors", "run_errors",
           "data_file_errors", "raise_errors", "cuda_default", "uses_transformer_engine"]

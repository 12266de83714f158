"""The training engine shared by SFT and RL: Megatron DDP + Megatron optimizer + LR scheduler, and one
optimizer step through Megatron's forward-backward schedule (pipelined or not).

Loss normalisation is explicit: a micro-batch loss function returns ``sum_of_terms / global_denominator``
(global over all micro-batches of the step and all data-parallel ranks); ``Engine.loss_scale`` undoes
Megatron's own averaging over micro-batches and DP ranks, so the step's gradient is exactly that of
the global mean whatever the layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rspo import distributed
from megatron_rspo.config import ModelConfig, OptimConfig, ParallelConfig
from megatron_rspo.model.provider import build_model
from megatron_rspo.validation import raise_errors, training_errors

ForwardStep = Callable[[Any, torch.nn.Module], tuple[torch.Tensor, Callable]]


@dataclass
class StepResult:
    metrics: list[dict[str, torch.Tensor]]  # one dict per micro-batch (last pipeline stage only)
    grad_norm: float
    lr: float
    skipped: bool


FINITE_CHECK_CHUNK = 1 << 22  # elements per finiteness check: its temporaries stay under ~30 MB
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.uint8}  # Megatron-LM's


def offload_options(opt: OptimConfig) -> dict:
    """Megatron-Core's OptimizerConfig fields for the offload and precision-aware flags (validated before)."""
    return dict(optimizer_cpu_offload=opt.optimizer_cpu_offload,
                optimizer_offload_fraction=opt.optimizer_offload_fraction if opt.optimizer_cpu_offload else 0.0,
                overlap_cpu_optimizer_d2h_h2d=opt.overlap_cpu_optimizer_d2h_h2d,
                use_precision_aware_optimizer=opt.use_precision_aware_optimizer,
                main_grads_dtype=_DTYPES[opt.main_grads_dtype], main_params_dtype=_DTYPES[opt.main_params_dtype],
                exp_avg_dtype=_DTYPES[opt.exp_avg_dtype], exp_avg_sq_dtype=_DTYPES[opt.exp_avg_sq_dtype])


class Engine:
    """Owns the model chunk of this rank, its DDP wrapper, optimizer and scheduler."""

    def __init__(self, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, optim_cfg: OptimConfig,
                 train_iters: int) -> None:
        self.model_cfg, self.parallel_cfg, self.optim_cfg = model_cfg, parallel_cfg, optim_cfg
        raise_errors(training_errors(model_cfg, parallel_cfg, opt=optim_cfg), "invalid training configuration")
        self.module = build_model(model_cfg, parallel_cfg, ddp=True)
        config = self.module.config
        # bf16: the model's params and activations are bf16 (params_dtype); grads are reduced in fp32 and the
        # optimizer keeps fp32 main params (Float16OptimizerWithFloat16Params / the distributed optimizer).
        # No Float16Module: its only job, casting float inputs to bf16 and outputs to fp32, is moot here
        # (inputs are token ids; every consumer of the logits upcasts them).
        self.ddp = DistributedDataParallel(
            config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=optim_cfg.main_grads_dtype == "fp32",  # bf16 only with the precision-aware Adam
                overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
                use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
                overlap_param_gather=parallel_cfg.overlap_param_gather,
            ),
            self.module,
        )
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.ddp.no_sync  # grads of non-final micro-batches are not reduced (overlap)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=optim_cfg.lr, min_lr=optim_cfg.min_lr, weight_decay=optim_cfg.weight_decay,
                adam_beta1=optim_cfg.adam_beta1, adam_beta2=optim_cfg.adam_beta2, adam_eps=optim_cfg.adam_eps,
                clip_grad=optim_cfg.clip_grad, bf16=model_cfg.bf16, params_dtype=config.params_dtype,
                use_distributed_optimizer=parallel_cfg.use_distributed_optimizer, **offload_options(optim_cfg),
            ),
            [self.ddp],
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim_cfg.lr_warmup_iters else optim_cfg.lr, max_lr=optim_cfg.lr,
            min_lr=optim_cfg.min_lr, lr_warmup_steps=optim_cfg.lr_warmup_iters,
            lr_decay_steps=max(train_iters, optim_cfg.lr_warmup_iters + 1), lr_decay_style=optim_cfg.lr_decay_style,
            start_wd=optim_cfg.weight_decay, end_wd=optim_cfg.weight_decay, wd_incr_steps=max(train_iters, 1),
            wd_incr_style="constant",
        )

    @property
    def loss_scale(self) -> float:
        """``loss_scale_for`` the configured ``--num-microbatches``."""
        return self.loss_scale_for(self.parallel_cfg.num_microbatches)

    def loss_scale_for(self, num_microbatches: int) -> float:
        """Multiply a globally-normalised micro-batch loss by this: Megatron divides by the number of
        micro-batches of the step and DDP averages over DP ranks."""
        return float(num_microbatches * parallel_state.get_data_parallel_world_size())

    def _run(self, forward_step: ForwardStep, microbatches: Iterable[Any], num_microbatches: int,
             forward_only: bool, seq_length: int, micro_batch_size: int) -> list[Any]:
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(microbatches), model=[self.ddp],
            num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
        # A forward step may post non-blocking sends inside the schedule (RL routing info to the last
        # pipeline stage); it completes them here.
        finish = getattr(forward_step, "finish", None)
        if finish is not None:
            finish()
        return out

    def forward_backward(self, forward_step: ForwardStep, microbatches: list[Any], seq_length: int,
                         micro_batch_size: int) -> list[Any]:
        """Zero the grads, then forward+backward over ``microbatches`` (len == --num-microbatches). On return
        the grads (``param.main_grad``) are final: reduced over DP, SP-norm grads over TP, embeddings over PP."""
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        return self._run(forward_step, microbatches, len(microbatches), False, seq_length, micro_batch_size)

    def grads_finite(self, losses: Iterable[torch.Tensor] = ()) -> bool:
        """True when every gradient of every rank (and every given loss) is finite. One fused check over
        the contiguous grad buffers, one all-reduce over the world, one host sync: every rank then
        agrees whether to step."""
        device = distributed.module_device(self.module)
        # chunk by chunk: isfinite over a whole buffer would allocate ~3 bytes per parameter at once (its bool
        # result and temporaries; 15 GB per GPU for Qwen3-30B-A3B on 8), more than any activation
        checks = [torch.isfinite(chunk).all() for b in self.ddp.buffers + self.ddp.expert_parallel_buffers
                  for chunk in b.grad_data.split(FINITE_CHECK_CHUNK)]
        checks += [torch.isfinite(x.detach()).all() for x in losses]
        ok = torch.stack(checks).all() if checks else torch.ones((), dtype=torch.bool, device=device)
        flag = ok.to(device=device, dtype=torch.int32).reshape(1)
        return bool(distributed.all_reduce(flag, distributed.ReduceOp.MIN)[0])

    def train_step(self, forward_step: ForwardStep, microbatches: list[Any], seq_length: int,
                   micro_batch_size: int) -> StepResult:
        """``forward_backward``, then one optimizer step, unless a loss or a gradient is not finite: then
        the step is skipped (weights, optimizer state and LR schedule untouched; ``skipped`` is True).
        The micro-batch stats' ``loss`` entries, when present, are part of the check."""
        metrics = self.forward_backward(forward_step, microbatches, seq_length, micro_batch_size)
        lr = self.optimizer.param_groups[0]["lr"]  # the LR this step applies (the scheduler moves it after)
        losses = [m["loss"] for m in metrics if isinstance(m, dict) and "loss" in m]
        if not self.grads_finite(losses):
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            return StepResult(metrics=metrics, grad_norm=float("nan"), lr=lr, skipped=True)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return StepResult(metrics=metrics, grad_norm=float(grad_norm or 0.0), lr=lr, skipped=not ok)

    @torch.no_grad()
    def forward_only(self, forward_step: ForwardStep, microbatches: list[Any], seq_length: int,
                     micro_batch_size: int) -> list[Any]:
        """Forward passes (no grad); returns what each micro-batch's loss function reported."""
        was_training = self.ddp.training
        self.ddp.eval()
        try:
            return self._run(forward_step, microbatches, len(microbatches), True, seq_length, micro_batch_size)
        finally:
            self.ddp.train(was_training)

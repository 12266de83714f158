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

from megatron_rspo.config import ModelConfig, OptimConfig, ParallelConfig
from megatron_rspo.model.provider import build_model

ForwardStep = Callable[[Any, torch.nn.Module], tuple[torch.Tensor, Callable]]


@dataclass
class StepResult:
    metrics: list[dict[str, torch.Tensor]]  # one dict per micro-batch (last pipeline stage only)
    grad_norm: float
    lr: float
    skipped: bool


class Engine:
    """Owns the model chunk of this rank, its DDP wrapper, optimizer and scheduler."""

    def __init__(self, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, optim_cfg: OptimConfig,
                 train_iters: int) -> None:
        self.model_cfg, self.parallel_cfg, self.optim_cfg = model_cfg, parallel_cfg, optim_cfg
        self.module = build_model(model_cfg, parallel_cfg)
        config = self.module.config
        self.ddp = DistributedDataParallel(
            config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                          use_distributed_optimizer=False),
            self.module,
        )
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.ddp.no_sync
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=optim_cfg.lr, min_lr=optim_cfg.min_lr, weight_decay=optim_cfg.weight_decay,
                adam_beta1=optim_cfg.adam_beta1, adam_beta2=optim_cfg.adam_beta2, adam_eps=optim_cfg.adam_eps,
                clip_grad=optim_cfg.clip_grad, bf16=model_cfg.bf16, params_dtype=config.params_dtype,
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
        """Multiply a globally-normalised micro-batch loss by this: Megatron divides by the number of
        micro-batches and DDP averages over DP ranks."""
        return float(self.parallel_cfg.num_microbatches * parallel_state.get_data_parallel_world_size())

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

    def train_step(self, forward_step: ForwardStep, microbatches: list[Any], seq_length: int,
                   micro_batch_size: int) -> StepResult:
        """``forward_backward``, then one optimizer step."""
        metrics = self.forward_backward(forward_step, microbatches, seq_length, micro_batch_size)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return StepResult(metrics=metrics, grad_norm=float(grad_norm or 0.0),
                          lr=self.optimizer.param_groups[0]["lr"], skipped=not ok)

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

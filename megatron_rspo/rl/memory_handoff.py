"""Device memory taking turns between generation and training when the rollout engine shares the trainer's
devices (colocated). Orchestration only: Megatron-Core and vLLM do the moving.

    to_rollout():  trainer's gradient buffers freed (DDP.offload_grad_buffers) and optimizer state with its fp32
                   main params moved to host (optimizer.offload_to_cpu), cache emptied -- then the engine wakes
                   (the weight sync wakes its weights, generation its KV cache)
    to_train():    the engine sleeps (vLLM sleep level 1/2: KV cache dropped, weights to host or dropped), then
                   the optimizer and gradient buffers come back

Each is idempotent, so the loop may call them at every phase boundary. On a CPU machine vLLM has no sleep
mode and Megatron's optimizer offload only moves CUDA tensors: the same sequence runs, the engine says
once that it keeps its memory, the optimizer stays, and the gradient buffers are still freed (that part
works on any device).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


class MemoryHandoff:
    def __init__(self, trainer_engine: Any, rollout_engine: Any, offload_optimizer: bool, offload_grads: bool
                 ) -> None:
        self.trainer, self.rollout = trainer_engine, rollout_engine
        # Megatron-Core 0.16.1's optimizer offload moves CUDA tensors only, and its restore calls .cuda() on every
        # host tensor: on a CPU machine it is skipped (there is no device memory to free)
        cuda = torch.cuda.is_available()
        if offload_optimizer and not cuda:
            log.info("--offload-optimizer-during-rollout: nothing to move on a CPU machine")
        self.offload_optimizer, self.offload_grads = offload_optimizer and cuda, offload_grads
        self.in_rollout = False

    def to_rollout(self) -> None:
        """Before the weight sync and generation: the trainer's state the engine's phase does not need leaves."""
        if self.in_rollout:
            return
        self.in_rollout = True
        cuda = torch.cuda.is_available()
        if self.offload_grads:
            self.trainer.ddp.offload_grad_buffers(synchronize=cuda, empty_cache=cuda)
        if self.offload_optimizer:
            self.trainer.optimizer.offload_to_cpu()  # Megatron-Core: moves CUDA tensors only
        if cuda:
            torch.cuda.empty_cache()

    def to_train(self) -> None:
        """After generation: the engine sleeps, the trainer's state comes back."""
        if self.in_rollout:
            self.rollout.sleep()
        self.trainer_back()

    def trainer_back(self) -> None:
        """The trainer's state back without putting the engine to sleep (e.g. to save a checkpoint)."""
        if not self.in_rollout:
            return
        self.in_rollout = False
        if self.offload_optimizer:
            self.trainer.optimizer.restore_from_cpu()
        if self.offload_grads:
            # zeroed on the way back: every step starts from zero gradients anyway (Engine.train_step)
            self.trainer.ddp.restore_grad_buffers(synchronize=torch.cuda.is_available())

"""Rollout engines: who samples the responses. One interface and one ``Rollout`` layout (see
``rollout/generate.py``), so the trainer never branches on the engine.

- ``MegatronEngine`` (the embedded default): ``generate()`` on the training model itself. Same process,
  same weights, same numerics: π_rollout is π_old by construction, so the trainer takes the old-policy
  pass's log-probs as the rollout's (mismatch exactly 0) and a weight sync moves nothing.
- ``VLLMEngine`` (``rollout/vllm_engine.py``, ``--rollout-engine vllm``): an external vLLM engine
  process, bf16 by default, weights streamed from Megatron after every round of updates.

Every rollout carries the weight version it was sampled with (``Rollout.weight_version``); the trainer
refuses one of an unexpected version.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.distributed as dist

from megatron_rspo import distributed
from megatron_rspo.rollout.generate import Rollout, SamplingParams, generate
from megatron_rspo.rollout.sampling import StopIds


class RolloutEngine(Protocol):
    name: str
    weight_version: int
    same_numerics_as_trainer: bool  # True: π_rollout == π_old by construction (the built-in engine)
    returns_routed_experts: bool  # the engine reports the experts it routed each token to (R3)
    shares_devices: bool  # the engine runs on the trainer's devices (colocated): phases take turns with memory

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, eos_id: StopIds, pad_id: int,
                 seed: int, record_scores: bool = True, max_batch_rows: Optional[int] = None,
                 sync_group: Optional[dist.ProcessGroup] = None) -> Rollout:
        """Sample one response per prompt (collective over every rank that calls it)."""

    def sync_weights(self, model: torch.nn.Module, version: int) -> float:
        """Make the engine sample with ``model``'s current weights, now called ``version``; returns seconds."""

    def sleep(self) -> None:
        """Give the trainer the engine's device memory until the next sync or generation."""

    def shutdown(self) -> None: ...


class MegatronEngine:
    """The built-in engine: KV-cache generation on the training model, recording every token's routing."""

    name = "megatron"
    same_numerics_as_trainer = True
    returns_routed_experts = False  # its routing is the training model's own: Rollout.routing_ids
    shares_devices = True

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.weight_version = 0

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, eos_id: StopIds, pad_id: int,
                 seed: int, record_scores: bool = True, max_batch_rows: Optional[int] = None,
                 sync_group: Optional[dist.ProcessGroup] = None) -> Rollout:
        # The sampling RNG lives on the model's device (no [N, V] host draws per step).
        gen = torch.Generator(device=distributed.module_device(self.model))
        gen.manual_seed(seed)
        ro = generate(self.model, prompts, params, eos_id=eos_id, pad_id=pad_id, record_routing=True,
                      record_scores=record_scores, generator=gen, sync_group=sync_group, max_batch_rows=max_batch_rows)
        ro.weight_version = self.weight_version
        return ro

    def sync_weights(self, model: torch.nn.Module, version: int) -> float:
        if model is not self.model:
            raise ValueError("the built-in engine samples with the training model itself")
        self.weight_version = version
        return 0.0

    def sleep(self) -> None:
        pass  # it is the training model

    def shutdown(self) -> None:
        pass

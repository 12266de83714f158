"""Shared fixtures: one gloo process group per test process, tiny Megatron models on CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


@pytest.fixture
def megatron_single_rank():
    """Initialise torch.distributed (gloo, 1 rank) + Megatron parallel state; returns a builder
    ``make(model_cfg=None, parallel_cfg=None, seed=1)`` for tiny GPT MoE models."""
    from megatron_rspo.config import ModelConfig, ParallelConfig
    from megatron_rspo.model.provider import build_model, init_distributed

    def make(model_cfg: ModelConfig | None = None, parallel_cfg: ParallelConfig | None = None, seed: int = 1):
        model_cfg = model_cfg or ModelConfig(vocab_size=64)
        parallel_cfg = parallel_cfg or ParallelConfig()
        init_distributed(parallel_cfg, seed=seed)
        return build_model(model_cfg, parallel_cfg)

    torch.manual_seed(0)
    return make

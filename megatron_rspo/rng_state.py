"""Every RNG stream of one rank, captured and restored together (checkpointing, exact resume).

Python ``random``, NumPy, the torch CPU generator, the CUDA generator (when present) and Megatron's
RNG tracker (named per-TP/EP-rank streams; on CPU the CpuRNGStatesTracker of compat/cpu.py).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

log = logging.getLogger(__name__)


def layout() -> tuple[int, int, int]:
    """(TP, PP, EP) sizes of the current Megatron parallel state ((1, 1, 1) when uninitialised)."""
    if not parallel_state.model_parallel_is_initialized():
        return (1, 1, 1)
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size())


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def capture() -> dict[str, Any]:
    state: dict[str, Any] = {
        "random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(), "world_size": _world(), "layout": layout(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict[str, Any]) -> bool:
    """Restore ``state`` if it was captured with the same world size and layout (else warn, return False):
    with another layout this rank's streams have no counterpart."""
    if state["world_size"] != _world() or tuple(state["layout"]) != layout():
        log.warning("RNG state was saved with world %s layout (tp,pp,ep)=%s, now %s %s; RNG not restored",
                    state["world_size"], tuple(state["layout"]), _world(), layout())
        return False
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    return True

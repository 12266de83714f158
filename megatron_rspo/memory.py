"""Memory per phase of an RL iteration, as ``memory/*`` scalars: what the trainer holds after generating and
after training (on CUDA: allocated, reserved and peak allocated since the last reading; on a CPU machine:
the process's resident set). Host-side counters only: no device sync. Names end in ``_max``, so the
reduction over data-parallel ranks keeps the largest rank's value.
"""

from __future__ import annotations

import psutil
import torch

GIB = float(1 << 30)


def phase_memory(phase: str, device: torch.device) -> dict[str, float]:
    """``memory/<phase>_*_gib_max`` for this process on ``device``; resets CUDA's peak counter for the next phase."""
    if device.type == "cuda":
        out = {f"memory/{phase}_allocated_gib_max": torch.cuda.memory_allocated(device) / GIB,
               f"memory/{phase}_reserved_gib_max": torch.cuda.memory_reserved(device) / GIB,
               f"memory/{phase}_peak_allocated_gib_max": torch.cuda.max_memory_allocated(device) / GIB}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    return {f"memory/{phase}_rss_gib_max": psutil.Process().memory_info().rss / GIB}

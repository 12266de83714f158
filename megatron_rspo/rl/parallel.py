"""Cross-rank plumbing for RL: metric reductions over data-parallel ranks.

(Routing records across TP/SP and PP stages land here with the parallel-correctness work.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _dp_group():
    return parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None


def all_reduce_dp(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the data-parallel group (a no-op on one rank)."""
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, op=op, group=_dp_group())
    return t


def mean_over_dp(metrics: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over DP ranks (every rank must pass the same keys)."""
    if not metrics:
        return {}
    keys = sorted(metrics)
    t = all_reduce_dp(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
    n = parallel_state.get_data_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    return {k: float(v) / n for k, v in zip(keys, t.tolist())}


def max_over_dp(value: float) -> float:
    return float(all_reduce_dp(torch.tensor([float(value)], dtype=torch.float64), dist.ReduceOp.MAX)[0])

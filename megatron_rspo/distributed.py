"""The one place that decides devices and runs collectives (DESIGN §8).

- **Compute device**: where the model's parameters live (``cuda:LOCAL_RANK`` on GPU nodes, else CPU);
  every tensor the training loop creates goes there (``compute_device``).
- **Communication device**: what the process group's backend needs. NCCL only takes CUDA tensors,
  gloo takes CPU tensors (and CUDA ones, through a host copy). ``comm_device(group)`` answers per group,
  and every collective here moves its tensor there and back, so a caller never thinks about it.

Every collective of the training loop goes through this module or through ``rl/parallel.py`` and
``rl/routing_exchange.py`` (RL's routing plumbing, built on these); ``checkpoint.py`` and ``convert/``
use their own object collectives. ``tests/test_device_discipline.py`` checks that no other module calls
``torch.distributed`` collectives directly. Reductions take and return tensors: a caller that needs a
Python number syncs once, where it logs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def compute_device() -> torch.device:
    """The device this process computes on: its local GPU when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (the model's device is the compute device)."""
    for p in module.parameters():
        return p.device
    return compute_device()


def comm_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device a collective over ``group`` needs its tensors on: CUDA for NCCL, CPU for gloo."""
    if not initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size(group: Optional[dist.ProcessGroup] = None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def _on_comm(t: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    dev = comm_device(group)
    return t if t.device == dev else t.to(dev)


def all_reduce(t: torch.Tensor, op: dist.ReduceOp = ReduceOp.SUM,
               group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """In-place all-reduce of ``t`` over ``group`` (a no-op for one rank), on the backend's device;
    ``t`` keeps its own device. Returns ``t``."""
    if world_size(group) == 1:
        return t
    buf = _on_comm(t.contiguous(), group)
    dist.all_reduce(buf, op=op, group=group)
    if buf.data_ptr() != t.data_ptr():
        t.copy_(buf)
    return t


def all_gather(t: torch.Tensor, group: Optional[dist.ProcessGroup] = None, dim: int = 0) -> torch.Tensor:
    """Concatenation along ``dim`` of every rank's ``t`` (same shape on every rank), no autograd."""
    n = world_size(group)
    if n == 1:
        return t
    buf = _on_comm(t.detach().contiguous(), group)
    parts = [torch.empty_like(buf) for _ in range(n)]
    dist.all_gather(parts, buf, group=group)
    return torch.cat(parts, dim=dim).to(t.device)


def all_gather_object(obj: object, group: Optional[dist.ProcessGroup] = None) -> list:
    """Every rank's ``obj`` (set-up only: pickles through the host)."""
    out: list = [None] * world_size(group)
    if len(out) == 1:
        return [obj]
    dist.all_gather_object(out, obj, group=group)
    return out


def agree_int(value: int, op: dist.ReduceOp, group: Optional[dist.ProcessGroup] = None) -> int:
    """An integer reduced over ``group`` (a host value every rank needs, e.g. a loop bound)."""
    if world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=comm_device(group))
    dist.all_reduce(t, op=op, group=group)
    return int(t[0])


def barrier(group: Optional[dist.ProcessGroup] = None) -> None:
    if world_size(group) > 1:
        dist.barrier(group=group)


def reduce_scalars(values: dict[str, torch.Tensor | float], ops: dict[str, str],
                   group: Optional[dist.ProcessGroup] = None, device: Optional[torch.device] = None
                   ) -> dict[str, float]:
    """Reduce named scalars over ``group`` with one collective per kind of reduction, then one host
    sync: ``ops[name]`` is "mean" (the default), "sum", "max" or "min". Every rank passes the same names."""
    if not values:
        return {}
    device = device or comm_device(group)
    n = world_size(group)
    out: dict[str, float] = {}
    for kind, red in (("sum", ReduceOp.SUM), ("mean", ReduceOp.SUM), ("max", ReduceOp.MAX), ("min", ReduceOp.MIN)):
        names = sorted(k for k in values if ops.get(k, "mean") == kind)
        if not names:
            continue
        t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()).to(device)
                         for k in names])
        all_reduce(t, red, group)
        if kind == "mean":
            t = t / n
        out.update(zip(names, t.tolist()))
    return out


def stack_on(device: torch.device, values: Sequence[torch.Tensor | float]) -> torch.Tensor:
    """Scalars (tensors on any device, or floats) as one fp64 vector on ``device`` (no host sync)."""
    return torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device).reshape(()) for v in values])

"""Where rollout engines sit: the trainer's world split into engine groups.

Engine group g is the ``ranks_per_engine`` consecutive global ranks ``[g*R, (g+1)*R)``; its first rank (the
driver) runs one engine on the group's devices (colocated: the group's GPUs, or on a CPU machine its share
of the cores) and generates every member's prompts in one batched call. Megatron orders ranks TP first,
so a group of R ranks holds whole tensor-parallel groups when R is a multiple of TP: TP peers submit
identical prompts and seeds, which the driver generates once. ``ranks_per_engine = world`` is the old
topology (one engine for the whole job).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rspo import distributed


@dataclass(frozen=True)
class EnginePlacement:
    rank: int
    world: int
    ranks_per_engine: int
    group: Optional[dist.ProcessGroup] = None  # this rank's engine group (gloo); None when it is alone

    @property
    def engine_index(self) -> int:
        return self.rank // self.ranks_per_engine

    @property
    def driver(self) -> int:
        return self.engine_index * self.ranks_per_engine

    @property
    def drivers(self) -> list[int]:
        return list(range(0, self.world, self.ranks_per_engine))

    @property
    def is_driver(self) -> bool:
        return self.rank == self.driver

    @property
    def num_engines(self) -> int:
        return self.world // self.ranks_per_engine


FLAG = "--rollout-tensor-parallel-size"


def placement_errors(world: int, ranks_per_engine: int, tensor_parallel: int = 1, pipeline_parallel: int = 1
                     ) -> list[str]:
    """Problems of an engine layout, named by flag (empty when it is valid). TP peers and pipeline stages of
    a data-parallel replica submit the same prompts: they must share an engine, or every prompt would be
    generated once per peer."""
    if ranks_per_engine < 1 or world % ranks_per_engine:
        return [f"{FLAG} ({ranks_per_engine}) must divide the world size ({world})"]
    if ranks_per_engine == world:
        return []
    if pipeline_parallel > 1:
        return [f"{FLAG} ({ranks_per_engine}): with pipeline parallelism a replica's stages are not adjacent "
                f"ranks, so they cannot share a smaller engine group; use {FLAG} {world} (one engine)"]
    if ranks_per_engine % tensor_parallel:
        return [f"{FLAG} ({ranks_per_engine}) must be a multiple of --tensor-model-parallel-size "
                f"({tensor_parallel}): TP peers submit the same prompts and must share an engine"]
    return []


def place_engines(ranks_per_engine: Optional[int] = None) -> EnginePlacement:
    """This rank's placement (collective: every rank creates every engine group, in the same order).
    ``ranks_per_engine`` None: the whole world shares one engine."""
    world, rank = distributed.world_size(), distributed.rank()
    per = world if ranks_per_engine is None else ranks_per_engine
    errors = placement_errors(world, per)
    if errors:
        raise ValueError(errors[0])
    group = None
    if distributed.initialized() and per > 1:
        for start in range(0, world, per):  # gloo: the engine groups exchange small host objects only
            g = dist.new_group(list(range(start, start + per)), backend="gloo")
            if start <= rank < start + per:
                group = g
    return EnginePlacement(rank, world, per, group)


def engine_devices(placement: EnginePlacement, tensor_parallel: int) -> dict[str, str]:
    """Environment that binds the driver's engine to its group's devices (applied while the engine's
    processes start): on CUDA the GPUs of the group's first ``tensor_parallel`` ranks on this node; on a
    CPU machine an equal share of this process's cores per engine on the node."""
    local_rank = int(os.environ.get("LOCAL_RANK", placement.rank))
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids[local_rank: local_rank + tensor_parallel])}
    if placement.num_engines == 1:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", placement.world))
    engines_here = max(1, local_world // placement.ranks_per_engine)
    share = max(1, len(cores) // engines_here)
    mine = (local_rank // placement.ranks_per_engine) % engines_here
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores[mine * share: (mine + 1) * share] or cores[:1]))}

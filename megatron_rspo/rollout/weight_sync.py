"""Trainer side of a weight sync: the live Megatron model's weights, in HF names and layout, into every rollout
engine (``--rollout-weight-sync``). Collective over the world: every rank runs the same exchanges.

- ``handles`` (default): each engine's driver receives, unit by unit, only what it lacks, from the nearest
  rank holding it (``convert/live_export.engine_weight_units``: point to point, exact sizes, nothing through
  global rank 0), stages whole units in a memory slot the engine's worker maps (``weight_handles``:
  shared memory on CPU, CUDA IPC on GPU) and has the worker load it in place while it stages the next.
  The engine starts from dummy weights and gets the real ones by the first sync: no model on disk.
- ``file``: the earlier path, kept as the fallback and the measured baseline: each unit gathered to each
  driver in turn, written as safetensors bucket files into /dev/shm, read back by the worker.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_rspo import distributed
from megatron_rspo.config import ModelConfig
from megatron_rspo.rollout.placement import EnginePlacement
from megatron_rspo.rollout.vllm_worker import DONE_FILE, bucket_file
from megatron_rspo.rollout.weight_handles import StagingSlots

MODES = ("handles", "file")


@dataclass
class SyncStats:
    seconds: float = 0.0  # the whole sync, on this rank
    engine_load_seconds: float = 0.0  # inside the engine: vLLM loading and post-processing the weights
    bytes_staged: int = 0  # bytes handed to this rank's engine (0 on other ranks)
    # the driver's side of a handles sync: collecting units (exchanges, assembly), staging them, waiting for
    # the engine to finish a bucket
    collect_seconds: float = 0.0
    stage_seconds: float = 0.0
    wait_seconds: float = 0.0


def unit_buckets(units: Iterator[tuple[Any, dict[str, torch.Tensor]]], limit: int,
                 dtype: Optional[torch.dtype] = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Whole units grouped into buckets of at most ``limit`` bytes in ``dtype`` (default: the tensors' own; a
    bigger unit alone): vLLM post-processes a layer once all its weights arrived, so a unit never straddles
    two buckets."""
    items: list[tuple[str, torch.Tensor]] = []
    size = 0
    for _, tensors in units:
        nbytes = sum(t.numel() * (dtype or t.dtype).itemsize for t in tensors.values())
        if items and size + nbytes > limit:
            yield items
            items, size = [], 0
        items += list(tensors.items())
        size += nbytes
    if items:
        yield items


class WeightSync:
    """One per VLLMEngine: pushes the model into the engines of ``placement`` (``llm``: this driver's engine)."""

    def __init__(self, mode: str, placement: EnginePlacement, model_cfg: ModelConfig, model_type: Optional[str],
                 dtype: torch.dtype, bucket_bytes: int, workdir: str, stage_device: Optional[torch.device] = None
                 ) -> None:
        if mode not in MODES:
            raise ValueError(f"--rollout-weight-sync must be one of {MODES}, got {mode!r}")
        self.mode, self.placement, self.model_cfg, self.model_type = mode, placement, model_cfg, model_type
        self.dtype, self.bucket_bytes, self.workdir = dtype, bucket_bytes, workdir
        self.stats = SyncStats()
        stage_device = stage_device or distributed.compute_device()
        self.slots = StagingSlots(stage_device, tag=f"{os.getpid()}") if mode == "handles" else None

    def push(self, model: Any, llm: Any, version: int) -> SyncStats:
        """The weights of ``model`` into every engine (collective); returns this sync's statistics."""
        t0 = time.perf_counter()
        stats = SyncStats()
        if self.mode == "handles":
            self._push_handles(model, llm, stats)
        else:
            stats.engine_load_seconds = self._push_files(model, llm, version)
        if llm is not None:
            # The prefix cache holds KV computed with the old weights (and, under R3, their routed experts); vLLM
            # does not drop it on a reload (vLLM PR #46125), so a shared prompt prefix would be decoded from stale KV.
            if not llm.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset its prefix cache after the weight sync")
        stats.seconds = time.perf_counter() - t0
        self.stats = stats
        return stats

    # ------------------------------------------------------------------ handles
    def _push_handles(self, model: Any, llm: Any, stats: SyncStats) -> None:
        from megatron_rspo.convert.live_export import engine_weight_units

        p = self.placement
        # nearest first: the engine's own group, then the driver's node (launchers number a node's ranks
        # consecutively), so with experts replicated per node nothing crosses nodes
        node = max(p.local_world, 1)
        near = {d: [*range(d, d + p.ranks_per_engine), *range(d // node * node, (d // node + 1) * node)]
                for d in p.drivers}
        units = engine_weight_units(model, self.model_cfg, self.model_type, dsts=p.drivers, near=near,
                                    dtype=self.dtype, device=self.slots.device)
        if llm is None:  # not a driver: serve the exchanges
            for _ in units:
                pass
            return
        llm.collective_rpc("begin_update")
        loading: Optional[_Background] = None
        buckets = unit_buckets(units, self.bucket_bytes, self.dtype)
        while True:
            t0 = time.perf_counter()
            bucket = next(buckets, None)
            t1 = time.perf_counter()
            stats.collect_seconds += t1 - t0
            if bucket is not None:
                # the other slot: the worker may still read the previous one; the model's own tensors cast here
                handle = self.slots.stage(bucket, self.dtype)
                stats.bytes_staged += handle["nbytes"]
            t2 = time.perf_counter()
            if loading is not None:
                loading.join()
            stats.stage_seconds += t2 - t1
            stats.wait_seconds += time.perf_counter() - t2
            if bucket is None:
                break
            loading = _Background(llm.collective_rpc, "load_bucket", args=(handle,))
        stats.engine_load_seconds = max(llm.collective_rpc("finish_update"))
        if self.slots.device.type == "cuda":  # between syncs the trainer's GPU memory is the trainer's
            self.slots.close()

    # ------------------------------------------------------------------ file stream
    def file_buckets(self, model: Any) -> Iterator[tuple[int, Any]]:
        """(index, bucket) of the whole model, on each engine's driver (none elsewhere); collective: every rank
        streams its shards to every driver in turn (one gather per engine)."""
        from megatron_rspo.convert.live_export import hf_weight_buckets

        for driver in self.placement.drivers:
            yield from enumerate(hf_weight_buckets(model, self.model_cfg, self.model_type, dst=driver,
                                                   bucket_bytes=self.bucket_bytes, dtype=self.dtype))

    def _push_files(self, model: Any, llm: Any, version: int) -> float:
        from safetensors.torch import save_file

        stream = os.path.join(self.workdir, f"sync_{version}")
        reload = None
        if llm is not None:
            os.makedirs(stream)
            reload = _Background(llm.collective_rpc, "reload_from_stream", args=(stream,))
        for i, bucket in self.file_buckets(model):
            _wait_for_room(stream, i, reload)
            tmp = os.path.join(stream, f".tmp_{i}")
            save_file({k: v.contiguous() for k, v in bucket}, tmp)
            os.rename(tmp, bucket_file(stream, i))  # atomic: the worker never sees a partial bucket
        if reload is None:
            return 0.0
        open(os.path.join(stream, DONE_FILE), "w").close()
        reload.join()
        shutil.rmtree(stream, ignore_errors=True)
        return max(reload.result)

    def close(self) -> None:
        if self.slots is not None:
            self.slots.close()


class _Background:
    """Runs a blocking call in a thread (the engine loads one bucket while we prepare the next)."""

    def __init__(self, fn, *args, **kwargs) -> None:
        self.error: Optional[BaseException] = None
        self.result: Any = None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, fn, args, kwargs) -> None:
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in join()
            self.error = e

    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"vLLM weight update failed: {self.error}") from self.error


def _wait_for_room(stream: str, index: int, reload: Optional[_Background], pending: int = 2) -> None:
    """Back-pressure: at most ``pending`` unread bucket files exist (the worker deletes each it has read)."""
    if reload is None:
        return
    while os.path.exists(bucket_file(stream, index - pending)):
        if not reload.alive():
            reload.join()  # raises the worker's error
            raise RuntimeError("the vLLM worker stopped reading weight buckets")
        time.sleep(0.002)

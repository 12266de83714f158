"""Weight buckets handed to an engine's worker without files or copies through a pipe: the trainer stages a
bucket in memory the worker can map (POSIX shared memory on a CPU machine, the GPU buffer itself through
CUDA IPC on one), and sends only a small handle (names, dtypes, shapes, byte offsets, and the memory's
name or IPC handle). The worker views the tensors in place and loads them (``rollout/vllm_worker.py``).

Both sides live here, so the handle format is written once; torch and the standard library only (vLLM
imports the worker side in its own processes).

Two slots alternate: the trainer stages bucket i+1 in one while the worker loads bucket i from the other,
and reuses a slot only after the worker returned from it. A worker that must keep a tensor beyond its
call (vLLM buffers the weights of a layer until the layer is complete) copies it first
(``vllm_worker.release_slot``), so the slot can be overwritten.
"""

from __future__ import annotations

import mmap
import os
import pickle
import secrets
from multiprocessing import shared_memory
from typing import Any, Optional

import torch

_ALIGN = 256  # each tensor starts aligned, so any dtype can view it (and CUDA kernels like the alignment)
Bucket = list[tuple[str, torch.Tensor]]


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def layout(bucket: Bucket, dtype: Optional[torch.dtype] = None) -> tuple[list[tuple[str, str, list[int], int]], int]:
    """(items: name, dtype name, shape, byte offset) and the bytes a slot needs for ``bucket``, each tensor in
    ``dtype`` (default: its own)."""
    items, offset = [], 0
    for name, t in bucket:
        dt = dtype or t.dtype
        items.append((name, str(dt).removeprefix("torch."), list(t.shape), offset))
        offset += _aligned(t.numel() * dt.itemsize)
    return items, offset


def _views(base: torch.Tensor, items: list) -> Bucket:
    """The bucket's tensors as views of a slot's bytes (``base``: uint8)."""
    out = []
    for name, dtype, shape, offset in items:
        dt = getattr(torch, dtype)
        n = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        out.append((name, base[offset: offset + n].view(dt).view(shape)))
    return out


class StagingSlots:
    """Trainer side: two alternating slots on ``device`` (CPU: shared memory; CUDA: device memory shared
    through IPC), grown when a bucket is bigger than the slot."""

    def __init__(self, device: torch.device, tag: str = "") -> None:
        # unique per instance: several engines (or runs) in one process each own their segments
        self.device, self.tag = device, f"{tag or os.getpid()}_{secrets.token_hex(4)}"
        self.slots: list[Optional[tuple[Any, torch.Tensor]]] = [None, None]  # (owner, uint8 view)
        self.handles: dict[int, dict] = {}  # slot -> what the worker needs to map it
        self.turn = 0
        self.created = 0

    def stage(self, bucket: Bucket, dtype: Optional[torch.dtype] = None) -> dict:
        """Copy ``bucket`` into the next slot, cast to ``dtype`` on the way (default: as is); returns the handle
        the worker opens. The caller must not stage into a slot the worker is still reading (the two slots
        alternate: wait for call i before i+2)."""
        items, nbytes = layout(bucket, dtype)
        k, self.turn = self.turn, 1 - self.turn
        slot = self.slots[k]
        if slot is None or slot[1].numel() < nbytes:
            self._free(k)
            slot = self.slots[k] = self._allocate(max(nbytes, 1))
        owner, base = slot
        with torch.no_grad():
            for (_, t), (_, view) in zip(bucket, _views(base, items)):
                view.copy_(t, non_blocking=True)
        if base.is_cuda:  # the worker reads through its own context: the copies must have landed
            torch.cuda.current_stream(base.device).synchronize()
        if k not in self.handles:  # exported once per slot (a CUDA IPC export is a refcounted record each time)
            self.handles[k] = self._describe(owner, base)
        return {"items": items, "nbytes": nbytes, **self.handles[k]}

    def _allocate(self, nbytes: int) -> tuple[Any, torch.Tensor]:
        self.created += 1
        if self.device.type == "cuda":
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            return buf, buf
        name = f"rspo_w_{self.tag}_{self.created}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        return shm, torch.frombuffer(shm.buf, dtype=torch.uint8)

    def _describe(self, owner: Any, base: torch.Tensor) -> dict:
        if base.is_cuda:
            from torch.multiprocessing.reductions import reduce_tensor

            _, args = reduce_tensor(base)
            uuid = str(torch.cuda.get_device_properties(base.device).uuid)
            return {"kind": "cuda_ipc", "gpu_uuid": uuid, "ipc": pickle.dumps(args)}
        return {"kind": "shm", "name": owner.name}

    def _free(self, k: int) -> None:
        slot, self.slots[k] = self.slots[k], None
        self.handles.pop(k, None)
        if slot is None:
            return
        owner, base = slot
        del base
        if isinstance(owner, shared_memory.SharedMemory):
            owner.close()
            owner.unlink()

    def close(self) -> None:
        for k in range(len(self.slots)):
            self._free(k)


class OpenedSlots:
    """Worker side: the slots a trainer staged, mapped once each and kept open until ``close``."""

    def __init__(self) -> None:
        self.mapped: dict[str, tuple[Any, torch.Tensor]] = {}

    def open(self, handle: dict) -> tuple[Bucket, tuple[int, int]]:
        """The bucket's tensors (views, no copy) and the slot's address range [start, end)."""
        key = handle["name"] if handle["kind"] == "shm" else handle["ipc"]
        if key not in self.mapped:
            self.mapped[key] = self._map(handle)
        base = self.mapped[key][1]
        start = base.untyped_storage().data_ptr()
        return _views(base, handle["items"]), (start, start + handle["nbytes"])

    @staticmethod
    def _map(handle: dict) -> tuple[Any, torch.Tensor]:
        if handle["kind"] == "shm":
            # mapped directly, not through SharedMemory: Python < 3.13 would register the segment with the
            # resource tracker this process shares with the trainer, which owns (and unlinks) it
            fd = os.open(os.path.join("/dev/shm", handle["name"]), os.O_RDWR)
            try:
                mem = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            return mem, torch.frombuffer(mem, dtype=torch.uint8)
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        args = list(pickle.loads(handle["ipc"]))
        args[6] = _device_of(handle["gpu_uuid"])  # the index of the trainer's GPU as this process numbers it
        base = rebuild_cuda_tensor(*args)
        return base, base

    def close(self) -> None:
        """Drop the mappings (a shared-memory mapping stays alive while a tensor still views it)."""
        self.mapped.clear()


def _device_of(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise RuntimeError(f"the trainer's GPU {uuid} is not visible to this engine worker (CUDA IPC needs the "
                       "engine on the trainer's node, with that GPU among its CUDA_VISIBLE_DEVICES)")


def in_range(t: torch.Tensor, span: tuple[int, int]) -> bool:
    """Whether ``t``'s memory lies in the slot ``span`` (a view the worker must copy before the slot is reused)."""
    ptr = t.untyped_storage().data_ptr()
    return span[0] <= ptr < span[1]

"""The measuring side of the memory planner: the bytes of every tensor storage alive on one device, and their
peak, while a piece of code runs (a ``TorchDispatchMode`` that sees every allocation, forward and backward,
and a weak reference that sees every release). What the code does not allocate itself (parameters,
gradient buffers, optimizer state made before) is counted as ``resident``.

Used to validate the planner on CPU (``tests/test_memory_planner.py``, ``tools/plan_memory.py --validate``)
and on a GPU by the GPU check, where ``torch.cuda.max_memory_allocated`` says the same from the allocator.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class PeakTracker(TorchDispatchMode):
    """``with PeakTracker(resident=...) as t: step()`` -> ``t.peak``: resident bytes plus the most bytes of
    storages allocated inside the block and alive at once."""

    def __init__(self, resident: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.resident_ptrs = {t.untyped_storage().data_ptr() for t in resident if isinstance(t, torch.Tensor)}
        self.resident = storage_bytes(resident)
        self.live: dict[int, int] = {}
        self.current = 0
        self.transient_peak = 0

    @property
    def peak(self) -> int:
        return self.resident + self.transient_peak

    def _free(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr in self.live or ptr in self.resident_ptrs or st.nbytes() == 0:
                continue
            self.live[ptr] = st.nbytes()
            self.current += st.nbytes()
            self.transient_peak = max(self.transient_peak, self.current)
            weakref.finalize(st, self._free, ptr)
        return out

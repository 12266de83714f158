"""The one place that decides devices and runs collectives (DESIGN §8).

- **Compute device**: where the model's parameters live (``cuda:LOCAL_RANK`` on GPU nodes, else CPU);
  every tensor the training loop creates goes there (``compute_device``).
- **Communication device**: what the process group's backend needs. NCCL only takes CUDA tensors,
  gloo takes CPU tensors (and CUDA ones, through a host copy). ``comm_device(group)`` answers per group,
  and every collective here moves its tensor there and back, so a caller never thinks about it.

Every collective of the training loop goes through this module or through ``rl/parallel.py`` and
``rl/routing_exchange.py`` (RL's routing plumbing, built on these); ``checkpoint.py`` and the offline
``convert/`` tools use their own object collectives. ``tests/test_device_discipline.py`` checks that no
other module calls ``torch.distributed`` collectives directly. Reductions take and return tensors: a
caller that needs a Python number syncs once, where it logs.
"""

from __future__ import annotations

import io
import os
import pickle
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


def new_group_like_world() -> Optional[dist.ProcessGroup]:
    """A gloo group of every rank, with a communicator of its own (collective to create): for small host-side
    agreements made in a thread while the main thread's collectives run on the world's groups."""
    return dist.new_group(list(range(dist.get_world_size())), backend="gloo") if initialized() else None


def world_size(group: Optional[dist.ProcessGroup] = None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if initialized() else 0


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


_ALIGN = 64  # every tensor's bytes start aligned, so a byte slice can be viewed as any dtype


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class _TensorPickler(pickle.Pickler):
    """Pickles an object with its tensors left out (``persistent_id``): they travel as raw bytes, at the
    offsets (after the skeleton) recorded in their ids."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[tuple[int, torch.Tensor]] = []
        self.nbytes = 0

    def persistent_id(self, obj: object) -> Optional[tuple]:
        if not isinstance(obj, torch.Tensor):
            return None
        self.tensors.append((self.nbytes, obj))
        pid = (self.nbytes, obj.dtype, tuple(obj.shape))
        self.nbytes += _aligned(obj.numel() * obj.element_size())
        return pid


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, skeleton: memoryview, payload: torch.Tensor) -> None:
        super().__init__(io.BytesIO(skeleton))
        self.payload = payload

    def persistent_load(self, pid: tuple) -> torch.Tensor:
        off, dtype, shape = pid
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        return self.payload[off: off + size].view(dtype).view(shape)


def gather_object(obj: object, dst: int = 0, group: Optional[dist.ProcessGroup] = None) -> Optional[list]:
    """Every rank's ``obj`` (in group order) on global rank ``dst``, None elsewhere; collective over ``group``.

    Tensors inside ``obj`` (on any device) are not pickled: each rank copies their bytes straight into one
    send buffer on the backend's device (pinned host memory when gloo ships CUDA tensors, then one host
    sync), and ``dst`` gets them as CPU tensors viewing its receive buffers; ``dst``'s own ``obj`` comes
    back as is, uncopied. Two collectives: an all-gather of the sizes, a gather of the buffers (padded to
    the largest), so ``dst`` ends up holding the other ranks' tensors once, plus padding (gloo's gather
    stages them once more while receiving; NCCL receives on the GPU, then copies to the host)."""
    n = world_size(group)
    if n == 1:
        return [obj]
    me, dev = dist.get_rank(), comm_device(group)
    skeleton, pickler = io.BytesIO(), None
    if me != dst:
        pickler = _TensorPickler(skeleton)
        pickler.dump(obj)
    skel = skeleton.tell()
    header = torch.tensor([[skel, _aligned(skel) + (pickler.nbytes if pickler else 0)]], dtype=torch.long)
    lengths = all_gather(header, group).tolist()  # [skeleton bytes, buffer bytes] per rank
    longest = max(length for _, length in lengths)
    if pickler is not None:
        pin = dev.type == "cpu" and any(t.is_cuda for _, t in pickler.tensors)
        buf = torch.empty(longest, dtype=torch.uint8, device=dev, pin_memory=pin)
        buf[:skel].copy_(torch.frombuffer(skeleton.getbuffer(), dtype=torch.uint8))
        payload = buf[_aligned(skel):]
        with torch.no_grad():
            for off, t in pickler.tensors:  # a view of the buffer in t's dtype and shape (copy_ handles strides)
                size = t.numel() * t.element_size()
                payload[off: off + size].view(t.dtype).view(t.shape).copy_(t, non_blocking=True)
        if pin:  # gloo reads host memory on its own threads: the async device->host copies must be done
            torch.cuda.current_stream().synchronize()
        dist.gather(buf, None, dst=dst, group=group)
        return None
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    recv = [torch.empty(longest, dtype=torch.uint8, device=dev) for _ in ranks]
    dist.gather(recv[ranks.index(dst)], recv, dst=dst, group=group)
    out: list = []
    for r, b, (skel, _) in zip(ranks, recv, lengths):
        if r == dst:
            out.append(obj)
            continue
        b = b.cpu()
        out.append(_TensorUnpickler(memoryview(b[:skel].numpy()), b[_aligned(skel):]).load())
    return out


def exchange(sends: dict[int, torch.Tensor], recv_numels: dict[int, int], dtype: torch.dtype
             ) -> dict[int, torch.Tensor]:
    """Point-to-point over the world: ``sends[r]`` (a flat tensor of ``dtype``) goes to global rank r, and from
    each rank r in ``recv_numels`` a flat tensor of that many elements arrives (returned per rank, on the
    backend's device). Exact sizes, no padding and no third rank involved; every rank passes what it sends
    and expects (the two sides agree by construction), ranks with neither may skip the call. One batch
    (NCCL groups it, so ranks that send to each other cannot deadlock)."""
    dev = comm_device()
    ops, out = [], {}
    for peer, t in sorted(sends.items()):
        ops.append(dist.P2POp(dist.isend, _on_comm(t.contiguous(), None), peer))
    for peer, n in sorted(recv_numels.items()):
        out[peer] = torch.empty(n, dtype=dtype, device=dev)
        ops.append(dist.P2POp(dist.irecv, out[peer], peer))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
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



def scatter_object(objs: Optional[list], src: int = 0, group: Optional[dist.ProcessGroup] = None) -> object:
    """Rank ``src`` hands ``objs[i]`` to the i-th rank of ``group`` (pickled: small host objects such as
    token lists); every rank returns its own."""
    if world_size(group) == 1:
        return objs[0]
    out: list = [None]
    dist.scatter_object_list(out, objs if dist.get_rank() == src else None, src=src, group=group)
    return out[0]

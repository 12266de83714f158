"""Read arbitrary slices of the global tensors of a Megatron ``torch_dist`` checkpoint, on one process.

Megatron's ``dist_checkpointing.load`` cannot load part of a tensor in a 1-process world (it places
the other shards on "another rank", which must exist), so this goes one level down, to PyTorch
Distributed Checkpoint (the ``torch_dist`` format): a small LoadPlanner asks the storage reader for
exactly the requested region of each tensor. No process group is needed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_rspo.convert.common import ConversionError
from megatron_rspo.state_keys import canonical_key


class _RegionPlanner(LoadPlanner):
    """Reads ``{fqn: (offsets, buffer)}``: the region of global tensor ``fqn`` at ``offsets`` into ``buffer``."""

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
        self.regions = regions

    def set_up_planner(self, state_dict: Any, metadata: Metadata | None = None, is_coordinator: bool = False,
                       **kwargs: Any) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for fqn, (offsets, buf) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.shape)
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        raise ConversionError(f"unexpected non-tensor item {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        buf = self.regions[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            buf = buf.narrow(dim, start, length)
        return buf  # the reader copies into this view

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class GlobalTensorReader:
    """Shapes/dtypes of every tensor in a Megatron checkpoint, and reads of whole tensors or index slices."""

    def __init__(self, path: str) -> None:
        self.path = path
        cfg_file = os.path.join(path, "metadata.json")
        backend = json.load(open(cfg_file)).get("sharded_backend") if os.path.isfile(cfg_file) else None
        if backend != "torch_dist":
            raise ConversionError(f"{path}: sharded backend {backend!r}; only torch_dist checkpoints can be exported")
        self.reader = dcp.FileSystemReader(path)
        md = self.reader.read_metadata().state_dict_metadata
        # by canonical key (a checkpoint of the TE spec may spell a key its own way, state_keys.py)
        self.stored = {canonical_key(k): k for k, v in md.items() if isinstance(v, TensorStorageMetadata)}
        self.meta = {c: md[k] for c, k in self.stored.items()}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.meta[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.meta[key].properties.dtype

    def read(self, keys: list[str], index: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
        """``key[index]`` for each key (``index`` selects along the leading axes, e.g. ``(layer,)``)."""
        regions = {}
        for key in keys:
            shape = self.shape(key)
            buf = torch.empty(shape[len(index):], dtype=self.dtype(key))
            regions[self.stored[key]] = (tuple(index) + (0,) * (len(shape) - len(index)),
                                         buf.view((1,) * len(index) + buf.shape))
        dcp.load({}, storage_reader=self.reader, planner=_RegionPlanner(regions), no_dist=True)
        return {key: regions[self.stored[key]][1].view(self.shape(key)[len(index):]) for key in keys}

"""The published HF weight layout: ``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``.

Reading is lazy (one ``safe_open`` handle per shard, a couple kept open, a tensor copied out only when
asked for), so memory stays at the tensors being processed. Writing buffers tensors up to the shard
size, flushes each shard as it fills, and names the shards once their count is known.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_rspo.convert.common import ConversionError, Log, default_log

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")


class HFCheckpointReader:
    """Tensor names, shapes and (lazily) values of a safetensors checkpoint directory."""

    def __init__(self, hf_dir: str, max_open: int = 2) -> None:
        self.dir = hf_dir
        index = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as fh:
                self.weight_map: dict[str, str] = json.load(fh)["weight_map"]
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
            with safe_open(os.path.join(hf_dir, SINGLE_FILE), "pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            bins = [n for n in os.listdir(hf_dir) if n.endswith(".bin")] if os.path.isdir(hf_dir) else []
            hint = " (only .bin files found: re-save with safe_serialization)" if bins else ""
            raise ConversionError(f"no {INDEX_FILE} or {SINGLE_FILE} in {hf_dir}{hint}")
        for name in sorted(set(self.weight_map.values())):
            if not os.path.isfile(os.path.join(hf_dir, name)):
                raise ConversionError(f"{INDEX_FILE} names {name}, which is missing from {hf_dir}")
        self._open: OrderedDict[str, Any] = OrderedDict()
        self.max_open = max_open
        self.consumed: set[str] = set()

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shard_of(self, name: str) -> str:
        return self.weight_map[name]

    def _handle(self, file: str):
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        handle = safe_open(os.path.join(self.dir, file), "pt")
        self._open[file] = handle
        while len(self._open) > self.max_open:  # drop the mmap of a shard we are done with
            self._open.popitem(last=False)
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"tensor {name} is missing from {self.dir}")
        self.consumed.add(name)
        return self._handle(self.weight_map[name]).get_tensor(name)

    def close(self) -> None:
        self._open.clear()


class HFCheckpointWriter:
    """Write tensors in order into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""

    def __init__(self, out_dir: str, max_shard_bytes: int, log: Log = default_log) -> None:
        self.dir, self.max_bytes, self.log = out_dir, max_shard_bytes, log
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(out_dir):  # stale weights of an earlier export would mix with ours
            if name.startswith("model") and (name.endswith(".safetensors") or name == INDEX_FILE):
                os.remove(os.path.join(out_dir, name))
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temp file, names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max_bytes:
            self._flush()
        self._buf[name] = tensor.detach().contiguous()
        self._buf_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        tmp = f".model-part-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._buf, os.path.join(self.dir, tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._buf)))
        self.log(f"[megatron->hf] wrote shard {len(self._shards)} ({self._buf_bytes / 2**20:.1f} MiB, "
                 f"{len(self._buf)} tensors)")
        self._buf, self._buf_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush, give shards their final names, write the index. Returns the shard file names."""
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            shutil.move(os.path.join(self.dir, tmp), os.path.join(self.dir, final))
            files.append(final)
            weight_map.update(dict.fromkeys(names, final))
        with open(os.path.join(self.dir, INDEX_FILE), "w") as fh:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                      fh, indent=2)
        return files


def copy_non_weight_files(src: str, dst: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy tokenizer/generation-config files (everything but weights and their index)."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (not os.path.isfile(path) or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")
                or name in skip):
            continue
        shutil.copy2(path, os.path.join(dst, name))
        copied.append(name)
    return copied

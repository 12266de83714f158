"""Is a checkpoint intact? Every file a load will read, checked before any collective starts: the small files
(``metadata.json``, ``run_config.json``, ``common.pt``) parse, and every byte range the tensor index
(``.metadata``, PyTorch distributed checkpoint) points into exists in its ``.distcp`` file. A damaged
checkpoint is named with its file and problem; a resume then falls back to the newest intact one.
Reads the shared file system only, so every rank reaches the same verdict.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch


def damage(path: str) -> Optional[str]:
    """``"<file>: <problem>"`` for the first damaged file of the ``iter_*`` directory ``path``, or None."""
    for name in ("metadata.json", "run_config.json"):
        file = os.path.join(path, name)
        try:
            with open(file) as fh:
                json.load(fh)
        except (OSError, ValueError) as e:
            return f"{file}: {type(e).__name__}: {e}"
    common = os.path.join(path, "common.pt")
    try:
        torch.load(common, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - whatever a truncated pickle raises
        return f"{common}: {type(e).__name__}: {e}"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        index = FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001
        return f"{os.path.join(path, '.metadata')}: {type(e).__name__}: {e}"
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(needed.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"{file}: missing"
        if (size := os.path.getsize(file)) < end:
            return f"{file}: truncated ({size} of at least {end} bytes)"
    return None


def newest_intact(root: str, iterations: list[int], below: int) -> Optional[int]:
    """The newest of ``iterations`` older than ``below`` whose checkpoint is intact, or None."""
    from megatron_rspo.checkpoint import iter_dir_name

    for it in sorted((i for i in iterations if i < below), reverse=True):
        if damage(os.path.join(root, iter_dir_name(it))) is None:
            return it
    return None

"""Is a checkpoint intact? Every file a load will read, checked before any collective starts: the small files
(``metadata.json``, ``run_config.json``, ``common.pt``) parse, and every byte range the tensor index
(``.metadata``, PyTorch distributed checkpoint) points into exists in its ``.distcp`` file. A damaged
checkpoint is named with its file and problem; a resume then falls back to the newest intact one.
Reads the shared file system only, so every rank reaches the same verdict.
"""

from __future__ import annotations

import errno
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


def newest_intact(candidates: dict[int, str]) -> Optional[int]:
    """The newest iteration of ``candidates`` (iteration -> its directory) whose checkpoint is intact, or None."""
    for it in sorted(candidates, reverse=True):
        if damage(candidates[it]) is None:
            return it
    return None


NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


def write_problem(exc: BaseException) -> Optional[str]:
    """One line for a save that failed because the file system refused it (full, over quota, read-only, no
    permission), found anywhere in the exception's chain; None for anything else. torch.save on a full disk
    reports only ``unexpected pos``."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return f"{os.strerror(e.errno).lower()}" + (f" ({e.filename})" if e.filename else "")
        if "unexpected pos" in str(e):
            return "no space left on device (the write stopped short)"
        e = e.__cause__ or e.__context__
    return None


def space_needed(state: dict, free_bytes: int) -> Optional[str]:
    """A message when this rank's tensors of ``state`` (a sharded state dict) alone exceed ``free_bytes``."""
    from megatron_rspo.state_keys import sharded_tensors

    need = sum(sh.data.numel() * sh.data.element_size() for sh in sharded_tensors(state)
               if getattr(sh, "replica_id", 0) in (0, (0, 0, 0)) and sh.data is not None)
    if need > free_bytes:
        return f"no space left: the checkpoint needs at least {need / 1e9:.2f} GB, {free_bytes / 1e9:.2f} GB are free"
    return None

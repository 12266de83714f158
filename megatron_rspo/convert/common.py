"""Errors, progress and memory reporting shared by the conversion tools."""

from __future__ import annotations

import re
import resource
import sys
import time
from collections.abc import Callable

import torch

from megatron_rspo.errors import UserError

Log = Callable[[str], None]


class ConversionError(UserError, ValueError):
    """The checkpoint cannot be converted (unsupported architecture/feature, missing or misshapen tensors)."""


class UnsupportedModelError(ConversionError):
    """The HF model type or one of its features has no Megatron equivalent here."""


def default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / '10KB' / 1234 -> bytes (decimal units, like transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"cannot parse size {text!r} (use e.g. 2GB, 500MB)")
    num, unit = float(m.group(1)), (m.group(2) or "B")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(num * scale)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Progress:
    """Timestamped progress lines: ``[tag] 3/48 layer 2 ... (1.2s, peak RSS 812 MiB)``."""

    def __init__(self, tag: str, total: int, log: Log = default_log) -> None:
        self.tag, self.total, self.log, self.t0, self.n = tag, total, log, time.monotonic(), 0

    def step(self, what: str) -> None:
        self.n += 1
        self.log(f"[{self.tag}] {self.n}/{self.total} {what} ({time.monotonic() - self.t0:.1f}s, "
                 f"peak RSS {peak_rss_mib():.0f} MiB)")

"""Copy a digit string: a verifiable task on which even a random policy scores (partial credit).

For checks that an RL iteration really updates the policy (the GPU check, CI): on Countdown a random
model earns 0 everywhere, so its advantages, gradients and updates are all 0 and a test of "the weights
changed" would pass without any learning signal. Here a response earns half a point per target digit it
contains (as a multiset) over the target's length, and 1.0 for exactly the target's digits in order, so
the responses of a group differ and advantages are non-zero from the first iteration. Not a benchmark.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from megatron_rspo.tasks.data import load_rows

MAX_DIGITS = 32


@dataclass(frozen=True)
class CopyExample:
    digits: str


def _example(row: dict) -> CopyExample:
    d = row["digits"]
    if not (d.isascii() and d.isdigit() and 1 <= len(d) <= MAX_DIGITS):
        raise ValueError(f"field 'digits' must be 1 to {MAX_DIGITS} decimal digits, got {d!r}")
    return CopyExample(d)


def load_copy(path: str | Path) -> list[CopyExample]:
    """JSONL rows ``{"digits": "4712"}``; a bad row raises DataError naming file and line."""
    return load_rows(path, ["digits"], convert=_example)


def format_prompt(x: CopyExample) -> str:
    return f"copy: {' '.join(x.digits)} = "


def copy_reward(text: str, x: CopyExample) -> float:
    got = [c for c in text if c.isascii() and c.isdigit()]
    if got == list(x.digits):
        return 1.0
    overlap = sum((Counter(got) & Counter(x.digits)).values())
    return 0.5 * overlap / len(x.digits)


def make_examples(n: int, seed: int, length: int = 4) -> list[CopyExample]:
    rng = random.Random(seed)
    return [CopyExample("".join(rng.choice("0123456789") for _ in range(length))) for _ in range(n)]


def save_jsonl(examples: list[CopyExample], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for x in examples:
            fh.write(json.dumps({"digits": x.digits}) + "\n")

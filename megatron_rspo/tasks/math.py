"""MATH-style problems: local data, the prompt, answer extraction and a math-verify reward.

The reward is ``1.0`` when ``math_verify.verify(parse(reference), parse(answer))`` holds for the LAST
``\\boxed{...}`` (or ``\\fbox``, or ``<answer>...</answer>``) in the response, else ``format_score``
(default 0) when an answer was extracted, else 0.

Why a worker process: math-verify's own timeouts use ``signal.alarm``, which only works in the main
thread and cannot interrupt a long C-level computation (sympy/gmpy on ``9^{9^{9^{9}}}``). So every
check runs in one persistent helper process (math-verify's signal timeouts stay on inside it, in its
main thread); the parent waits at most ``timeout_s`` and kills and later respawns the helper when a
check overruns. The helper has an address-space limit, so a memory explosion is a MemoryError there,
not in the trainer. Model output is only parsed (by math-verify / sympy's LaTeX parser), never eval-ed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_rspo.tasks.data import load_rows

MATH_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
MAX_ANSWER_CHARS = 1000  # longer "answers" are not checked (parsing cost grows with length)


@dataclass(frozen=True)
class MathExample:
    problem: str
    answer: str  # the reference final answer (LaTeX, without \boxed)


# ----------------------------------------------------------------------------------------------
# Answer extraction
# ----------------------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped pair (\{, \}, \\, \b...) or a bare brace
_BARE_ARG = re.compile(r"\s+([^\s${}]+)")  # \boxed 5: one space-delimited token
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _brace_pairs(text: str, start: int) -> dict[int, int]:
    """Matching closing index for every balanced ``{`` at or after ``start`` (one linear pass;
    escaped ``\\{``/``\\}`` are literal braces, not grouping)."""
    stack: list[int] = []
    pairs: dict[int, int] = {}
    for m in _TOKENS.finditer(text, start):
        c = m.group()
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            pairs[stack.pop()] = m.start()
    return pairs


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept), or of
    ``\\boxed 5``; None if there is none or it is empty."""
    boxes = list(_BOX.finditer(text))
    if not boxes:
        return None
    pairs = _brace_pairs(text, boxes[0].end())
    for box in reversed(boxes):
        i = box.end()
        while i < len(text) and text[i] in " \t\n":
            i += 1
        if i < len(text) and text[i] == "{":
            close = pairs.get(i)
            if close is None:  # unterminated (e.g. a truncated generation): try an earlier box
                continue
            content = text[i + 1 : close].strip()
        else:
            bare = _BARE_ARG.match(text, box.end())
            if bare is None:
                continue
            content = bare.group(1).rstrip(".,;")
        if content:
            return content
    return None


def extract_answer(text: str) -> str | None:
    """The final answer: the last ``\\boxed{}``/``\\fbox{}``, else the last ``<answer>...</answer>``."""
    if not isinstance(text, str):
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(text)
    if tags and tags[-1].strip():
        return tags[-1].strip()
    return None


_SPACING = re.compile(r"\\[,;:! ]|\\left|\\right|\s+|\$")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def _normalize(answer: str) -> str:
    """Cheap canonical form for the exact-match fast path (skips the helper for identical answers)."""
    s = _TEXT.sub(r"\1", answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    return _SPACING.sub("", s).rstrip(".")


# ----------------------------------------------------------------------------------------------
# The verifier helper process
# ----------------------------------------------------------------------------------------------

# Runs in the helper (its main thread, so math-verify's signal timeouts work there too). One JSON
# request per line in, "1"/"0" per line out. Every error, MemoryError included, is a "0".
_WORKER_SRC = r"""
import json, logging, resource, sys
mem = int(sys.argv[1])
if mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
logging.disable(logging.CRITICAL)
from math_verify import parse, verify
sys.stdout.write("ready\n"); sys.stdout.flush()
for line in sys.stdin:
    ok = False
    try:
        req = json.loads(line)
        t = req["t"]
        gold = parse("\\boxed{" + req["gold"] + "}", parsing_timeout=t)
        pred = parse("\\boxed{" + req["pred"] + "}", parsing_timeout=t)
        ok = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=t))
    except BaseException:
        ok = False
    sys.stdout.write("1\n" if ok else "0\n"); sys.stdout.flush()
"""


class MathVerifier:
    """A persistent math-verify helper process with a hard wall-clock limit per check.
    Thread-safe (checks are serialised); survives ``fork`` (the child starts its own helper)."""

    def __init__(self, memory_mb: int = 4096, startup_timeout_s: float = 120.0):
        self.memory_mb, self.startup_timeout_s = memory_mb, startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._pid = os.getpid()
        self._buf, self._ready = b"", False
        self._lock = threading.Lock()
        self.restarts = 0  # helpers killed for overrunning (diagnostics)

    def _spawn(self) -> None:
        """Start a helper without waiting for it: after a kill the next one warms up in the background."""
        self._proc = subprocess.Popen(
            [sys.executable, "-P", "-c", _WORKER_SRC, str(self.memory_mb << 20)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a terminal Ctrl-C goes to the trainer, not the helper
        )
        self._buf, self._ready = b"", False

    def _ensure_ready(self) -> None:
        if self._pid != os.getpid():  # forked: the helper's pipes belong to the parent
            self._proc, self._pid = None, os.getpid()
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._spawn()
        if not self._ready:
            if self._readline(time.monotonic() + self.startup_timeout_s) != b"ready":
                self._kill()
                raise RuntimeError("math-verify helper failed to start (is math-verify installed?)")
            self._ready = True

    def _readline(self, deadline: float) -> bytes | None:
        """One output line, or None on EOF or when the deadline passes."""
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.strip()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                with contextlib.suppress(OSError):  # unflushed request to a dead helper
                    f.close()
            self._proc = None

    def check(self, reference: str, answer: str, timeout_s: float = 5.0) -> bool:
        """``verify(parse(reference), parse(answer))`` within ``timeout_s`` seconds (False past it)."""
        request = json.dumps({"gold": reference, "pred": answer, "t": max(1, math.ceil(timeout_s))}) + "\n"
        with self._lock:
            self._ensure_ready()
            try:
                self._proc.stdin.write(request.encode())
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._kill()
                return False
            line = self._readline(time.monotonic() + timeout_s)
            if line is None:  # overran (or died): kill it and warm up a fresh one for the next check
                self._kill()
                self._spawn()
                self.restarts += 1
                return False
            return line == b"1"

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._kill()


_default_verifier: MathVerifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> MathVerifier:
    """The process-wide helper used when no verifier is passed (started on first use)."""
    global _default_verifier
    with _default_lock:
        if _default_verifier is None:
            _default_verifier = MathVerifier()
            atexit.register(_default_verifier.close)
        return _default_verifier


# ----------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------


def math_reward(
    response: str,
    reference: str,
    *,
    timeout_s: float = 5.0,
    format_score: float = 0.0,
    verifier: MathVerifier | None = None,
) -> float:
    """1.0 if the response's final answer is equivalent to ``reference`` (math-verify), else
    ``format_score`` if an answer was extracted, else 0.0. Never raises on arbitrary text, and
    returns within about ``timeout_s`` (plus a one-off helper start-up)."""
    if isinstance(response, bytes):
        response = response.decode("utf-8", errors="replace")
    if not isinstance(response, str) or not isinstance(reference, str):
        return 0.0
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    if len(answer) > MAX_ANSWER_CHARS or not reference.strip():
        return format_score
    if _normalize(answer) == _normalize(reference):
        return 1.0
    ok = (verifier or default_verifier()).check(reference, answer, timeout_s)
    return 1.0 if ok else format_score


def score_batch(
    responses: Sequence[str],
    references: Sequence[str],
    *,
    timeout_s: float = 5.0,
    format_score: float = 0.0,
    verifier: MathVerifier | None = None,
) -> list[float]:
    """Rewards for aligned (response, reference) pairs."""
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses for {len(references)} references")
    return [
        math_reward(r, a, timeout_s=timeout_s, format_score=format_score, verifier=verifier)
        for r, a in zip(responses, references)
    ]


# ----------------------------------------------------------------------------------------------
# Data and prompts
# ----------------------------------------------------------------------------------------------


def load_math(
    path: str | Path,
    *,
    problem_field: str = "problem",
    answer_field: str | None = "answer",
    solution_field: str | None = "solution",
    limit: int | None = None,
) -> list[MathExample]:
    """Load MATH-style JSONL/parquet. The reference answer is ``answer_field`` when present (numbers
    are accepted and turned into strings), else the last ``\\boxed{}`` of ``solution_field``.
    A row with neither, or a solution without a box, raises ``DataError`` naming file:line."""
    optional = {k: v for k, v in (("answer", answer_field), ("solution", solution_field)) if v}

    def convert(row: dict) -> MathExample:
        answer = row.get("answer")
        if answer is not None:
            answer = str(answer).strip()
        elif "solution" in row:
            answer = extract_boxed(row["solution"])
            if answer is None:
                raise ValueError(f"field {solution_field!r} has no \\boxed{{}} answer to use as the reference")
        else:
            wanted = " or ".join(repr(f) for f in optional.values()) or "an answer field"
            raise ValueError(f"needs {wanted}")
        if not answer:
            raise ValueError("the reference answer is empty")
        return MathExample(row["problem"], answer)

    return load_rows(
        path, {"problem": problem_field}, optional=optional,
        types={"answer": (str, int, float)}, limit=limit, convert=convert,
    )


def format_prompt(example: MathExample | str, template: str = MATH_TEMPLATE) -> str:
    """The user message for a problem (wrap it in the model's chat template)."""
    problem = example.problem if isinstance(example, MathExample) else example
    return template.format(problem=problem)

"""Countdown: combine the given numbers with + - * / (each exactly once) to reach a target.

Arithmetic is exact (``fractions.Fraction``): intermediate results may be rational or negative, in the
solver and in the reward alike (TinyZero's convention), so anything the solver finds scores 1.0.
Unary minus is not allowed (classic Countdown has none), and neither is anything but integer
literals, the four binary operators and parentheses. Equations are parsed with ``ast`` and evaluated
by our own walker: model output is never ``eval``-ed.
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from megatron_rspo.tasks.countdown_solver import range_table, render, solve  # noqa: F401 (solve is part of this API)
from megatron_rspo.tasks.data import DataError

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
MAX_EQUATION_CHARS = 200
MAX_LITERAL = 10**6  # literals must have at most 6 digits
_EQUATION_CHARS = re.compile(r"[0-9+\-*/() \t\r\n]+")  # a whitelist checked before ast ever sees the text

TEMPLATES = ("tiny", "chat")
TINY_TEMPLATE = "numbers: {numbers} target: {target} <answer>"
CHAT_TEMPLATE = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)


@dataclass
class CountdownInstance:
    numbers: list[int]
    target: int
    solution: str  # a reference equation using each number exactly once

    def key(self) -> tuple[tuple[int, ...], int]:
        """Identity for deduplication: the multiset of numbers and the target."""
        return tuple(sorted(self.numbers)), self.target


@dataclass
class CountdownConfig:
    num_numbers: tuple[int, ...] = (3,)  # how many numbers per instance (chosen uniformly)
    min_number: int = 1
    max_number: int = 9
    min_target: int = 1
    max_target: int = 100
    sorted_numbers: bool = False  # present numbers sorted (easier for tiny models) or in sampled order

    def validate(self) -> None:
        if not self.num_numbers or any(not 2 <= k <= 5 for k in self.num_numbers):
            raise ValueError(f"num_numbers must be in 2..5, got {self.num_numbers}")
        if not 0 <= self.min_number <= self.max_number or self.max_number >= MAX_LITERAL:
            raise ValueError(f"bad number range [{self.min_number}, {self.max_number}]")
        if not 1 <= self.min_target <= self.max_target:
            raise ValueError(f"bad target range [{self.min_target}, {self.max_target}]")


# --- Instance generation and splits ---


def generate_instances(
    n: int, seed: int, config: CountdownConfig | None = None, exclude: Iterable[tuple] = ()
) -> list[CountdownInstance]:
    """``n`` unique solvable instances, deterministic in ``seed``; keys in ``exclude`` are skipped.

    Numbers are drawn uniformly (with replacement), then the target uniformly among the reachable
    integers in range; the reference solution is the solver's canonical one for that multiset."""
    cfg = config or CountdownConfig()
    cfg.validate()
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[CountdownInstance] = []
    attempts, max_attempts = 0, 50 * n + 10_000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"only {len(out)} of {n} unique instances found after {max_attempts} draws; "
                f"widen the number/target ranges or use more numbers ({cfg})"
            )
        k = rng.choice(cfg.num_numbers)
        nums = [rng.randint(cfg.min_number, cfg.max_number) for _ in range(k)]
        key_nums = tuple(sorted(nums))
        table = range_table(key_nums, cfg.min_target, cfg.max_target)
        if not table:
            continue
        target = rng.choice(sorted(table))
        if (key_nums, target) in seen:
            continue
        seen.add((key_nums, target))
        solution = render(table[target][1])[0]
        out.append(CountdownInstance(list(key_nums) if cfg.sorted_numbers else nums, target, solution))
    return out


def generate_splits(
    n_train: int, n_test: int, seed: int = 0, config: CountdownConfig | None = None, **overrides
) -> tuple[list[CountdownInstance], list[CountdownInstance]]:
    """Disjoint (train, test) splits. The test split depends only on (seed, n_test, config), so it
    stays fixed when the train size changes. ``overrides`` are CountdownConfig fields."""
    cfg = CountdownConfig(**{**(asdict(config) if config else {}), **overrides})
    if "num_numbers" in overrides:
        cfg.num_numbers = tuple(cfg.num_numbers)
    test = generate_instances(n_test, seed * 2 + 1, cfg)
    train = generate_instances(n_train, seed * 2 + 2, cfg, exclude=(i.key() for i in test))
    return train, test


# --- JSONL ---


def save_jsonl(instances: Iterable[CountdownInstance], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for inst in instances:
            f.write(json.dumps(asdict(inst)) + "\n")


def _check_row(row: object, verify: bool) -> CountdownInstance:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    missing = {"numbers", "target", "solution"} - row.keys()
    if missing:
        raise ValueError(f"missing field(s) {sorted(missing)}")
    nums, target, sol = row["numbers"], row["target"], row["solution"]
    if not isinstance(nums, list) or not nums or not all(type(x) is int for x in nums):
        raise ValueError(f"'numbers' must be a non-empty list of integers, got {nums!r}")
    if type(target) is not int:
        raise ValueError(f"'target' must be an integer, got {target!r}")
    if not isinstance(sol, str):
        raise ValueError(f"'solution' must be a string, got {sol!r}")
    inst = CountdownInstance(nums, target, sol)
    if verify and not is_correct(sol, inst):
        raise ValueError(f"solution {sol!r} does not reach {target} using each of {nums} exactly once")
    return inst


def load_jsonl(path: str | Path, verify: bool = True) -> list[CountdownInstance]:
    """Load instances; a malformed row raises DataError('<file>:<line>: <what is wrong>'), a ValueError.
    ``verify`` also checks that every reference solution is correct."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(_check_row(json.loads(line), verify))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise DataError(path, lineno, str(e)) from None
    if not out:
        raise DataError(path, None, "no rows (the file is empty)")
    return out


# --- Prompts ---


def format_prompt(inst: CountdownInstance, template: str = "tiny") -> str:
    """The prompt text; for "tiny" it ends with ``<answer>``, right where the model starts writing.
    For "chat" it is the user message (wrap it in the model's chat template)."""
    if template == "tiny":
        return TINY_TEMPLATE.format(numbers=" ".join(map(str, inst.numbers)), target=inst.target)
    if template == "chat":
        return CHAT_TEMPLATE.format(numbers=list(inst.numbers), target=inst.target)
    raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")


def sft_completion(inst: CountdownInstance, template: str = "tiny") -> str:
    """The SFT target completion (without EOS; the caller appends it)."""
    if template == "tiny":
        return inst.solution + ANSWER_CLOSE
    if template == "chat":
        return f"<think> {inst.solution} = {inst.target} </think>\n<answer> {inst.solution} </answer>"
    raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")


def response_prefix(template: str = "tiny") -> str:
    """Prompt tail that belongs to the answer: the "tiny" prompt already opened ``<answer>``."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    return ANSWER_OPEN if template == "tiny" else ""


def response_for_scoring(response: str, template: str = "tiny") -> str:
    """The text ``countdown_reward`` expects: the response with the template's answer prefix."""
    return response_prefix(template) + response




# --- Reward ---


class _Rejected(Exception):
    pass


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Constant):
        v = node.value
        if type(v) is not int or not 0 <= v < MAX_LITERAL:  # no bools, floats, strings, huge ints
            raise _Rejected
        used.append(v)
        return Fraction(v)
    if isinstance(node, ast.BinOp):
        a, b = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if isinstance(node.op, ast.Div):
            return a / b  # ZeroDivisionError is caught by the caller
    raise _Rejected  # names, calls, Pow, FloorDiv, UnaryOp, ...


def parse_equation(text: str) -> tuple[list[int], Fraction] | None:
    """(numbers used, exact value) of an equation such as ``(3+5)*7``, or None if it is not one.
    Only integer literals (<= 6 digits), binary + - * / and parentheses are accepted; no unary minus."""
    if not isinstance(text, str) or len(text) > MAX_EQUATION_CHARS:
        return None
    text = text.strip()
    if not text or not _EQUATION_CHARS.fullmatch(text):
        return None
    used: list[int] = []
    try:
        value = _evaluate(ast.parse(text, mode="eval").body, used)
    except (_Rejected, SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError, OverflowError):
        return None
    return used, value


def extract_answer(text: str) -> str | None:
    """Contents of the LAST ``<answer>...</answer>`` in ``text``, or None."""
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    return None if start < 0 else text[start + len(ANSWER_OPEN) : end]


def is_correct(equation: str, inst: CountdownInstance) -> bool:
    parsed = parse_equation(equation)
    return parsed is not None and Counter(parsed[0]) == Counter(inst.numbers) and parsed[1] == inst.target


def countdown_reward(
    response: str, inst: CountdownInstance, format_score: float = 0.1, full_score: float = 1.0, prefix: str = ""
) -> float:
    """Score ``prefix + response``: ``full_score`` if the last answer uses each number exactly once and
    equals the target, ``format_score`` if it is a well-formed equation but wrong, else 0.0.

    With the "tiny" template the prompt already opened ``<answer>``: pass
    ``prefix=response_prefix("tiny")`` (``score_batch`` does). Never raises on arbitrary text."""
    if isinstance(response, bytes):
        response = response.decode("utf-8", errors="replace")
    if not isinstance(response, str):
        return 0.0
    answer = extract_answer(prefix + response)
    if answer is None:
        return 0.0
    parsed = parse_equation(answer)
    if parsed is None:
        return 0.0
    used, value = parsed
    return full_score if Counter(used) == Counter(inst.numbers) and value == inst.target else format_score


def score_batch(
    responses: Sequence[str],
    instances: Sequence[CountdownInstance],
    template: str = "tiny",
    format_score: float = 0.1,
    full_score: float = 1.0,
) -> list[float]:
    """Rewards for aligned (response, instance) pairs, with the template's prefix applied."""
    if len(responses) != len(instances):
        raise ValueError(f"{len(responses)} responses for {len(instances)} instances")
    prefix = response_prefix(template)
    return [countdown_reward(r, i, format_score, full_score, prefix) for r, i in zip(responses, instances)]


def accuracy(rewards: Sequence[float], full_score: float = 1.0) -> float:
    """Fraction of rewards equal to the full score (0.0 for an empty batch)."""
    return sum(r >= full_score for r in rewards) / len(rewards) if len(rewards) else 0.0

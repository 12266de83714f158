"""The tasks the trainer and evaluation can run, behind one small interface (``--task``).

A task loads its examples from a local file, turns one into a prompt text, and scores a response text.
Prompts of the ``chat`` template are wrapped in the tokenizer's chat template when it has one (Hugging
Face tokenizers of instruct models); the tiny Countdown template is used as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_rspo.tasks import code as code_task
from megatron_rspo.tasks import copy_digits, countdown
from megatron_rspo.tasks import math as math_task
from megatron_rspo.tokenizer import Tokenizer


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[str], list[Any]]
    prompt_text: Callable[[Any, str], str]  # (example, template) -> the user prompt
    score: Callable[[str, Any, str], float]  # (response text, example, template) -> reward
    full_score: float = 1.0  # a reward counted as "solved" by the accuracy metric

    def prompt(self, example: Any, template: str, tok: Tokenizer) -> str:
        text = self.prompt_text(example, template)
        wrap = getattr(tok, "apply_chat_template", None)
        return wrap(text) if template != "tiny" and wrap is not None else text


TASKS: dict[str, Task] = {
    "countdown": Task(
        "countdown",
        load=countdown.load_jsonl,
        prompt_text=countdown.format_prompt,
        score=lambda text, x, template: countdown.countdown_reward(countdown.response_for_scoring(text, template), x),
    ),
    "math": Task(
        "math",
        load=math_task.load_math,
        prompt_text=lambda x, template: math_task.format_prompt(x),
        score=lambda text, x, template: math_task.math_reward(text, x.answer),
    ),
    "code": Task(
        "code",
        load=code_task.load_code,
        prompt_text=lambda x, template: code_task.format_prompt(x),
        score=lambda text, x, template: code_task.code_reward(text, x),
    ),
    "copy_digits": Task(
        "copy_digits",
        load=copy_digits.load_copy,
        prompt_text=lambda x, template: copy_digits.format_prompt(x),
        score=lambda text, x, template: copy_digits.copy_reward(text, x),
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]

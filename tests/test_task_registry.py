"""The task registry behind ``--task``: every task loads, prompts and scores through one interface."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_rspo.tasks.countdown import CountdownInstance
from megatron_rspo.tasks.registry import TASKS, get_task

FIXTURES = Path(__file__).parent / "fixtures"


class PlainTok:
    pass


class ChatTok:
    def apply_chat_template(self, user: str, system: str | None = None) -> str:
        return f"<user>{user}</user><assistant>"


def test_countdown_prompt_and_score():
    task = get_task("countdown")
    x = CountdownInstance([3, 5, 7], 22, "3*5+7")
    assert task.prompt(x, "tiny", ChatTok()) == "numbers: 3 5 7 target: 22 <answer>"  # tiny: never wrapped
    assert task.prompt(x, "chat", ChatTok()).startswith("<user>Using the numbers [3, 5, 7]")
    assert task.score("3*5+7</answer>", x, "tiny") == 1.0
    assert task.score("<answer>7+5*3</answer>", x, "chat") == 1.0
    assert task.score("1+1</answer>", x, "tiny") == pytest.approx(0.1)


def test_math_task_from_fixture():
    task = get_task("math")
    rows = task.load(str(FIXTURES / "math_small.jsonl"))
    assert task.prompt(rows[0], "chat", PlainTok()).endswith("\\boxed{}.")
    assert task.score("so it is \\boxed{0.5}", rows[0], "chat") == 1.0
    assert task.score("\\boxed{3}", rows[0], "chat") == 0.0


def test_code_task_from_fixture():
    task = get_task("code")
    rows = task.load(str(FIXTURES / "code_small.jsonl"))
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    assert task.score(good, rows[0], "chat") == 1.0
    assert task.score("no code here", rows[0], "chat") == 0.0


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        get_task("chess")
    assert set(TASKS) == {"countdown", "math", "code"}

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
    assert set(TASKS) == {"countdown", "math", "code", "copy_digits"}


def test_copy_digits_task(tmp_path):
    """Partial credit for a random policy's digits, full score for the exact copy, bad rows named."""
    from megatron_rspo.tasks import copy_digits
    from megatron_rspo.tasks.data import DataError

    task = get_task("copy_digits")
    xs = copy_digits.make_examples(5, seed=1)
    copy_digits.save_jsonl(xs, tmp_path / "c.jsonl")
    assert task.load(str(tmp_path / "c.jsonl")) == xs
    x = copy_digits.CopyExample("4712")
    assert task.prompt(x, "tiny", PlainTok()) == "copy: 4 7 1 2 = "
    assert task.score("4 7 1 2", x, "tiny") == 1.0
    assert task.score("2 1 7 4", x, "tiny") == 0.5  # all digits, wrong order
    assert task.score("x4y", x, "tiny") == 0.125 and task.score("none", x, "tiny") == 0.0
    (tmp_path / "bad.jsonl").write_text('{"digits": "12"}\n{"digits": "1a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*decimal digits"):
        task.load(str(tmp_path / "bad.jsonl"))

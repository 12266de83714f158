"""Countdown: solver, generation/splits, JSONL, prompts and the (adversarially robust) reward."""

from __future__ import annotations

import itertools
import json
import random
import time
from fractions import Fraction

import pytest

from megatron_rspo.tasks import countdown as cd
from megatron_rspo.tasks import countdown_solver as solver
from megatron_rspo.tasks.countdown import CountdownConfig, CountdownInstance

INST = CountdownInstance(numbers=[3, 5, 7], target=22, solution="3*5+7")

# Hang guards, not speed tests: generous so that a loaded CI machine cannot fail them.
HANG_GUARD_S = 30.0


def _brute_force_values(nums: tuple[int, ...]) -> set[Fraction]:
    """Independent reference: every value of every binary tree over every ordering."""
    if len(nums) == 1:
        return {Fraction(nums[0])}
    out = set()
    for perm in set(itertools.permutations(nums)):
        for cut in range(1, len(perm)):
            for a in _brute_force_values(perm[:cut]):
                for b in _brute_force_values(perm[cut:]):
                    out |= {a + b, a - b, a * b}
                    if b:
                        out.add(a / b)
    return out


# ------------------------------------------------------------------ solver


def test_solve_known_cases():
    assert cd.solve([3, 5, 7], 22) == "3*5+7"
    assert cd.solve([1, 1, 1], 100) is None
    for nums, target in [([4, 4, 10, 10], 24), ([1, 5, 5, 5], 24), ([3, 3, 8, 8], 24), ([1, 2, 3, 4], 24)]:
        sol = cd.solve(nums, target)  # the last three need fractional intermediates
        assert sol is not None and cd.is_correct(sol, CountdownInstance(nums, target, sol)), (nums, sol)
    assert cd.solve([2, 3], Fraction(2, 3)) == "2/3"


@pytest.mark.parametrize("nums", [(1, 2, 3), (2, 2, 7), (5, 5, 5), (1, 3, 4, 6), (2, 2, 9, 9)])
def test_solver_matches_brute_force(nums):
    ref = _brute_force_values(nums)
    table = solver._solution_table(tuple(sorted(nums)))
    assert {Fraction(v) for v in table} == ref
    for v in itertools.islice(ref, 40):
        sol = cd.solve(nums, v)
        assert sol is not None and cd.parse_equation(sol)[1] == v
        assert sorted(cd.parse_equation(sol)[0]) == sorted(nums)


def test_range_table_equals_filtered_full_table():
    rng = random.Random(0)
    for _ in range(60):
        nums = tuple(sorted(rng.randint(1, 12) for _ in range(rng.choice((2, 3, 4)))))
        fast = solver.range_table(nums, 1, 100)
        full = {v: e for v, e in solver._solution_table(nums).items() if type(v) is int and 1 <= v <= 100}
        assert fast.keys() == full.keys()
        assert all(solver.render(fast[v][1]) == solver.render(full[v][1]) for v in fast)  # same canonical solution


def test_render_minimal_parentheses():
    assert solver.render(("-", 9, ("-", 5, 2)))[0] == "9-(5-2)"
    assert solver.render(("+", 9, ("-", 5, 2)))[0] == "9+5-2"
    assert solver.render(("/", 8, ("*", 2, 2)))[0] == "8/(2*2)"
    assert solver.render(("*", ("+", 3, 5), 7))[0] == "(3+5)*7"


# ------------------------------------------------------------------ generation


def test_generated_instances_are_solved_in_range_and_unique():
    cfg = CountdownConfig(num_numbers=(3, 4), max_number=9, max_target=100)
    train, test = cd.generate_splits(1500, 200, seed=3, config=cfg)
    assert len(train) == 1500 and len(test) == 200
    for split in (train, test):
        assert len({i.key() for i in split}) == len(split)
        assert all(len(i.numbers) in (3, 4) and all(1 <= x <= 9 for x in i.numbers) for i in split)
        assert all(1 <= i.target <= 100 for i in split)
        completions = [cd.sft_completion(i, "tiny") for i in split]
        assert cd.score_batch(completions, split, "tiny") == [1.0] * len(split)
        assert all(cd.countdown_reward(cd.sft_completion(i, "chat"), i) == 1.0 for i in split[:50])
    assert {len(i.numbers) for i in train} == {3, 4}
    assert all(cd.solve(i.numbers, i.target) == i.solution for i in train[:100])  # canonical


def test_splits_disjoint_and_deterministic():
    train, test = cd.generate_splits(1000, 300, seed=7, num_numbers=(3,))
    assert not {i.key() for i in train} & {i.key() for i in test}
    train2, test2 = cd.generate_splits(1000, 300, seed=7, num_numbers=[3])
    assert train == train2 and test == test2
    _, test3 = cd.generate_splits(10, 300, seed=7, num_numbers=(3,))
    assert test3 == test  # the test split does not depend on the train size
    train4, _ = cd.generate_splits(1000, 300, seed=8, num_numbers=(3,))
    assert train4 != train


def test_sorted_numbers_and_capacity_error():
    train, _ = cd.generate_splits(50, 10, seed=0, sorted_numbers=True)
    assert all(i.numbers == sorted(i.numbers) for i in train)
    with pytest.raises(ValueError, match="unique instances"):
        cd.generate_instances(100, 0, CountdownConfig(num_numbers=(2,), max_number=3, max_target=10))
    with pytest.raises(ValueError, match="num_numbers"):
        cd.generate_instances(1, 0, CountdownConfig(num_numbers=(7,)))


# ------------------------------------------------------------------ JSONL


def test_jsonl_round_trip(tmp_path):
    train, _ = cd.generate_splits(100, 0, seed=1)
    path = tmp_path / "train.jsonl"
    cd.save_jsonl(train, path)
    assert cd.load_jsonl(path) == train


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "Expecting"),
        ("[1, 2]", "JSON object"),
        ('{"numbers": [3, 5, 7], "target": 22}', "missing field"),
        ('{"numbers": [3, "5", 7], "target": 22, "solution": "3*5+7"}', "numbers"),
        ('{"numbers": [3, 5, 7], "target": 22.0, "solution": "3*5+7"}', "target"),
        ('{"numbers": [3, 5, 7], "target": 22, "solution": 7}', "solution"),
        ('{"numbers": [3, 5, 7], "target": 23, "solution": "3*5+7"}', "does not reach"),
    ],
)
def test_jsonl_malformed_row_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"numbers": [3, 5, 7], "target": 22, "solution": "3*5+7"})
    path.write_text(f"{good}\n\n{good}\n{bad}\n")
    with pytest.raises(ValueError, match=rf"data\.jsonl:4: .*{message}"):
        cd.load_jsonl(path)


# ------------------------------------------------------------------ prompts


def test_prompt_templates():
    assert cd.format_prompt(INST, "tiny") == "numbers: 3 5 7 target: 22 <answer>"
    assert cd.sft_completion(INST, "tiny") == "3*5+7</answer>"
    assert cd.format_prompt(INST, "chat") == (
        "Using the numbers [3, 5, 7], create an equation that equals 22. You can use basic arithmetic operations "
        "(+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. And return "
        "the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
    )
    assert cd.sft_completion(INST, "chat").endswith("<answer> 3*5+7 </answer>")
    assert cd.response_for_scoring("3*5+7</answer>", "tiny") == "<answer>3*5+7</answer>"
    assert cd.response_for_scoring("x", "chat") == "x"
    with pytest.raises(ValueError, match="unknown template"):
        cd.format_prompt(INST, "nope")


# ------------------------------------------------------------------ reward


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<answer>3*5+7</answer>", 1.0),
        ("<answer> (7 + 3 * 5) </answer>", 1.0),
        ("<answer>" + "(" * 90 + "3*5+7" + ")" * 90 + "</answer>", 1.0),  # deep but short enough
        ("<think>hmm</think> <answer>1+1</answer> no wait <answer>5*3+7</answer>", 1.0),  # last answer wins
        ("<answer>5*3+7</answer> oops <answer>1+1</answer>", 0.1),
        ("<answer>3+5+7</answer>", 0.1),  # wrong value
        ("<answer>3*5+7+7-7</answer>", 0.1),  # a number used twice
        ("<answer>3*7+1</answer>", 0.1),  # 5 missing, 1 not given
        ("<answer>5*3+7+0</answer>", 0.1),  # an extra number
        ("<answer>-3+5*5</answer>", 0.0),  # unary minus is not allowed
        ("3*5+7", 0.0),  # no tags
        ("<answer>3*5+7", 0.0),
        ("<answer>twenty-two</answer>", 0.0),
        ("<answer></answer>", 0.0),
        ("<answer>3.0*5+7</answer>", 0.0),
        ("<answer>3*5+7=22</answer>", 0.0),
        ("<answer>1234567+1</answer>", 0.0),  # more than 6 digits
    ],
)
def test_reward_cases(response, expected):
    assert cd.countdown_reward(response, INST) == pytest.approx(expected)


def test_reward_scores_tiny_prefix_and_batch_helpers():
    assert cd.countdown_reward("3*5+7</answer>", INST) == 0.0  # the prefix matters
    assert cd.countdown_reward("3*5+7</answer>", INST, prefix="<answer>") == 1.0
    assert cd.countdown_reward("3*5+7</answer>", INST, format_score=0.0, full_score=2.0, prefix="<answer>") == 2.0
    rewards = cd.score_batch(["3*5+7</answer>", "3+5+7</answer>", "junk"], [INST] * 3, "tiny")
    assert rewards == [1.0, 0.1, 0.0]
    assert cd.accuracy(rewards) == pytest.approx(1 / 3) and cd.accuracy([]) == 0.0
    with pytest.raises(ValueError):
        cd.score_batch(["a"], [INST, INST])


ADVERSARIAL = [
    "9**9**9",
    "9**9**9**9",
    "__import__('os').system('x')",
    "1/0",
    "(3*5+7)/(5-5)",
    "(" * 10000,
    "(" * 100 + "3*5+7" + ")" * 100,  # correct but longer than MAX_EQUATION_CHARS
    "1" * 1_000_000,
    "<answer>" * 100_000 + "1" + "</answer>" * 100_000,
    "1e309",
    "lambda: 1",
    "[1,2]",
    "3 5",
    "True+True",
    "0x16",
    "3_0",
    "22 if 1 else 0",
    "(3*5+7)//1",
    "3*5+7;1",
    "٣*5+7",
    "\udcff\x00\x7f",
    "\n".join(["1+"] * 50),
]


@pytest.mark.parametrize("payload", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_answers_score_zero_fast(payload):
    for response in (payload, f"<answer>{payload}</answer>", f"<answer>3*5+7</answer><answer>{payload}</answer>"):
        t0 = time.perf_counter()
        assert cd.countdown_reward(response, INST) == 0.0
        assert time.perf_counter() - t0 < HANG_GUARD_S  # a hang guard (speed belongs in benchmarks/)
    assert cd.parse_equation(payload) is None


def test_reward_non_string_inputs():
    assert cd.countdown_reward(b"<answer>3*5+7</answer>", INST) == 1.0
    assert cd.countdown_reward(b"<answer>\xff\xfe</answer>", INST) == 0.0
    assert cd.countdown_reward(None, INST) == 0.0  # type: ignore[arg-type]


def test_parse_equation():
    assert cd.parse_equation("(3+5)*7") == ([3, 5, 7], Fraction(56))
    assert cd.parse_equation(" 8/(3-8/3) ") == ([8, 3, 8, 3], Fraction(24))
    assert cd.parse_equation("2/3") == ([2, 3], Fraction(2, 3))
    assert cd.parse_equation("999999*999999") == ([999999, 999999], Fraction(999998000001))
    for bad in ("-3+5", "+3", "3**2", "3//2", "3%2", "x+1", "3.5", "", "()", "1" * 201):
        assert cd.parse_equation(bad) is None, bad

"""MATH task: data loading (bad rows name file:line), answer extraction, math-verify reward with timeouts."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_rspo.tasks import math as mt
from megatron_rspo.tasks.data import DataError, load_rows

FIXTURE = Path(__file__).parent / "fixtures" / "math_small.jsonl"

# Hang guards, not speed tests: generous so that a loaded CI machine cannot fail them (speed belongs in
# benchmarks/).
HANG_GUARD_S = 60.0


@pytest.fixture(scope="module")
def verifier():
    v = mt.MathVerifier()
    yield v
    v.close()


def _write(tmp_path: Path, lines: list[str], name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


# ------------------------------------------------------------------------------------------ data


def test_load_fixture_answers_and_solutions():
    ex = mt.load_math(FIXTURE)
    assert len(ex) == 10
    assert ex[0] == mt.MathExample("What is $\\frac{2}{4}$ in lowest terms?", "\\frac{1}{2}")
    # rows 7 and 8 have no "answer": the reference is the last \boxed{} of the solution, nested braces kept
    assert ex[6].answer == "\\frac{\\pi}{4}"
    assert ex[7].answer == "\\begin{pmatrix} 3 \\\\ 5 \\end{pmatrix}"
    assert mt.load_math(FIXTURE, limit=3) == ex[:3]
    # MATH (no answer field) derives every reference from the solution
    assert [e.answer for e in mt.load_math(FIXTURE, answer_field=None)][:2] == ["\\frac{1}{2}", "\\sqrt{2}"]


def test_prompt_template():
    ex = mt.load_math(FIXTURE)[4]
    p = mt.format_prompt(ex)
    assert p.startswith("Compute $7 \\times 6$.")
    assert p.endswith("Please reason step by step, and put your final answer within \\boxed{}.")
    assert mt.format_prompt("Q?", "Problem: {problem}") == "Problem: Q?"


def test_custom_field_names_and_numeric_answers(tmp_path):
    rows = [json.dumps({"question": "1+1?", "final": 2}), "", json.dumps({"question": "x", "final": "3"})]
    p = _write(tmp_path, rows)
    ex = mt.load_math(p, problem_field="question", answer_field="final", solution_field=None)
    assert ex == [mt.MathExample("1+1?", "2"), mt.MathExample("x", "3")]


@pytest.mark.parametrize(
    "lines, where, what",
    [
        (['{"problem": "a", "answer": "1"}', "{not json"], ":2:", "invalid JSON"),
        (['{"problem": "a", "answer": "1"}', "", '{"answer": "1"}'], ":3:", "'problem' is missing"),
        (['{"problem": 5, "answer": "1"}'], ":1:", "'problem' must be str, got int"),
        (['{"problem": "a", "answer": true}'], ":1:", "'answer' must be str or int or float, got bool"),
        (['{"problem": null, "answer": "1"}'], ":1:", "'problem' is null"),
        (['{"problem": "a", "solution": "no box here"}'], ":1:", "no \\boxed{} answer"),
        (['{"problem": "a"}'], ":1:", "needs 'answer' or 'solution'"),
        (['{"problem": "a", "answer": "  "}'], ":1:", "reference answer is empty"),
        (["[1, 2]"], ":1:", "expected a JSON object, got list"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, lines, where, what):
    p = _write(tmp_path, lines)
    with pytest.raises(ValueError) as e:
        mt.load_math(p)
    assert isinstance(e.value, DataError)
    assert f"{p}{where}" in str(e.value) and what in str(e.value)


def test_empty_file(tmp_path):
    p = _write(tmp_path, ["", "  "])
    with pytest.raises(DataError, match="no rows"):
        mt.load_math(p)


def test_load_rows_renames_and_types(tmp_path):
    p = _write(tmp_path, [json.dumps({"q": "x", "n": [1, 2], "extra": 1})])
    rows = load_rows(p, {"question": "q"}, optional={"nums": "n", "gone": "gone"}, types={"nums": list})
    assert rows == [{"question": "x", "nums": [1, 2]}]
    with pytest.raises(DataError, match="'n' must be str, got list"):
        load_rows(p, ["q", "n"])


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow.parquet` fail
    with pytest.raises(ImportError, match="needs pyarrow"):
        load_rows(tmp_path / "x.parquet", ["problem"])


def test_parquet_roundtrip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    table = pa.table({"problem": [r["problem"] for r in rows], "solution": [r["solution"] for r in rows]})
    pq.write_table(table, tmp_path / "m.parquet")
    assert mt.load_math(tmp_path / "m.parquet") == mt.load_math(FIXTURE, answer_field=None)
    pq.write_table(pa.table({"problem": ["a", None]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet: row 2: field 'problem' is null"):
        load_rows(tmp_path / "bad.parquet", ["problem"])


# ------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2}", "2"),  # the last box wins
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literal
        ("\\boxed{x^{2^{3}}+\\frac{a}{b}}", "x^{2^{3}}+\\frac{a}{b}"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$.", "5"),
        ("\\boxed { 3 }", "3"),
        ("\\boxed{3} and an unterminated \\boxed{4", "3"),
        ("<answer>1/2</answer> then <answer> 3 </answer>", "3"),
        ("<answer>9</answer> but \\boxed{8}", "8"),  # a box beats an answer tag
        ("\\boxed{}", None),
        ("\\boxedx{3}", None),
        ("\\boxed{", None),
        ("no answer", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert mt.extract_answer(text) == expected


def test_extract_is_linear_on_adversarial_text():
    t0 = time.monotonic()
    assert mt.extract_answer("\\boxed{" * 30_000) is None
    assert mt.extract_answer("{" * 100_000 + "\\boxed{1}") == "1"
    assert mt.extract_answer("\\boxed{" + "{" * 50_000 + "}" * 50_000 + "}") is not None
    assert time.monotonic() - t0 < HANG_GUARD_S  # quadratic scanning of these would take minutes


# ---------------------------------------------------------------------------------------- reward


EQUIVALENT = ["0.5", "\\sqrt 2", "(-\\infty,3]", "\\text{Monday}", "42.0", "2,-2", "\\pi/4",
              "\\begin{pmatrix}3\\\\5\\end{pmatrix}", "(x+1)^2", "25"]
WRONG = ["0.6", "2", "(-\\infty,3)", "\\text{Tuesday}", "41", "2", "\\pi/2",
         "\\begin{pmatrix}3\\\\6\\end{pmatrix}", "(x+1)^3", "2.5"]


def test_reward_on_fixture(verifier):
    examples = mt.load_math(FIXTURE)
    good = [f"Reasoning...\nThe answer is $\\boxed{{{a}}}$." for a in EQUIVALENT]
    bad = [f"\\boxed{{{a}}}" for a in WRONG]
    refs = [e.answer for e in examples]
    assert mt.score_batch(good, refs, verifier=verifier) == [1.0] * 10
    assert mt.score_batch(bad, refs, verifier=verifier) == [0.0] * 10


def test_reward_format_score_and_answer_tags(verifier):
    assert mt.math_reward("<answer>1/2</answer>", "\\frac{1}{2}", verifier=verifier) == 1.0
    assert mt.math_reward("\\boxed{3}", "4", format_score=0.1, verifier=verifier) == 0.1
    assert mt.math_reward("no box", "4", format_score=0.1, verifier=verifier) == 0.0


GARBAGE = [None, 17, b"\\boxed{4}", "", "\\boxed{\\frac{", "\\boxed{)(}", "\\boxed{\x00\ud800}",
           "\\boxed{\\begin{pmatrix}}", "\\boxed{" + "\\sqrt{" * 300 + "}" * 300 + "}"]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_reward_never_raises(verifier, garbage):
    r = mt.math_reward(garbage, "4", timeout_s=2, verifier=verifier)
    assert r in (0.0, 1.0)
    assert r == (1.0 if garbage == b"\\boxed{4}" else 0.0)


def test_pathological_inputs_return_within_timeout(verifier):
    """Without the timeout these never return (9^9^9^9 has ~10^(3.7e8) digits); with it, within the 1 s budget
    plus a helper restart."""
    for response, ref in [("\\boxed{9^{9^{9^{9}}}}", "5"), ("\\boxed{9^{9^{9}}}", "9^{387420489}")]:
        t0 = time.monotonic()
        assert mt.math_reward(response, ref, timeout_s=1.0, verifier=verifier) == 0.0
        assert time.monotonic() - t0 < HANG_GUARD_S
    t0 = time.monotonic()
    assert mt.math_reward("x" * 100_000 + "\\boxed{42}", "42", verifier=verifier) == 1.0
    assert mt.math_reward("\\boxed{" + "1+" * 50_000 + "1}", "3", verifier=verifier) == 0.0  # too long
    assert time.monotonic() - t0 < HANG_GUARD_S
    # the helper was replaced after overrunning and still works
    assert mt.math_reward("\\boxed{0.5}", "\\frac12", verifier=verifier) == 1.0


def test_reward_from_a_worker_thread(verifier):
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(mt.math_reward("\\boxed{\\sqrt{4}}", "2", verifier=verifier)))
    t.start()
    t.join(30)
    assert out == [1.0]

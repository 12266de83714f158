"""Code generation: local problems with unit tests, code-block extraction and a sandboxed test reward.

A problem has either assert-style tests (``{"tests": ["assert f(1) == 2", ...]}``, optionally an
``entry_point`` that tests can call as ``candidate``) or stdin/stdout cases
(``{"io": [{"input": "1 2\\n", "output": "3\\n"}]}``). The reward is the fraction of tests passed
(or all-or-nothing), 0.0 when the response has no code block.

All tests of one response run in ONE sandboxed process (``sandbox.run_python``): a harness execs the
candidate, then each test under a per-test SIGALRM limit, and streams one line per test back over a
private pipe, prefixed with a random nonce the candidate never sees (so printing fake "passed" lines
does not work). For stdin/stdout cases the harness only returns the program's (capped) output and
the expected outputs never enter the sandbox; the comparison happens here. Results are parsed as
JSON, never eval-ed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megatron_rspo.tasks.data import load_rows
from megatron_rspo.tasks.sandbox import SandboxConfig, SandboxResult, run_python

CODE_TEMPLATE = (
    "{prompt}\n\n{requirement}Write your solution in Python and put the complete code in a single "
    "```python code block at the end of your answer."
)
_PY_LANGS = {"python", "py", "python3", "py3"}
# An opening fence (its info string may not contain backticks, which keeps matching linear), the body,
# and the next closing fence.
_FENCE = re.compile(r"```[ \t]*([^\n`]*)\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class IOCase:
    input: str
    output: str


@dataclass(frozen=True)
class CodeExample:
    prompt: str
    tests: tuple[str, ...] = ()  # assert-style snippets
    io: tuple[IOCase, ...] = ()  # stdin/stdout cases
    entry_point: str | None = None  # function the tests may call as `candidate`

    @property
    def num_tests(self) -> int:
        return len(self.tests) or len(self.io)


@dataclass
class CodeTaskConfig:
    test_timeout_s: float = 2.0  # per test (and for loading the solution), enforced inside the sandbox
    max_total_s: float = 30.0  # hard wall-clock cap for all tests of one response together
    all_or_nothing: bool = False  # reward 1.0 only if every test passes
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class TestReport:
    passed: list[bool]  # one entry per test
    timed_out: bool  # the whole run hit its wall-clock cap
    error: str | None  # why the solution did not load (SyntaxError, Timeout, ...), if it did not

    @property
    def fraction(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


# ----------------------------------------------------------------------------------------------
# Data and prompts
# ----------------------------------------------------------------------------------------------


def _convert(row: dict) -> CodeExample:
    tests = row.get("tests", [])
    if isinstance(tests, str):  # one snippet (e.g. HumanEval's `test` plus its check call)
        tests = [tests]
    if not all(isinstance(t, str) and t.strip() for t in tests):
        raise ValueError("'tests' must be a list of non-empty strings")
    cases = []
    for j, case in enumerate(row.get("io", [])):
        if not (isinstance(case, dict) and isinstance(case.get("input"), str) and isinstance(case.get("output"), str)):
            raise ValueError(f"io case {j} must be an object with string 'input' and 'output'")
        cases.append(IOCase(case["input"], case["output"]))
    if bool(tests) == bool(cases):
        raise ValueError("a problem needs either non-empty 'tests' or non-empty 'io', not both or neither")
    entry = row.get("entry_point")
    if entry is not None and not entry.isidentifier():
        raise ValueError(f"entry_point {entry!r} is not a Python identifier")
    return CodeExample(row["prompt"], tuple(tests), tuple(cases), entry)


def load_code(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    tests_field: str | None = "tests",
    io_field: str | None = "io",
    entry_point_field: str | None = "entry_point",
    limit: int | None = None,
) -> list[CodeExample]:
    """Load problems from JSONL/parquet; a bad row raises ``DataError`` naming file:line."""
    optional = {k: v for k, v in (("tests", tests_field), ("io", io_field), ("entry_point", entry_point_field)) if v}
    types = {"tests": (list, str), "io": list, "entry_point": str}
    return load_rows(path, {"prompt": prompt_field}, optional=optional, types=types, limit=limit, convert=_convert)


def format_prompt(example: CodeExample, template: str = CODE_TEMPLATE) -> str:
    """The user message (wrap it in the model's chat template)."""
    if example.io:
        requirement = "The program must read from standard input and write to standard output. "
    elif example.entry_point:
        requirement = f"Define the function `{example.entry_point}`. "
    else:
        requirement = ""
    return template.format(prompt=example.prompt, requirement=requirement)


def extract_code(text: str) -> str | None:
    """Body of the last ```python (or ```py) fenced block, else of the last untagged ``` block."""
    if not isinstance(text, str):
        return None
    last_py = last_plain = None
    for m in _FENCE.finditer(text):
        lang = m.group(1).strip().lower()
        if lang in _PY_LANGS:
            last_py = m.group(2)
        elif not lang:
            last_plain = m.group(2)
    code = last_py if last_py is not None else last_plain
    return code if code is not None and code.strip() else None


# ----------------------------------------------------------------------------------------------
# Running tests
# ----------------------------------------------------------------------------------------------

# Runs inside the sandbox after the guard. Reads its spec from stdin and closes it (so the candidate
# cannot re-read the nonce), then reports one nonce-prefixed JSON line per test on the channel.
_HARNESS_SRC = r'''
import io, json, os, signal, sys, threading

class TimeLimitExceeded(BaseException):
    pass

class OutputLimitExceeded(BaseException):
    pass

class _Sink(io.RawIOBase):
    def __init__(self, cap):
        self.data, self.cap = bytearray(), cap
    def writable(self):
        return True
    def write(self, b):
        if len(self.data) + len(b) > self.cap:
            raise OutputLimitExceeded()
        self.data += b
        return len(b)

def _on_alarm(signum, frame):
    raise TimeLimitExceeded()

def _run(code, ns, seconds, stdin, cap):
    """exec with captured, capped stdout and a time limit; returns (stdout bytes, error name or None)."""
    sink = _Sink(cap)
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(sink), encoding="utf-8", write_through=True)
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(_Sink(cap)), encoding="utf-8", write_through=True)
    err = None
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                exec(code, ns)
                for th in threading.enumerate():  # solutions that run main() in a big-stack thread
                    if th is not threading.main_thread() and not th.daemon:
                        th.join()
            except SystemExit as e:
                if e.code not in (None, 0):
                    err = "SystemExit"
            sys.stdout.flush()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException as e:  # the timer is off here, so a late alarm cannot escape
        err = type(e).__name__
    return bytes(sink.data), err

def _main():
    spec = json.loads(sys.stdin.buffer.read())
    os.close(0)
    nonce = spec.pop("nonce").encode()
    chan = SANDBOX_CHANNEL_FD

    def report(obj):
        data = nonce + b" " + json.dumps(obj).encode() + b"\n"
        while data:
            data = data[os.write(chan, data):]

    signal.signal(signal.SIGALRM, _on_alarm)
    t, cap = spec["timeout"], spec["cap"]
    try:
        code = compile(spec["code"], "solution.py", "exec")
    except BaseException as e:
        report({"load": type(e).__name__})
        return
    if spec["inputs"] is not None:
        report({"load": None})
        for i, stdin in enumerate(spec["inputs"]):
            out, err = _run(code, {"__name__": "__main__"}, t, stdin.encode(), cap)
            report({"i": i, "out": out.decode("utf-8", "replace"), "err": err})
        return
    ns = {"__name__": "solution"}
    _, err = _run(code, ns, t, b"", cap)
    if err is None and spec["entry_point"]:
        err = None if spec["entry_point"] in ns else "MissingEntryPoint"
        ns["candidate"] = ns.get(spec["entry_point"])
    report({"load": err})
    if err is not None:
        return
    for i, test in enumerate(spec["tests"]):
        try:
            tcode = compile(test, f"test_{i}", "exec")
        except BaseException as e:
            report({"i": i, "ok": False, "err": type(e).__name__})
            continue
        _, err = _run(tcode, ns, t, b"", cap)
        report({"i": i, "ok": err is None, "err": err})

_main()
'''


def _same_output(got: str, expected: str) -> bool:
    """Equal up to trailing whitespace on each line and leading/trailing blank lines."""

    def norm(s: str) -> list[str]:
        return [line.rstrip() for line in s.replace("\r\n", "\n").strip().split("\n")]

    return norm(got) == norm(expected)


def _parse_channel(result: SandboxResult, nonce: str, n: int) -> tuple[list[dict | None], str | None]:
    """Per-test result objects (None where missing) and the load error, from nonce-prefixed lines."""
    prefix = nonce.encode() + b" "
    per_test: list[dict | None] = [None] * n
    load_error: str | None = "NoResult"
    for line in result.channel.split(b"\n"):
        if not line.startswith(prefix):
            continue
        try:
            obj = json.loads(line[len(prefix):])
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if "load" in obj:
            load_error = obj["load"] if isinstance(obj["load"], str) else None
        i = obj.get("i")
        if type(i) is int and 0 <= i < n and per_test[i] is None:
            per_test[i] = obj
    return per_test, load_error


def run_tests(code: str, example: CodeExample, config: CodeTaskConfig | None = None) -> TestReport:
    """Run all of ``example``'s tests against ``code`` in one sandboxed process."""
    cfg = config or CodeTaskConfig()
    n = example.num_tests
    nonce = secrets.token_hex(16)
    spec = {
        "nonce": nonce, "code": code, "timeout": cfg.test_timeout_s, "cap": cfg.sandbox.max_output_bytes,
        "tests": list(example.tests), "entry_point": example.entry_point,
        "inputs": [c.input for c in example.io] if example.io else None,
    }
    wall = min(cfg.max_total_s, 1.0 + cfg.test_timeout_s * (n + 1))  # start-up + load + each test
    sandbox = dataclasses.replace(cfg.sandbox, timeout_s=wall)
    result = run_python(_HARNESS_SRC, stdin=json.dumps(spec).encode(), config=sandbox)
    per_test, load_error = _parse_channel(result, nonce, n)
    if example.io:
        passed = [r is not None and r.get("err") is None and isinstance(r.get("out"), str)
                  and _same_output(r["out"], case.output) for r, case in zip(per_test, example.io)]
    else:
        passed = [r is not None and r.get("ok") is True for r in per_test]
    if result.timed_out and load_error == "NoResult":
        load_error = "Timeout"
    return TestReport(passed, result.timed_out, load_error)


def code_reward(response: str, example: CodeExample, config: CodeTaskConfig | None = None) -> float:
    """Fraction of tests passed by the response's last code block (1.0/0.0 with all_or_nothing);
    0.0 without a code block. Never raises on arbitrary model output."""
    cfg = config or CodeTaskConfig()
    code = extract_code(response.decode("utf-8", "replace") if isinstance(response, bytes) else response)
    if code is None or example.num_tests == 0:
        return 0.0
    report = run_tests(code, example, cfg)
    if cfg.all_or_nothing:
        return 1.0 if all(report.passed) else 0.0
    return report.fraction


def score_batch(
    responses: Sequence[str], examples: Sequence[CodeExample], config: CodeTaskConfig | None = None,
    max_workers: int = 1,
) -> list[float]:
    """Rewards for aligned (response, example) pairs; ``max_workers`` sandboxes run at once."""
    if len(responses) != len(examples):
        raise ValueError(f"{len(responses)} responses for {len(examples)} examples")
    if max_workers <= 1:
        return [code_reward(r, e, config) for r, e in zip(responses, examples)]
    with ThreadPoolExecutor(max_workers) as pool:
        return list(pool.map(lambda pair: code_reward(pair[0], pair[1], config), zip(responses, examples)))

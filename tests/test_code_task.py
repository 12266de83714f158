"""Code task: data loading, code extraction, test rewards, and proof that the sandbox contains
hostile programs (each scores 0, quickly, and leaves the machine alone)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from megatron_rspo.tasks import code as ct
from megatron_rspo.tasks.data import DataError
from megatron_rspo.tasks.sandbox import SandboxConfig, run_python

FIXTURE = Path(__file__).parent / "fixtures" / "code_small.jsonl"
FAST = ct.CodeTaskConfig(test_timeout_s=1.0, max_total_s=2.0)

# Hang guards, not speed tests: generous so that a loaded CI machine cannot fail them.
HANG_GUARD_S = 30.0


@pytest.fixture(scope="module")
def problems() -> list[ct.CodeExample]:
    return ct.load_code(FIXTURE)


def _block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


ADD = "def add(a, b):\n    return a + b\n"


# ------------------------------------------------------------------------------------------ data


def test_load_fixture(problems):
    add, pal, io_sum, io_minmax = problems
    assert len(add.tests) == 4 and not add.io and add.entry_point is None
    assert pal.entry_point == "is_palindrome" and len(pal.tests) == 1
    assert io_sum.io[0] == ct.IOCase("1 2\n", "3\n") and io_sum.num_tests == 3
    assert "standard input" in ct.format_prompt(io_sum)
    assert "`is_palindrome`" in ct.format_prompt(pal)
    assert ct.format_prompt(add).endswith("code block at the end of your answer.")


@pytest.mark.parametrize(
    "row, what",
    [
        ("{oops", "invalid JSON"),
        ('{"tests": ["assert 1"]}', "'prompt' is missing"),
        ('{"prompt": "p", "tests": [1]}', "list of non-empty strings"),
        ('{"prompt": "p", "tests": {"a": 1}}', "'tests' must be list or str, got dict"),
        ('{"prompt": "p", "io": [{"input": "1"}]}', "io case 0 must be an object"),
        ('{"prompt": "p"}', "either non-empty 'tests' or non-empty 'io'"),
        ('{"prompt": "p", "tests": ["assert 1"], "io": [{"input": "", "output": ""}]}', "not both"),
        ('{"prompt": "p", "tests": ["assert 1"], "entry_point": "not valid"}', "not a Python identifier"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, what):
    p = tmp_path / "c.jsonl"
    p.write_text(FIXTURE.read_text().splitlines()[0] + "\n\n" + row + "\n")
    with pytest.raises(DataError) as e:
        ct.load_code(p)
    assert f"{p}:3:" in str(e.value) and what in str(e.value)


def test_custom_fields_mbpp_style(tmp_path):
    p = tmp_path / "mbpp.jsonl"
    p.write_text(json.dumps({"text": "add", "test_list": ["assert add(1, 1) == 2"]}) + "\n")
    (ex,) = ct.load_code(p, prompt_field="text", tests_field="test_list")
    assert ex == ct.CodeExample("add", ("assert add(1, 1) == 2",))


# ------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("```python\na = 1\n```\ntext\n```python\nb = 2\n```", "b = 2\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("```\nplain = 1\n```", "plain = 1\n"),
        ("```python\nfirst = 1\n```\n```\nplain = 1\n```", "first = 1\n"),  # a tagged block beats an untagged one
        ("```bash\nrm -rf /\n```", None),
        ("```python\nunclosed = 1\n", None),
        ("no code at all", None),
        ("```python\n\n```", None),
    ],
)
def test_extract_code(text, expected):
    assert ct.extract_code(text) == expected


def test_extract_code_is_fast_on_adversarial_text():
    t0 = time.monotonic()
    assert ct.extract_code("```a" * 30_000) is None
    assert ct.extract_code("```python\n" + "x" * 200_000) is None
    assert time.monotonic() - t0 < HANG_GUARD_S  # quadratic scanning would take minutes


# ---------------------------------------------------------------------------------------- reward


def test_correct_partial_and_wrong_solutions(problems):
    add, pal, io_sum, io_minmax = problems
    partial = _block("def add(a, b):\n    return abs(a) + b")
    assert ct.code_reward(_block(ADD), add, FAST) == 1.0
    assert ct.code_reward(partial, add, FAST) == 0.75
    assert ct.code_reward(partial, add, ct.CodeTaskConfig(all_or_nothing=True)) == 0.0
    assert ct.code_reward(_block("def is_palindrome(s):\n    return s == s[::-1]"), pal, FAST) == 1.0
    assert ct.code_reward(_block("def palindrome(s):\n    return True"), pal, FAST) == 0.0  # wrong entry point
    io_code = "import sys\na, b = map(int, sys.stdin.readline().split())\nprint(a + b)\nsys.exit(0)"
    assert ct.code_reward(_block(io_code), io_sum, FAST) == 1.0
    minmax = "n = int(input())\nv = list(map(int, input().split()))\nprint(max(v))\nprint(min(v))"
    assert ct.code_reward(_block(minmax), io_minmax, FAST) == 1.0
    assert ct.code_reward(_block("print(max(map(int, open(0).read().split()[1:])))"), io_minmax, FAST) == 0.0
    assert ct.code_reward(_block("print(3)"), io_sum, FAST) == pytest.approx(1 / 3)


def test_no_code_syntax_error_and_garbage(problems):
    add = problems[0]
    assert ct.code_reward("def add(a, b): return a + b", add, FAST) == 0.0  # no fenced block
    report = ct.run_tests("def add(a, b) return", add, FAST)
    assert report.error == "SyntaxError" and report.passed == [False] * 4
    for garbage in (None, 3, b"```python\n" + ADD.encode() + b"```", "\x00" * 10_000):
        assert ct.code_reward(garbage, add, FAST) in (0.0, 1.0)


def test_printed_results_cannot_be_forged(problems):
    """Writing fake result lines to stdout and to every fd does not count as passing."""
    forge = (
        "import os, json\nline = json.dumps({'i': 0, 'ok': True}).encode()\n"
        "for fd in range(1, 64):\n    try:\n        os.write(fd, b'x ' + line + b'\\n' + line + b'\\n')\n"
        "    except OSError:\n        pass\nprint(line.decode())\ndef add(a, b):\n    return None\n"
    )
    assert ct.code_reward(_block(forge), problems[0], FAST) == 0.0


def test_sandbox_dir_is_usable(problems):
    ok = ("import numpy as np\nopen('scratch.txt', 'w').write('5')\n"
          "def add(a, b):\n    return int(np.int64(a) + b) + int(open('scratch.txt').read()) - 5\n")
    assert ct.code_reward(_block(ok), problems[0], FAST) == 1.0


def test_parallel_batch(problems):
    add = problems[0]
    rewards = ct.score_batch([_block(ADD), "nothing", _block("def add(a, b):\n    return 0")], [add] * 3,
                             FAST, max_workers=3)
    assert rewards == [1.0, 0.0, 0.5]


# ----------------------------------------------------------------------------------- containment
# Each hostile program defines a correct `add` AFTER its attack, so it scores 1.0 only if the attack
# goes through; 0.0 means the attack was stopped.


@pytest.fixture
def secret_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("outside") / "secret.txt"
    p.write_text("TOP SECRET")
    return p


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


ATTACKS = {  # name: (program, why it fails to load)
    "infinite_loop": ("while True:\n    pass\n", "TimeLimitExceeded"),
    "alarm_swallowing_loop": ("while True:\n    try:\n        x = 0\n        while True:\n            x += 1\n"
                              "    except BaseException:\n        pass\n", "Timeout"),  # wall clock: group killed
    "fork_bomb": ("import os\nwhile True:\n    os.fork()\n", "PermissionError"),
    "subprocess": ("import subprocess\nsubprocess.run(['true'])\n", "PermissionError"),
    "multiprocessing": ("import multiprocessing as mp\np = mp.Process(target=print)\np.start()\n", "PermissionError"),
    "huge_print": ("print('x' * 10**9)\n", "MemoryError"),
    "print_flood": ("while True:\n    print('y')\n", "OutputLimitExceeded"),
    "memory_bomb": ("x = ' ' * 10**10\n", "MemoryError"),
    "read_passwd": ("open('/etc/passwd').read()\n", "PermissionError"),
    "read_harness_input": ("open('../stdin').read()\n", "PermissionError"),
    "signal_parent": ("import os\nos.kill(os.getppid(), 0)\n", "PermissionError"),
    "ctypes": ("import ctypes\n", "ImportError"),
    "raise_limits": ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n", "ImportError"),
    "frame_walk": ("import sys\ntry:\n    1 / 0\nexcept ZeroDivisionError as e:\n"
                   "    print(e.__traceback__.tb_frame.f_back.f_locals)\n", "AttributeError"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_score_zero(problems, name):
    code, why = ATTACKS[name]
    t0 = time.monotonic()
    assert ct.code_reward(_block(code + ADD), problems[0], FAST) == 0.0
    assert time.monotonic() - t0 < FAST.max_total_s + HANG_GUARD_S  # the sandbox's budget bounds it
    report = ct.run_tests(code + ADD, problems[0], FAST)
    assert report.error == why and not any(report.passed)


def test_private_file_outside_is_denied(problems, secret_file):
    code = f"open({str(secret_file)!r}).read()\n" + ADD
    assert ct.code_reward(_block(code), problems[0], FAST) == 0.0
    r = run_python(f"print(open({str(secret_file)!r}).read())", config=SandboxConfig(timeout_s=2))
    assert "TOP SECRET" not in r.stdout and "PermissionError" in r.stderr


def test_network_is_denied(problems, listener):
    attack = f"import socket\nsocket.create_connection(('127.0.0.1', {listener}), timeout=1)\n"
    assert ct.code_reward(_block(attack + ADD), problems[0], FAST) == 0.0
    assert ct.code_reward(_block(f"import _socket\n_socket.socket().connect(('127.0.0.1', {listener}))\n" + ADD),
                          problems[0], FAST) == 0.0


# --------------------------------------------------- the kernel limits alone (Python guard off)

RAW = SandboxConfig(timeout_s=1.0, guard=False)


def test_wall_clock_kill_without_guard():
    r = run_python("while True:\n    pass\n", config=RAW)
    assert r.timed_out and r.returncode == -9 and r.wall_s < 1.5


def test_memory_limit_without_guard():
    r = run_python("x = bytearray(10**10)\n", config=RAW)
    assert r.returncode == 1 and "MemoryError" in r.stderr


def test_output_caps_without_guard():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('y' * 4096)\n", config=RAW)
    assert r.stdout_truncated and len(r.stdout) == RAW.max_output_bytes and "File too large" in r.stderr
    assert r.wall_s < 1.5


def test_process_group_is_killed_without_guard():
    """A child left sleeping after the program exits is killed with its process group."""
    r = run_python("import os, time\npid = os.fork()\nif pid == 0:\n    time.sleep(60)\n    os._exit(0)\n"
                   "os.write(SANDBOX_CHANNEL_FD, str(pid).encode())\n", config=RAW)
    pid = int(r.channel)
    time.sleep(0.2)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z")  # dead (a zombie until init reaps it)


def test_network_namespace_without_guard(listener):
    r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {listener}), timeout=1)\n", config=RAW)
    if not r.network_isolated:
        pytest.skip("this kernel/container does not allow a private network namespace")
    assert r.returncode == 1 and "Network is unreachable" in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores RLIMIT_NPROC: an unguarded fork bomb is unsafe here")
def test_fork_bomb_without_guard_as_non_root():
    r = run_python("import os\nwhile True:\n    os.fork()\n", config=SandboxConfig(timeout_s=2.0, guard=False))
    assert r.returncode is not None and r.wall_s < 3.0


def test_threaded_io_solution_and_odd_text(problems):
    threaded = ("import sys, threading\nthreading.stack_size(1 << 26)\nsys.setrecursionlimit(10**5)\n"
                "def main():\n    a, b = map(int, input().split())\n    print(a + b)\n"
                "threading.Thread(target=main).start()\n")
    assert ct.code_reward(_block(threaded), problems[2], FAST) == 1.0
    for odd in ("x = '\ud800'\n", "x = 1\x00\n", "\ufeff" + ADD):
        assert ct.code_reward(_block(odd), problems[0], FAST) in (0.0, 1.0)

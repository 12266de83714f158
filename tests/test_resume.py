"""Exact resume: SIGKILL an RL run after a checkpoint, resume it, and the following iterations' metrics
equal those of an uninterrupted run with the same seed, bit for bit (CPU, fixed thread count)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_scalars

ITERS = 6


def command(data, save, tb, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_rspo.rl.trainer",
            "--train-data", str(data / "train.jsonl"), "--test-data", str(data / "test.jsonl"),
            "--tokenizer-model", str(data / "tok.model"), "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "2", "--ffn-hidden-size", "64", "--num-experts", "4",
            "--moe-router-topk", "2", "--rollout-batch-size", "2", "--num-generations", "4",
            "--max-new-tokens", "6", "--train-iters", str(ITERS), "--num-minibatches", "2", "--ppo-epochs", "2",
            "--lr", "3e-3", "--save", str(save), "--save-interval", "2", "--log-interval", "1", "--no-progress",
            "--tensorboard-dir", str(tb), "--seed", "11", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# Off-policy: the rollout generated ahead with the older weights is in the checkpoint, so the resumed run
# trains on the same samples as the uninterrupted one (without it, it would generate them anew).
@pytest.mark.parametrize("schedule", [(), ("--async-rollout", "--max-staleness", "1")], ids=["sync", "one_step_off"])
def test_sigkill_then_resume_matches_uninterrupted_run(countdown_data, tmp_path, schedule):
    def cmd(save, tb, *extra: str) -> list[str]:
        return command(countdown_data, save, tb, *schedule, *extra)

    subprocess.run(cmd(tmp_path / "a", tmp_path / "tb_a"), check=True, env=ENV, timeout=600,
                   stdout=subprocess.DEVNULL)
    reference = run_scalars(tmp_path / "tb_a")

    save_b = tmp_path / "b"
    proc = subprocess.Popen(cmd(save_b, tmp_path / "tb_b1"), env=ENV, stdout=subprocess.DEVNULL)
    tracker = save_b / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if tracker.exists() and tracker.read_text().strip() == "2":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(tracker.read_text())
    assert killed_at == 2

    subprocess.run(cmd(save_b, tmp_path / "tb_b2", "--load", str(save_b)), check=True, env=ENV,
                   timeout=600, stdout=subprocess.DEVNULL)
    resumed = run_scalars(tmp_path / "tb_b2")
    after = {k: v for k, v in reference.items() if k[1] > killed_at}
    assert after and set(after) == set(resumed)
    mismatched = {k: (after[k], resumed[k]) for k in after if after[k] != resumed[k]}
    assert not mismatched, f"resumed metrics differ: {sorted(mismatched.items())[:5]}"

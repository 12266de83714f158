"""Faults a run meets in its first week: SIGTERM (a slurm preemption) and Ctrl-C end it at an iteration boundary
with a checkpoint and one line; a damaged checkpoint is named with its file, and a resume falls back to the
newest intact one with a warning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_rspo import checkpoint as ckpt
from megatron_rspo.checkpoint_check import damage
from megatron_rspo.config import ModelConfig, ParallelConfig

MODEL = ModelConfig(vocab_size=64, num_layers=1, hidden_size=32, ffn_hidden_size=32, num_attention_heads=2,
                    num_experts=4, moe_router_topk=2)


def _trainer_args(data, run) -> list[str]:
    return ["--train-data", str(data / "train.jsonl"), "--test-data", str(data / "test.jsonl"),
            "--tokenizer-model", str(data / "tok.model"), "--num-layers", "1", "--hidden-size", "32",
            "--num-attention-heads", "2", "--ffn-hidden-size", "32", "--num-experts", "4", "--train-iters", "500",
            "--rollout-batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4", "--no-progress",
            "--save", str(run), "--save-interval", "1000", "--eval-interval", "0"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_stops_with_one_line(countdown_data, tmp_path, sig):
    run, log = tmp_path / "run", tmp_path / "out.log"
    with open(log, "w") as out:  # a file, not a pipe: nothing the test does can block the child's writes
        proc = subprocess.Popen([sys.executable, "-m", "megatron_rspo.rl.trainer",
                                 *_trainer_args(countdown_data, run)], stdout=out, stderr=subprocess.STDOUT,
                                env={**{k: v for k, v in os.environ.items() if not k.startswith("MASTER_")},
                                     "PYTHONWARNINGS": "ignore"})  # not this process's rendezvous port
    deadline = time.monotonic() + 300  # a hang guard, not a timing
    while "memory plan per rank" not in log.read_text():  # set up: stop at the first iteration boundary
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode == 128 + sig, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    name = signal.Signals(sig).name
    assert f"error: stopped by {name} after iteration 1; checkpoint saved to {run}" in text
    assert ckpt.latest_iteration(str(run)) == 1 and damage(str(run / "iter_0000001")) is None


@pytest.fixture()
def two_checkpoints(tmp_path):
    from megatron_rspo.model.provider import build_model, init_distributed

    init_distributed(ParallelConfig(), seed=3)
    model = build_model(MODEL, ParallelConfig())
    root = tmp_path / "ckpt"
    for it in (1, 2):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        ckpt.save_checkpoint(str(root), it, model, configs=(MODEL, ParallelConfig()), save_rng=False)
    return root, model


def _truncate(path: str) -> str:
    shard = sorted(f for f in os.listdir(path) if f.endswith(".distcp"))[0]
    file = os.path.join(path, shard)
    with open(file, "r+b") as fh:
        fh.truncate(os.path.getsize(file) // 2)
    return file


def test_a_damaged_checkpoint_is_named_and_a_resume_falls_back(two_checkpoints, caplog):
    root, model = two_checkpoints
    newest = str(root / "iter_0000002")
    file = _truncate(newest)
    assert damage(newest).startswith(f"{file}: truncated")
    with pytest.raises(ckpt.CheckpointError) as err:  # asked for this one: named, the intact one offered
        ckpt.load_checkpoint(newest, model, model_config=MODEL)
    assert file in str(err.value) and str(root / "iter_0000001") in str(err.value)
    with caplog.at_level("WARNING"):
        loaded = ckpt.load_checkpoint(str(root), model, model_config=MODEL)  # resuming: the newest intact one
    assert loaded.iteration == 1 and "resuming from the newest intact one, iter_0000001" in caplog.text


def test_a_missing_shard_with_no_intact_checkpoint_left_is_one_error(two_checkpoints):
    root, model = two_checkpoints
    for it in ("iter_0000001", "iter_0000002"):
        os.remove(os.path.join(root, it, "common.pt"))
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(str(root), model, model_config=MODEL)
    assert "incomplete or corrupt" in str(err.value) or "damaged" in str(err.value)


def test_a_full_disk_is_one_line_and_publishes_nothing(two_checkpoints, monkeypatch):
    import shutil
    from collections import namedtuple

    root, model = two_checkpoints
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.save_checkpoint(str(root), 3, model, configs=(MODEL, ParallelConfig()), save_rng=False)
    assert "no space left" in str(err.value) and "the previous checkpoint is intact" in str(err.value)
    assert ckpt.latest_iteration(str(root)) == 2 and not [n for n in os.listdir(root) if ".tmp-" in n]


def test_write_errors_are_recognised_through_the_chain():
    import errno

    from megatron_rspo.checkpoint_check import write_problem

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/iter/__0_0.distcp")
        except OSError as inner:
            raise RuntimeError("checkpoint write failed") from inner
    except RuntimeError as outer:
        assert write_problem(outer) == "no space left on device (/ckpt/iter/__0_0.distcp)"
    assert write_problem(RuntimeError("unexpected pos 704 vs 598")).startswith("no space left")
    assert write_problem(ValueError("a bug")) is None


def test_save_must_be_writable_and_lr_positive(tmp_path, monkeypatch):
    from megatron_rspo.config import OptimConfig, RunConfig
    from megatron_rspo.validation import optim_errors, run_errors

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))  # read-only
    errors = run_errors(RunConfig(tokenizer_model="t", save=str(locked / "run")), check_files=False)
    assert any("cannot write there" in e for e in errors)
    assert run_errors(RunConfig(tokenizer_model="t", save=str(tmp_path / "new" / "run")), check_files=False) == []
    assert any("--lr must be > 0" in e for e in optim_errors(OptimConfig(lr=0.0)))

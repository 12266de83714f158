"""The entry points run under torchrun (2 ranks, gloo): SFT and RL with data parallelism, RL with
TP+SP and EP carved from the TP ranks (generation with sequence parallelism off), SFT with PP."""

from __future__ import annotations

import pytest
from conftest import run_torchrun

MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--ffn-hidden-size", "64",
         "--num-experts", "4", "--moe-router-topk", "2", "--log-interval", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data(countdown_data):
    d = countdown_data
    return ["--train-data", str(d / "train.jsonl"), "--test-data", str(d / "test.jsonl"),
            "--tokenizer-model", str(d / "tok.model")]


def torchrun(module: str, *args: str) -> str:
    proc = run_torchrun("-m", module, *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def step_line(out: str, step: int, key: str) -> str:
    lines = [line for line in out.splitlines() if f"] step {step} |" in line and key in line]
    assert len(lines) == 1, f"expected one console line for step {step} (rank 0 only):\n{out[-3000:]}"
    return lines[0]


@pytest.mark.parametrize("layout", [[], ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                         "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type",
                                         "alltoall"]], ids=["dp2", "tp2_sp_ep2"])
def test_rl_trainer_under_torchrun(data, layout):
    out = torchrun("megatron_rspo.rl.trainer", *data, *MODEL, *layout, "--rollout-batch-size", "2",
                   "--num-generations", "4", "--max-new-tokens", "6", "--train-iters", "2", "--num-minibatches", "2",
                   "--eval-interval", "2", "--eval-samples", "4")
    line = step_line(out, 2, "reward/mean")
    for name in ("router/gamma_mean", "router/shift_mean", "expert_load/max_over_mean", "eval/accuracy"):
        assert f"{name} " in line, name


@pytest.mark.parametrize("layout", [[], ["--pipeline-model-parallel-size", "2"]], ids=["dp2", "pp2"])
def test_sft_under_torchrun(data, layout):
    out = torchrun("megatron_rspo.sft", *data, *MODEL, *layout, "--micro-batch-size", "4", "--num-microbatches", "2",
                   "--train-iters", "2", "--eval-interval", "2", "--eval-samples", "4", "--eval-max-new-tokens", "6")
    loss = float(step_line(out, 2, "train/loss").split("train/loss ")[1].split(" ")[0])
    assert 0.5 < loss < 10  # a real cross-entropy reached rank 0 (under PP it lives on the last stage)

"""Shared fixtures: one gloo process group per test process, tiny Megatron models on CPU."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str):
    """A script of the repository (``benchmarks/x.py``, ``tools/y.py``) as a module named by its stem,
    registered in sys.modules (dataclasses resolve their module by name)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def megatron_single_rank():
    """Initialise torch.distributed (gloo, 1 rank) + Megatron parallel state; returns a builder
    ``make(model_cfg=None, parallel_cfg=None, seed=1)`` for tiny GPT MoE models."""
    from megatron_rspo.config import ModelConfig, ParallelConfig
    from megatron_rspo.model.provider import build_model, init_distributed

    def make(model_cfg: ModelConfig | None = None, parallel_cfg: ParallelConfig | None = None, seed: int = 1):
        model_cfg = model_cfg or ModelConfig(vocab_size=64)
        parallel_cfg = parallel_cfg or ParallelConfig()
        init_distributed(parallel_cfg, seed=seed)
        return build_model(model_cfg, parallel_cfg)

    torch.manual_seed(0)
    return make


@pytest.fixture(scope="session")
def countdown_data(tmp_path_factory):
    """A small Countdown data set (64 train / 8 test) and a sentencepiece tokenizer ``tok.model``."""
    from megatron_rspo.tasks import countdown
    from megatron_rspo.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("countdown")
    train, test = countdown.generate_splits(64, 8, seed=3)
    countdown.save_jsonl(train, d / "train.jsonl")
    countdown.save_jsonl(test, d / "test.jsonl")
    train_sentencepiece([countdown.format_prompt(x) + countdown.sft_completion(x) for x in train + test],
                        str(d / "tok"), vocab_size=48)
    return d


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of a tensorboard run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# What a run measures of the machine (speed, memory), not part of its result: left out of exact comparisons.
MACHINE_MEASUREMENTS = ("time/", "memory/")


def run_scalars(logdir) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of a run's tensorboard scalars, without the machine's measurements."""
    return {(tag, step): v for tag, series in tensorboard_scalars(logdir).items()
            if not tag.startswith(MACHINE_MEASUREMENTS) for step, v in series}


def run_torchrun(*target: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` on a free loopback port (gloo, one thread per rank); ``target`` is a
    script path or ``-m module`` followed by its arguments. Output is captured; callers check it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           "--master-port", str(port), *target], env=env, capture_output=True, text=True,
                          timeout=timeout)

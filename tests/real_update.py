"""An RL run that must really learn something, watched from outside (CPU test and GPU check alike).

On the copy_digits task a random policy already earns partial rewards, so advantages, gradients and
updates are non-zero from the first iteration. The run is wrapped so that it can be checked that:
every iteration's rewards vary within the batch (a learning signal exists), the loss is finite and no
step was skipped, the weights change at every update, and each rollout after the first was sampled
with the weights the previous update produced (a fingerprint of the sampling model at generate time
equals the trained model's after that update, and differs from the one before it).
"""

from __future__ import annotations

import math

import torch

from megatron_rspo.tasks import copy_digits


def make_copy_data(directory, tokenizer_model) -> list[str]:
    """copy_digits train/test files in ``directory``; returns the data flags for the trainer."""
    copy_digits.save_jsonl(copy_digits.make_examples(64, seed=1), directory / "copy_train.jsonl")
    copy_digits.save_jsonl(copy_digits.make_examples(8, seed=2), directory / "copy_test.jsonl")
    return ["--task", "copy_digits", "--train-data", str(directory / "copy_train.jsonl"),
            "--test-data", str(directory / "copy_test.jsonl"), "--tokenizer-model", str(tokenizer_model)]


def _fingerprint(module: torch.nn.Module) -> tuple[float, ...]:
    return tuple(torch.stack([p.detach().double().sum() for p in module.parameters()]).tolist())


def run_and_check(argv: list[str], iterations: int = 3) -> list[dict[str, float]]:
    """Run ``iterations`` RL iterations with ``argv`` (data flags included) and assert the properties above;
    returns every iteration's metrics."""
    from megatron_rspo.config import from_args
    from megatron_rspo.rl.trainer import CONFIG_CLASSES, RLTrainer, build_parser

    ns = build_parser().parse_args([*argv, "--train-iters", str(iterations), "--no-progress", "--log-interval", "1"])
    trainer = RLTrainer(*(from_args(c, ns) for c in CONFIG_CLASSES))
    module, events, stats = trainer.engine.module, [], []
    engine_generate, metrics_log = trainer.rollout_engine.generate, trainer.metrics.log

    def generate(*args, **kwargs):
        events.append(("rollout", _fingerprint(module)))
        return engine_generate(*args, **kwargs)

    def log(it, values, console=False):
        events.append(("updated", _fingerprint(module)))
        stats.append(dict(values))
        return metrics_log(it, values, console=console)

    trainer.rollout_engine.generate, trainer.metrics.log = generate, log
    trainer.train()
    assert len(stats) == iterations
    for it, s in enumerate(stats, 1):
        assert s["reward/std"] > 0, f"iteration {it}: every reward equal, no learning signal ({s['reward/mean']})"
        assert math.isfinite(s["policy/loss"]) and s["optim/skipped_steps"] == 0, (it, s["policy/loss"])
        assert s["optim/grad_norm"] > 0, it
        assert all(math.isfinite(v) for v in s.values()), [k for k, v in s.items() if not math.isfinite(v)]
        for phase in ("rollout", "train"):  # memory per phase (RSS on CPU; allocated/reserved/peak on CUDA)
            assert any(k.startswith(f"memory/{phase}_") and v > 0 for k, v in s.items()), (phase, it)
    kinds = [k for k, _ in events]
    assert kinds == ["rollout", "updated"] * iterations, kinds
    fps = [fp for _, fp in events]
    for i in range(iterations):
        assert fps[2 * i + 1] != fps[2 * i], f"update {i + 1} did not change the weights"
        if i:
            assert fps[2 * i] == fps[2 * i - 1], f"rollout {i + 1} was not sampled with update {i}'s weights"
    return stats

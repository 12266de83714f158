"""A short RL run of the whole loop on a tiny model, for each algorithm and baseline mode."""

from __future__ import annotations

import pytest
from conftest import tensorboard_scalars

from megatron_rspo.rl import trainer

# Tensorboard scalar names are part of the interface (DESIGN §4).
EXPECTED = [
    "reward/mean", "reward/std", "reward/accuracy", "response/length_mean",
    "policy/is_ratio_mean", "policy/is_ratio_std", "policy/is_ratio_max",
    "policy/seq_is_ratio_mean", "policy/seq_is_ratio_std", "policy/seq_is_ratio_max",
    "policy/clip_frac_low", "policy/clip_frac_high", "policy/ppo_kl", "policy/entropy",
    "optim/grad_norm", "optim/lr",
    "router/shift_layer_0", "router/shift_layer_1", "router/shift_mean",
    "router/gamma_mean", "router/gamma_min", "router/gamma_p05", "router/gamma_floor_frac",
    "router/expert_set_change_rate", "expert_load/max_over_mean", "expert_load/layer_0_max_over_mean",
    "collapse/warning", "eval/accuracy", "eval/reward_mean",
]


def scalar_names(logdir) -> set[str]:
    return set(tensorboard_scalars(logdir))


def run(data, tmp_path, *extra: str) -> dict[str, float]:
    return trainer.main([
        "--train-data", str(data / "train.jsonl"), "--test-data", str(data / "test.jsonl"),
        "--tokenizer-model", str(data / "tok.model"), "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "2", "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-router-topk", "2",
        "--rollout-batch-size", "2", "--num-generations", "4", "--max-new-tokens", "6", "--train-iters", "2",
        "--num-minibatches", "2", "--ppo-epochs", "2", "--eval-interval", "2", "--eval-samples", "4",
        "--log-interval", "1", "--no-progress", "--tensorboard-dir", str(tmp_path / "tb"), *extra,
    ])


@pytest.mark.parametrize("algorithm", ["rspo", "grpo", "gspo", "gmpo"])
def test_each_algorithm_runs_and_logs_every_diagnostic(countdown_data, tmp_path, algorithm):
    extra = ["--rl-algorithm", algorithm] + ([] if algorithm == "rspo" else ["--router-shift"])
    last = run(countdown_data, tmp_path, *extra)
    names = scalar_names(tmp_path / "tb")
    missing = [n for n in EXPECTED if n not in names]
    assert not missing, f"not logged: {missing}"
    assert 0.8 <= last["router/gamma_min"] <= 1.0


@pytest.mark.parametrize("mode", [["--routing-replay"], ["--freeze-router"], ["--no-recompute-old-logprobs"],
                                  ["--kl-coeff", "0.1", "--entropy-coeff", "0.01", "--num-microbatches", "2"]])
def test_baseline_modes_run(countdown_data, tmp_path, mode):
    last = run(countdown_data, tmp_path, "--rl-algorithm", "gmpo", *mode)
    assert "policy/ppo_kl" in last


def test_bad_rl_settings_fail_before_work(countdown_data, tmp_path):
    from megatron_rspo.config import ConfigError

    with pytest.raises(ConfigError, match="--num-minibatches"):
        run(countdown_data, tmp_path, "--num-minibatches", "3")


@pytest.mark.parametrize("task", ["math", "code"])
def test_other_tasks_run_through_the_trainer(tmp_path, task):
    """--task math|code: prompts, rewards and evaluation come from the task registry."""
    from pathlib import Path

    from megatron_rspo.tasks.registry import get_task
    from megatron_rspo.tokenizer import train_sentencepiece

    fixture = Path(__file__).parent / "fixtures" / f"{task}_small.jsonl"
    rows = get_task(task).load(str(fixture))
    texts = [get_task(task).prompt_text(x, "chat") for x in rows] + ["```python\ndef f():\n    return 1\n```\\boxed{1}"]
    train_sentencepiece(texts, str(tmp_path / "tok"), vocab_size=120, model_type="char")
    last = trainer.main([
        "--task", task, "--template", "chat", "--train-data", str(fixture), "--test-data", str(fixture),
        "--tokenizer-model", str(tmp_path / "tok.model"), "--num-layers", "1", "--hidden-size", "32",
        "--num-attention-heads", "2", "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-router-topk", "2",
        "--max-position-embeddings", "1024", "--rollout-batch-size", "2", "--num-generations", "2",
        "--max-new-tokens", "4", "--train-iters", "1", "--num-minibatches", "1", "--eval-interval", "1",
        "--eval-samples", "2", "--no-progress",
    ])
    assert last["reward/mean"] == 0.0 and "eval/accuracy" in last  # an untrained model solves nothing

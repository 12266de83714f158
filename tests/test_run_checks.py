"""Artifacts that do not belong together (rl/run_checks.py): each answered with one message before any model is
built, or a warning line where a run can go on."""

from __future__ import annotations

import pytest

from megatron_rspo.config import ConfigError, ModelConfig
from megatron_rspo.rl import run_checks, trainer


def _args(data, *extra: str) -> list[str]:
    return ["--train-data", str(data / "train.jsonl"), "--test-data", str(data / "test.jsonl"),
            "--tokenizer-model", str(data / "tok.model"), "--num-layers", "1", "--hidden-size", "32",
            "--num-attention-heads", "2", "--ffn-hidden-size", "32", "--num-experts", "4", "--train-iters", "1",
            "--rollout-batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4", "--no-progress",
            "--eval-interval", "0", *extra]


def test_architecture_flags_that_contradict_init_from_are_named():
    saved = ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=4, vocab_size=512)
    cli = ModelConfig(num_layers=2, hidden_size=128, recompute_granularity="full")  # hidden equals, recompute runtime
    given = {"num_layers", "hidden_size", "recompute_granularity"}
    assert run_checks.init_from_conflicts(cli, saved, given) == ["--num-layers 2 (the checkpoint has 4)"]
    assert run_checks.init_from_conflicts(cli, saved, set()) == []  # defaults left alone say nothing


def test_a_tokenizer_that_is_not_the_checkpoints_is_refused():
    trained = {"RunConfig": {"tokenizer_model": "data/countdown/tok.model"}}
    assert "use that tokenizer" in run_checks.tokenizer_problem("other.model", 300, 512, trained)
    assert run_checks.tokenizer_problem("tok.model", 512, 512, trained) is None
    assert run_checks.tokenizer_problem("qwen3", 151_669, 151_936, None) is None  # a converted HF model's padding
    assert "more than the model's" in run_checks.tokenizer_problem("big", 600, 512, None)


def test_prompts_past_the_positions_name_the_longest(countdown_data, monkeypatch):
    built = []
    monkeypatch.setattr(trainer, "Engine", lambda *a, **k: built.append(1))
    with pytest.raises(ConfigError) as err:
        trainer.main(_args(countdown_data, "--max-position-embeddings", "16", "--max-new-tokens", "8"))
    assert "the longest prompt" in str(err.value) and "train.jsonl row" in str(err.value) and not built


def test_resuming_a_finished_run_or_with_changed_flags(countdown_data, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level("INFO"):
        trainer.main(_args(countdown_data, "--save", str(run), "--load", str(run)))  # a fresh run: said so
    assert f"--load {run} does not exist: starting a new run" in caplog.text
    assert f"checkpoint saved: {run}/iter_0000001" in caplog.text
    assert "run finished: 1 iterations in" in caplog.text and f"checkpoint in {run}" in caplog.text
    with pytest.raises(ConfigError) as err:
        trainer.main(_args(countdown_data, "--load", str(run)))
    assert "already reached iteration 1 (--train-iters 1): nothing to train" in str(err.value)
    caplog.clear()
    with caplog.at_level("WARNING"):
        trainer.main(_args(countdown_data, "--load", str(run), "--train-iters", "2", "--lr", "5e-4",
                           "--rl-algorithm", "grpo"))
    assert "flags that changed since it was saved" in caplog.text
    assert "--lr 0.001 -> 0.0005" in caplog.text and "--rl-algorithm 'rspo' -> 'grpo'" in caplog.text


def test_given_flags_are_the_ones_on_the_command_line():
    from megatron_rspo.cli import given_flags

    assert given_flags(trainer.build_parser(), ["--num-layers", "2", "--lr", "1e-3"]) == {"num_layers", "lr"}

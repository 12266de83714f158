"""--config FILE: YAML or a saved run_config.json supplies flag values, the command line overrides them, a saved
run repeats exactly, and a bad file is one message naming it."""

from __future__ import annotations

import json

import pytest
from conftest import run_scalars

from megatron_rspo.cli import config_file_values, parse_with_config
from megatron_rspo.config import ConfigError
from megatron_rspo.rl import trainer


def _args(data) -> list[str]:
    return ["--train-data", str(data / "train.jsonl"), "--test-data", str(data / "test.jsonl"),
            "--tokenizer-model", str(data / "tok.model"), "--num-layers", "1", "--hidden-size", "32",
            "--num-attention-heads", "2", "--ffn-hidden-size", "32", "--num-experts", "4", "--train-iters", "2",
            "--rollout-batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4", "--no-progress",
            "--eval-interval", "0", "--seed", "7", "--lr", "5e-4"]


def test_yaml_values_and_command_line_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 2.0e-4\nrollout-batch-size: 8\nRLConfig:\n  rl_algorithm: grpo\n  num_generations: 4\n")
    ns = parse_with_config(trainer.build_parser(), ["--config", str(cfg), "--num-generations", "6"])
    assert (ns.lr, ns.rollout_batch_size, ns.rl_algorithm, ns.num_generations) == (2.0e-4, 8, "grpo", 6)
    assert ns.config_flags == {"lr", "rollout_batch_size", "rl_algorithm", "num_generations"}


@pytest.mark.parametrize("text, message", [("lr: [1, 2\n", "not valid YAML"), ("- a\n- b\n", "expected a mapping"),
                                           ("lr: 1\nlearning_rate: 2\n", "unknown flags --learning-rate")])
def test_a_bad_config_file_is_one_message(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        config_file_values(str(cfg), {"lr"})
    assert message in str(err.value) and str(cfg) in str(err.value)


def test_a_saved_run_config_repeats_the_run(countdown_data, tmp_path):
    trainer.main([*_args(countdown_data), "--save", str(tmp_path / "a"), "--tensorboard-dir", str(tmp_path / "tb_a")])
    saved = tmp_path / "a" / "iter_0000002" / "run_config.json"
    assert json.loads(saved.read_text())["OptimConfig"]["lr"] == 5e-4
    trainer.main(["--config", str(saved), "--save", str(tmp_path / "b"), "--tensorboard-dir", str(tmp_path / "tb_b")])
    assert run_scalars(tmp_path / "tb_a") == run_scalars(tmp_path / "tb_b")


def test_wandb_offline_records_the_metrics(countdown_data, tmp_path, monkeypatch):
    """--wandb-project with --wandb-mode offline: a W&B run on disk, no network; its log holds the metrics."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e .[wandb])")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer.main([*_args(countdown_data), "--wandb-project", "rspo-test", "--wandb-mode", "offline",
                  "--wandb-dir", str(tmp_path), "--wandb-run-name", "first-week"])
    logs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    data = logs[0].read_bytes()
    assert b"reward/mean" in data and b"policy/loss" in data and b"first-week" in data

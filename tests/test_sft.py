"""A short SFT run on the tiny MoE: the loss decreases, a checkpoint is saved, and it resumes."""

from __future__ import annotations

from conftest import tensorboard_scalars

from megatron_rspo import checkpoint, sft


def args(data, tmp_path, iters: int, *extra: str) -> list[str]:
    return ["--train-data", str(data / "train.jsonl"), "--test-data", str(data / "test.jsonl"),
            "--tokenizer-model", str(data / "tok.model"), "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--ffn-hidden-size", "128", "--num-experts", "4", "--moe-router-topk", "2",
            "--train-iters", str(iters), "--micro-batch-size", "16", "--lr", "3e-3", "--eval-samples", "8",
            "--log-interval", "5", "--no-progress", "--save", str(tmp_path / "ckpt"),
            "--tensorboard-dir", str(tmp_path / "tb"), *extra]


def test_sft_loss_decreases_and_checkpoint_is_saved(countdown_data, tmp_path):
    acc = sft.main(args(countdown_data, tmp_path, 40))
    assert 0.0 <= acc <= 1.0
    loss = [v for _, v in tensorboard_scalars(tmp_path / "tb")["train/loss"]]
    assert len(loss) == 40
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert checkpoint.latest_iteration(str(tmp_path / "ckpt")) == 40
    assert "eval/accuracy" in tensorboard_scalars(tmp_path / "tb")


def test_sft_resumes_from_its_checkpoint(countdown_data, tmp_path):
    sft.main(args(countdown_data, tmp_path, 6, "--save-interval", "3"))
    sft.main(args(countdown_data, tmp_path, 9, "--load", str(tmp_path / "ckpt")))
    steps = [s for s, _ in tensorboard_scalars(tmp_path / "tb")["train/loss"]]
    assert max(steps) == 9 and checkpoint.latest_iteration(str(tmp_path / "ckpt")) == 9

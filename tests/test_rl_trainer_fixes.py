"""Trainer behaviour a review found broken: the KL reference across a resume, sampling temperature end to
end, the non-finite guard in the loop, and honest metrics."""

from __future__ import annotations

import pytest
from conftest import run_scalars

from megatron_rspo.rl import trainer
from megatron_rspo.rl.losses import POLICY_LOSSES


def _args(data, tmp_path, *extra: str) -> list[str]:
    return ["--train-data", str(data / "train.jsonl"), "--test-data", str(data / "test.jsonl"),
            "--tokenizer-model", str(data / "tok.model"), "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "2", "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-router-topk", "2",
            "--rollout-batch-size", "2", "--num-generations", "4", "--max-new-tokens", "6", "--log-interval", "1",
            "--no-progress", "--seed", "5", *extra]


def test_resume_with_kl_keeps_the_initial_reference(countdown_data, tmp_path):
    """--kl-coeff > 0: a run resumed from its iteration-2 checkpoint logs the same iterations 3-4 as an
    uninterrupted run, bit for bit (the reference is the initial policy, not the resumed one)."""
    # Untrained: rewards (so advantages) are 0; the entropy bonus moves the policy away from the reference.
    common = ("--kl-coeff", "0.5", "--entropy-coeff", "0.05", "--lr", "3e-3", "--lr-decay-style", "constant",
              "--num-minibatches", "2", "--ppo-epochs", "2")
    trainer.main(_args(countdown_data, tmp_path, *common, "--train-iters", "4",
                       "--tensorboard-dir", str(tmp_path / "tb_a")))
    trainer.main(_args(countdown_data, tmp_path, *common, "--train-iters", "2", "--save", str(tmp_path / "b"),
                       "--tensorboard-dir", str(tmp_path / "tb_b1")))
    trainer.main(_args(countdown_data, tmp_path, *common, "--train-iters", "4", "--save", str(tmp_path / "b"),
                       "--load", str(tmp_path / "b"), "--tensorboard-dir", str(tmp_path / "tb_b2")))
    ref, resumed = run_scalars(tmp_path / "tb_a"), run_scalars(tmp_path / "tb_b2")
    after = {k: v for k, v in ref.items() if k[1] > 2}
    assert ("policy/kl_ref", 3) in after and after["policy/kl_ref", 3] > 0
    assert set(after) == set(resumed)
    assert {k: (after[k], resumed[k]) for k in after if after[k] != resumed[k]} == {}


def test_temperature_reaches_every_pass(countdown_data, tmp_path):
    """T = 0.7: the old-policy pass and the first training step see the same distribution (ratio exactly 1
    with one mini-batch), and the rollout's own log-probs are at T too (ratio ~1 without the old pass)."""
    one = ("--temperature", "0.7", "--num-minibatches", "1", "--ppo-epochs", "1", "--train-iters", "1")
    last = trainer.main(_args(countdown_data, tmp_path, *one))
    assert last["policy/is_ratio_max"] == 1.0 and last["policy/is_ratio_std"] == 0.0
    last = trainer.main(_args(countdown_data, tmp_path, *one, "--no-recompute-old-logprobs"))
    assert abs(last["policy/is_ratio_max"] - 1.0) < 1e-4 and last["policy/is_ratio_std"] < 1e-5


def test_greedy_rl_is_refused_before_any_model(countdown_data, tmp_path):
    from megatron_rspo.config import ConfigError

    with pytest.raises(ConfigError, match="--temperature"):
        trainer.main(_args(countdown_data, tmp_path, "--temperature", "0"))


def test_repeated_non_finite_steps_stop_the_run(countdown_data, tmp_path, monkeypatch):
    real = POLICY_LOSSES["gmpo"]

    def poisoned(*a, **k):
        loss, stats = real(*a, **k)
        return loss * float("nan"), stats

    monkeypatch.setitem(POLICY_LOSSES, "gmpo", poisoned)
    with pytest.raises(trainer.TrainingStopped, match="3 optimizer steps in a row"):
        trainer.main(_args(countdown_data, tmp_path, "--rl-algorithm", "gmpo", "--num-minibatches", "2",
                           "--train-iters", "3", "--max-consecutive-skipped-steps", "3"))


def test_skipped_steps_are_counted_and_logged(countdown_data, tmp_path, monkeypatch):
    real, calls = POLICY_LOSSES["gmpo"], []

    def first_poisoned(*a, **k):
        loss, stats = real(*a, **k)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 1 else loss), stats

    monkeypatch.setitem(POLICY_LOSSES, "gmpo", first_poisoned)
    trainer.main(_args(countdown_data, tmp_path, "--rl-algorithm", "gmpo", "--num-minibatches", "2",
                       "--train-iters", "2", "--tensorboard-dir", str(tmp_path / "tb")))
    s = run_scalars(tmp_path / "tb")
    assert s["optim/skipped_steps", 1] == 1.0 and s["optim/skipped_steps", 2] == 1.0


@pytest.mark.parametrize("sizing", [["--micro-batch-size", "2"], ["--micro-batch-tokens", "40"]])
def test_every_pass_uses_the_training_micro_batch(countdown_data, tmp_path, monkeypatch, sizing):
    """The old-policy, KL-reference and training forwards all run micro-batches of the same rows (once they
    were a whole rollout / --num-microbatches and one forward over the whole rollout); generation runs at
    most --generation-batch-size rows at once."""
    from megatron_rspo.model import logprobs
    from megatron_rspo.rl import step
    from megatron_rspo.rollout import engine as engine_mod

    forwards, generated = [], []
    real_forward, real_generate = logprobs.forward_logits, engine_mod.generate

    def counting_forward(model, tokens, **kw):
        forwards.append(tuple(tokens.shape))
        return real_forward(model, tokens, **kw)

    def counting_generate(model, prompts, *a, **kw):
        generated.append(kw.get("max_batch_rows"))
        return real_generate(model, prompts, *a, **kw)

    monkeypatch.setattr(step, "forward_logits", counting_forward)
    monkeypatch.setattr(engine_mod, "generate", counting_generate)
    trainer.main(_args(countdown_data, tmp_path, "--kl-coeff", "0.1", "--num-minibatches", "2", "--train-iters", "1",
                       "--generation-batch-size", "4", *sizing))
    assert generated == [4]
    rows = {b for b, _ in forwards}
    if sizing[0] == "--micro-batch-size":
        assert rows == {2}
    else:
        length = forwards[0][1]
        assert rows == {max(1, 40 // length)}, (rows, length)
    # 8 rows: old pass 8/r forwards, reference 8/r, training 2 mini-batches of 4 rows -> 8/r in all
    r = next(iter(rows))
    assert len(forwards) == 3 * -(-8 // r) or len(forwards) == -(-8 // r) + -(-8 // r) + 2 * -(-4 // r)


def test_fused_logprobs_train_like_the_standard_path(countdown_data, tmp_path):
    """--fused-logprobs (hidden states, token chunks, recomputed backward) through the whole loop, with the
    KL and entropy terms: the same iteration as the standard path, to fp32 rounding."""
    extra = ("--kl-coeff", "0.1", "--entropy-coeff", "0.01", "--train-iters", "2", "--num-minibatches", "2",
             "--lr", "3e-3")
    std = trainer.main(_args(countdown_data, tmp_path, *extra))
    fused = trainer.main(_args(countdown_data, tmp_path, *extra, "--fused-logprobs", "--logprob-chunk-tokens", "7"))
    for k in ("policy/entropy", "policy/kl_ref", "policy/ppo_kl", "optim/grad_norm", "policy/is_ratio_max"):
        assert fused[k] == pytest.approx(std[k], rel=1e-4, abs=1e-6), k


def test_builtin_engine_has_exactly_zero_mismatch(countdown_data, tmp_path):
    """The built-in engine samples with the training model itself: π_rollout is π_old by construction."""
    last = trainer.main(_args(countdown_data, tmp_path, "--train-iters", "1", "--num-minibatches", "2"))
    names = ("mismatch/k3_kl", "mismatch/abs_logp_diff_mean", "mismatch/abs_logp_diff_max",
             "mismatch/ratio_out_of_band_frac")
    assert [last[n] for n in names] == [0.0] * 4

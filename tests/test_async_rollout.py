"""The off-policy schedule (versions, staleness bound, identical to the synchronous loop at staleness 0) and
DAPO dynamic sampling (batch filled, all-equal groups gone, round cap respected, overlong handling)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_scalars

from megatron_rspo.rl import trainer
from megatron_rspo.rl.async_rollout import RolloutQueue, pending_state, restore_pending
from megatron_rspo.rl.dynamic_sampling import informative_groups, overlong_penalty, truncated
from megatron_rspo.rl.experience import Experience


class _Engine:
    """Stands in for a rollout engine: a rollout is the weight version it was sampled with."""

    def __init__(self) -> None:
        self.version = 0

    def produce(self, index: int) -> tuple[int, int]:
        return index, self.version


@pytest.mark.parametrize("staleness", [0, 1, 2])
@pytest.mark.parametrize("overlap", [False, True])
def test_queue_bounds_staleness_and_keeps_order(staleness, overlap):
    engine, position = _Engine(), [0]

    def produce(index):
        position[0] += 1
        return engine.produce(index)

    q = RolloutQueue(produce, staleness, overlap, position=lambda: position[0])
    seen = []
    for k in range(6):
        index, version = q.get(k)
        assert index == k and k - version <= staleness and version <= k
        seen.append(k - version)
        q.wait()  # training on rollout k is done; the generation started at version k has finished
        engine.version = k + 1  # the weight sync
    assert seen[staleness:] == [staleness] * (6 - staleness)  # steady state: exactly N versions behind
    assert q.resume_position(position[0]) == position[0] - staleness


def test_queue_reraises_generation_errors():
    def produce(index):
        if index == 1:
            raise ValueError("engine died")
        return index

    q = RolloutQueue(produce, 1, overlap=True, position=lambda: 0)
    assert q.get(0) == 0
    with pytest.raises(ValueError, match="engine died"):
        q.wait()


def _exp(version: int) -> Experience:
    return Experience(tokens=torch.arange(6).reshape(2, 3), response_mask=torch.ones(2, 2),
                      advantages=torch.tensor([0.5, -0.5]), rewards=torch.tensor([1.0, 0.0]),
                      rollout_logp=torch.full((2, 2), -0.25), weight_version=version)


def test_pending_rollouts_survive_a_checkpoint_round_trip(tmp_path):
    """What the checkpoint holds (plain CPU data, loadable with weights_only) restores the same rollouts in
    the same queue slots; a resumed schedule with a smaller --max-staleness drops the ones it cannot train
    on, with every later one, and rewinds the stream to regenerate them."""
    q = RolloutQueue(lambda i: None, 2, overlap=False, position=lambda: 0)
    q.restore([(5, (_exp(3), {"reward/_sum": torch.tensor(1.0), "rollout/filter_rounds": 1.0}), 40),
               (6, (_exp(4), {"reward/_sum": torch.tensor(2.0)}), 44)])
    torch.save(pending_state(q, stream_position=48), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)

    produced = []
    back = RolloutQueue(produced.append, 2, False, lambda: 0)
    assert restore_pending(back, state, iteration=5, device=torch.device("cpu")) == 48
    for index, version in ((5, 3), (6, 4)):
        exp, stats = back.ready[index][0]
        want = q.ready[index][0][0]
        assert exp.weight_version == version and exp.old_logp is None
        assert all(torch.equal(getattr(exp, f), getattr(want, f)) for f in ("tokens", "rollout_logp", "rewards"))
        assert torch.equal(stats["reward/_sum"], q.ready[index][0][1]["reward/_sum"])
    assert back.get(5)[0].weight_version == 3 and produced == [7]  # only the next one is generated

    tight = RolloutQueue(lambda i: None, 1, False, lambda: 0)  # rollout 5 (version 3) is 2 versions old
    assert restore_pending(tight, state, iteration=5, device=torch.device("cpu")) == 40 and not tight.ready


def test_dynamic_sampling_functions():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert informative_groups(r, 2).tolist() == [False, True, False]
    lens = torch.tensor([10, 14, 16])
    assert overlong_penalty(torch.zeros(3), lens, 16, 4, 1.0).tolist() == pytest.approx([0.0, -0.5, -1.0])
    assert overlong_penalty(torch.zeros(3), lens, 16, 0, 1.0).tolist() == [0.0] * 3
    assert truncated(torch.tensor([True, False, False]), lens, 16).tolist() == [False, False, True]


def _args(data, tmp_path, *extra: str) -> list[str]:
    return ["--train-data", str(data / "train.jsonl"), "--test-data", str(data / "test.jsonl"),
            "--tokenizer-model", str(data / "tok.model"), "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "2", "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-router-topk", "2",
            "--rollout-batch-size", "2", "--num-generations", "4", "--max-new-tokens", "6", "--log-interval", "1",
            "--no-progress", "--seed", "5", "--lr", "3e-3", "--num-minibatches", "2", "--train-iters", "3", *extra]


def test_async_at_staleness_zero_is_the_synchronous_loop(countdown_data, tmp_path):
    trainer.main(_args(countdown_data, tmp_path, "--tensorboard-dir", str(tmp_path / "sync"), "--entropy-coeff",
                       "0.05"))
    trainer.main(_args(countdown_data, tmp_path, "--tensorboard-dir", str(tmp_path / "async0"), "--entropy-coeff",
                       "0.05", "--async-rollout", "--max-staleness", "0"))
    a, b = run_scalars(tmp_path / "sync"), run_scalars(tmp_path / "async0")
    assert set(a) == set(b) and {k: (a[k], b[k]) for k in a if a[k] != b[k]} == {}


def test_one_step_off_rollouts_are_one_version_old(countdown_data, tmp_path):
    trainer.main(_args(countdown_data, tmp_path, "--tensorboard-dir", str(tmp_path / "tb"), "--entropy-coeff", "0.05",
                       "--async-rollout", "--max-staleness", "1"))
    s = run_scalars(tmp_path / "tb")
    assert [s["rollout/staleness_max", i] for i in (1, 2, 3)] == [0.0, 1.0, 1.0]
    # a stale rollout's log-probs are the behaviour policy's, not the proximal one's: the lag is measured
    assert s["mismatch/abs_logp_diff_mean", 1] == 0.0 and s["mismatch/abs_logp_diff_mean", 3] > 0


def test_filter_groups_fills_the_batch_with_informative_groups(countdown_data, tmp_path, monkeypatch):
    from megatron_rspo.rl import rollout_phase

    calls = {"n": 0}

    def flaky_score(text, inst, template):  # alternate all-equal and mixed groups
        calls["n"] += 1
        return float(calls["n"] % 3 == 0) if (calls["n"] // 4) % 2 else 0.0

    from dataclasses import replace

    task = replace(trainer.get_task("countdown"), score=flaky_score)
    monkeypatch.setattr(trainer, "get_task", lambda name: task)
    kept = []
    real = rollout_phase.collect_rollout

    def spy(ctx, index):
        exp, stats = real(ctx, index)
        kept.append((exp, stats))
        return exp, stats

    monkeypatch.setattr(rollout_phase, "collect_rollout", spy)
    monkeypatch.setattr(trainer, "collect_rollout", spy)
    trainer.main(_args(countdown_data, tmp_path, "--filter-groups", "--max-filter-rounds", "4", "--train-iters", "2"))
    for exp, stats in kept:
        assert len(exp) == 2 * 4 and 1 <= stats["rollout/filter_rounds"] <= 4
        groups = exp.advantages.view(-1, 4)
        live = exp.response_mask.view(-1, 4, exp.response_mask.shape[1]).sum((1, 2)) > 0
        assert bool(((groups != 0).any(1) | ~live).all())  # every group left in the loss is informative


def test_round_cap_is_respected_when_nothing_is_informative(countdown_data, tmp_path):
    last = trainer.main(_args(countdown_data, tmp_path, "--filter-groups", "--max-filter-rounds", "2",
                              "--train-iters", "1"))
    assert last["rollout/filter_rounds"] == 2 and last["rollout/kept_group_frac"] == 0.0  # untrained: all reward 0


def test_our_extensions_run_through_the_trainer(countdown_data, tmp_path):
    """token_gm (per-token γ inside GMPO's mean) and adaptive reuse (stop a rollout's remaining steps on a
    burst) are options of the loop; their numbers are in tests/test_losses_extensions.py and test_reuse.py."""
    last = trainer.main(_args(countdown_data, tmp_path, "--rl-algorithm", "rspo", "--router-shift-placement",
                              "token_gm", "--adaptive-reuse", "--ppo-epochs", "2"))
    assert 0.8 <= last["router/gamma_min"] <= 1.0
    assert last["reuse/steps_run"] >= 1 and last["reuse/skipped_steps"] >= 0


def test_reuse_stops_keep_the_lr_schedule_on_rollouts(countdown_data, tmp_path, monkeypatch):
    """Every rollout stops after its first of 2 x 2 steps; the cosine schedule still ends where the run's
    12 planned steps put it, so a stop changes how many steps a rollout gets, not the later rollouts' LR."""
    from megatron_rspo.rl.reuse import ReuseController

    record = ReuseController.should_stop  # the step is recorded, then the rollout stops regardless
    monkeypatch.setattr(ReuseController, "should_stop", lambda self, stats: record(self, stats) or True)
    seen = {}
    train = trainer.RLTrainer.train
    monkeypatch.setattr(trainer.RLTrainer, "train", lambda self, *a: seen.setdefault("t", self) and train(self, *a))
    trainer.main(_args(countdown_data, tmp_path, "--rl-algorithm", "rspo", "--adaptive-reuse", "--ppo-epochs", "2"))
    assert seen["t"].engine.scheduler.num_steps == 3 * 2 * 2


def test_token_gm_is_refused_where_it_means_nothing(countdown_data, tmp_path):
    from megatron_rspo.config import ConfigError

    with pytest.raises(ConfigError, match="token_gm"):
        trainer.main(_args(countdown_data, tmp_path, "--rl-algorithm", "grpo", "--router-shift",
                           "--router-shift-placement", "token_gm"))

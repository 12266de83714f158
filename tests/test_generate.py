"""KV-cache generation on a tiny Megatron MoE GPT (CPU): cache == no cache, batching, routing records."""

from __future__ import annotations

import pytest
import torch

from megatron_rspo.config import ModelConfig
from megatron_rspo.model.routing import RoutingSession, routing_session
from megatron_rspo.rollout.generate import Rollout, SamplingParams, generate
from megatron_rspo.rollout.sampling import sample, truncate_logits

VOCAB, PAD, EOS = 64, 0, 1
PROMPTS = [[5, 9, 13, 2, 7, 30, 41], [3, 4], [17, 22, 8, 50, 11], [60, 61, 62, 63]]


@pytest.fixture
def model(megatron_single_rank):
    cfg = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_layers=2,
        num_experts=4,
        moe_router_topk=2,
        transformer_impl="local",
        init_method_std=0.2,
    )
    m = megatron_single_rank(cfg, seed=3)
    m.train()  # generate() must switch to eval and restore this
    return m


def full_forward(model, tokens: torch.Tensor) -> tuple[torch.Tensor, RoutingSession]:
    """Independent cache-free forward over the right-padded tokens (causal mask suffices)."""
    s = tokens.shape[1]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    pos = torch.arange(s).unsqueeze(0).expand(tokens.shape[0], -1)
    model.eval()
    with torch.no_grad(), routing_session(model, RoutingSession(record=True)) as session:
        logits = model(tokens, pos, mask)
    model.train()
    return logits.float(), session


def check_layout(r: Rollout, prompts: list[list[int]]) -> None:
    n, s = r.tokens.shape
    assert r.logprobs.shape == r.response_mask.shape == (n, s - 1)
    assert int(r.total_lens.max()) == s
    for i, p in enumerate(prompts):
        assert r.tokens[i, : len(p)].tolist() == p
        assert (r.tokens[i, int(r.total_lens[i]) :] == PAD).all()
        m = r.response_mask[i]
        assert m.sum() == r.response_lens[i]
        assert m[len(p) - 1] == 1 and (m[: len(p) - 1] == 0).all()
        assert (r.logprobs[i][m == 0] == 0).all()


def test_cached_greedy_equals_cache_free(model):
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    cached = generate(model, PROMPTS, params, eos_id=None, pad_id=PAD)
    ref = generate(model, PROMPTS, params, eos_id=None, pad_id=PAD, use_cache=False)
    assert model.training
    check_layout(cached, PROMPTS)
    assert torch.equal(cached.tokens, ref.tokens)
    assert (cached.response_lens == 12).all()
    torch.testing.assert_close(cached.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    assert torch.equal(cached.routing_ids, ref.routing_ids)
    torch.testing.assert_close(cached.routing_log_scores, ref.routing_log_scores, atol=1e-5, rtol=0)


def test_batched_equals_alone(model):
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    batched = generate(model, PROMPTS, params, eos_id=None, pad_id=PAD)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], params, eos_id=None, pad_id=PAD)
        assert batched.response(i) == alone.response(0)
        s = int(alone.total_lens[0])
        torch.testing.assert_close(batched.logprobs[i, : s - 1], alone.logprobs[0], atol=1e-5, rtol=0)
        assert torch.equal(batched.routing_ids[i, :s], alone.routing_ids[0])


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_routing_and_logprobs_match_full_forward(model, temperature):
    params = SamplingParams(max_new_tokens=9, temperature=temperature)
    g = torch.Generator().manual_seed(0)
    r = generate(model, PROMPTS, params, eos_id=EOS, pad_id=PAD, generator=g)
    n, s = r.tokens.shape
    assert r.routing_ids.shape == (n, s, 2, 2) and r.routing_ids.dtype == torch.uint8
    assert r.routing_log_scores.shape == (n, s, 2, 2) and r.routing_log_scores.dtype == torch.float32
    logits, session = full_forward(model, r.tokens)
    ids = RoutingSession.stack(session.recorded_ids, 2)
    scores = RoutingSession.stack(session.recorded_log_scores, 2)
    valid = torch.arange(s)[None] < r.total_lens[:, None]
    assert torch.equal(r.routing_ids[valid], ids[valid])
    torch.testing.assert_close(r.routing_log_scores[valid], scores[valid], atol=1e-5, rtol=0)
    assert (r.routing_ids[~valid] == 0).all() and (r.routing_log_scores[~valid] == 0).all()
    # Label alignment: forward position j predicts token j+1.
    t = params.logprob_temperature
    ref = torch.log_softmax(logits[:, :-1] / t, -1).gather(-1, r.tokens[:, 1:, None]).squeeze(-1)
    ref = ref * r.response_mask
    torch.testing.assert_close(r.logprobs, ref, atol=1e-5, rtol=0)
    check_layout(r, PROMPTS)


def test_eos_stops_row(model):
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    probe = generate(model, PROMPTS, params, eos_id=None, pad_id=PAD, record_routing=False)
    assert probe.routing_ids is None
    eos = probe.response(1)[2]  # make row 1's third greedy token the EOS
    r = generate(model, PROMPTS, params, eos_id=eos, pad_id=PAD)
    assert bool(r.finished[1]) and len(r.response(1)) <= 3
    for i in range(len(PROMPTS)):
        resp = probe.response(i)
        cut = resp.index(eos) + 1 if eos in resp else len(resp)
        assert r.response(i) == resp[:cut]
        assert bool(r.finished[i]) == (eos in resp)
    check_layout(r, PROMPTS)


def test_early_stop_when_all_rows_finish(model):
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    probe = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=3, temperature=0.0), None, PAD)
    eos = probe.response(0)[0]
    r = generate(model, [PROMPTS[0]], params, eos_id=eos, pad_id=PAD)
    assert r.response(0) == [eos] and r.tokens.shape[1] == len(PROMPTS[0]) + 1
    assert r.routing_ids.shape[1] == len(PROMPTS[0]) + 1


def test_sampling_reproducible_with_generator(model):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.95)
    a = generate(model, PROMPTS, params, EOS, PAD, generator=torch.Generator().manual_seed(7))
    b = generate(model, PROMPTS, params, EOS, PAD, generator=torch.Generator().manual_seed(7))
    c = generate(model, PROMPTS, params, EOS, PAD, generator=torch.Generator().manual_seed(8))
    nc = generate(model, PROMPTS, params, EOS, PAD, use_cache=False, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert torch.equal(a.tokens, nc.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_tiny_top_p_is_greedy(model):
    greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0), EOS, PAD)
    tiny = generate(
        model,
        PROMPTS,
        SamplingParams(max_new_tokens=8, temperature=1.5, top_p=1e-6),
        EOS,
        PAD,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(greedy.tokens, tiny.tokens)


def test_sampler_truncation():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]])
    assert torch.isinf(truncate_logits(logits, top_k=2)).tolist() == [[True, False, False, True, True]]
    # probs ~ [.03, .64, .24, .09, .01]: nucleus 0.8 keeps the top two.
    assert torch.isinf(truncate_logits(logits, top_p=0.8)).tolist() == [[True, False, False, True, True]]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, SamplingParams(top_k=2), g) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {1, 2}
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0).validate()


def test_every_stop_id_ends_a_response(model):
    """A model with several EOS ids (Qwen3: <|im_end|> and <|endoftext|>): a response ends at whichever comes
    first. Greedy decoding without a stop gives the reference; each of its tokens, named a stop id, ends it."""
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    free = generate(model, PROMPTS, params, eos_id=None, pad_id=PAD)
    row, plen = free.tokens[0].tolist(), len(PROMPTS[0])
    first, third = row[plen], row[plen + 2]
    for stops, want in (([third, 63], 3), ((63, first), 1), (first, 1)):
        ro = generate(model, PROMPTS[:1], params, eos_id=stops, pad_id=PAD)
        assert int(ro.response_lens[0]) == want and bool(ro.finished[0]), (stops, want)
        assert ro.tokens[0, : plen + want].tolist() == row[: plen + want]

"""generate() at real sizes, on a tiny CPU model: chunked rows, device-side seeded sampling, ids-only
records, no O(max_len^2) mask."""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

import megatron_rspo.rollout.generate as gen
from megatron_rspo.config import ModelConfig
from megatron_rspo.rollout.generate import Rollout, SamplingParams, generate
from megatron_rspo.rollout.sampling import sample

VOCAB, PAD = 64, 0
# Longest prompts in different chunks of 2, so the chunks' widths differ and padding to S is exercised.
PROMPTS = [[5, 9, 13], [3, 4, 8, 2, 7, 30, 41], [17, 22], [60, 61, 62, 63, 11], [40, 41, 42, 43, 44, 45, 46, 47, 48]]


@pytest.fixture(scope="module")
def model():
    from megatron_rspo.config import ParallelConfig
    from megatron_rspo.model.provider import build_model, init_distributed

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_experts=4, moe_router_topk=2,
                      transformer_impl="local", init_method_std=0.2)
    init_distributed(ParallelConfig(), seed=3)
    return build_model(cfg, ParallelConfig())


def check_layout(r: Rollout, prompts: list[list[int]]) -> None:
    n, s = r.tokens.shape
    assert r.logprobs.shape == r.response_mask.shape == (n, s - 1)
    assert int(r.total_lens.max()) == s and r.routing_ids.shape[:2] == (n, s)
    for i, p in enumerate(prompts):
        total = int(r.total_lens[i])
        assert r.tokens[i, : len(p)].tolist() == p and (r.tokens[i, total:] == PAD).all()
        m = r.response_mask[i]
        assert m.sum() == r.response_lens[i] and m[len(p) - 1] == 1 and (m[: len(p) - 1] == 0).all()
        assert (m[total - 1 :] == 0).all() and (r.logprobs[i][m == 0] == 0).all()
        assert (r.routing_ids[i, total:] == 0).all()


def assert_same(a: Rollout, b: Rollout, scores: bool = True) -> None:
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.response_lens, b.response_lens) and torch.equal(a.finished, b.finished)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert torch.equal(a.routing_ids, b.routing_ids)
    if scores:
        torch.testing.assert_close(a.routing_log_scores, b.routing_log_scores, atol=1e-5, rtol=0)


def test_chunked_greedy_matches_one_batch_and_cache_free(model):
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    eos = generate(model, PROMPTS, params, eos_id=None, pad_id=PAD, record_routing=False).response(2)[1]
    whole = generate(model, PROMPTS, params, eos_id=eos, pad_id=PAD)
    chunked = generate(model, PROMPTS, params, eos_id=eos, pad_id=PAD, max_batch_rows=2)  # chunks of 2, 2, 1
    ref = generate(model, PROMPTS, params, eos_id=eos, pad_id=PAD, max_batch_rows=3, use_cache=False)
    assert bool(whole.finished[2]) and not whole.finished.all()  # rows of different lengths
    for r in (whole, chunked, ref):
        check_layout(r, PROMPTS)
    assert_same(chunked, whole)
    assert_same(ref, whole)


def test_chunked_sampling_is_seeded_and_independent_of_chunking(model):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9)

    def run(seed: int, rows) -> Rollout:
        return generate(model, PROMPTS, params, eos_id=None, pad_id=PAD, max_batch_rows=rows,
                        generator=torch.Generator(device="cpu").manual_seed(seed))

    a, b, c = run(7, 2), run(7, 2), run(8, 2)
    assert_same(a, b)
    assert not torch.equal(a.tokens, c.tokens)
    assert_same(run(7, None), a)  # the random stream is per row and position, not per chunk
    check_layout(a, PROMPTS)


def test_record_scores_false_keeps_ids_only(model):
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    both = generate(model, PROMPTS, params, eos_id=None, pad_id=PAD, max_batch_rows=2)
    ids_only = generate(model, PROMPTS, params, eos_id=None, pad_id=PAD, max_batch_rows=2, record_scores=False)
    assert ids_only.routing_log_scores is None and both.routing_log_scores is not None
    assert ids_only.routing_ids.dtype == torch.uint8
    assert_same(ids_only, both, scores=False)


def test_generator_on_another_device_is_refused(model):
    other = types.SimpleNamespace(device=torch.device("cuda", 0))  # stands in for a generator elsewhere
    params = SamplingParams(max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="generator is on cuda:0 but the logits are on cpu"):
        generate(model, PROMPTS, params, eos_id=None, pad_id=PAD, generator=other)
    with pytest.raises(ValueError, match="generator is on cuda:0"):
        sample(torch.zeros(2, 5), params, other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_cpu_generator_for_cuda_logits_is_refused():
    with pytest.raises(ValueError, match="generator is on cpu"):
        sample(torch.zeros(2, 5, device="cuda"), SamplingParams(), torch.Generator().manual_seed(0))


def test_no_quadratic_mask(model, monkeypatch):
    max_len = 300
    step = gen._Forward(model, 2, max_len, use_cache=True, record=False, record_scores=False)
    held = [t for t in vars(step).values() if isinstance(t, torch.Tensor)]
    assert held and all(t.numel() <= max_len for t in held)  # the [1, 1, 1, max_len] decode row only
    sizes: list[int] = []
    build = gen._causal_mask
    monkeypatch.setattr(gen, "_causal_mask", lambda n, device: sizes.append(n) or build(n, device))
    generate(model, PROMPTS, SamplingParams(max_new_tokens=5, temperature=0.0), None, PAD, max_batch_rows=2)
    assert sizes == [3, 2, 9]  # one causal mask per chunk, of its prefill (shortest prompt) length


def test_unequal_chunk_counts_over_sync_group_are_refused(model, monkeypatch):
    # Another rank of the group has one chunk more than this one.
    monkeypatch.setattr(gen, "_agree", lambda value, op, group, device: value + (op == dist.ReduceOp.MAX))
    with pytest.raises(ValueError, match="ranks of sync_group would run 3 to 4 generation chunks"):
        generate(model, PROMPTS, SamplingParams(max_new_tokens=2), None, PAD, max_batch_rows=2)
    with pytest.raises(ValueError, match="max_batch_rows must be >= 1"):
        generate(model, PROMPTS, SamplingParams(max_new_tokens=2), None, PAD, max_batch_rows=0)


def test_inverse_cdf_sampler_follows_the_distribution():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0, float("-inf")]])
    probs = torch.softmax(logits, -1)[0]
    n = 40000
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    draws = sample(logits.expand(n, -1), SamplingParams(), uniforms=u)
    freq = torch.bincount(draws, minlength=6).double() / n
    assert freq[5] == 0  # probability 0 is never drawn
    torch.testing.assert_close(freq, probs.double(), atol=4 * (0.25 / n) ** 0.5, rtol=0)
    # The edges of [0, 1): the first and the last token with probability > 0 (top-k 2 keeps tokens 1, 2).
    edges = torch.tensor([0.0, 1 - 2**-53, 1.0], dtype=torch.float64)  # 1.0: a float32 u rounded up
    assert sample(logits.expand(3, -1), SamplingParams(top_k=2), uniforms=edges).tolist() == [1, 2, 2]
    g1, g2 = (torch.Generator().manual_seed(5) for _ in range(2))
    assert torch.equal(sample(logits.expand(50, -1), SamplingParams(), g1),
                       sample(logits.expand(50, -1), SamplingParams(), g2))

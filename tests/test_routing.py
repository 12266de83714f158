"""The recording router: record / replay / score-at-ids, checked against independent NumPy math."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_rspo.config import ModelConfig
from megatron_rspo.model.logprobs import forward_logits
from megatron_rspo.model.routing import (
    RoutingSession,
    frozen_router,
    id_dtype,
    routers,
    routing_session,
)

B, S = 3, 10


def capture_router_inputs(model):
    """Hook every router; returns {moe_index: input hidden [S, B, H]} filled by the next forward."""
    seen: dict[int, torch.Tensor] = {}
    handles = [r.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod.moe_index, args[0].detach()))
               for r in routers(model)]
    return seen, handles


def numpy_scores(hidden: torch.Tensor, weight: torch.Tensor, score_function: str) -> np.ndarray:
    """[S, B, H] x [E, H] -> routing score over all experts, [B, S, E], in float64."""
    logits = np.einsum("sbh,eh->bse", hidden.double().numpy(), weight.detach().double().numpy())
    if score_function == "softmax":
        z = np.exp(logits - logits.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_record_matches_numpy_topk_and_scores(megatron_single_rank, score_function):
    cfg = ModelConfig(vocab_size=64, num_layers=2, num_experts=8, moe_router_topk=3,
                      moe_router_score_function=score_function)
    model = megatron_single_rank(cfg)
    model.eval()
    tokens = torch.randint(0, 64, (B, S))
    seen, handles = capture_router_inputs(model)
    with torch.no_grad(), routing_session(model, RoutingSession(record=True)) as sess:
        forward_logits(model, tokens)
    for h in handles:
        h.remove()
    ids = RoutingSession.stack(sess.recorded_ids, 2)
    scores = RoutingSession.stack(sess.recorded_log_scores, 2)
    assert ids.shape == (B, S, 2, 3) and ids.dtype == torch.uint8
    assert scores.dtype == torch.float32
    for r in routers(model):
        ref = numpy_scores(seen[r.moe_index], r.weight, score_function)  # [B, S, E]
        ref_top = np.argsort(-ref, axis=-1)[..., :3]
        got = ids[:, :, r.moe_index].long().numpy()
        np.testing.assert_array_equal(np.sort(got, -1), np.sort(ref_top, -1))
        np.testing.assert_array_equal(got[..., 0], ref_top[..., 0])  # best expert first
        ref_logp = np.log(np.take_along_axis(ref, got, -1))
        np.testing.assert_allclose(scores[:, :, r.moe_index].numpy(), ref_logp, atol=1e-5)


def test_id_dtype_is_uint8_up_to_256_experts():
    assert all(id_dtype(e) == torch.uint8 for e in (1, 8, 127, 128, 200, 256))
    assert id_dtype(257) == id_dtype(32767) == torch.int16
    with pytest.raises(ValueError):
        id_dtype(32768)


@pytest.mark.parametrize("num_experts, dtype", [(200, torch.uint8), (260, torch.int16)])
def test_record_is_compact_for_many_experts(megatron_single_rank, num_experts, dtype):
    model = megatron_single_rank(ModelConfig(vocab_size=64, num_layers=1, num_experts=num_experts, moe_router_topk=8))
    model.eval()
    tokens = torch.randint(0, 64, (2, 4))
    with torch.no_grad():
        for r in routers(model):  # lower half: logit 0; upper half: ~half of its logits clearly above 0
            r.weight[: num_experts // 2] = 0.0
            r.weight[num_experts // 2 :] *= 10.0
        with routing_session(model, RoutingSession(record=True)) as sess:
            forward_logits(model, tokens)
        ids = RoutingSession.stack(sess.recorded_ids, 1)
        assert ids.dtype == dtype and int(ids.min()) >= num_experts // 2 and int(ids.max()) < num_experts
        # Consumers widen before indexing: replaying and scoring at these ids reproduces the record.
        with routing_session(model, RoutingSession(record=True, replay_ids=ids, score_ids=ids)) as rep:
            forward_logits(model, tokens)
    assert torch.equal(RoutingSession.stack(rep.recorded_ids, 1), ids)
    torch.testing.assert_close(rep.current_log_scores[0], sess.recorded_log_scores[0], rtol=0, atol=1e-6)


def test_record_scores_false_records_ids_only(megatron_single_rank):
    model = megatron_single_rank(ModelConfig(vocab_size=64, num_layers=2, num_experts=8, moe_router_topk=2))
    model.eval()
    tokens = torch.randint(0, 64, (B, S))
    with torch.no_grad(), routing_session(model, RoutingSession(record=True)) as both:
        forward_logits(model, tokens)
    with torch.no_grad(), routing_session(model, RoutingSession(record=True, record_scores=False)) as ids_only:
        forward_logits(model, tokens)
    assert not ids_only.recorded_log_scores and sorted(ids_only.recorded_ids) == [0, 1]
    assert torch.equal(RoutingSession.stack(ids_only.recorded_ids, 2), RoutingSession.stack(both.recorded_ids, 2))


def test_replay_uses_given_ids_even_after_router_changes(megatron_single_rank):
    model = megatron_single_rank(ModelConfig(vocab_size=64, num_layers=2, num_experts=8, moe_router_topk=2))
    model.eval()
    tokens = torch.randint(0, 64, (B, S))
    with torch.no_grad(), routing_session(model, RoutingSession(record=True)) as rec:
        before = forward_logits(model, tokens)
    old_ids = RoutingSession.stack(rec.recorded_ids, 2)
    with torch.no_grad():
        for r in routers(model):
            r.weight.add_(torch.randn_like(r.weight) * 5.0)  # a very different router
        with routing_session(model, RoutingSession(record=True)) as fresh:
            forward_logits(model, tokens)
        assert not torch.equal(RoutingSession.stack(fresh.recorded_ids, 2), old_ids)
        with routing_session(model, RoutingSession(record=True, replay_ids=old_ids)) as rep:
            after = forward_logits(model, tokens)
    torch.testing.assert_close(RoutingSession.stack(rep.recorded_ids, 2), old_ids, rtol=0, atol=0)
    assert not torch.allclose(before, after)  # combine weights come from the new router


def test_score_at_old_ids_and_gradient_flow(megatron_single_rank):
    model = megatron_single_rank(ModelConfig(vocab_size=64, num_layers=2, num_experts=4, moe_router_topk=2))
    tokens = torch.randint(0, 64, (B, S))
    with torch.no_grad(), routing_session(model, RoutingSession(record=True)) as rec:
        forward_logits(model, tokens)
    old_ids = RoutingSession.stack(rec.recorded_ids, 2)
    old_scores = RoutingSession.stack(rec.recorded_log_scores, 2)
    # Same weights: current scores at the old ids equal the recorded ones.
    with routing_session(model, RoutingSession(score_ids=old_ids, differentiable_scores=True)) as cur:
        logits = forward_logits(model, tokens)
    current = RoutingSession.stack(cur.current_log_scores, 2)
    torch.testing.assert_close(current, old_scores, atol=1e-6, rtol=0)
    # Differentiable: gradient of the scores reaches the router weights (and nothing else needs it).
    model.zero_grad()
    current.sum().backward()
    for r in routers(model):
        assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    # Default: detached scores (gamma is stop-gradient), so no graph is kept.
    with routing_session(model, RoutingSession(score_ids=old_ids)) as cur2:
        forward_logits(model, tokens)
    assert not RoutingSession.stack(cur2.current_log_scores, 2).requires_grad
    assert logits.requires_grad


def test_frozen_router_gets_no_gradient(megatron_single_rank):
    model = megatron_single_rank(ModelConfig(vocab_size=64, num_layers=1))
    with frozen_router(model):
        forward_logits(model, torch.randint(0, 64, (2, 5))).sum().backward()
        assert all(r.weight.grad is None for r in routers(model))
    assert all(r.weight.requires_grad for r in routers(model))


def test_replay_ids_shape_mismatch_is_clear(megatron_single_rank):
    model = megatron_single_rank(ModelConfig(vocab_size=64, num_layers=1))
    bad = torch.zeros(B, S + 1, 1, 2, dtype=torch.int8)
    with pytest.raises(ValueError, match="routing ids for MoE layer 0"):
        with torch.no_grad(), routing_session(model, RoutingSession(replay_ids=bad)):
            forward_logits(model, torch.randint(0, 64, (B, S)))

"""Padding is not routed: the training forward hands Megatron's MoE layers a padding mask, so expert-load
statistics (and Megatron's aux loss / expert-bias counts) count real tokens only."""

from __future__ import annotations

import torch

from megatron_rspo.config import ModelConfig
from megatron_rspo.model.logprobs import forward_logits
from megatron_rspo.model.routing import RoutingSession, routing_session
from megatron_rspo.rl.experience import Experience


def test_pads_are_excluded_from_expert_load(megatron_single_rank):
    model = megatron_single_rank(ModelConfig(vocab_size=64, num_experts=4, moe_router_topk=2))
    tokens = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([9, 5, 2])  # prompt+response tokens per row; the rest is padding
    exp = Experience(tokens=tokens, response_mask=torch.ones(3, 8), advantages=torch.zeros(3),
                     rewards=torch.zeros(3), lengths=lengths)
    pad = exp.padding_mask()
    assert pad.shape == (3, 8) and int((~pad).sum()) == 8 + 5 + 2
    with torch.no_grad():
        with routing_session(model, RoutingSession(record=True)) as masked:
            logits = forward_logits(model, tokens[:, :-1], padding_mask=pad)
        with routing_session(model, RoutingSession(record=True)) as unmasked:
            same = forward_logits(model, tokens[:, :-1])
    assert torch.equal(logits, same)  # the mask changes statistics, not outputs
    for layer, load in masked.expert_load.items():
        assert float(load.sum()) == 15 * 2, layer  # real tokens x top-k
        assert float(unmasked.expert_load[layer].sum()) == 24 * 2


def test_replayed_engine_ids_with_no_record_route_live(megatron_single_rank):
    """R3 from an engine: -1 marks a slot the engine did not record; that token is routed by the router's
    own top-K, every other token by the engine's experts."""
    model = megatron_single_rank(ModelConfig(vocab_size=64, num_experts=8, moe_router_topk=2))
    tokens = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), routing_session(model, RoutingSession(record=True)) as live:
        forward_logits(model, tokens)
    live_ids = RoutingSession.stack(live.recorded_ids, 2).long()  # [B, S, L, K]
    engine = ((live_ids + 3) % 8).to(torch.int16)  # experts the router would not pick itself
    engine[0, 2, 0, 0] = -1  # one (token, first layer: same input either way) without a record
    with torch.no_grad(), routing_session(model, RoutingSession(record=True, replay_ids=engine)) as replay:
        forward_logits(model, tokens)
    used = RoutingSession.stack(replay.recorded_ids, 2).long()
    expected = engine.long().clone()
    expected[0, 2, 0] = live_ids[0, 2, 0]
    assert torch.equal(used, expected)

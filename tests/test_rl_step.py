"""RL forward steps on a real tiny Megatron MoE: on-policy identities, RS gradient, routing replay."""

from __future__ import annotations

import pytest
import torch

from megatron_rspo.config import ModelConfig
from megatron_rspo.model.routing import routers
from megatron_rspo.rl.experience import Experience
from megatron_rspo.rl.losses import PolicyLossConfig
from megatron_rspo.rl.router_shift import RouterShiftConfig
from megatron_rspo.rl.step import StepOptions, make_old_policy_step, make_train_step
from megatron_rspo.rollout.generate import SamplingParams, generate

CFG = ModelConfig(vocab_size=64, num_layers=2, hidden_size=64, num_experts=4, moe_router_topk=2,
                  init_method_std=0.2)


def options(algorithm: str, rs: bool, replay: bool = False) -> StepOptions:
    return StepOptions(algorithm=algorithm, loss=PolicyLossConfig(), router_shift=RouterShiftConfig(enabled=rs),
                       routing_replay=replay, temperature=1.0, num_moe_layers=2)


def rollout_experience(model) -> Experience:
    g = torch.Generator().manual_seed(0)
    prompts = [[1, 5, 7], [1, 9], [3, 4, 5, 6], [2, 2]]
    ro = generate(model, prompts, SamplingParams(max_new_tokens=6, temperature=1.0), eos_id=None, pad_id=0,
                  generator=g)
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0])
    return Experience(tokens=ro.tokens, response_mask=ro.response_mask, advantages=adv, rewards=adv,
                      routing_ids=ro.routing_ids)


def old_pass(model, exp: Experience, opts: StepOptions) -> Experience:
    model.eval()
    with torch.no_grad():
        logits, loss_func = make_old_policy_step(opts, need_scores=True)(iter([exp]), model)
        _, out = loss_func(logits)
    exp.old_logp, exp.old_log_scores = out["logp"], out["log_scores"]
    return exp


def train_loss(model, exp: Experience, opts: StepOptions):
    model.train()
    model.zero_grad()
    logits, loss_func = make_train_step(opts, normalizer=float((exp.response_mask.sum(-1) > 0).sum()),
                                        loss_scale=1.0)(iter([exp]), model)
    loss, stats = loss_func(logits)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), stats, grads


@pytest.mark.parametrize("algorithm", ["grpo", "gspo", "gmpo", "rspo"])
def test_on_policy_ratio_and_gamma_are_exactly_one(megatron_single_rank, algorithm):
    model = megatron_single_rank(CFG)
    opts = options(algorithm, rs=True)
    exp = old_pass(model, rollout_experience(model), opts)
    _, stats, _ = train_loss(model, exp, opts)
    assert stats["is_ratio_max"] == 1.0 and stats["is_ratio_mean"] == 1.0 and stats["is_ratio_std"] == 0.0
    assert stats["gamma_min"] == 1.0 and stats["gamma_mean"] == 1.0
    assert stats["clip_frac"] == 0.0 and stats["router_shift/mean"] == 0.0
    assert stats["expert_set_change_rate"] == 0.0


def test_rspo_gradient_equals_gmpo_on_policy(megatron_single_rank):
    model = megatron_single_rank(CFG)
    exp = old_pass(model, rollout_experience(model), options("gmpo", rs=False))
    loss_g, _, grads_g = train_loss(model, exp, options("gmpo", rs=False))
    loss_r, _, grads_r = train_loss(model, exp, options("rspo", rs=True))
    assert torch.equal(loss_g, loss_r)
    assert grads_g.keys() == grads_r.keys() and len(grads_g) > 0
    for name in grads_g:
        assert torch.equal(grads_g[name], grads_r[name]), name


def test_router_shift_bites_after_router_moves(megatron_single_rank):
    model = megatron_single_rank(CFG)
    opts = options("rspo", rs=True)
    exp = old_pass(model, rollout_experience(model), opts)
    with torch.no_grad():
        for r in routers(model):
            r.weight.add_(torch.randn_like(r.weight))
    _, stats, _ = train_loss(model, exp, opts)
    assert stats["router_shift/mean"] > 0 and stats["gamma_min"] < 1.0
    assert stats["gamma_min"] >= 0.8 - 1e-7  # the floor holds


def test_routing_replay_trains_with_rollout_ids(megatron_single_rank):
    model = megatron_single_rank(CFG)
    opts = options("gmpo", rs=False, replay=True)
    exp = old_pass(model, rollout_experience(model), opts)
    with torch.no_grad():
        for r in routers(model):
            r.weight.mul_(-3.0)  # the router now prefers other experts
    _, stats_replay, _ = train_loss(model, exp, opts)
    _, stats_free, _ = train_loss(model, exp, options("gmpo", rs=False, replay=False))
    assert stats_replay["expert_set_change_rate"] == 0.0  # the ids used are the rollout's
    assert stats_free["expert_set_change_rate"] > 0.0

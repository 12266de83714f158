"""Forward steps for Megatron's schedule: the old-policy pass and the RL training micro-batch.

Glue only: a model forward inside a RoutingSession, then the pure functions of ``router_shift``,
``losses`` and ``metrics``. ``make_*`` return ``forward_step(data_iterator, model)`` callables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_rspo.model.logprobs import forward_logits, token_entropy, token_logprobs
from megatron_rspo.model.routing import RoutingSession, routing_session
from megatron_rspo.rl.experience import Experience
from megatron_rspo.rl.losses import PolicyLossConfig, get_policy_loss, kl_penalty, masked_mean
from megatron_rspo.rl.metrics import gamma_stats, router_shift_stats
from megatron_rspo.rl.router_shift import (
    RouterShiftConfig,
    aggregate_layers,
    expert_set_change_rate,
    per_layer_router_shift,
    router_shift_ratio,
)


@dataclass
class StepOptions:
    algorithm: str
    loss: PolicyLossConfig
    router_shift: RouterShiftConfig
    routing_replay: bool
    temperature: float
    num_moe_layers: int
    kl_coeff: float = 0.0
    entropy_coeff: float = 0.0


def _session(exp: Experience, opts: StepOptions, *, score: bool, record: bool) -> RoutingSession:
    ids = None if exp.routing_ids is None else exp.routing_ids[:, :-1]
    return RoutingSession(
        record=record,
        score_ids=ids if score else None,
        replay_ids=ids if opts.routing_replay else None,
    )


def _policy_logits(model, exp: Experience, session: RoutingSession) -> torch.Tensor:
    with routing_session(model, session):
        return forward_logits(model, exp.tokens[:, :-1])


def make_old_policy_step(opts: StepOptions, need_scores: bool):
    """Forward-only step: log pi_old per label and router log-scores at the rollout's ids."""

    def forward_step(data_iterator, model):
        exp: Experience = next(data_iterator)
        session = _session(exp, opts, score=need_scores, record=False)
        logits = _policy_logits(model, exp, session)

        def loss_func(logits: torch.Tensor):
            out = {"logp": token_logprobs(logits / opts.temperature, exp.tokens[:, 1:])}
            if need_scores:
                out["log_scores"] = RoutingSession.stack(session.current_log_scores, opts.num_moe_layers)
            return logits.new_zeros(()), out

        return logits, loss_func

    return forward_step


def make_train_step(opts: StepOptions, normalizer: float, loss_scale: float):
    """Training micro-batch: current log-probs, gamma from the router shift, the registered loss."""
    loss_fn = get_policy_loss(opts.algorithm)
    rs = opts.router_shift

    def forward_step(data_iterator, model):
        exp: Experience = next(data_iterator)
        session = _session(exp, opts, score=rs.enabled or exp.old_log_scores is not None, record=True)
        logits = _policy_logits(model, exp, session)

        def loss_func(logits: torch.Tensor):
            logits = logits / opts.temperature
            mask = exp.response_mask
            logp = token_logprobs(logits, exp.tokens[:, 1:])
            gamma, stats = None, {}
            if session.current_log_scores and exp.old_log_scores is not None:
                current = RoutingSession.stack(session.current_log_scores, opts.num_moe_layers)
                per_layer = per_layer_router_shift(current, exp.old_log_scores)
                stats.update(router_shift_stats(per_layer, mask))
                if rs.enabled:
                    gamma = router_shift_ratio(aggregate_layers(per_layer, rs.aggregation), rs.floor)
                    stats.update(gamma_stats(gamma, mask, rs.floor))
            if session.recorded_ids and exp.routing_ids is not None:
                now = RoutingSession.stack(session.recorded_ids, opts.num_moe_layers)
                stats["expert_set_change_rate"] = expert_set_change_rate(exp.routing_ids[:, :-1], now, mask)
            loss, loss_stats = loss_fn(logp, exp.old_logp, exp.advantages, mask, opts.loss, gamma=gamma,
                                       normalizer=normalizer)
            stats.update(loss_stats)
            with torch.set_grad_enabled(opts.entropy_coeff > 0 and torch.is_grad_enabled()):
                entropy = masked_mean(token_entropy(logits), mask)
            stats["entropy"] = entropy.detach()
            if opts.entropy_coeff > 0:
                loss = loss - opts.entropy_coeff * entropy * _share(mask, normalizer, opts)
            if opts.kl_coeff > 0 and exp.ref_logp is not None:
                kl = masked_mean(kl_penalty(logp, exp.ref_logp, mask, kind="k3"), mask)
                stats["kl_ref"] = kl.detach()
                loss = loss + opts.kl_coeff * kl * _share(mask, normalizer, opts)
            stats["expert_load"] = torch.stack(
                [session.expert_load[i] for i in sorted(session.expert_load)]) if session.expert_load else None
            stats = {k: v.detach() for k, v in stats.items() if v is not None}
            return loss * loss_scale, stats

        return logits, loss_func

    return forward_step


def loss_units(algorithm: str, loss_cfg: PolicyLossConfig, mask: torch.Tensor) -> float:
    """What the policy loss averages over: valid tokens (grpo token_mean) or valid sequences."""
    if algorithm == "grpo" and loss_cfg.loss_agg == "token_mean":
        return float(mask.sum())
    return float((mask.sum(-1) > 0).sum())


def _share(mask: torch.Tensor, normalizer: float, opts: StepOptions) -> float:
    """This micro-batch's share of the mini-batch, in the policy loss's own units, so that the
    token-mean entropy/KL terms of all micro-batches add up to the mini-batch mean too."""
    return loss_units(opts.algorithm, opts.loss, mask) / normalizer

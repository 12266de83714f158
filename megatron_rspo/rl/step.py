"""Forward steps for Megatron's schedule: the old-policy pass and the RL training micro-batch.

Glue only: a model forward inside a RoutingSession, then the pure functions of ``router_shift``,
``losses`` and ``metrics``. ``make_*`` return ``forward_step(data_iterator, model)`` callables that work
in every layout (DESIGN §5): under sequence parallelism the routers get their TP rank's slice of the
rollout ids and ``routing_exchange`` gathers what they produce; under pipeline parallelism every stage
scores its own MoE layers and sends them to the last stage, where the loss is computed. The callables
have a ``finish()`` that the engine calls after the schedule (it waits for those sends).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_rspo.model.fused_logprobs import fused_token_logprobs, output_hidden
from megatron_rspo.model.logprobs import forward_logits, token_logprobs, token_logprobs_and_entropy
from megatron_rspo.model.routing import RoutingSession, routing_session
from megatron_rspo.rl.config import RLConfig
from megatron_rspo.rl.experience import Experience
from megatron_rspo.rl.losses import PolicyLossConfig, get_policy_loss, kl_penalty, masked_mean
from megatron_rspo.rl.metrics import gamma_stats, router_shift_stats
from megatron_rspo.rl.parallel import RoutingLayout, unwrap
from megatron_rspo.rl.router_shift import RouterShiftConfig, aggregate_layers, change_rate, router_shift_ratio
from megatron_rspo.rl.routing_exchange import PipelineRouting, stage_records, stage_routing, stage_scores


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
    layout: Optional[RoutingLayout] = None  # None: RoutingLayout.local(model) (one pipeline stage)
    fused_logprobs: bool = False  # log-probs from hidden states in token chunks; no [tokens, V] logits
    logprob_chunk_tokens: int = 256


def _session(exp: Experience, opts: StepOptions, layout: RoutingLayout, *, score: bool,
             record: bool) -> RoutingSession:
    ids = None if exp.routing_ids is None else exp.routing_ids[:, :-1]
    return RoutingSession(
        record=record,
        record_scores=False,  # the training forward records ids (expert-set change); scores come via score_ids
        score_ids=ids if score else None,
        replay_ids=ids if opts.routing_replay else None,
        seq_slice=layout.seq_slice(exp.tokens.shape[1] - 1),
    )


class PolicyOutput:
    """A policy forward over ``tokens[:, :-1]`` (pads excluded from routing) and the token log-probs and
    entropy of its output: from materialised logits (one fp32 working copy), or, with
    ``--fused-logprobs``, from the final hidden states, chunked over tokens with the output projection
    recomputed in backward (no [tokens, V] tensor at all)."""

    def __init__(self, opts: StepOptions) -> None:
        self.opts = opts
        self.head = None

    def forward(self, model, exp: Experience, session: RoutingSession) -> torch.Tensor:
        ctx = output_hidden(model) if self.opts.fused_logprobs else contextlib.nullcontext()
        with routing_session(model, session), ctx as head:
            out = forward_logits(model, exp.tokens[:, :-1], padding_mask=exp.padding_mask())
        self.head = head
        return out

    def logprobs(self, output: torch.Tensor, labels: torch.Tensor, *, entropy: bool = False,
                 entropy_grad: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        t = self.opts.temperature
        if self.opts.fused_logprobs:
            return fused_token_logprobs(output, self.head.weight, labels, t,
                                        chunk_tokens=self.opts.logprob_chunk_tokens, with_entropy=entropy,
                                        entropy_grad=entropy_grad,
                                        sequence_parallel=self.head.sequence_parallel)
        if entropy:
            return token_logprobs_and_entropy(output, labels, t, entropy_grad=entropy_grad)
        return token_logprobs(output, labels, t), None


def _num_experts(model) -> int:
    return int(unwrap(model).config.num_moe_experts or 0)


class _Step:
    def __init__(self, opts: StepOptions) -> None:
        self.opts = opts
        self.layout = opts.layout
        self.microbatch = 0  # forward calls so far: the tag of the pipeline routing messages

    def _layout(self, model) -> RoutingLayout:
        if self.layout is None:
            self.layout = RoutingLayout.local(model)
        return self.layout

    def finish(self) -> None:
        """Called by the engine once the schedule has run (nothing in flight by default)."""


class OldPolicyStep(_Step):
    """Forward-only step: log pi_old per label (last stage: the loss function's ``logp``) and the router
    log-scores at the rollout's ids of this stage's MoE layers, complete over the sequence. Each stage
    keeps its own scores (``self.log_scores``, one [B, S, L_stage, K] per micro-batch): a stage needs no
    other stage's old scores to compute its part of the router shift.

    A rollout without routing records (an external engine's) has its old-policy experts recorded here
    instead: the routers' own top-K under θ_old (``self.ids``, [B, S, L_stage, K]) and the log-scores at
    them; under R3 (``replay_ids``) the engine's experts are replayed, -1 slots routed live, and what was
    used is recorded."""

    def __init__(self, opts: StepOptions, need_scores: bool, replay_ids: bool = False) -> None:
        super().__init__(opts)
        self.need_scores = need_scores
        self.replay_engine_ids = replay_ids
        self.log_scores: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []

    def __call__(self, data_iterator, model):
        exp: Experience = next(data_iterator)
        layout = self._layout(model)
        self.microbatch += 1
        batch, seq = exp.tokens.shape[0], exp.tokens.shape[1] - 1
        record = exp.routing_ids is None or self.replay_engine_ids
        if record:
            replay = exp.routing_ids[:, :-1] if self.replay_engine_ids else None
            session = RoutingSession(record=True, replay_ids=replay, seq_slice=layout.seq_slice(seq))
        else:
            session = _session(exp, self.opts, layout, score=self.need_scores, record=False)
        policy = PolicyOutput(self.opts)
        logits = policy.forward(model, exp, session)
        scores = None
        if record:
            ids, scores = stage_records(session, layout, batch, seq, exp.tokens.device)
            self.ids.append(ids)
            self.log_scores.append(scores)
        elif self.need_scores:
            scores = stage_scores(session, layout, batch, seq, exp.tokens.device)
            self.log_scores.append(scores)

        def loss_func(logits: torch.Tensor):
            out = {"logp": policy.logprobs(logits, exp.tokens[:, 1:])[0]}
            if scores is not None:
                out["log_scores"] = scores
            return logits.new_zeros(()), out

        return logits, loss_func


def _not_last_stage(output: torch.Tensor):
    raise RuntimeError("the loss function runs on the last pipeline stage only")


class TrainStep(_Step):
    """Training micro-batch: current log-probs, γ from the router shift, the registered loss.

    ``keep_tensors`` keeps per-token ``gamma``/``logp`` and the unscaled ``loss`` of each micro-batch in
    ``self.kept`` (last stage; diagnostics and the cross-layout equivalence tests)."""

    def __init__(self, opts: StepOptions, normalizer: float | torch.Tensor, loss_scale: float,
                 keep_tensors: bool = False) -> None:
        super().__init__(opts)
        self.normalizer, self.loss_scale = normalizer, loss_scale
        self.loss_fn = get_policy_loss(opts.algorithm)
        self.keep_tensors = keep_tensors
        self.kept: list[dict[str, torch.Tensor]] = []
        self.pipe: Optional[PipelineRouting] = None

    def __call__(self, data_iterator, model):
        exp: Experience = next(data_iterator)
        opts, rs = self.opts, self.opts.router_shift
        layout = self._layout(model)
        if self.pipe is None:
            self.pipe = PipelineRouting(layout)
        microbatch, self.microbatch = self.microbatch, self.microbatch + 1
        score = (rs.enabled or exp.old_log_scores is not None) and exp.routing_ids is not None
        # Without rollout ids (plain baselines) there is nothing to score or compare: route as Megatron does.
        session = _session(exp, opts, layout, score=score, record=exp.routing_ids is not None)
        policy = PolicyOutput(opts)
        logits = policy.forward(model, exp, session)
        ids = None if exp.routing_ids is None else exp.routing_ids[:, :-1]
        part = stage_routing(session, layout, exp.old_log_scores if score else None, ids, exp.tokens.shape[0],
                             exp.tokens.shape[1] - 1, _num_experts(model), exp.tokens.device)
        if not layout.is_last_stage:
            self.pipe.send(part, microbatch)
            return logits, _not_last_stage

        def loss_func(logits: torch.Tensor):
            return self._loss(policy, logits, exp, self.pipe.collect(part, microbatch), have_shift=score
                              and exp.old_log_scores is not None, have_ids=ids is not None)

        return logits, loss_func

    def _loss(self, policy: PolicyOutput, output: torch.Tensor, exp: Experience, routing, have_shift: bool,
              have_ids: bool):
        opts, rs = self.opts, self.opts.router_shift
        mask = exp.response_mask
        # Entropy is always logged (no grad, chunked); it is differentiated only when it is in the loss.
        logp, entropy_tok = policy.logprobs(output, exp.tokens[:, 1:], entropy=True,
                                            entropy_grad=opts.entropy_coeff > 0 and torch.is_grad_enabled())
        gamma, stats = None, {}
        if have_shift and routing.shift.shape[-1]:
            stats.update(router_shift_stats(routing.shift, mask))
            if rs.enabled:
                gamma = router_shift_ratio(aggregate_layers(routing.shift, rs.aggregation), rs.floor)
                stats.update(gamma_stats(gamma, mask, rs.floor))
        if have_ids and routing.changed.shape[-1]:
            stats["expert_set_change_rate"] = change_rate(routing.changed, mask)
        loss, loss_stats = self.loss_fn(logp, exp.old_logp, exp.advantages, mask, opts.loss, gamma=gamma,
                                        normalizer=self.normalizer, token_weight=exp.correction_weight)
        stats.update(loss_stats)
        entropy = masked_mean(entropy_tok, mask)
        stats["entropy"] = entropy.detach()
        if opts.entropy_coeff > 0:
            loss = loss - opts.entropy_coeff * entropy * _share(mask, self.normalizer, opts)
        if opts.kl_coeff > 0 and exp.ref_logp is not None:
            kl = masked_mean(kl_penalty(logp, exp.ref_logp, mask, kind="k3"), mask)
            stats["kl_ref"] = kl.detach()
            loss = loss + opts.kl_coeff * kl * _share(mask, self.normalizer, opts)
        stats["expert_load"] = routing.load if routing.load.shape[0] else None
        stats["loss"] = loss.detach()  # the engine skips the step when any micro-batch loss is not finite
        stats = {k: v.detach() for k, v in stats.items() if v is not None}
        if self.keep_tensors:
            self.kept.append({"loss": loss.detach(), "logp": logp.detach(),
                              "gamma": gamma if gamma is not None else torch.ones_like(logp)})
        return loss * self.loss_scale, stats

    def finish(self) -> None:
        if self.pipe is not None:
            self.pipe.finish()


def make_old_policy_step(opts: StepOptions, need_scores: bool, replay_ids: bool = False) -> OldPolicyStep:
    """Forward-only step: log pi_old per label and router log-scores at the rollout's ids (or, for a rollout
    without records, at the experts this pass routes to: ``OldPolicyStep.ids``)."""
    return OldPolicyStep(opts, need_scores, replay_ids)


def make_train_step(opts: StepOptions, normalizer: float | torch.Tensor, loss_scale: float,
                    keep_tensors: bool = False) -> TrainStep:
    """Training micro-batch: current log-probs, gamma from the router shift, the registered loss."""
    return TrainStep(opts, normalizer, loss_scale, keep_tensors)


def loss_units(algorithm: str, loss_cfg: PolicyLossConfig, mask: torch.Tensor) -> torch.Tensor:
    """What the policy loss averages over: valid tokens (grpo token_mean) or valid sequences (a 0-d
    tensor on the mask's device: no host sync)."""
    if algorithm == "grpo" and loss_cfg.loss_agg == "token_mean":
        return mask.sum().float()
    return (mask.sum(-1) > 0).sum().float()


def _share(mask: torch.Tensor, normalizer: float | torch.Tensor, opts: StepOptions) -> torch.Tensor:
    """This micro-batch's share of the mini-batch, in the policy loss's own units, so that the
    token-mean entropy/KL terms of all micro-batches add up to the mini-batch mean too."""
    return loss_units(opts.algorithm, opts.loss, mask) / normalizer


def step_options(rl: RLConfig, num_moe_layers: int, layout: RoutingLayout) -> StepOptions:
    """The forward steps' options from the run's RL flags."""
    return StepOptions(
        algorithm=rl.rl_algorithm,
        loss=PolicyLossConfig(clip_eps=rl.clip_eps, clip_eps_high=rl.clip_eps_high, loss_agg=rl.loss_agg,
                              router_shift_placement=rl.router_shift_placement),
        router_shift=RouterShiftConfig(enabled=rl.uses_router_shift, floor=rl.router_shift_floor,
                                       aggregation=rl.router_shift_aggregation, placement=rl.router_shift_placement),
        routing_replay=rl.routing_replay, temperature=rl.temperature, num_moe_layers=num_moe_layers,
        kl_coeff=rl.kl_coeff, entropy_coeff=rl.entropy_coeff, layout=layout, fused_logprobs=rl.fused_logprobs,
        logprob_chunk_tokens=rl.logprob_chunk_tokens,
    )

"""Batched sampling on a Megatron GPTModel with a KV cache, recording the routing of every token.

Layout of a ``Rollout`` (one layout for the trainer, everything right-padded)::

    tokens          [N, S]        prompt ++ response ++ pad          (S = max prompt+response length)
    logprobs        [N, S-1]      label-aligned: logprobs[i, j] is log pi(tokens[i, j+1] | tokens[i, :j+1])
    response_mask   [N, S-1]      label-aligned: 1 iff tokens[i, j+1] is a response token, i.e.
                                  prompt_len-1 <= j < prompt_len+response_len-1
    routing_ids     [N, S, L, K]  input-aligned: what the routers did for input token j during rollout
    routing_log_scores [N, S, L, K]

A training forward over ``tokens[:, :-1]`` (or over all of ``tokens``) yields logits at position j
predicting token j+1, and its router at position j routes input token j. So for the response label
token at position j+1, both its log-prob and its router shift come from forward position j:
``logprobs[:, j]``, ``response_mask[:, j]`` and ``routing_*[:, j]`` line up with the training
forward's position j (``routing_*[:, :-1]`` when the forward is over ``tokens[:, :-1]``).
Padding positions hold ids 0, scores 0, log-probs 0, mask 0. The routing record covers every
position of prompt+response, including the last response token (one extra decode step feeds it).

``logprobs`` are of the distribution the tokens were sampled from before truncation:
log_softmax(logits / temperature) (temperature 1 for greedy); top-k/top-p truncation is not
reflected. A trainer comparing against them must scale its logits by the same temperature.

Scheme (Megatron's own static-batching scheme): all rows start at position 0, so positions and RoPE
angles are exactly those of the right-padded training forward. The batch is prefilled with the
shortest prompt length; after that one token per step is fed, and rows still inside their prompt
are forced to their next prompt token instead of a sampled one. The KV cache therefore never holds
padding that a live token can see, and every attention mask is plain causal: prefill gets an
explicit causal mask, decode steps an all-visible [1, 1, 1, kv_len] mask. (A left-padded prefill
would need a key-padding mask, which Megatron's fused causal softmax kernel and TE's "causal" mask
type silently ignore on GPU, and Megatron's static KV cache applies RoPE by cache slot, not by
position id.) The cost is that prompt tokens past the shortest prompt are fed one per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_rspo.model.routing import RoutingSession, routers, routing_session
from megatron_rspo.rollout.sampling import SamplingParams, sample, token_logprobs

__all__ = ["SamplingParams", "Rollout", "generate"]


@dataclass
class Rollout:
    tokens: torch.Tensor  # [N, S] int64
    prompt_lens: torch.Tensor  # [N] int64
    response_lens: torch.Tensor  # [N] int64, includes the EOS token when one was generated
    response_mask: torch.Tensor  # [N, S-1] fp32, label-aligned
    logprobs: torch.Tensor  # [N, S-1] fp32, label-aligned
    routing_ids: Optional[torch.Tensor] = None  # [N, S, L, K] int8 (E <= 127) / int16
    routing_log_scores: Optional[torch.Tensor] = None  # [N, S, L, K] fp32
    finished: Optional[torch.Tensor] = None  # [N] bool: the response ended with EOS

    @property
    def total_lens(self) -> torch.Tensor:
        return self.prompt_lens + self.response_lens

    def response(self, i: int) -> list[int]:
        p, r = int(self.prompt_lens[i]), int(self.response_lens[i])
        return self.tokens[i, p : p + r].tolist()


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_single_stage(model: torch.nn.Module) -> None:
    inner = model
    while hasattr(inner, "module") and not hasattr(inner, "pre_process"):
        inner = inner.module  # DDP / Float16Module wrappers
    if not (getattr(inner, "pre_process", True) and getattr(inner, "post_process", True)):
        raise NotImplementedError("generate() needs the whole model on one rank (pipeline parallel size 1)")


class _Forward:
    """One forward step of the generation loop, with or without Megatron's static KV cache.

    ``__call__(buf, start, end)`` feeds positions [start, end) (cached) or [0, end) (cache-free) and
    returns the logits predicting position ``end`` ([B, V]) plus the routing session of the forward.
    """

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, use_cache: bool, record: bool) -> None:
        self.model, self.use_cache, self.record = model, use_cache, record
        self.device = _model_device(model)
        self.ctx = StaticInferenceContext(batch, max_len) if use_cache else None
        # Explicit boolean masks (True = masked out): Megatron builds its default causal mask on
        # "cuda" when given None, and the cached decode step must see every cached key.
        self.causal = torch.triu(torch.ones(max_len, max_len, dtype=torch.bool, device=self.device), diagonal=1)
        self.visible = torch.zeros(1, 1, 1, max_len, dtype=torch.bool, device=self.device)

    def __call__(self, buf: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, Optional[RoutingSession]]:
        if self.use_cache:
            ids = buf[:, start:end]
            decode = start > 0
            mask = self.visible[..., :end] if decode else self.causal[None, None, :end, :end]
        else:
            start, ids = 0, buf[:, :end]
            mask = self.causal[None, None, :end, :end]
        pos = torch.arange(start, end, device=self.device).unsqueeze(0).expand(buf.shape[0], -1)
        session = RoutingSession(record=True) if self.record else None
        kwargs = {"runtime_gather_output": True}
        if self.ctx is not None:
            kwargs["inference_context"] = self.ctx
        if session is not None:
            with routing_session(self.model, session):
                logits = self.model(ids, pos, mask, **kwargs)
        else:
            logits = self.model(ids, pos, mask, **kwargs)
        if self.ctx is not None:
            self.ctx.increment_sequence_len_offset(end - start)
            self.ctx.enable_decode_mode()
        return logits[:, -1, :], session


def _validate(prompts: list[list[int]], params: SamplingParams) -> None:
    params.validate()
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty} are empty; every prompt needs at least one token")


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: Optional[int],
    pad_id: int,
    *,
    use_cache: bool = True,
    record_routing: bool = True,
    generator: Optional[torch.Generator] = None,
    sync_group: Optional[dist.ProcessGroup] = None,
) -> Rollout:
    """Sample a response for every prompt; see the module docstring for the layout and alignment.

    ``use_cache=False`` recomputes the whole prefix every step (the reference for tests).
    ``eos_id=None``: responses only stop at ``params.max_new_tokens``.
    ``sync_group``: ranks whose forwards are collective (expert or tensor parallelism): they run the same
    prefill length and number of steps, so each passes the same number of prompts.
    """
    _validate(prompts, params)
    _check_single_stage(model)
    device = _model_device(model)
    n = len(prompts)
    plens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    p_min = _agree(int(plens.min()), dist.ReduceOp.MIN, sync_group, device)
    p_max = _agree(int(plens.max()), dist.ReduceOp.MAX, sync_group, device)
    buf_len = p_max + params.max_new_tokens  # room for the longest prompt plus a full response
    buf = torch.full((n, buf_len), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    logprobs = torch.zeros(n, buf_len - 1, dtype=torch.float32, device=device)

    router_list = routers(model) if record_routing else []
    record = bool(router_list)
    num_moe, topk = len(router_list), (router_list[0].topk if router_list else 0)
    routing_ids: Optional[torch.Tensor] = None
    routing_scores: Optional[torch.Tensor] = None

    def keep_routing(session: Optional[RoutingSession], start: int, end: int) -> None:
        nonlocal routing_ids, routing_scores
        if session is None:
            return
        ids = RoutingSession.stack(session.recorded_ids, num_moe)[:, -(end - start) :]  # [B, s, L, K]
        scores = RoutingSession.stack(session.recorded_log_scores, num_moe)[:, -(end - start) :]
        if routing_ids is None:
            routing_ids = torch.zeros(n, buf_len, num_moe, topk, dtype=ids.dtype, device=device)
            routing_scores = torch.zeros(n, buf_len, num_moe, topk, dtype=torch.float32, device=device)
        routing_ids[:, start:end] = ids
        routing_scores[:, start:end] = scores.float()

    rlens = torch.zeros(n, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    t_logprob = params.logprob_temperature
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            step = _Forward(model, n, buf_len, use_cache, record)
            fed = 0
            while True:
                # Feed the unfed prefix (prefill: the shortest prompt; then one token per step).
                end = p_min if fed == 0 else fed + 1
                logits, session = step(buf, fed, end)
                keep_routing(session, fed, end)
                fed = t = end  # the position being produced now
                all_done = bool(_agree(int(done.all()), dist.ReduceOp.MIN, sync_group, device))
                if all_done or t >= buf_len:
                    break  # this last forward only fed the final tokens for their routing records
                new = sample(logits, params, generator)
                live = ~done & (t >= plens)  # rows generating now (others: in their prompt, or done)
                buf[:, t] = torch.where(live, new, torch.where(t < plens, buf[:, t], pad_id))
                logprobs[:, t - 1] = torch.where(live, token_logprobs(logits, new, t_logprob), 0.0)
                rlens += live.long()
                hit_eos = live & (new == eos_id) if eos_id is not None else torch.zeros_like(live)
                finished |= hit_eos
                done |= hit_eos | (live & (rlens >= params.max_new_tokens))
                if not record and _agree(int(done.all()), dist.ReduceOp.MIN, sync_group, device):
                    break  # no routing to record for the tokens just produced
    finally:
        model.train(was_training)

    return _assemble(buf, plens, rlens, logprobs, routing_ids, routing_scores, finished)


def _agree(value: int, op: dist.ReduceOp, group: Optional[dist.ProcessGroup], device: torch.device) -> int:
    """``value`` reduced over ``group`` (itself without one)."""
    if group is None or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=op, group=group)
    return int(t[0])


def _assemble(
    buf: torch.Tensor,
    plens: torch.Tensor,
    rlens: torch.Tensor,
    logprobs: torch.Tensor,
    routing_ids: Optional[torch.Tensor],
    routing_scores: Optional[torch.Tensor],
    finished: torch.Tensor,
) -> Rollout:
    """Cut the work buffers to S = max(prompt+response) and zero everything past each row's end."""
    total = plens + rlens
    s = int(total.max())
    pos = torch.arange(s, device=buf.device).unsqueeze(0)
    valid = pos < total.unsqueeze(1)  # [N, S] input positions inside prompt+response
    labels = pos[:, 1:]
    mask = (labels >= plens.unsqueeze(1)) & (labels < total.unsqueeze(1))  # [N, S-1]
    tokens = buf[:, :s].clone()
    out_logprobs = torch.where(mask, logprobs[:, : s - 1], 0.0)
    if routing_ids is not None:
        keep = valid[:, :, None, None]
        routing_ids = torch.where(keep, routing_ids[:, :s], torch.zeros((), dtype=routing_ids.dtype))
        routing_scores = torch.where(keep, routing_scores[:, :s], 0.0)
    return Rollout(
        tokens=tokens,
        prompt_lens=plens,
        response_lens=rlens,
        response_mask=mask.float(),
        logprobs=out_logprobs,
        routing_ids=routing_ids,
        routing_log_scores=routing_scores,
        finished=finished,
    )

"""Batched sampling on a Megatron GPTModel with a KV cache, recording the routing of every token.

Layout of a ``Rollout`` (one layout for the trainer, everything right-padded)::

    tokens          [N, S]        prompt ++ response ++ pad          (S = max prompt+response length)
    logprobs        [N, S-1]      label-aligned: logprobs[i, j] is log pi(tokens[i, j+1] | tokens[i, :j+1])
    response_mask   [N, S-1]      label-aligned: 1 iff tokens[i, j+1] is a response token, i.e.
                                  prompt_len-1 <= j < prompt_len+response_len-1
    routing_ids     [N, S, L, K]  input-aligned: what the routers did for input token j during rollout
                                  (uint8 for E <= 256 experts, int16 above)
    routing_log_scores [N, S, L, K]  fp32; None with ``record_scores=False``

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

At size: ``max_batch_rows`` runs the rows in consecutive chunks of at most that many, each with its own
KV cache (the KV cache and the [rows, V] sampling buffers scale with the chunk, the returned records
with all rows); the chunks' rollouts are concatenated in row order and padded to the common S, in the
layout above. Randomness does not depend on the chunking: every uniform the call needs is drawn up
front from the caller's generator (on the model's device), one per row and position, and row i's token
at position t is the inverse-CDF draw at ``uniforms[i, t]`` (``sampling.sample``). A seeded rollout is
therefore the same for any ``max_batch_rows``, cached or not, up to the float rounding of forwards
over different batch sizes. ``record_scores=False`` keeps only the expert ids (what the trainer needs
when it recomputes the old-policy scores anyway): no [T, E] log-softmax or gather in the routers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_rspo import distributed
from megatron_rspo.model.routing import RoutingSession, routers, routing_session
from megatron_rspo.rollout.sampling import (
    SamplingParams,
    StopIds,
    check_generator_device,
    sample,
    stop_id_list,
    token_logprobs,
)

__all__ = ["SamplingParams", "Rollout", "generate"]


@dataclass
class Rollout:
    tokens: torch.Tensor  # [N, S] int64
    prompt_lens: torch.Tensor  # [N] int64
    response_lens: torch.Tensor  # [N] int64, includes the EOS token when one was generated
    response_mask: torch.Tensor  # [N, S-1] fp32, label-aligned
    logprobs: torch.Tensor  # [N, S-1] fp32, label-aligned
    routing_ids: Optional[torch.Tensor] = None  # [N, S, L, K] uint8 (E <= 256) / int16
    routing_log_scores: Optional[torch.Tensor] = None  # [N, S, L, K] fp32; None with record_scores=False
    finished: Optional[torch.Tensor] = None  # [N] bool: the response ended with EOS
    weight_version: int = 0  # the policy version the rollout was sampled with (set by the rollout engine)
    # the inference engine's own routed experts [N, S, L, K] int16, -1 = no record (prefix-cached or not
    # returned); None when the engine returns none (the built-in engine's are routing_ids)
    engine_routing_ids: Optional[torch.Tensor] = None

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


def _causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, length, length] boolean causal mask (True = masked out), built for one forward only."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)[None, None]


class _Forward:
    """One forward step of the generation loop, with or without Megatron's static KV cache.

    ``__call__(buf, start, end)`` feeds positions [start, end) (cached) or [0, end) (cache-free) and
    returns the logits predicting position ``end`` ([B, V]) plus the routing session of the forward.
    Masks are explicit booleans (True = masked out): Megatron builds its default causal mask on "cuda"
    when given None. Nothing here is O(max_len^2): the cached prefill builds a [p, p] causal mask for its
    own length p, decode steps slice one [1, 1, 1, max_len] all-visible row (they see every cached key),
    and only the cache-free reference builds a causal mask per step.
    """

    def __init__(
        self, model: torch.nn.Module, batch: int, max_len: int, use_cache: bool, record: bool, record_scores: bool
    ) -> None:
        self.model, self.use_cache, self.record, self.record_scores = model, use_cache, record, record_scores
        self.device = _model_device(model)
        self.ctx = StaticInferenceContext(batch, max_len) if use_cache else None
        self.visible = torch.zeros(1, 1, 1, max_len, dtype=torch.bool, device=self.device) if use_cache else None

    def __call__(self, buf: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, Optional[RoutingSession]]:
        if self.use_cache:
            ids = buf[:, start:end]
            mask = self.visible[..., :end] if start > 0 else _causal_mask(end, self.device)
        else:
            start, ids = 0, buf[:, :end]
            mask = _causal_mask(end, self.device)
        pos = torch.arange(start, end, device=self.device).unsqueeze(0).expand(buf.shape[0], -1)
        session = RoutingSession(record=True, record_scores=self.record_scores) if self.record else None
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


def _validate(prompts: list[list[int]], params: SamplingParams, max_batch_rows: Optional[int]) -> None:
    params.validate()
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty} are empty; every prompt needs at least one token")
    if max_batch_rows is not None and max_batch_rows < 1:
        raise ValueError(f"max_batch_rows must be >= 1 or None (got {max_batch_rows})")


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: StopIds,
    pad_id: int,
    *,
    use_cache: bool = True,
    record_routing: bool = True,
    generator: Optional[torch.Generator] = None,
    sync_group: Optional[dist.ProcessGroup] = None,
    max_batch_rows: Optional[int] = None,
    record_scores: bool = True,
) -> Rollout:
    """Sample a response for every prompt; see the module docstring for the layout and alignment.

    ``use_cache=False`` recomputes the whole prefix every step (the reference for tests).
    ``eos_id``: the id, or ids, that end a response (every EOS of the tokenizer and generation config); None:
    responses only stop at ``params.max_new_tokens``.
    ``generator``: on the model's device (ValueError otherwise); it draws every random number of the call
    up front (None: the device's default generator). ``max_batch_rows``: generate at most that many rows
    at a time, each chunk with its own KV cache; the result does not depend on it (module docstring).
    ``record_scores=False``: record expert ids only (``routing_log_scores`` is None).
    ``sync_group``: ranks whose forwards are collective (expert or tensor parallelism): they run the same
    chunks, prefill lengths and number of steps, so they must agree on the number of chunks (pass the
    same number of prompts; ValueError otherwise).
    """
    _validate(prompts, params, max_batch_rows)
    _check_single_stage(model)
    device = _model_device(model)
    check_generator_device(generator, device)
    n = len(prompts)
    rows = n if max_batch_rows is None else max_batch_rows
    chunks = [range(lo, min(lo + rows, n)) for lo in range(0, n, rows)]
    fewest = _agree(len(chunks), dist.ReduceOp.MIN, sync_group, device)
    most = _agree(len(chunks), dist.ReduceOp.MAX, sync_group, device)
    if fewest != most:
        raise ValueError(
            f"ranks of sync_group would run {fewest} to {most} generation chunks ({n} prompts here, "
            f"max_batch_rows={max_batch_rows}); their forwards are collective, so pass the same number of prompts"
        )
    # One uniform per row and position, drawn before chunking: row i's token at position t uses
    # uniforms[i, t] whatever the chunking, prefill length or cache mode (8 bytes per row and position).
    # The width is agreed over the group because each chunk's buffers are (its prompts may be shorter).
    p_max = _agree(max(len(p) for p in prompts), dist.ReduceOp.MAX, sync_group, device)
    uniforms = None
    if not params.greedy:
        width = p_max + params.max_new_tokens
        uniforms = torch.rand(n, width, dtype=torch.float64, device=device, generator=generator)

    router_list = routers(model) if record_routing else []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [
                _generate_rows(
                    model, [prompts[i] for i in c], params, eos_id, pad_id, use_cache, router_list, record_scores,
                    None if uniforms is None else uniforms[c.start : c.stop], sync_group, device,
                )
                for c in chunks
            ]
    finally:
        model.train(was_training)
    return parts[0] if len(parts) == 1 else _concat(parts, pad_id)


def _generate_rows(
    model: torch.nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: StopIds,
    pad_id: int,
    use_cache: bool,
    router_list: list,
    record_scores: bool,
    uniforms: Optional[torch.Tensor],
    sync_group: Optional[dist.ProcessGroup],
    device: torch.device,
) -> Rollout:
    """One batch of rows (one chunk), with its own KV cache and work buffers; freed when it returns."""
    n = len(prompts)
    lens = [len(p) for p in prompts]
    plens = torch.tensor(lens, dtype=torch.long, device=device)
    p_min = _agree(min(lens), dist.ReduceOp.MIN, sync_group, device)
    p_max = _agree(max(lens), dist.ReduceOp.MAX, sync_group, device)
    buf_len = p_max + params.max_new_tokens  # room for the longest prompt plus a full response
    buf = torch.full((n, buf_len), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    logprobs = torch.zeros(n, buf_len - 1, dtype=torch.float32, device=device)
    stop_ids = stop_id_list(eos_id)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None

    record = bool(router_list)
    num_moe, topk = len(router_list), (router_list[0].topk if router_list else 0)
    routing_ids: Optional[torch.Tensor] = None
    routing_scores: Optional[torch.Tensor] = None

    def keep_routing(session: Optional[RoutingSession], start: int, end: int) -> None:
        nonlocal routing_ids, routing_scores
        if session is None:
            return
        ids = RoutingSession.stack(session.recorded_ids, num_moe)[:, -(end - start) :]  # [B, s, L, K]
        if routing_ids is None:
            routing_ids = torch.zeros(n, buf_len, num_moe, topk, dtype=ids.dtype, device=device)
            if record_scores:
                routing_scores = torch.zeros(n, buf_len, num_moe, topk, dtype=torch.float32, device=device)
        routing_ids[:, start:end] = ids
        if routing_scores is not None:
            scores = RoutingSession.stack(session.recorded_log_scores, num_moe)[:, -(end - start) :]
            routing_scores[:, start:end] = scores.float()

    rlens = torch.zeros(n, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    t_logprob = params.logprob_temperature
    step = _Forward(model, n, buf_len, use_cache, record, record_scores)
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
        new = sample(logits, params, uniforms=None if uniforms is None else uniforms[:, t])
        live = ~done & (t >= plens)  # rows generating now (others: in their prompt, or done)
        buf[:, t] = torch.where(live, new, torch.where(t < plens, buf[:, t], pad_id))
        logprobs[:, t - 1] = torch.where(live, token_logprobs(logits, new, t_logprob), 0.0)
        rlens += live.long()
        hit_eos = live & torch.isin(new, stop) if stop is not None else torch.zeros_like(live)
        finished |= hit_eos
        done |= hit_eos | (live & (rlens >= params.max_new_tokens))
        if not record and _agree(int(done.all()), dist.ReduceOp.MIN, sync_group, device):
            break  # no routing to record for the tokens just produced
    del step  # the KV cache goes before the next chunk's is allocated
    return _assemble(buf, plens, rlens, logprobs, routing_ids, routing_scores, finished)


def _agree(value: int, op: dist.ReduceOp, group: Optional[dist.ProcessGroup], device: torch.device) -> int:
    """``value`` reduced over ``group`` (itself without one), through the parallel plumbing."""
    if group is None:
        return value
    return distributed.agree_int(value, op, group)


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
        if routing_scores is not None:
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


def _concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """Chunks' rollouts as one: rows in order, every chunk right-padded to the common S (pad tokens, zeros
    elsewhere, as ``_assemble`` leaves them). Each chunk's field is dropped once copied (peak: ~one field)."""
    n = sum(len(p.prompt_lens) for p in parts)
    s = max(p.tokens.shape[1] for p in parts)
    out: dict[str, Optional[torch.Tensor]] = {}
    for name, width, fill in [
        ("tokens", s, pad_id), ("response_mask", s - 1, 0), ("logprobs", s - 1, 0), ("routing_ids", s, 0),
        ("routing_log_scores", s, 0), ("prompt_lens", None, 0), ("response_lens", None, 0), ("finished", None, 0),
    ]:
        first = getattr(parts[0], name)
        if first is None:
            out[name] = None
            continue
        shape = (n,) if width is None else (n, width, *first.shape[2:])
        full = first.new_full(shape, fill)
        row = 0
        for p in parts:
            x = getattr(p, name)
            if width is None:
                full[row : row + len(x)] = x
            else:
                full[row : row + len(x), : x.shape[1]] = x
            row += len(x)
            setattr(p, name, None)
        out[name] = full
    return Rollout(**out)

"""One rollout's worth of experience: prompts -> engine -> rewards -> advantages, with DAPO's dynamic
sampling (rounds until the batch holds enough informative groups) and overlong handling. Orchestration
only: the engine samples, the task scores, ``advantages``/``dynamic_sampling`` compute.

Rollout ``index`` (the iteration that will train on it) takes the stream's next prompts and seeds its
sampling from ``index``, the round and the DP rank, so a rollout is the same whichever iteration generated
it (the synchronous and the asynchronous schedules see the same data and samples at staleness 0).
A rollout sampled with older weights than the ones it is trained at (``weight_version < index``) is
treated like an external engine's: its log-probs are the behaviour policy's, and the old-policy pass
records the proximal policy's own experts (DESIGN §7).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_rspo import distributed
from megatron_rspo.evaluation import decode_responses
from megatron_rspo.rl.config import RLConfig
from megatron_rspo.rl.dynamic_sampling import informative_groups, overlong_penalty, truncated
from megatron_rspo.rl.experience import Experience, build_experience
from megatron_rspo.rl.parallel import RoutingLayout, agreed_forward_length, generation_mode, pad_sequence
from megatron_rspo.rollout.engine import RolloutEngine
from megatron_rspo.rollout.generate import SamplingParams


@dataclass
class RolloutContext:
    rl: RLConfig
    seed: int
    tok: Any
    task: Any
    train_set: list
    stream: Any  # data.ShuffledStream of this DP rank
    engine: RolloutEngine
    model: torch.nn.Module  # the training model (generation_mode switches its sequence parallelism off)
    layout: RoutingLayout
    dp: int
    dp_rank: int
    # the group of this phase's own agreements (every rank; None: the world). A rollout produced in a thread
    # while the trainer's collectives run (overlap) must not share their communicator.
    group: Optional[Any] = None


def _sample_round(ctx: RolloutContext, index: int, round_: int) -> tuple[Experience, torch.Tensor, Any]:
    """One round: a batch of the stream's prompts, G samples each, scored; returns the experience, the
    raw rewards and the engine's Rollout."""
    rl = ctx.rl
    insts = [ctx.train_set[i] for i in ctx.stream.take(rl.rollout_batch_size // ctx.dp)]
    prompts = [ctx.tok.encode(ctx.task.prompt(x, rl.template, ctx.tok)) for x in insts]
    rows = [p for p in prompts for _ in range(rl.num_generations)]
    # TP ranks of a DP rank share the seed and see the same gathered logits: the same samples.
    seed = ctx.seed * 100003 + index * 101 + ctx.dp_rank + round_ * 7_919_000
    params = SamplingParams(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p)
    # An external engine never touches the training model (which may be training meanwhile, in another thread).
    external = not ctx.engine.same_numerics_as_trainer
    with contextlib.nullcontext() if external else generation_mode(ctx.model) as group:
        ro = ctx.engine.generate(rows, params, eos_id=ctx.tok.stop_ids, pad_id=ctx.tok.pad_id, seed=seed,
                                 record_scores=not rl.recompute_old_logprobs, sync_group=group,
                                 max_batch_rows=rl.generation_batch_size)
    texts = decode_responses(ctx.tok, ro.tokens, ro.prompt_lens, ro.response_lens)  # one host copy
    group_insts = [x for x in insts for _ in range(rl.num_generations)]
    raw = torch.tensor([ctx.task.score(t, x, rl.template) for t, x in zip(texts, group_insts)], dtype=torch.float32)
    shaped = overlong_penalty(raw, ro.response_lens.cpu(), rl.max_new_tokens, rl.overlong_buffer,
                              rl.overlong_penalty)
    stale = ro.weight_version < index
    replay_engine = rl.routing_replay_source == "rollout" and ro.engine_routing_ids is not None
    routing_ids = ro.engine_routing_ids if replay_engine else (None if stale else ro.routing_ids)
    exp = build_experience(ro.tokens, ro.response_mask, ro.total_lens, shaped.tolist(), rl.num_generations,
                           rl.normalize_advantage_std, routing_ids=routing_ids)
    exp.rollout_logp, exp.weight_version = ro.logprobs, ro.weight_version
    exp.engine_routing_ids = ro.engine_routing_ids
    if stale and ro.routing_ids is not None and exp.engine_routing_ids is None:
        exp.engine_routing_ids = ro.routing_ids.to(torch.int16)  # the behaviour policy's experts
    if ctx.engine.same_numerics_as_trainer and not rl.recompute_old_logprobs:
        exp.old_logp = ro.logprobs
        exp.old_log_scores = ro.routing_log_scores[:, :-1]
    if rl.overlong_filter:  # truncated responses leave the loss (and its normaliser) instead of being penalised
        cut = truncated(ro.finished, ro.response_lens, rl.max_new_tokens)
        exp.response_mask = exp.response_mask * (~cut).to(exp.response_mask.dtype)[:, None]
    return exp, raw, ro


def collect_rollout(ctx: RolloutContext, index: int) -> tuple[Experience, dict[str, torch.Tensor]]:
    """Rollout ``index``: with ``--filter-groups``, rounds of sampling until ``--rollout-batch-size`` informative
    groups (rewards not all equal) are kept or ``--max-filter-rounds`` is reached; short batches are filled
    with uninformative groups whose tokens are masked out, so they count in no loss normaliser."""
    rl, g = ctx.rl, ctx.rl.num_generations
    target = rl.rollout_batch_size // ctx.dp
    kept, spare, raws, rounds = [], [], [], 0
    lengths, eos, versions = [], [], []
    n_kept = 0
    while True:
        exp, raw, ro = _sample_round(ctx, index, rounds)
        rounds += 1
        raws.append(raw)
        lengths.append(ro.response_lens.float())
        eos.append(ro.finished.float() if ro.finished is not None else torch.ones(len(raw)))
        versions.append(ro.weight_version)
        good = informative_groups(raw, g).tolist() if rl.filter_groups else [True] * (len(raw) // g)
        for i, ok in enumerate(good):
            rows = slice(i * g, (i + 1) * g)
            if ok and n_kept < target:
                kept.append(exp.select(rows))
                n_kept += 1
            elif not ok:
                spare.append(exp.select(rows))
        # Every rank samples the same number of rounds (its forwards are collective over TP/EP ranks).
        more = int(rl.filter_groups and n_kept < target and rounds < rl.max_filter_rounds)
        if not distributed.agree_int(more, distributed.ReduceOp.MAX, ctx.group):
            break
    for part in spare[: target - n_kept]:  # the cap was reached: fill, masked out
        part.response_mask = torch.zeros_like(part.response_mask)
        kept.append(part)
    out = Experience.cat(kept, ctx.tok.pad_id)
    r = torch.cat(raws).double().to(out.device)
    stats = {"reward/_sum": r.sum(), "reward/_sq_sum": (r * r).sum(), "reward/_count": r.new_tensor(len(r)),
             "reward/accuracy": (r >= ctx.task.full_score).float().mean(),
             "response/length_mean": torch.cat(lengths).mean(), "response/eos_frac": torch.cat(eos).mean(),
             "rollout/filter_rounds": float(rounds), "rollout/kept_group_frac": n_kept / (len(r) // g),
             "rollout/staleness_mean": float(index - sum(versions) / len(versions)),
             "rollout/staleness_max": float(index - min(versions))}
    out = out.trimmed()
    length = agreed_forward_length(out.tokens.shape[1] - 1, ctx.layout.seq_multiple, ctx.group)
    return pad_sequence(out, length, ctx.tok.pad_id), stats

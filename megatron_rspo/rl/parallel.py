"""Cross-rank plumbing for RL (DESIGN §5): routing information across TP/SP and PP, the rows of each
data-parallel rank, and metric reductions over DP.

- DP (EP is carved from DP ranks): each rank owns different rows and keeps their routing records;
  experts may run elsewhere (the dispatcher moves tokens, not records). Metrics are all-reduced over DP.
- TP + sequence parallelism: a router sees only its TP rank's slice of the sequence, so the ids handed
  to it are sliced (``RoutingLayout.seq_slice``) and what it produces per token is all-gathered over
  the TP group; every TP rank then holds the complete per-token values, as it does the vocab-parallel
  log-probs (the loss is computed redundantly on every TP rank).
- PP: a stage scores only its own MoE layers. Per micro-batch it computes, for those layers, the
  per-token router-shift distance and expert-set change (plus expert load) and sends them to the last
  stage of its pipeline (``routing_exchange.PipelineRouting``), which assembles all layers before γ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.utils import set_model_to_sequence_parallel

from megatron_rspo import distributed
from megatron_rspo.model.routing import routers
from megatron_rspo.rl.experience import Experience


def _initialized() -> bool:
    return dist.is_initialized() and parallel_state.model_parallel_is_initialized()


def _dp_group():
    return parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None


def all_reduce_dp(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the data-parallel group (a no-op on one rank), on the backend's device."""
    if parallel_state.model_parallel_is_initialized():
        distributed.all_reduce(t, op, _dp_group())
    return t


def dp_world_size() -> int:
    return parallel_state.get_data_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1


def reduce_over_dp(metrics: dict[str, torch.Tensor | float], ops: Optional[dict[str, str]] = None
                   ) -> dict[str, float]:
    """Scalar metrics reduced over DP ranks (``ops[name]``: "mean" by default, "sum", "max", "min"); one
    collective per kind and one host sync. Every rank must pass the same keys."""
    group = _dp_group() if dp_world_size() > 1 else None
    return distributed.reduce_scalars(metrics, ops or {}, group)


def mean_over_dp(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Average scalar metrics over DP ranks (every rank must pass the same keys)."""
    return reduce_over_dp(metrics)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def _pipeline_p2p_groups() -> tuple[Any, list[int]]:
    """A process group per pipeline, separate from Megatron's, for the routing partials: NCCL matches
    point-to-point messages between two ranks in posting order per communicator, so sharing Megatron's
    pipeline group would interleave ours with its activations. ``new_group`` is collective over the
    world, so every rank creates every pipeline's group, in the same order."""
    mine = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    everyone: list[Optional[list[int]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    group = None
    for ranks in sorted({tuple(r) for r in everyone if r is not None}):
        g = dist.new_group(list(ranks))
        if list(ranks) == mine:
            group = g
    return group, mine


@dataclass
class RoutingLayout:
    """Where this rank sits for routing purposes: its TP slice of the sequence and its pipeline stage's
    MoE layers. ``build`` is collective under PP (call it on every rank before the first schedule)."""

    local_layers: list[int]  # MoE-layer indices (0..L-1 over the whole model) of this stage, ascending
    stage_layers: list[list[int]] = field(default_factory=list)  # per pipeline stage
    stage_ranks: list[int] = field(default_factory=list)  # global rank of each stage of this pipeline
    tp_size: int = 1
    tp_rank: int = 0
    sequence_parallel: bool = False
    tp_group: Any = None
    pp_rank: int = 0
    p2p_group: Any = None

    @property
    def pp_size(self) -> int:
        return max(len(self.stage_layers), 1)

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def last_stage_rank(self) -> int:
        return self.stage_ranks[-1]

    @property
    def num_moe_layers(self) -> int:
        return sum(len(s) for s in self.stage_layers)

    @classmethod
    def local(cls, model: torch.nn.Module) -> RoutingLayout:
        """Without collectives: valid when the pipeline has one stage."""
        layers = [r.moe_index for r in routers(model)]
        tp, tp_rank, tp_group = 1, 0, None
        if _initialized():
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                raise RuntimeError("pipeline parallelism needs RoutingLayout.build(model), called on every rank "
                                   "before the first forward-backward schedule (it is collective)")
            tp = parallel_state.get_tensor_model_parallel_world_size()
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            tp_group = parallel_state.get_tensor_model_parallel_group()
        sp = bool(unwrap(model).config.sequence_parallel) and tp > 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        return cls(local_layers=layers, stage_layers=[layers], stage_ranks=[rank], tp_size=tp, tp_rank=tp_rank,
                   sequence_parallel=sp, tp_group=tp_group)

    @classmethod
    def build(cls, model: torch.nn.Module) -> RoutingLayout:
        """Collective over all ranks when PP > 1 (exchanges each stage's MoE layers, creates p2p groups)."""
        if not _initialized() or parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return cls.local(model)
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        layers = [r.moe_index for r in routers(model)]
        stage_layers: list[Optional[list[int]]] = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(stage_layers, layers, group=pp_group)
        p2p_group, stage_ranks = _pipeline_p2p_groups()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return cls(local_layers=layers, stage_layers=[list(s or []) for s in stage_layers], stage_ranks=stage_ranks,
                   tp_size=tp, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                   sequence_parallel=bool(unwrap(model).config.sequence_parallel) and tp > 1,
                   tp_group=parallel_state.get_tensor_model_parallel_group(),
                   pp_rank=parallel_state.get_pipeline_model_parallel_rank(), p2p_group=p2p_group)

    # ------------------------------------------------------------------ TP / SP
    def seq_slice(self, seq: int) -> Optional[slice]:
        """The positions of a length-``seq`` forward that this rank's routers see (None: all)."""
        if not self.sequence_parallel:
            return None
        if seq % self.tp_size:
            raise ValueError(f"sequence parallelism needs the forward length ({seq}) to be a multiple of the "
                             f"tensor-parallel size ({self.tp_size}); pad the experience (pad_sequence)")
        n = seq // self.tp_size
        return slice(self.tp_rank * n, (self.tp_rank + 1) * n)

    def gather_seq(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """All-gather this rank's sequence slice over the TP group along ``dim`` (no autograd)."""
        if not self.sequence_parallel:
            return x
        return distributed.all_gather(x, self.tp_group, dim=dim)

    def sum_tp(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of per-slice counts over the TP group (SP only: without it every TP rank routes all tokens)."""
        if self.sequence_parallel:
            x = distributed.all_reduce(x.detach().clone(), group=self.tp_group)
        return x

    @property
    def seq_multiple(self) -> int:
        return self.tp_size if self.sequence_parallel else 1


@contextlib.contextmanager
def generation_mode(model: torch.nn.Module) -> Iterator[Optional[dist.ProcessGroup]]:
    """Rollout generation in a TP and/or EP layout: yields the ``sync_group`` for ``generate``.

    Decode steps feed one position, which cannot be split over TP ranks, so sequence parallelism is
    switched off meanwhile (Megatron's own switch): every TP rank then runs, and routes, the whole
    sequence of its DP rank's rows and records complete routing. MoE forwards are collective over the
    TP/EP ranks, so all ranks keep in step (same prefill length and number of decode steps). Pipeline
    parallelism has no generation path (it would need the pipelined inference schedule)."""
    if not _initialized():
        yield None
        return
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("rollout generation needs --pipeline-model-parallel-size 1; the old-policy pass "
                                  "and the training step support pipeline parallelism (docs/parallelism.md)")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    inner = unwrap(model)
    sp = bool(inner.config.sequence_parallel)
    if sp:
        set_model_to_sequence_parallel(inner, False)
    try:
        yield dist.group.WORLD if tp > 1 or ep > 1 else None
    finally:
        if sp:
            set_model_to_sequence_parallel(inner, True)


@dataclass
class StageRouting:
    """Per-token routing quantities of some MoE layers (one stage's, or all of them once assembled):
    ``shift`` and ``changed`` [B, S, L] (NaN when not computed), ``load`` [L, E] tokens per expert."""

    shift: torch.Tensor
    changed: torch.Tensor
    load: torch.Tensor

    def pack(self) -> torch.Tensor:
        return torch.cat([torch.stack([self.shift, self.changed], dim=-1).flatten(), self.load.flatten()]).float()

    @classmethod
    def unpack(cls, flat: torch.Tensor, batch: int, seq: int, layers: int, experts: int) -> StageRouting:
        n = batch * seq * layers * 2
        per_token = flat[:n].view(batch, seq, layers, 2)
        return cls(per_token[..., 0], per_token[..., 1], flat[n:].view(layers, experts))

    @classmethod
    def cat(cls, parts: list[StageRouting]) -> StageRouting:
        return cls(torch.cat([p.shift for p in parts], dim=-1), torch.cat([p.changed for p in parts], dim=-1),
                   torch.cat([p.load for p in parts], dim=0))


def localize(exp: Experience, layout: RoutingLayout, dp_rank: int = 0, dp_size: int = 1) -> Experience:
    """Cut a whole-batch experience (all rows, all MoE layers) to what this rank trains on: its DP rank's
    contiguous rows, and the old router scores of its pipeline stage's layers. TP ranks keep the whole
    sequence (their routers' slices are taken at forward time)."""
    if len(exp) % dp_size:
        raise ValueError(f"{len(exp)} rows do not split over {dp_size} data-parallel ranks")
    n = len(exp) // dp_size
    out = exp.select(slice(dp_rank * n, (dp_rank + 1) * n))
    if out.old_log_scores is not None and out.old_log_scores.shape[2] != len(layout.local_layers):
        out = replace(out, old_log_scores=out.old_log_scores[:, :, layout.local_layers])
    return out


def agreed_forward_length(length: int, multiple: int = 1, group: Optional[dist.ProcessGroup] = None) -> int:
    """The forward length every rank uses: the max over all ranks (MoE dispatchers gather tokens over EP
    ranks, pipeline stages exchange fixed-shape activations), rounded up to ``multiple`` (SP: TP | length).
    ``group``: a group spanning every rank (default: the world)."""
    length = distributed.agree_int(length, dist.ReduceOp.MAX, group)
    return -(-length // multiple) * multiple


def pad_sequence(exp: Experience, forward_length: int, pad_id: int = 0) -> Experience:
    """Right-pad to ``forward_length + 1`` tokens (the training forward runs over ``tokens[:, :-1]``); padded
    positions are masked out, so results do not change."""
    extra = forward_length + 1 - exp.tokens.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {exp.tokens.shape[1]} tokens to a forward length of {forward_length}")
    if extra == 0:
        return exp

    def pad(t: Optional[torch.Tensor], value: float = 0) -> Optional[torch.Tensor]:
        if t is None:
            return None
        return F.pad(t, [0, 0] * (t.dim() - 2) + [0, extra], value=value)  # dim 1 is the sequence

    return replace(exp, tokens=pad(exp.tokens, pad_id), response_mask=pad(exp.response_mask),
                   routing_ids=pad(exp.routing_ids), old_logp=pad(exp.old_logp),
                   old_log_scores=pad(exp.old_log_scores), ref_logp=pad(exp.ref_logp),
                   rollout_logp=pad(exp.rollout_logp), correction_weight=pad(exp.correction_weight),
                   engine_routing_ids=pad(exp.engine_routing_ids, -1))

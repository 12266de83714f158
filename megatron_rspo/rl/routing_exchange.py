"""Per-micro-batch routing quantities of a stage's MoE layers, assembled over TP and carried over PP.

After a stage's forward, ``stage_routing`` turns what its routers saw (a TP rank's slice of the
sequence, this stage's layers) into per-token, per-layer tensors complete over the sequence.
``PipelineRouting`` carries them to the last pipeline stage of the same micro-batch inside Megatron's
schedule: every earlier stage ``isend``s its packed tensor to the last stage right after its forward
(tag = micro-batch counter); the last stage ``recv``s from each earlier stage right before it needs
γ. Activations for micro-batch i reach the last stage only after every earlier stage has finished
its forward of i, so the matching send has always been posted: the receive cannot deadlock, and the
non-blocking sends complete during the schedule (``finish`` waits for them after it).

Per-layer distances rather than only their sum travel (L_stage floats per token against the h floats
of the activations already sent): the last stage then computes γ with exactly the reduction of a single
rank, and per-layer diagnostics come out whole.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_rspo import distributed
from megatron_rspo.model.routing import RoutingSession
from megatron_rspo.rl.parallel import RoutingLayout, StageRouting
from megatron_rspo.rl.router_shift import expert_set_changed, per_layer_router_shift


def _stack(per_layer: dict[int, torch.Tensor], layers: list[int], batch: int, seq: int,
           device: torch.device) -> torch.Tensor:
    """{layer: [S, B, K]} -> [B, S, L_stage, K] (a stage without MoE layers gives L_stage = 0)."""
    if not layers:
        return torch.zeros(batch, seq, 0, 1, device=device)
    return RoutingSession.stack(per_layer, layers).to(device)


def _local_len(layout: RoutingLayout, seq: int) -> int:
    return len(range(seq)[layout.seq_slice(seq) or slice(None)])


@torch.no_grad()
def stage_scores(session: RoutingSession, layout: RoutingLayout, batch: int, seq: int,
                 device: torch.device) -> torch.Tensor:
    """Current router log-scores at the session's score ids for this stage's layers, [B, S, L_stage, K],
    gathered over the TP group (old-policy pass; ``seq`` is the forward length)."""
    return layout.gather_seq(_stack(session.current_log_scores, layout.local_layers, batch,
                                    _local_len(layout, seq), device), dim=1)


@torch.no_grad()
def stage_records(session: RoutingSession, layout: RoutingLayout, batch: int, seq: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert ids this stage's routers used and their log-scores, [B, S, L_stage, K] each, gathered over
    the TP group (the old-policy pass of a rollout that came without routing records, e.g. from vLLM)."""
    n = _local_len(layout, seq)
    ids = _stack(session.recorded_ids, layout.local_layers, batch, n, device)
    scores = _stack(session.recorded_log_scores, layout.local_layers, batch, n, device)
    wide = layout.gather_seq(ids.to(torch.int32), dim=1).to(ids.dtype)  # gloo has no uint8 all-gather
    return wide, layout.gather_seq(scores.float(), dim=1)


@torch.no_grad()
def stage_routing(session: RoutingSession, layout: RoutingLayout, old_log_scores: Optional[torch.Tensor],
                  old_ids: Optional[torch.Tensor], batch: int, seq: int, num_experts: int,
                  device: torch.device) -> StageRouting:
    """This stage's per-token router shift and expert-set change, complete over the sequence.

    ``old_log_scores`` [B, S, L_stage, K] (this stage's layers, the whole sequence) and ``old_ids``
    [B, S, L, K] (all layers) are the rollout's; either may be None (that quantity is then NaN).
    """
    layers = layout.local_layers
    sl = layout.seq_slice(seq) or slice(None)
    seq_local = _local_len(layout, seq)
    shift = torch.full((batch, seq_local, len(layers)), float("nan"), device=device)
    changed = shift.clone()
    if layers and old_log_scores is not None and session.score_ids is not None:
        current = _stack(session.current_log_scores, layers, batch, seq_local, device)
        shift = per_layer_router_shift(current, old_log_scores[:, sl].to(device))
    if layers and old_ids is not None and session.recorded_ids:
        now = _stack(session.recorded_ids, layers, batch, seq_local, device)
        changed = expert_set_changed(old_ids[:, sl][:, :, layers].to(device), now)
    per_token = layout.gather_seq(torch.stack([shift.float(), changed.float()], dim=-1), dim=1)
    if layers and session.expert_load:
        load = torch.stack([session.expert_load[i] for i in layers]).float().to(device)
    else:
        load = torch.zeros(len(layers), num_experts, device=device)
    return StageRouting(per_token[..., 0], per_token[..., 1], layout.sum_tp(load))


class PipelineRouting:
    """Carries each micro-batch's ``StageRouting`` from every pipeline stage to the last one."""

    def __init__(self, layout: RoutingLayout) -> None:
        self.layout = layout
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def send(self, part: StageRouting, microbatch: int) -> None:
        """Non-last stage: post a non-blocking send of this micro-batch's part to the last stage."""
        if not self.layout.local_layers:
            return
        buf = part.pack().to(distributed.comm_device(self.layout.p2p_group)).contiguous()
        work = dist.isend(buf, dst=self.layout.last_stage_rank, group=self.layout.p2p_group, tag=microbatch)
        self._pending.append((work, buf))  # the buffer must outlive the send

    def collect(self, own: StageRouting, microbatch: int) -> StageRouting:
        """Last stage: this micro-batch's routing over ALL MoE layers (stage order = layer order)."""
        if self.layout.pp_size == 1:
            return own
        batch, seq = own.shift.shape[:2]
        experts = own.load.shape[1]
        parts = []
        for stage, layers in enumerate(self.layout.stage_layers[:-1]):
            if not layers:
                continue
            buf = torch.empty(batch * seq * len(layers) * 2 + len(layers) * experts,
                              device=distributed.comm_device(self.layout.p2p_group))
            dist.recv(buf, src=self.layout.stage_ranks[stage], group=self.layout.p2p_group, tag=microbatch)
            parts.append(StageRouting.unpack(buf.to(own.shift.device), batch, seq, len(layers), experts))
        return StageRouting.cat(parts + [own])

    def finish(self) -> None:
        """Wait for every send posted during the schedule (call after it returns)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

"""The RSPO router: Megatron's TopKRouter that can record, replay and score routing decisions.

One ``RoutingSession`` is attached to a model for the duration of a forward pass
(``with routing_session(model, session): model(...)``). Per MoE layer and per token the router then
  (a) records the top-K expert ids it used and, unless ``record_scores=False``, the router log-scores
      at those ids (``record=True``; used at rollout and in the old-policy pass),
  (b) routes with given ids instead of its own top-K (``replay_ids``; routing replay / R3), and
  (c) returns the current log-scores at given ids (``score_ids``; the training forward of RSPO),
      optionally keeping the autograd graph to the router weights (``differentiable_scores``).

The score is the router's routing score over ALL experts — log-softmax over E experts for softmax
routers, log-sigmoid for sigmoid routers — never the top-k-renormalised combine weights.
Records are compact: ids uint8 (E <= 256, int16 above) and scores fp32, per layer [S, B, K]; they are
assembled to [B, S, L, K] (L = MoE layers of the whole model) by ``RoutingSession.stack``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import router_gating_linear
from megatron.core.transformer.moe.router import TopKRouter


def id_dtype(num_experts: int) -> torch.dtype:
    """Smallest integer type that holds expert ids 0..E-1: uint8 up to 256 experts, else int16 (config caps
    E at 32767). Unsigned: there is no "no record" value such as -1; padding positions hold 0."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 32767:
        return torch.int16
    raise ValueError(f"{num_experts} experts do not fit int16 expert ids")


def router_log_scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """log r(e) over all experts, in fp32: log-softmax (softmax routers) or log-sigmoid."""
    logits = logits.float()
    if score_function == "softmax":
        return F.log_softmax(logits, dim=-1)
    if score_function == "sigmoid":
        return F.logsigmoid(logits)
    raise ValueError(f"unknown router score function {score_function!r}")


@dataclass
class RoutingSession:
    """What the routers of one model should do in the next forward pass(es), and what they saw.

    ``replay_ids`` / ``score_ids``: [B, S, L, K] integer tensors (L = number of MoE layers of the
    whole model, S = the sequence length of the forward pass). Results are keyed by MoE-layer index.
    ``seq_slice`` restricts the ids handed to a router to a slice of S (sequence parallelism: a router
    sees its TP rank's slice only, so results are for that slice; ``rl.routing_exchange`` gathers them).
    """

    record: bool = False
    record_scores: bool = True  # with ``record``: also the log-scores at the ids (False: ids only, no gather)
    replay_ids: Optional[torch.Tensor] = None
    score_ids: Optional[torch.Tensor] = None
    differentiable_scores: bool = False
    seq_slice: Optional[slice] = None
    recorded_ids: dict[int, torch.Tensor] = field(default_factory=dict)  # [S, B, K]
    recorded_log_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # [S, B, K] fp32
    current_log_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # [S, B, K] fp32
    expert_load: dict[int, torch.Tensor] = field(default_factory=dict)  # [E] tokens per expert

    def ids_for_layer(self, ids: torch.Tensor, moe_index: int, seq: int, batch: int) -> torch.Tensor:
        """[B, S, L, K] -> this layer's [S*B, K] (Megatron's token order: sequence-major)."""
        layer = ids[:, :, moe_index, :]
        if self.seq_slice is not None:
            layer = layer[:, self.seq_slice]
        if layer.shape[0] != batch or layer.shape[1] != seq:
            raise ValueError(
                f"routing ids for MoE layer {moe_index} have batch/seq {tuple(layer.shape[:2])}, "
                f"but the router sees ({batch}, {seq})"
            )
        return layer.transpose(0, 1).reshape(seq * batch, -1).long()

    @staticmethod
    def stack(per_layer: dict[int, torch.Tensor], layers: int | Sequence[int]) -> torch.Tensor:
        """{layer: [S, B, K]} -> [B, S, L, K] over ``layers`` (an int L: layers 0..L-1; a list: those,
        e.g. one pipeline stage's); every one must be present."""
        wanted = list(range(layers)) if isinstance(layers, int) else list(layers)
        missing = [i for i in wanted if i not in per_layer]
        if missing:
            raise ValueError(f"no routing record for MoE layers {missing}")
        return torch.stack([per_layer[i] for i in wanted], dim=2).transpose(0, 1)

    def clear(self) -> None:
        self.recorded_ids.clear()
        self.recorded_log_scores.clear()
        self.current_log_scores.clear()
        self.expert_load.clear()


class _TopKPicker:
    """Duck-types Megatron's RouterReplay.get_replay_topk, so Megatron's own
    ``topk_routing_with_score_function`` (probabilities, renormalisation, expert bias, aux losses)
    runs unchanged while we see — or fix — the expert ids it picks."""

    def __init__(self, fixed_ids: Optional[torch.Tensor] = None) -> None:
        self.fixed_ids = fixed_ids
        self.ids: Optional[torch.Tensor] = None

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        if self.fixed_ids is not None:
            fixed = self.fixed_ids.to(scores.device)
            # An engine's -1 marks a slot it did not record (R3: prefix-cached positions): that token is routed
            # live, by the router's own top-K.
            missing = (fixed < 0).any(dim=-1, keepdim=True)
            _, live = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
            self.ids = torch.where(missing, live, fixed)
            return scores.gather(1, self.ids), self.ids
        values, self.ids = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        return values, self.ids


class RecordingTopKRouter(TopKRouter):
    """TopKRouter + record / replay / score-at-ids, driven by an attached RoutingSession."""

    session: Optional[RoutingSession] = None
    moe_index: int = -1  # position among the MoE layers of the whole model (set by the provider)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        # Megatron 0.16.1's gating moves a CPU weight "to the GPU" on every call; our weight already
        # lives where the input does, so only the dtype choice and the gating linear remain.
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype or "", input.dtype
        )
        return router_gating_linear(input, self.weight, self.bias, router_dtype)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        s = self.session
        if s is None or not (s.record or s.replay_ids is not None or s.score_ids is not None):
            return super().routing(logits, padding_mask=padding_mask)
        seq, batch = logits.shape[:2]
        flat = logits.reshape(-1, self.config.num_moe_experts)
        fixed = None if s.replay_ids is None else s.ids_for_layer(s.replay_ids, self.moe_index, seq, batch)
        picker, saved = _TopKPicker(fixed), self.router_replay
        self.router_replay = picker
        try:
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        finally:
            self.router_replay = saved
        log_scores = None
        if (s.record and s.record_scores) or s.score_ids is not None:  # skip the [T, E] log-softmax otherwise
            grad = s.differentiable_scores and torch.is_grad_enabled()
            with torch.set_grad_enabled(grad):
                log_scores = router_log_scores(flat if grad else flat.detach(), self.score_function)
        if s.record:
            ids = picker.ids
            s.recorded_ids[self.moe_index] = ids.view(seq, batch, -1).to(id_dtype(self.num_experts))
            if s.record_scores:
                s.recorded_log_scores[self.moe_index] = log_scores.detach().gather(1, ids).view(seq, batch, -1)
        if s.score_ids is not None:
            old = s.ids_for_layer(s.score_ids, self.moe_index, seq, batch)
            s.current_log_scores[self.moe_index] = log_scores.gather(1, old).view(seq, batch, -1)
        # Tokens per expert over real tokens only: Megatron's padding_mask (True = padding, [S, B] here)
        # already keeps pads out of the aux loss and expert-bias counts; the load statistics follow it.
        counted = routing_map if padding_mask is None else routing_map & ~padding_mask.reshape(-1, 1).bool()
        s.expert_load[self.moe_index] = counted.sum(dim=0).detach().float()
        return probs, routing_map


def routers(model: torch.nn.Module) -> list[RecordingTopKRouter]:
    found = [m for m in model.modules() if isinstance(m, RecordingTopKRouter)]
    return sorted(found, key=lambda r: r.moe_index)


@contextlib.contextmanager
def routing_session(model: torch.nn.Module, session: RoutingSession) -> Iterator[RoutingSession]:
    """Attach ``session`` to every RecordingTopKRouter of ``model`` for the enclosed forwards."""
    rs = routers(model)
    for r in rs:
        r.session = session
    try:
        yield session
    finally:
        for r in rs:
            r.session = None


@contextlib.contextmanager
def frozen_router(model: torch.nn.Module) -> Iterator[None]:
    """The ``--freeze-router`` baseline: router weights get no gradient while inside."""
    params = [p for r in routers(model) for p in r.parameters()]
    old = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, o in zip(params, old):
            p.requires_grad_(o)

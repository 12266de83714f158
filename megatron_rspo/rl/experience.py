"""One rollout's worth of training data, row-aligned, and its split into mini- and micro-batches.

Layout follows ``rollout.generate.Rollout``: ``tokens`` [N, S]; everything per label position is
[N, S-1] (position j predicts token j+1); routing records are input-aligned [N, S, L, K] and the
training forward over ``tokens[:, :-1]`` uses ``routing_ids[:, :-1]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional

import torch

from megatron_rspo.rl.advantages import group_relative_advantages


@dataclass
class Experience:
    tokens: torch.Tensor  # [N, S] int64
    response_mask: torch.Tensor  # [N, S-1] fp32
    advantages: torch.Tensor  # [N] fp32
    rewards: torch.Tensor  # [N] fp32
    routing_ids: Optional[torch.Tensor] = None  # [N, S, L, K] uint8 (E <= 256) / int16: the rollout's expert ids
    old_logp: Optional[torch.Tensor] = None  # [N, S-1] fp32 under theta_old
    old_log_scores: Optional[torch.Tensor] = None  # [N, S-1, L, K] fp32 router log-scores at the old ids
    ref_logp: Optional[torch.Tensor] = None  # [N, S-1] fp32 under the reference policy (KL)
    lengths: Optional[torch.Tensor] = None  # [N] int64 prompt+response tokens (inputs at >= length are padding)
    rollout_logp: Optional[torch.Tensor] = None  # [N, S-1] fp32 the engine's log-probs (behaviour policy)
    correction_weight: Optional[torch.Tensor] = None  # [N, S-1] a mismatch correction's weight (rl/corrections.py)
    engine_routing_ids: Optional[torch.Tensor] = None  # [N, S, L, K] int16 the engine's routed experts, -1 = none
    weight_version: int = 0  # the policy version the rollout was sampled with (the behaviour policy)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows: torch.Tensor | slice) -> Experience:
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self)
                                if torch.is_tensor(getattr(self, f.name))})

    @classmethod
    def cat(cls, parts: list[Experience], pad_id: int) -> Experience:
        """Rows of several experiences (e.g. dynamic-sampling rounds) as one, right-padded to the widest."""
        width = max(p.tokens.shape[1] for p in parts)
        padded = [_pad_to(p, width, pad_id) for p in parts]
        out = {}
        for f in fields(cls):
            values = [getattr(p, f.name) for p in padded]
            if all(torch.is_tensor(v) for v in values):
                out[f.name] = torch.cat(values)
            elif any(torch.is_tensor(v) for v in values):
                raise ValueError(f"cannot concatenate experiences where only some have {f.name}")
            else:
                out[f.name] = values[0]
        return cls(**out)

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint: the fields that are set, tensors copied to the CPU."""
        return tensors_to({f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}, "cpu")

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> Experience:
        return cls(**tensors_to(state, device))

    def trimmed(self) -> Experience:
        """Drop trailing columns that are padding in every row (cheaper forwards, same results)."""
        width = int(self.response_mask.sum(0).nonzero().max()) + 2 if self.response_mask.any() else 2
        if width >= self.tokens.shape[1]:
            return self
        return replace(
            self,
            tokens=self.tokens[:, :width],
            response_mask=self.response_mask[:, : width - 1],
            routing_ids=None if self.routing_ids is None else self.routing_ids[:, :width],
            old_logp=None if self.old_logp is None else self.old_logp[:, : width - 1],
            old_log_scores=None if self.old_log_scores is None else self.old_log_scores[:, : width - 1],
            ref_logp=None if self.ref_logp is None else self.ref_logp[:, : width - 1],
            rollout_logp=None if self.rollout_logp is None else self.rollout_logp[:, : width - 1],
            correction_weight=None if self.correction_weight is None else self.correction_weight[:, : width - 1],
            engine_routing_ids=None if self.engine_routing_ids is None else self.engine_routing_ids[:, :width],
        )

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def padding_mask(self) -> Optional[torch.Tensor]:
        """[N, S-1] bool, True where the training forward's input (``tokens[:, :-1]``) is padding: what
        Megatron's MoE layers exclude from routing statistics (aux loss, expert bias, load)."""
        if self.lengths is None:
            return None
        pos = torch.arange(self.tokens.shape[1] - 1, device=self.device)
        return pos.unsqueeze(0) >= self.lengths.unsqueeze(1)

    def chunks(self, rows: int) -> list[Experience]:
        """Consecutive pieces of at most ``rows`` rows (the last may be smaller)."""
        if rows < 1:
            raise ValueError(f"micro-batch rows must be >= 1, got {rows}")
        return [self.select(slice(i, i + rows)) for i in range(0, len(self), rows)]

    def split(self, parts: int) -> list[Experience]:
        n = len(self)
        if n % parts:
            raise ValueError(f"{n} rows do not split into {parts} equal parts")
        size = n // parts
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(parts)]


def tensors_to(values: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """``values`` with its tensors (detached) on ``device``; other values as they are."""
    return {k: v.detach().to(device) if torch.is_tensor(v) else v for k, v in values.items()}


def _pad_to(exp: Experience, width: int, pad_id: int) -> Experience:
    import torch.nn.functional as F

    extra = width - exp.tokens.shape[1]
    if extra == 0:
        return exp
    values = {}
    for f in fields(exp):
        t = getattr(exp, f.name)
        if torch.is_tensor(t) and t.dim() >= 2:  # dim 1 is the sequence (tokens/ids: S, the rest S-1)
            fill = pad_id if f.name == "tokens" else (-1 if f.name == "engine_routing_ids" else 0)
            values[f.name] = F.pad(t, [0, 0] * (t.dim() - 2) + [0, extra], value=fill)
    return replace(exp, **values)


def build_experience(tokens: torch.Tensor, response_mask: torch.Tensor, lengths: torch.Tensor, rewards: list[float],
                     num_generations: int, normalize_std: bool,
                     routing_ids: Optional[torch.Tensor] = None) -> Experience:
    """A rollout's experience, everything on the rollout's device (the model's): rewards come from the
    host (task scoring), so they are moved there once, and the advantages are computed there."""
    device = tokens.device
    r = torch.tensor(rewards, dtype=torch.float32).to(device, non_blocking=True)
    adv = group_relative_advantages(r, num_generations, normalize_std=normalize_std)
    return Experience(tokens=tokens, response_mask=response_mask, advantages=adv, rewards=r,
                      routing_ids=routing_ids, lengths=lengths.to(device))


def minibatches(exp: Experience, num_minibatches: int, generator: torch.Generator) -> list[Experience]:
    """A fresh random permutation of the rows, cut into ``num_minibatches`` equal mini-batches."""
    perm = torch.randperm(len(exp), generator=generator)
    return exp.select(perm).split(num_minibatches)


def micro_batch_rows(rl: Any, par: Any, dp: int, forward_length: int) -> int:
    """Rows per micro-batch, the same in the old-policy, reference and training passes (``rl``: RLConfig,
    ``par``: ParallelConfig): --micro-batch-size, or --micro-batch-tokens // forward length, else a mini-batch
    of this data-parallel rank / --num-microbatches."""
    if rl.micro_batch_size:
        return rl.micro_batch_size
    if rl.micro_batch_tokens:
        return max(1, rl.micro_batch_tokens // max(forward_length, 1))
    rows = rl.rollout_batch_size // max(dp, 1) * rl.num_generations // rl.num_minibatches
    return max(1, rows // max(par.num_microbatches, 1))

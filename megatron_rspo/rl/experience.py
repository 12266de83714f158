"""One rollout's worth of training data, row-aligned, and its split into mini- and micro-batches.

Layout follows ``rollout.generate.Rollout``: ``tokens`` [N, S]; everything per label position is
[N, S-1] (position j predicts token j+1); routing records are input-aligned [N, S, L, K] and the
training forward over ``tokens[:, :-1]`` uses ``routing_ids[:, :-1]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class Experience:
    tokens: torch.Tensor  # [N, S] int64
    response_mask: torch.Tensor  # [N, S-1] fp32
    advantages: torch.Tensor  # [N] fp32
    rewards: torch.Tensor  # [N] fp32
    routing_ids: Optional[torch.Tensor] = None  # [N, S, L, K] int8/int16 (rollout's expert ids)
    old_logp: Optional[torch.Tensor] = None  # [N, S-1] fp32 under theta_old
    old_log_scores: Optional[torch.Tensor] = None  # [N, S-1, L, K] fp32 router log-scores at the old ids
    ref_logp: Optional[torch.Tensor] = None  # [N, S-1] fp32 under the reference policy (KL)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows: torch.Tensor | slice) -> Experience:
        return replace(self, **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                                for f in fields(self)})

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
        )

    def split(self, parts: int) -> list[Experience]:
        n = len(self)
        if n % parts:
            raise ValueError(f"{n} rows do not split into {parts} equal parts")
        size = n // parts
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(parts)]


def minibatches(exp: Experience, num_minibatches: int, generator: torch.Generator) -> list[Experience]:
    """A fresh random permutation of the rows, cut into ``num_minibatches`` equal mini-batches."""
    perm = torch.randperm(len(exp), generator=generator)
    return exp.select(perm).split(num_minibatches)

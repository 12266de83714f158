"""Token sampling from next-token logits: temperature, top-k, top-p (nucleus), greedy.

Pure tensor functions over ``[B, V]`` logits. Sampling uses the exponential-race form of a
categorical draw (``argmax(p / q)``, ``q ~ Exp(1)``): one random number per vocabulary entry, drawn
from the caller's ``torch.Generator``, so a seeded generator reproduces a rollout exactly and the
stream consumed per step does not depend on the probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 => greedy (argmax of the raw logits)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability mass reaches top_p
    top_k: int = 0  # 0 => no top-k truncation

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (got {self.top_k})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the distribution whose log-probs a rollout reports (1 for greedy)."""
        return 1.0 if self.greedy else self.temperature


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at ``tokens``, fp32. logits [..., V], tokens [...]."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def truncate_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf (always keeps the most likely token)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass of the strictly more likely tokens already reaches top_p.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens [B] (int64) from logits [B, V] under ``params``."""
    logits = logits.float()
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = truncate_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    # Draw on the generator's device (a CPU generator may drive a GPU rollout), then move.
    draw_device = generator.device if generator is not None else probs.device
    race = torch.empty(probs.shape, device=draw_device).exponential_(1.0, generator=generator).to(probs.device)
    return (probs / race).argmax(dim=-1)

"""Token sampling from next-token logits: temperature, top-k, top-p (nucleus), greedy.

Pure tensor functions over ``[B, V]`` logits, on the logits' device. A draw is an inverse-CDF draw:
the first token whose cumulative probability (float64, normalised so the last entry is exactly 1)
exceeds ``u ~ U[0, 1)``. One uniform per row and step, whatever V is, so the caller can hand in its own
(``generate`` keys them by row and position, which makes a rollout independent of how its rows are
batched), and the stream consumed per step does not depend on the probabilities. Without given
uniforms they are drawn from the caller's ``torch.Generator``, which must live on the logits' device:
nothing of size [B, V] ever crosses devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch

# The token ids that end a response: one id, several (Qwen3's generation config lists <|im_end|> and
# <|endoftext|>), or None (responses stop only at max_new_tokens).
StopIds = Optional[Union[int, Sequence[int]]]


def stop_id_list(stop: StopIds) -> list[int]:
    """``stop`` as a list of ids (empty for None)."""
    if stop is None:
        return []
    return [int(stop)] if isinstance(stop, int) else [int(i) for i in stop]


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


def check_generator_device(generator: Optional[torch.Generator], device: torch.device) -> None:
    """A sampling generator must live where the logits do (a CPU generator would mean host draws and copies)."""
    if generator is not None and not _same_device(generator.device, device):
        raise ValueError(
            f"the sampling generator is on {generator.device} but the logits are on {device}; "
            f"create it with torch.Generator(device={str(device)!r}).manual_seed(seed)"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    def index(d: torch.device) -> Optional[int]:
        if d.type == "cuda" and d.index is None:
            return torch.cuda.current_device()
        return d.index

    return a.type == b.type and index(a) == index(b)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: Optional[torch.Generator] = None,
    uniforms: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Next tokens [B] (int64) from logits [B, V] under ``params``.

    ``uniforms`` [B] float64 in [0, 1): the random numbers of this step (else drawn from ``generator``, on
    the logits' device; None: that device's default generator). Greedy ignores both.
    """
    logits = logits.float()
    if params.greedy:
        return logits.argmax(dim=-1)
    if uniforms is None:
        check_generator_device(generator, logits.device)
        uniforms = torch.rand(logits.shape[0], dtype=torch.float64, device=logits.device, generator=generator)
    elif uniforms.device != logits.device:
        raise ValueError(f"uniforms are on {uniforms.device} but the logits are on {logits.device}")
    scaled = truncate_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    del scaled  # [B, V] buffers are freed as soon as possible: at most one fp32 and one float64 live
    # float64 sum: an fp32 running sum over ~150k entries drifts by ~1e-5, the mass of a whole tail token.
    cdf = probs.double()
    del probs
    cdf.cumsum_(dim=-1)
    cdf.div_(cdf[:, -1:].clone())  # last entry exactly 1 > u, so the search never runs off the end
    # First entry > u: its cdf step is > 0, so a truncated (probability 0) token is never drawn.
    u = uniforms.to(torch.float64).reshape(-1, 1).clamp(max=1.0 - 2**-53)  # a u rounded up to 1 stays < 1
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)

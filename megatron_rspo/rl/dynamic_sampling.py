"""DAPO's dynamic sampling and overlong handling, as pure tensor functions (the trainer runs the rounds).

- ``informative_groups``: a group whose G rewards are all equal has zero advantage everywhere; it adds
  nothing to the gradient but would count in the loss normaliser. ``--filter-groups`` drops such groups
  and samples more prompts until the batch is full (at most ``--max-filter-rounds`` rounds).
- ``overlong_penalty`` (DAPO's soft overlong punishment): a response within the last ``buffer`` tokens
  of ``max_new_tokens`` loses up to ``factor`` reward, linearly in how far into the buffer it went.
- ``truncated``: responses that hit ``max_new_tokens`` without EOS (``--overlong-filter`` masks them out
  of the loss instead of penalising them).
"""

from __future__ import annotations

import torch


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] rewards (prompt-major groups of ``group_size``) -> [N / G] bool: the group's rewards differ."""
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of {group_size}, got {tuple(rewards.shape)}")
    r = rewards.view(-1, group_size)
    return (r != r[:, :1]).any(dim=1)


def overlong_penalty(rewards: torch.Tensor, response_lens: torch.Tensor, max_new_tokens: int, buffer: int,
                     factor: float) -> torch.Tensor:
    """rewards − factor · clamp((len − (max_new_tokens − buffer)) / buffer, 0, 1) (DAPO, Eq. 13)."""
    if buffer <= 0 or factor == 0:
        return rewards
    excess = (response_lens.to(rewards.dtype) - (max_new_tokens - buffer)) / buffer
    return rewards - factor * excess.clamp(0.0, 1.0)


def truncated(finished: torch.Tensor, response_lens: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """[N] bool: the response stopped at the length limit, not at EOS."""
    return ~finished.bool() & (response_lens >= max_new_tokens)

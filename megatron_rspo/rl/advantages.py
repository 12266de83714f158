"""Group-relative advantages (GRPO-style), one scalar per response. Pure tensors."""

from __future__ import annotations

import torch


def group_relative_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
    unbiased: bool = True,
) -> torch.Tensor:
    """A_i = (R_i − mean_group) / (std_group + eps)  (or R_i − mean_group with ``normalize_std=False``).

    ``rewards`` [N], prompt-major: rows g·G .. g·G+G−1 are the G responses to prompt g.
    std is the unbiased sample std (N−1, ``torch.std``'s default, as in GRPO/verl/TRL); pass
    ``unbiased=False`` for the population std. A group whose rewards are all equal gets A = 0 exactly:
    float rounding makes its mean differ from its rewards by ~1 ulp (eight float32 rewards of 0.1 leave
    residuals of ~1e-9 and a std of ~1e-8), and dividing by (std + eps) would blow that noise up to
    |A| ~ 0.01-0.1, the same advantage for every response of the group.
    Returns float32 (float64 if the rewards are float64).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D [N] tensor, got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (group-relative advantages need G >= 2), got {group_size!r}")
    n = rewards.shape[0]
    if n % group_size:
        raise ValueError(f"number of responses ({n}) is not a multiple of group_size ({group_size}); "
                         "rows must be whole prompt groups, prompt-major")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    r = rewards.detach().to(dtype).view(n // group_size, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True, unbiased=unbiased) + eps)
    tied = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return adv.masked_fill(tied, 0.0).reshape(n)

"""Rollout-correction registry (DESIGN §7): re-weight or drop tokens by the train–inference ratio. Pure tensors.

Every correction has the same signature::

    fn(old_logp, rollout_logp, mask, cfg) -> (token_weight, mask, stats)

old_logp [N, T] θ_old log-probs from our old-policy pass (async: the proximal policy); rollout_logp [N, T]
the engine's log-probs of the same tokens (async: the behaviour policy); mask [N, T] 1 = real response
token. ratio r = π_old/π_rollout, log r = old_logp − rollout_logp taken on valid tokens only and clamped to
±20 (exp guard, as in losses.py). Returns token_weight [N, T] (detached, ≥fp32: fp32 for bf16/fp32 inputs,
fp64 stays fp64; 0 on padding) or None for "no re-weighting", the mask to use from here on (the input
object itself unless tokens are dropped) and 0-d detached stats:

  none      weight None, mask unchanged (π_rollout only logged, see mismatch.py).
  tis       truncated IS: w = min(r, tis_clip) per token; level "sequence": w_i = min(exp(Σ_t log r), tis_clip)
            broadcast to the response's tokens (the Σ is clamped to ±20 before exp).
  icepop    w = r if r ∈ [icepop_low, icepop_high] else 0 (edges inclusive): band-masked IS, as slime's
            icepop_function and the IcePop report. Out-of-band tokens get no gradient but STAY in the mask,
            so the loss normaliser (valid tokens / sequences) and GMPO's 1/|o_i| are unchanged by the
            correction — the same choice as slime, which zeroes the per-token loss and leaves loss_masks alone.
  seq_mask  drop every token of a response whose geometric-mean ratio exp(mean_t log r) lies outside
            [seq_mask_low, seq_mask_high] (verl's geometric rejection sampling); weight None. Dropped rows
            leave the loss normaliser: they are treated as padding from then on.

How the policy losses (losses.py) use the weight: GRPO multiplies each token's clipped surrogate
min(w̃A, clip(w̃)A) by it; GMPO/RSPO multiply each token's clipped log-ratio term ρ^clip inside the
geometric mean, S_i = exp(sgn(A_i)·(1/|o_i|)·Σ_t weight_t·ρ^clip_t). (GSPO's sequence ratio has no token
term to weight; a per-response weight such as tis level "sequence" is its natural fit — left to losses.py.)
The weight is a constant (stop-gradient): it corrects the sampling distribution, it is not optimised.

Stats: correction/weight_mean, correction/weight_max (tis, icepop; over valid tokens),
correction/masked_token_frac (valid tokens zero-weighted or dropped), correction/masked_seq_frac (seq_mask;
over responses with at least one valid token). "none" returns no stats.

Anchors: verl ``trainer/ppo/rollout_corr_helper.py`` (token/sequence IS truncation with a ±20 safety
bound, geometric rejection sampling), slime ``backends/megatron_utils/loss.py`` (``vanilla_tis_function``,
``icepop_function``), NeMo-RL ``algorithms/loss_functions.py`` (``use_importance_sampling_correction``,
``truncated_importance_sampling_ratio``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_rspo.rl.mismatch import in_band, log_ratio

CorrectionLevel = Literal["token", "sequence"]
LEVELS: tuple[str, ...] = ("token", "sequence")
RolloutCorrectionFn = Callable[..., tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]]
ROLLOUT_CORRECTIONS: dict[str, RolloutCorrectionFn] = {}

_MAX_LOG_RATIO = 20.0  # same exp guard as losses.py / verl's SAFETY_BOUND


@dataclass
class RolloutCorrectionConfig:
    """kind: a registered correction (``--rollout-correction``); level applies to tis only (icepop is
    token-level and seq_mask sequence-level by definition). Defaults: verl's TIS threshold 2.0, IcePop's
    band [0.5, 5.0], a geometric-mean band [0.5, 2.0] for seq_mask."""

    kind: str = "none"
    level: CorrectionLevel = "token"
    tis_clip: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    seq_mask_low: float = 0.5
    seq_mask_high: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in ROLLOUT_CORRECTIONS:
            raise ValueError(f"--rollout-correction must be one of {sorted(ROLLOUT_CORRECTIONS)}, got {self.kind!r}")
        if self.level not in LEVELS:
            raise ValueError(f"--rollout-correction-level must be one of {LEVELS}, got {self.level!r}")
        if self.level == "sequence" and self.kind == "icepop":
            raise ValueError("--rollout-correction-level sequence is not defined for icepop (a token-level band); "
                             "use seq_mask for a sequence-level band")
        if not self.tis_clip > 0:
            raise ValueError(f"--tis-clip must be > 0, got {self.tis_clip!r}")
        if not 0 < self.icepop_low < self.icepop_high:
            raise ValueError(f"--icepop-low/-high must satisfy 0 < low < high, got "
                             f"{self.icepop_low!r}, {self.icepop_high!r}")
        if not 0 < self.seq_mask_low < self.seq_mask_high:
            raise ValueError(f"--seq-mask-low/-high must satisfy 0 < low < high, got "
                             f"{self.seq_mask_low!r}, {self.seq_mask_high!r}")


def register_rollout_correction(name: str) -> Callable[[RolloutCorrectionFn], RolloutCorrectionFn]:
    def deco(fn: RolloutCorrectionFn) -> RolloutCorrectionFn:
        ROLLOUT_CORRECTIONS[name] = fn
        return fn

    return deco


def get_rollout_correction(name: str) -> RolloutCorrectionFn:
    if name not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout correction {name!r}; registered: {sorted(ROLLOUT_CORRECTIONS)}")
    return ROLLOUT_CORRECTIONS[name]


# ----------------------------------------------------------------------------- helpers


def _safe_log_ratio(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool mask, log r clamped to ±20, 0 on padding)."""
    m = mask.bool()
    return m, log_ratio(old_logp, rollout_logp, m).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def _frac(x: torch.Tensor, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Fraction of ``m``'s entries where bool ``x`` holds (0 when ``m`` is empty)."""
    return (x & m).sum().to(dtype) / m.sum().clamp_min(1)


def _weight_stats(w: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
    mx = torch.where(m, w, torch.full_like(w, -torch.inf)).max()
    return {
        "correction/weight_mean": w.sum() / m.sum().clamp_min(1),  # w is 0 on padding
        "correction/weight_max": torch.where(m.any(), mx, torch.zeros_like(mx)),
        "correction/masked_token_frac": _frac(w == 0, m, w.dtype),
    }


def _detached(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in stats.items()}


# ----------------------------------------------------------------------------- corrections


@register_rollout_correction("none")
def no_correction(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cfg: RolloutCorrectionConfig
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
    """No correction: the loss uses π_old as if it had sampled the tokens."""
    return None, mask, {}


@register_rollout_correction("tis")
def tis_correction(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cfg: RolloutCorrectionConfig
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated IS (verl rollout_corr_helper ``truncate``, slime ``vanilla_tis_function`` without a lower
    clip): w = min(r, C), token- or sequence-level. Truncation bounds the variance; the bias it adds is
    limited to the tokens whose engine probability is far below the trainer's."""
    with torch.no_grad():
        m, log_r = _safe_log_ratio(old_logp, rollout_logp, mask)
        if cfg.level == "sequence":
            seq = log_r.sum(-1, keepdim=True).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # log r is 0 on padding
            w = seq.exp().clamp(max=cfg.tis_clip).expand_as(log_r)
        else:
            w = log_r.exp().clamp(max=cfg.tis_clip)
        w = torch.where(m, w, torch.zeros_like(w))
        return w, mask, _detached(_weight_stats(w, m))


@register_rollout_correction("icepop")
def icepop_correction(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cfg: RolloutCorrectionConfig
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
    """IcePop (slime ``icepop_function``, the IcePop report): the token's ratio π_old/π_rollout as its weight
    inside [low, high], 0 outside (no gradient from tokens whose mismatch is too large); tokens stay in the
    mask (module docstring)."""
    with torch.no_grad():
        m, log_r = _safe_log_ratio(old_logp, rollout_logp, mask)
        keep = m & in_band(log_r, cfg.icepop_low, cfg.icepop_high)
        w = torch.where(keep, log_r.exp(), torch.zeros_like(log_r))
        return w, mask, _detached(_weight_stats(w, m))


@register_rollout_correction("seq_mask")
def seq_mask_correction(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cfg: RolloutCorrectionConfig
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence rejection by the geometric-mean ratio (verl's geometric RS): a response whose per-token
    mismatch is large on average is dropped whole; the length normalisation keeps long responses from
    being rejected just for being long (unlike the product ratio)."""
    with torch.no_grad():
        m, log_r = _safe_log_ratio(old_logp, rollout_logp, mask)
        n_tok = m.sum(-1)
        rows = n_tok > 0
        geo = log_r.sum(-1) / n_tok.clamp_min(1)  # empty rows: 0 -> in band, and nothing to drop anyway
        drop = rows & ~in_band(geo, cfg.seq_mask_low, cfg.seq_mask_high)
        new_mask = torch.where(drop[:, None], torch.zeros_like(mask), mask)
        stats = {
            "correction/masked_token_frac": _frac(drop[:, None].expand_as(m), m, log_r.dtype),
            "correction/masked_seq_frac": _frac(drop, rows, log_r.dtype),
        }
        return None, new_mask, _detached(stats)

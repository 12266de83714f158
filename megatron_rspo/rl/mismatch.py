"""Train–inference mismatch diagnostics (DESIGN §7): π_old (our old-policy pass) vs π_rollout (the engine).

With an external engine (vLLM, bf16) the engine's log-probs of the sampled tokens differ from the trainer's
θ_old pass on the same tokens, and on MoE models its router may pick different experts. These are logged,
never used in the loss (the optional corrections live in corrections.py). Pure tensors, sync-free (no
``.item()``, no data-dependent Python branches), device-agnostic (meta included); every value is a
detached 0-d tensor, 0 when nothing is valid, and exactly 0 when π_old == π_rollout and the ids agree.

Anchors: verl ``trainer/ppo/rollout_corr_helper.py`` (``rollout_corr/`` mismatch metrics: k3 KL,
log-ppl diff), slime ``backends/megatron_utils/loss.py`` (``train_rollout_logprob_abs_diff``), NeMo-RL
``algorithms/loss_functions.py`` (``token_mult_prob_error``), and R3 (Rollout Routing Replay) for the
router-disagreement rate.

Tensorboard names (part of the interface, DESIGN §4):
  mismatch/k3_kl                    mean_t k3 with log r = log π_old − log π_rollout, k3 = r − 1 − log r:
                                    the non-negative, unbiased estimator of KL(π_rollout ‖ π_old) from
                                    tokens sampled by π_rollout.
  mismatch/abs_logp_diff_mean       mean_t |log π_old − log π_rollout|
  mismatch/abs_logp_diff_max        max_t of the same (``*_max``: reduced by max over micro-batches/ranks)
  mismatch/ratio_out_of_band_frac   fraction of tokens with π_old/π_rollout outside [band_lo, band_hi]
  mismatch/expert_mismatch_frac     fraction of (token, layer, k) slots whose engine expert is not in the
                                    old pass's top-K set for that token and layer (only with the ids)
"""

from __future__ import annotations

import math

import torch

# exp() guard, as in losses.py: |log r| > 20 (r ≈ 5e8) only happens in a broken run; keeps k3 finite.
_MAX_LOG_RATIO = 20.0


def _mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the bool mask ``m`` (0 when empty; masked-out entries, even NaN, ignored)."""
    return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp_min(1)


def _max(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Max of ``x`` over ``m``; 0 when nothing is valid (sync-free: no ``if m.any()``)."""
    mx = torch.where(m, x, torch.full_like(x, -torch.inf)).max()
    return torch.where(m.any(), mx, torch.zeros_like(mx))


def log_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(π_old/π_rollout) per token [N, T], computed in ≥fp32 (fp64 stays fp64), 0 on padding (so inf/NaN
    log-probs there never leak), NOT clamped. Shared with corrections.py."""
    if old_logp.dim() != 2 or rollout_logp.shape != old_logp.shape or mask.shape != old_logp.shape:
        raise ValueError(f"old_logp, rollout_logp, mask must all be [N, T]; got {tuple(old_logp.shape)}, "
                         f"{tuple(rollout_logp.shape)}, {tuple(mask.shape)}")
    dtype = torch.promote_types(torch.promote_types(old_logp.dtype, rollout_logp.dtype), torch.float32)
    diff = old_logp.detach().to(dtype) - rollout_logp.detach().to(dtype)
    return torch.where(mask.bool(), diff, torch.zeros_like(diff))


def in_band(log_r: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """ratio = exp(log_r) ∈ [low, high], edges inclusive. Compared in log space, so a log-ratio of exactly
    log(edge) counts as inside even where exp(log(edge)) rounds past the edge (e.g. 5.0)."""
    return (log_r >= math.log(low)) & (log_r <= math.log(high))


def expert_mismatch(
    engine_ids: torch.Tensor, old_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot disagreement of routed experts: returns (mismatch [N, T, L, Ke] bool, valid [N, T, L, Ke]).

    A slot (token, layer, k) is valid when the token is in ``mask`` and ``engine_ids >= 0`` (−1 = the engine
    kept no record there); it mismatches when ``engine_ids[..., k]`` is not any of ``old_ids[..., :]`` (set
    comparison per token and layer: the order within top-K is irrelevant). Loops over the old K rather than
    broadcasting [.., Ke, Ko], to keep the working set at one [N, T, L, Ke] bool.
    """
    if engine_ids.dim() != 4 or old_ids.dim() != 4 or engine_ids.shape[:3] != old_ids.shape[:3]:
        raise ValueError(f"engine_ids and old_ids must be [N, T, L, K] with equal N, T, L; got "
                         f"{tuple(engine_ids.shape)}, {tuple(old_ids.shape)}")
    if engine_ids.shape[:2] != mask.shape:
        raise ValueError(f"expert ids [N, T, L, K] must match mask [N, T]={tuple(mask.shape)}, "
                         f"got {tuple(engine_ids.shape)}")
    found = torch.zeros(engine_ids.shape, dtype=torch.bool, device=engine_ids.device)
    for j in range(old_ids.shape[-1]):
        found |= engine_ids == old_ids[..., j : j + 1]
    valid = mask.bool()[:, :, None, None] & (engine_ids >= 0)
    return valid & ~found, valid


def mismatch_stats(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    engine_ids: torch.Tensor | None = None,
    old_ids: torch.Tensor | None = None,
    band: tuple[float, float] = (0.5, 2.0),
) -> dict[str, torch.Tensor]:
    """Mismatch scalars (module docstring) over the valid tokens of ``mask`` [N, T].

    old_logp / rollout_logp [N, T]: log-probs of the sampled tokens under the trainer's θ_old pass and the
    engine. engine_ids / old_ids [N, T, L, K] (both or neither): the engine's routed experts (−1 = no record)
    and the old pass's top-K, adding ``mismatch/expert_mismatch_frac``. band = (lo, hi), 0 < lo < hi.
    """
    lo, hi = band
    if not 0 < lo < hi:
        raise ValueError(f"band must satisfy 0 < lo < hi, got {band!r}")
    if (engine_ids is None) != (old_ids is None):
        raise ValueError("engine_ids and old_ids must be given together (or neither)")
    with torch.no_grad():
        m = mask.bool()
        log_r = log_ratio(old_logp, rollout_logp, m)
        safe = log_r.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        k3 = safe.exp() - 1 - safe  # exactly 0 at log r = 0
        absdiff = log_r.abs()
        out = {
            "mismatch/k3_kl": _mean(k3, m),
            "mismatch/abs_logp_diff_mean": _mean(absdiff, m),
            "mismatch/abs_logp_diff_max": _max(absdiff, m),
            "mismatch/ratio_out_of_band_frac": _mean((~in_band(log_r, lo, hi)).to(log_r.dtype), m),
        }
        if engine_ids is not None:
            bad, valid = expert_mismatch(engine_ids, old_ids, m)
            out["mismatch/expert_mismatch_frac"] = bad.sum().to(log_r.dtype) / valid.sum().clamp_min(1)
    return {k: v.detach() for k, v in out.items()}

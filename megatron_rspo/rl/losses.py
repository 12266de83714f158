"""Policy-loss registry: ``grpo``, ``gspo``, ``gmpo``, ``rspo`` (= GMPO + router shift). Pure tensors.

Every loss has the same signature (compare them side by side)::

    fn(logp, old_logp, advantages, mask, cfg, gamma=None, normalizer=None, token_weight=None) -> (loss, stats)

logp [N, T] current token log-probs (requires grad); old_logp [N, T] θ_old log-probs (no grad);
advantages [N] one per response; mask [N, T] 1 = real response token (right padded);
gamma [N, T] router-shift ratio γ (stop-gradient, see router_shift.py), None = RS off;
normalizer: the denominator of the mean (valid tokens for grpo "token_mean", valid sequences
otherwise) over the WHOLE optimizer mini-batch, so that micro-batch losses sum to the mini-batch mean;
None = this batch's own count. Fully padded rows contribute nothing and are not counted.
token_weight [N, T]: a train-inference mismatch correction's stop-gradient weight (rl/corrections.py),
None = no correction.

Router shift (RS) is a plug-in for every algorithm: with placement "pre_clip" (the published form)
the token ratio is rescaled before clipping, w̃ = γ·w, i.e. log w̃ = log γ + log w. "post_clip" (the
earlier form) multiplies the already-clipped objective by γ — per token for grpo/gmpo, by the
geometric mean of γ over the response for the sequence-level gspo (see each function). "token_gm" (OUR
extension, gmpo/rspo only; rl/losses_ext.py) makes γ each token's weight in GMPO's mean of clipped log-ratios.

Clip fractions count tokens (sequences for gspo) where the clip changes the objective (and zeroes the
gradient): A > 0 with ratio above 1+ε_high ("high"), A < 0 with ratio below 1−ε_low ("low"), where
"ratio" is the one actually clipped (w̃ in pre_clip, w in post_clip). Ratio statistics use the plain
w (no γ); std is the population std over valid tokens / sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_rspo.rl.losses_ext import check_placement, gamma_weighted_mean
from megatron_rspo.rl.router_shift import PLACEMENTS, Placement

LossAgg = Literal["token_mean", "seq_mean_token_mean"]
LOSS_AGGS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean")
PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}

# (ε_low, ε_high). grpo: PPO/GRPO's 0.2; gspo: the GSPO paper's 3e-4 / 4e-4 on the sequence ratio;
# gmpo/rspo: GMPO's 0.4 on both sides, in log space (ratio kept within [e^-0.4, e^0.4]).
_DEFAULT_CLIP: dict[str, tuple[float, float]] = {
    "grpo": (0.2, 0.2),
    "gspo": (3e-4, 4e-4),
    "gmpo": (0.4, 0.4),
    "rspo": (0.4, 0.4),
}
# exp() guard: log-ratios beyond ±20 (ratio ≈ 5e8) only arise in a collapsed run; without it an inf ratio
# turns into NaN gradients (inf·0 in the backward of min/exp). Same guard as verl.
_MAX_LOG_RATIO = 20.0


def default_clip(algorithm: str) -> tuple[float, float]:
    """Default (ε_low, ε_high) for ``algorithm``."""
    if algorithm not in _DEFAULT_CLIP:
        raise ValueError(f"unknown policy loss {algorithm!r}; choose one of {sorted(_DEFAULT_CLIP)}")
    return _DEFAULT_CLIP[algorithm]


@dataclass
class PolicyLossConfig:
    """clip_eps / clip_eps_high: None = the algorithm's default (:func:`default_clip`); a given clip_eps
    with clip_eps_high None clips symmetrically; clip_eps_high > clip_eps is DAPO's clip-higher.
    loss_agg applies to grpo only (gspo and gmpo/rspo are means over sequences by definition)."""

    clip_eps: float | None = None
    clip_eps_high: float | None = None
    loss_agg: LossAgg = "token_mean"
    router_shift_placement: Placement = "pre_clip"

    def __post_init__(self) -> None:
        for name in ("clip_eps", "clip_eps_high"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 (or None for the algorithm default), got {v!r}")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
        if self.router_shift_placement not in PLACEMENTS:
            raise ValueError(f"router_shift_placement must be one of {PLACEMENTS}, got {self.router_shift_placement!r}")

    def clip_range(self, algorithm: str) -> tuple[float, float]:
        """Resolved (ε_low, ε_high) for ``algorithm``."""
        d_low, d_high = default_clip(algorithm)
        if self.clip_eps is None:
            return d_low, (d_high if self.clip_eps_high is None else self.clip_eps_high)
        return self.clip_eps, (self.clip_eps if self.clip_eps_high is None else self.clip_eps_high)


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        return fn

    return deco


def get_policy_loss(name: str) -> PolicyLossFn:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; registered: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


# ----------------------------------------------------------------------------- helpers


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (0 where nothing is valid; NaN/inf in masked-out entries are ignored)."""
    m = mask.bool()
    total = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / m.sum().clamp_min(1)
    return total.sum(dim) / m.sum(dim).clamp_min(1)


def _masked_stats(x: torch.Tensor, m: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    # Sync-free (no ``if m.any()``): 0 when nothing is valid.
    mx = torch.where(m, x, torch.full_like(x, -torch.inf)).max()
    mx = torch.where(m.any(), mx, torch.zeros_like(mx))
    return {f"{prefix}_mean": mean, f"{prefix}_std": var.sqrt(), f"{prefix}_max": mx}


def _prepare(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    gamma: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate shapes; return (mask bool, log w [N,T] zero on padding, A [N], log γ [N,T] or None)."""
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp, mask must all be [N, T]; got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [N]={logp.shape[0]} (one per response), got {tuple(advantages.shape)}")
    if gamma is not None and gamma.shape != logp.shape:
        raise ValueError(f"gamma must be [N, T]={tuple(logp.shape)}, got {tuple(gamma.shape)}")
    dtype = torch.promote_types(logp.dtype, torch.float32)  # fp32 at least; fp64 stays fp64 (tests)
    m = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    # where (not *mask) so garbage/inf log-probs on padding can neither leak NaN forward nor backward.
    log_w = torch.where(m, logp.to(dtype) - old_logp.detach().to(dtype), zero)
    log_g = None
    if gamma is not None:
        g = gamma.detach().to(dtype).clamp_min(torch.finfo(dtype).tiny)  # floor=0 allows γ -> 0
        log_g = torch.where(m, g.log(), zero)
    return m, log_w, advantages.detach().to(dtype), log_g


def _common_stats(
    log_w: torch.Tensor, m: torch.Tensor, log_g: torch.Tensor | None, clip_low: torch.Tensor,
    clip_high: torch.Tensor, clip_units: torch.Tensor,
) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        lw = log_w.detach()
        n_tok = m.sum(-1)
        rows = n_tok > 0
        seq_log = lw.sum(-1) / n_tok.clamp_min(1)
        stats = {
            "clip_frac_low": masked_mean(clip_low.to(lw.dtype), clip_units),
            "clip_frac_high": masked_mean(clip_high.to(lw.dtype), clip_units),
            "ppo_kl": masked_mean(-lw, m),
            **_masked_stats(lw.clamp(max=_MAX_LOG_RATIO).exp(), m, "is_ratio"),
            **_masked_stats(seq_log.clamp(max=_MAX_LOG_RATIO).exp(), rows, "seq_is_ratio"),
        }
        stats["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
        if log_g is not None:
            stats["gamma_mean"] = masked_mean(log_g.exp(), m)
    return stats


def _weighted(x: torch.Tensor, token_weight: torch.Tensor | None) -> torch.Tensor:
    """A rollout correction's per-token weight (stop-gradient; rl/corrections.py): it multiplies each token's
    clipped surrogate (grpo), or each token's term inside the mean of log-ratios (gspo, gmpo/rspo), so a
    token with weight 0 (IcePop) contributes nothing and TIS scales a token's share of the gradient."""
    return x if token_weight is None else x * token_weight.detach().to(x.dtype)


def _use_rs(cfg: PolicyLossConfig, log_g: torch.Tensor | None, placement: str) -> bool:
    return log_g is not None and cfg.router_shift_placement == placement


# ----------------------------------------------------------------------------- losses


@register_policy_loss("grpo")
def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    gamma: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level PPO clip: −min(w̃A, clip(w̃, 1−ε_low, 1+ε_high)A), w̃ = γ·w (pre_clip);
    post_clip: −γ·min(wA, clip(w)A). Aggregated by ``cfg.loss_agg``."""
    low, high = cfg.clip_range("grpo")
    check_placement("grpo", cfg.router_shift_placement)
    if low >= 1:
        raise ValueError(f"grpo needs clip_eps < 1 (the ratio's lower bound 1-ε must stay positive), got {low}")
    m, log_w, adv, log_g = _prepare(logp, old_logp, advantages, mask, gamma)
    log_ratio = log_w + log_g if _use_rs(cfg, log_g, "pre_clip") else log_w
    ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    a = adv[:, None]
    obj = torch.minimum(ratio * a, ratio.clamp(1 - low, 1 + high) * a)
    if _use_rs(cfg, log_g, "post_clip"):
        obj = obj * log_g.exp()
    obj = _weighted(obj, token_weight)
    obj = torch.where(m, obj, torch.zeros_like(obj))
    if cfg.loss_agg == "token_mean":
        denom = m.sum().clamp_min(1) if normalizer is None else normalizer
        loss = -obj.sum() / denom
    else:
        n_tok = m.sum(-1)
        denom = (n_tok > 0).sum().clamp_min(1) if normalizer is None else normalizer
        loss = -(obj.sum(-1) / n_tok.clamp_min(1)).sum() / denom
    clip_low = m & (a < 0) & (ratio < 1 - low)
    clip_high = m & (a > 0) & (ratio > 1 + high)
    return loss, _common_stats(log_w, m, log_g, clip_low, clip_high, m)


@register_policy_loss("gspo")
def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    gamma: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence-level clip: s_i = exp(mean_t log w̃), loss = −mean_i min(s_i A_i, clip(s_i) A_i).

    pre_clip: log w̃ = log γ + log w, so s̃_i = s_i · GM_t(γ) enters the clip. post_clip: the clipped
    per-sequence objective is multiplied by the geometric mean of γ over the response, exp(mean_t log γ)
    — the sequence analogue of multiplying every token's clipped ratio by its γ.
    (Plain sequence form; its gradient equals GSPO's token form when A is per-sequence.)
    """
    low, high = cfg.clip_range("gspo")
    check_placement("gspo", cfg.router_shift_placement)
    if low >= 1:
        raise ValueError(f"gspo needs clip_eps < 1, got {low}")
    m, log_w, adv, log_g = _prepare(logp, old_logp, advantages, mask, gamma)
    n_tok = m.sum(-1)
    rows = n_tok > 0
    denom_tok = n_tok.clamp_min(1)
    log_ratio = log_w + log_g if _use_rs(cfg, log_g, "pre_clip") else log_w
    seq_ratio = (_weighted(log_ratio, token_weight).sum(-1) / denom_tok).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    obj = torch.minimum(seq_ratio * adv, seq_ratio.clamp(1 - low, 1 + high) * adv)
    if _use_rs(cfg, log_g, "post_clip"):
        obj = obj * (log_g.sum(-1) / denom_tok).exp()
    obj = torch.where(rows, obj, torch.zeros_like(obj))
    denom = rows.sum().clamp_min(1) if normalizer is None else normalizer
    loss = -obj.sum() / denom
    clip_low = rows & (adv < 0) & (seq_ratio < 1 - low)
    clip_high = rows & (adv > 0) & (seq_ratio > 1 + high)
    return loss, _common_stats(log_w, m, log_g, clip_low, clip_high, rows)


def _gmpo(
    algorithm: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    gamma: torch.Tensor | None,
    normalizer: float | torch.Tensor | None,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    low, high = cfg.clip_range(algorithm)
    m, log_w, adv, log_g = _prepare(logp, old_logp, advantages, mask, gamma)
    n_tok = m.sum(-1)
    rows = n_tok > 0
    sgn = torch.sign(adv)[:, None]  # A = 0 -> sgn 0 -> ρ = 0, S = 1, S·A = 0: no signal, no NaN
    log_ratio = log_w + log_g if _use_rs(cfg, log_g, "pre_clip") else log_w
    # ρ^clip = min(ρ, sgn(A)·clip(log w̃, −ε_low, ε_high)): A > 0 caps log w̃ at ε_high, A < 0 floors it at
    # −ε_low (GMPO paper/code). Identical to min(ρ, clip(ρ, −ε_low, ε_high)) when ε_low == ε_high.
    rho = sgn * log_ratio
    rho_clip = torch.minimum(rho, sgn * log_ratio.clamp(-low, high))
    if _use_rs(cfg, log_g, "post_clip"):
        # sgn(A)·ρ^clip is the log of the token's clipped ratio; adding log γ multiplies that ratio by γ.
        rho_clip = rho_clip + sgn * log_g
    if _use_rs(cfg, log_g, "token_gm"):  # ours: Σ_t γ_t c_t ρ^clip_t / Σ_t γ_t (γ never entered the ratio)
        mean_rho = gamma_weighted_mean(rho_clip, m, log_g, token_weight)
    else:
        mean_rho = torch.where(m, _weighted(rho_clip, token_weight), torch.zeros_like(rho_clip)).sum(-1)
        mean_rho = mean_rho / n_tok.clamp_min(1)
    exponent = sgn[:, 0] * mean_rho
    seq_obj = exponent.clamp(max=_MAX_LOG_RATIO).exp() * adv  # S_i · A_i
    seq_obj = torch.where(rows, seq_obj, torch.zeros_like(seq_obj))
    denom = rows.sum().clamp_min(1) if normalizer is None else normalizer
    loss = -seq_obj.sum() / denom
    a = adv[:, None]
    clip_low = m & (a < 0) & (log_ratio < -low)
    clip_high = m & (a > 0) & (log_ratio > high)
    return loss, _common_stats(log_w, m, log_g, clip_low, clip_high, m)


@register_policy_loss("gmpo")
def gmpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    gamma: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GMPO (DESIGN §2): ρ = sgn(A)·log w̃, token clip in log space, S_i = exp(sgn(A)·mean_t ρ^clip),
    loss = −(1/N) Σ_i S_i A_i. post_clip: each token's clipped ratio is multiplied by γ. token_gm (ours):
    S_i = exp(sgn(A)·Σ_t γ_t ρ^clip_t / Σ_t γ_t) with ρ on the plain w (rl/losses_ext.py)."""
    return _gmpo("gmpo", logp, old_logp, advantages, mask, cfg, gamma, normalizer, token_weight)


@register_policy_loss("rspo")
def rspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    gamma: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RSPO = GMPO + router shift; γ is required."""
    if gamma is None:
        raise ValueError("rspo needs the router-shift ratio gamma (enable router shift, or use 'gmpo')")
    return _gmpo("rspo", logp, old_logp, advantages, mask, cfg, gamma, normalizer, token_weight)


# ----------------------------------------------------------------------------- optional terms


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kind: Literal["k1", "k2", "k3"] = "k3"
) -> torch.Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate [N, T] (0 on padding); average it with :func:`masked_mean`.

    k1 = log r, k2 = ½(log r)², k3 = exp(−log r) + log r − 1 (Schulman's unbiased, non-negative
    estimator), with log r = logp − ref_logp clamped to ±20 for k3's exp.
    """
    if logp.shape != ref_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp, ref_logp, mask must share a shape; got {tuple(logp.shape)}, "
                         f"{tuple(ref_logp.shape)}, {tuple(mask.shape)}")
    m = mask.bool()
    log_r = torch.where(m, logp - ref_logp.detach(), torch.zeros_like(logp))
    if kind == "k1":
        kl = log_r
    elif kind == "k2":
        kl = 0.5 * log_r.square()
    elif kind == "k3":
        log_r = log_r.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        kl = torch.exp(-log_r) + log_r - 1
    else:
        raise ValueError(f"kl kind must be 'k1', 'k2' or 'k3', got {kind!r}")
    return torch.where(m, kl, torch.zeros_like(kl))


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, [..., V] -> [...]: H = logsumexp(z) − Σ softmax(z)·z.

    Computed in fp32 (bf16 logits are upcast). ``chunk_size`` (rows of the flattened [.., V]) bounds the
    fp32 working set when no gradient is needed (e.g. logging entropy under no_grad)."""

    def _h(z: torch.Tensor) -> torch.Tensor:
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)

    if chunk_size is None:
        return _h(logits)
    flat = logits.reshape(-1, logits.shape[-1])
    return torch.cat([_h(c) for c in flat.split(chunk_size)]).reshape(logits.shape[:-1])

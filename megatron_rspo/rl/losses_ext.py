"""Router-shift placement ``token_gm``: per-token γ inside GMPO's geometric mean.

OUR extension, not the RSPO paper's. Pure tensors; imported by losses.py (this module imports nothing
from the package, so there is no cycle).

Why: with the paper's pre-clip placement, w̃ = γ·w inside GMPO, the geometric mean turns γ into a
per-response scalar GM_t(γ_t) (plus a per-token shift of the clip bound by −log γ_t): every token of a
response keeps the same share of the gradient, so the tokens whose routing moved are NOT down-weighted
(docs/rspo_reproduction.md, tests/test_losses.py::test_rs_weights_sequences_in_gmpo_and_tokens_in_grpo).
``token_gm`` instead makes γ the weight of each token's clipped log-ratio in the response's mean:

    ρ_t = sgn(A)·log w_t   (NO γ in the ratio: the clip bounds are GMPO's own)
    ρ^clip_t = min(ρ_t, sgn(A)·clip(log w_t, −ε_low, ε_high))
    S_i = exp( sgn(A_i) · Σ_t γ_t c_t ρ^clip_t / Σ_t γ_t )      (valid tokens t of response i)

c_t is the rollout correction's weight (``token_weight``, 1 without one). Where no clip binds,
∂S_i/∂log π(y_t) = S_i · γ_t c_t / Σ_s γ_s: each token's share of the response's gradient is proportional
to its γ_t, so a token whose router moved a lot moves the policy less.

Normaliser Σ_t γ_t rather than |o_i|: Σ γ_t ρ / |o_i| = mean(γ) · (γ-weighted mean of ρ) would also shrink
the whole response's exponent (and gradient) by mean_t γ, re-introducing the per-response scalar that
this placement is meant to replace; with Σ γ_t the exponent stays a weighted MEAN of clipped log-ratios
(a convex combination of them when c ≡ 1, so S keeps GMPO's range), only the split of the response's
gradient among its tokens changes, and with all γ_t of a response equal it is exactly GMPO.

c_t is NOT in the normaliser: GMPO here already multiplies ρ^clip_t by c_t and divides by |o_i| (rl/losses.py
``_weighted``), so with γ ≡ const ``token_gm`` is GMPO with its correction unchanged; self-normalising by
Σ γ c would cancel a TIS weight's scale (turning truncated IS into self-normalised IS, a different estimator)
and re-inflate the surviving tokens of a response whose tokens IcePop masked (c = 0), which GMPO counts
in |o_i|. Only γ, a redistribution within the response, is normalised.
"""

from __future__ import annotations

import torch

TOKEN_GM = "token_gm"
TOKEN_GM_ALGORITHMS: tuple[str, ...] = ("gmpo", "rspo")


def check_placement(algorithm: str, placement: str) -> None:
    """``token_gm`` reweights tokens inside GMPO's geometric mean: it has no meaning for grpo/gspo."""
    if placement == TOKEN_GM and algorithm not in TOKEN_GM_ALGORITHMS:
        raise ValueError(
            f"--router-shift-placement {TOKEN_GM} is only defined for {'/'.join(TOKEN_GM_ALGORITHMS)} (it weights "
            f"tokens inside GMPO's geometric mean); use pre_clip or post_clip with {algorithm}"
        )


def gamma_weighted_mean(
    rho_clip: torch.Tensor, mask: torch.Tensor, log_g: torch.Tensor, token_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_t γ_t c_t ρ^clip_t / Σ_t γ_t per response [N] over ``mask`` (0 for a fully padded row).

    ``log_g`` [N, T] is log γ (stop-gradient, finite: losses._prepare floors γ at the dtype's tiny);
    ``token_weight`` [N, T] is c (stop-gradient) or None."""
    m = mask.bool()
    zero = torch.zeros((), dtype=rho_clip.dtype, device=rho_clip.device)
    g = torch.where(m, log_g.detach().to(rho_clip.dtype).exp(), zero)
    w = g if token_weight is None else g * token_weight.detach().to(rho_clip.dtype)
    num = torch.where(m, w * rho_clip, zero).sum(-1)
    return num / g.sum(-1).clamp_min(torch.finfo(rho_clip.dtype).tiny)

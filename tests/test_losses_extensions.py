"""Our ``token_gm`` router-shift placement (rl/losses_ext.py) vs an independent float64 NumPy reference,
and the property that motivates it: per-token γ down-weights individual tokens, pre-clip γ does not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_rspo.rl.losses import POLICY_LOSSES, PolicyLossConfig
from megatron_rspo.rl.router_shift import PLACEMENTS, RouterShiftConfig

TOKEN_GM = PolicyLossConfig(router_shift_placement="token_gm")


def ref_token_gm(logp, old, adv, mask, gamma, low, high, weight=None):
    """Loss and analytic gradient, per token: S_i = exp(sgn(A) Σ γ c ρ^clip / Σ γ), loss = −mean_i S_i A_i."""
    n_rows = sum(1 for i in range(logp.shape[0]) if mask[i].any())
    loss, grad = 0.0, np.zeros_like(logp)
    for i in range(logp.shape[0]):
        ts = [t for t in range(logp.shape[1]) if mask[i, t]]
        if not ts:
            continue
        a, sg = adv[i], float(np.sign(adv[i]))
        num, den, live = 0.0, 0.0, {}
        for t in ts:
            lw = logp[i, t] - old[i, t]
            rho, rho_c = sg * lw, sg * min(max(lw, -low), high)
            c = 1.0 if weight is None else weight[i, t]
            num += gamma[i, t] * c * min(rho, rho_c)
            den += gamma[i, t]
            live[t] = gamma[i, t] * c * (rho <= rho_c)  # d(γ c ρ^clip)/d logp = sg·γ·c where unclipped
        s = math.exp(sg * num / den)
        loss -= s * a / n_rows
        for t in ts:
            grad[i, t] = -s * a * sg * sg * live[t] / den / n_rows
    return loss, grad


def _random(seed, n=7, t=9):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, t + 1, n)
    lengths[0], lengths[1] = 0, t  # a fully padded row and a full one
    mask = np.arange(t)[None, :] < lengths[:, None]
    old = -rng.uniform(0.1, 4.0, (n, t))
    log_ratio = rng.normal(0.0, 0.35, (n, t))  # crosses GMPO's ±0.4 clip on both sides
    adv = rng.normal(0.0, 1.0, n)
    adv[2] = 0.0
    gamma = rng.uniform(0.3, 1.0, (n, t))
    weight = rng.uniform(0.0, 2.0, (n, t)) * (rng.random((n, t)) > 0.2)  # TIS-like values and IcePop zeros
    return mask, old, old + log_ratio, adv, gamma, weight


def _loss(name, logp_np, old, adv, mask, gamma, cfg, weight=None, garbage=True):
    logp = torch.tensor(logp_np)
    if garbage:  # padding may hold -inf / NaN: nothing may leak
        logp = torch.where(torch.tensor(mask), logp, torch.tensor(math.nan, dtype=torch.float64))
    logp.requires_grad_(True)
    g = None if gamma is None else torch.tensor(gamma)
    w = None if weight is None else torch.tensor(weight)
    loss, stats = POLICY_LOSSES[name](logp, torch.tensor(old), torch.tensor(adv), torch.tensor(mask), cfg,
                                      gamma=g, token_weight=w)
    loss.backward()
    return loss, logp.grad, stats


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["gmpo", "rspo"])
@pytest.mark.parametrize("clip", [(None, None), (0.3, 0.55)])
@pytest.mark.parametrize("use_weight", [False, True])
def test_token_gm_vs_numpy(seed, name, clip, use_weight):
    mask, old, logp, adv, gamma, weight = _random(seed)
    weight = weight if use_weight else None
    cfg = PolicyLossConfig(clip[0], clip[1], router_shift_placement="token_gm")
    low, high = cfg.clip_range(name)
    loss, grad, stats = _loss(name, logp, old, adv, mask, gamma, cfg, weight)
    ref_loss, ref_grad = ref_token_gm(logp, old, adv, mask, gamma, low, high, weight)
    assert loss.dtype == torch.float64
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10, atol=1e-14)
    assert np.all(grad.numpy()[~mask] == 0)
    # finite differences of the reference: the analytic NumPy gradient is itself right
    h, fd = 1e-6, np.zeros_like(logp)
    for i, t in zip(*np.nonzero(mask)):
        p, q = logp.copy(), logp.copy()
        p[i, t] += h
        q[i, t] -= h
        fd[i, t] = (ref_token_gm(p, old, adv, mask, gamma, low, high, weight)[0]
                    - ref_token_gm(q, old, adv, mask, gamma, low, high, weight)[0]) / (2 * h)
    np.testing.assert_allclose(ref_grad, fd, atol=1e-7)
    # clip statistics are those of plain GMPO (on log w, γ never enters the ratio)
    _, _, plain = _loss("gmpo", logp, old, adv, mask, None, PolicyLossConfig(clip[0], clip[1]), weight)
    for k in ("clip_frac_low", "clip_frac_high", "clip_frac", "is_ratio_std", "ppo_kl"):
        assert stats[k].item() == plain[k].item(), k
    assert stats["gamma_mean"].item() == pytest.approx(gamma[mask].mean())


@pytest.mark.parametrize("use_weight", [False, True])
def test_token_gm_with_constant_gamma_is_gmpo(use_weight):
    mask, old, logp, adv, _, weight = _random(3)
    weight = weight if use_weight else None
    plain_loss, plain_grad, _ = _loss("gmpo", logp, old, adv, mask, None, PolicyLossConfig(), weight)
    for c in (1.0, 0.8, 0.37):
        # a different constant per response too: only the split WITHIN a response depends on γ
        gamma = np.full(mask.shape, c) * np.linspace(0.5, 1.0, mask.shape[0])[:, None]
        loss, grad, _ = _loss("rspo", logp, old, adv, mask, gamma, TOKEN_GM, weight)
        torch.testing.assert_close(loss, plain_loss, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(grad, plain_grad, rtol=1e-12, atol=1e-15)
    # RS off (γ None) with token_gm selected: plain GMPO
    loss, grad, st = _loss("gmpo", logp, old, adv, mask, None, TOKEN_GM, weight)
    assert torch.equal(loss, plain_loss) and torch.equal(grad, plain_grad) and "gamma_mean" not in st


def _unclipped_case(t=6):
    gen = torch.Generator().manual_seed(0)
    old = (torch.randn(2, t, generator=gen, dtype=torch.float64) - 2).numpy()
    logp = old + 0.01 * torch.randn(2, t, generator=gen, dtype=torch.float64).numpy()  # far inside every clip
    return np.ones((2, t), dtype=bool), old, logp, np.array([1.0, -1.0])


def test_token_gm_downweights_shifted_tokens_pre_clip_does_not():
    """token_gm: grad_t(γ) / grad_t(γ≡1) ∝ γ_t within a response (the shifted token moves the policy less).
    pre_clip (the paper's form): that ratio is one number per response, GM(γ), whatever each token's γ."""
    mask, old, logp, adv = _unclipped_case()
    # |log γ| < 0.36 < ε − |log w|: no clip binds in pre_clip either, so the comparison is clip-free
    gamma = 0.7 + 0.3 * np.random.default_rng(1).random(mask.shape)
    _, g1, _ = _loss("gmpo", logp, old, adv, mask, None, PolicyLossConfig())
    _, g_tgm, _ = _loss("rspo", logp, old, adv, mask, gamma, TOKEN_GM)
    _, g_pre, _ = _loss("rspo", logp, old, adv, mask, gamma, PolicyLossConfig())
    r_tgm, r_pre = (g_tgm / g1).numpy(), (g_pre / g1).numpy()
    per_gamma = r_tgm / gamma  # constant per row
    np.testing.assert_allclose(per_gamma, per_gamma[:, :1].repeat(mask.shape[1], 1), rtol=1e-9)
    assert np.ptp(r_tgm, axis=1).min() > 0.05  # really token-dependent
    gm = np.exp(np.log(gamma).mean(1, keepdims=True))
    np.testing.assert_allclose(r_pre, np.broadcast_to(gm, r_pre.shape), rtol=1e-9)  # same for every token

    # one token with small γ (0.75: |log γ| < ε, so pre_clip's moved clip bound does not bind either): its
    # gradient relative to its neighbours shrinks by γ under token_gm only
    one = np.ones(mask.shape)
    one[:, 2] = 0.75
    _, g_tgm, _ = _loss("rspo", logp, old, adv, mask, one, TOKEN_GM)
    _, g_pre, _ = _loss("rspo", logp, old, adv, mask, one, PolicyLossConfig())
    rel = lambda g: (g[:, 2] / g[:, 0]).numpy()  # noqa: E731
    np.testing.assert_allclose(rel(g_tgm), 0.75 * rel(g1), rtol=1e-9)
    np.testing.assert_allclose(rel(g_pre), rel(g1), rtol=1e-9)
    # and the response's total gradient keeps its size (mean normalisation), unlike pre_clip's GM(γ) scaling
    np.testing.assert_allclose(g_tgm.sum(1).numpy(), g1.sum(1).numpy(), rtol=1e-3)
    np.testing.assert_allclose(g_pre.sum(1).numpy(), g1.sum(1).numpy() * 0.75 ** (1 / 6), rtol=1e-9)


def test_token_gm_normalizer_splits_micro_batches():
    mask, old, logp, adv, gamma, weight = _random(4)
    full, _, _ = _loss("rspo", logp, old, adv, mask, gamma, TOKEN_GM, weight, garbage=False)
    norm = float(mask.any(-1).sum())
    parts = 0.0
    for s in (slice(0, 3), slice(3, None)):
        part, _ = POLICY_LOSSES["rspo"](torch.tensor(logp[s]), torch.tensor(old[s]), torch.tensor(adv[s]),
                                        torch.tensor(mask[s]), TOKEN_GM, gamma=torch.tensor(gamma[s]),
                                        normalizer=norm, token_weight=torch.tensor(weight[s]))
        parts = parts + part
    torch.testing.assert_close(parts, full.detach(), rtol=1e-12, atol=1e-14)


def test_token_gm_extreme_gamma_is_finite():
    mask, old, logp, adv, gamma, _ = _random(5)
    gamma = np.where(np.random.default_rng(0).random(gamma.shape) < 0.5, 0.0, gamma)  # floor 0: γ -> 0
    gamma[3] = 0.0  # a whole response at γ = 0
    loss, grad, st = _loss("rspo", logp, old, adv, mask, gamma, TOKEN_GM)
    assert torch.isfinite(loss) and torch.all(torch.isfinite(grad)) and all(torch.isfinite(v) for v in st.values())


def test_token_gm_config_and_errors():
    assert "token_gm" in PLACEMENTS
    assert RouterShiftConfig(True, placement="token_gm").placement == "token_gm"
    mask, old, logp, adv, gamma, _ = _random(0)
    for name in ("grpo", "gspo"):
        for g in (gamma, None):
            with pytest.raises(ValueError, match="--router-shift-placement token_gm"):
                _loss(name, logp, old, adv, mask, g, TOKEN_GM)

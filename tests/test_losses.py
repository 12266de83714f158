"""Policy losses vs independent float64 NumPy references (written per token / per row, from the papers'
formulas), plus finite-difference gradients of the references vs autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_rspo.rl.losses import (
    POLICY_LOSSES,
    PolicyLossConfig,
    default_clip,
    entropy_from_logits,
    get_policy_loss,
    kl_penalty,
    masked_mean,
)
from megatron_rspo.rl.router_shift import RouterShiftConfig, compute_router_shift

# ----------------------------------------------------------------------------- NumPy references


def _clip(x, lo, hi):
    return min(max(x, lo), hi)


def ref_grpo(logp, old, adv, mask, gamma, low, high, placement="pre_clip", agg="token_mean"):
    rows, total, count = [], 0.0, 0
    for i in range(logp.shape[0]):
        objs = []
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            w = math.exp(logp[i, t] - old[i, t])
            g = 1.0 if gamma is None else gamma[i, t]
            a = adv[i]
            if placement == "pre_clip":
                r = g * w
                o = min(r * a, _clip(r, 1 - low, 1 + high) * a)
            else:
                o = g * min(w * a, _clip(w, 1 - low, 1 + high) * a)
            objs.append(o)
        if objs:
            rows.append(sum(objs) / len(objs))
            total += sum(objs)
            count += len(objs)
    if agg == "token_mean":
        return -total / max(count, 1)
    return -sum(rows) / max(len(rows), 1)


def ref_gspo(logp, old, adv, mask, gamma, low, high, placement="pre_clip"):
    objs = []
    for i in range(logp.shape[0]):
        ts = [t for t in range(logp.shape[1]) if mask[i, t]]
        if not ts:
            continue
        s = math.exp(sum(logp[i, t] - old[i, t] for t in ts) / len(ts))
        g_gm = 1.0 if gamma is None else math.exp(sum(math.log(gamma[i, t]) for t in ts) / len(ts))
        a = adv[i]
        if placement == "pre_clip":
            r = s * g_gm
            objs.append(min(r * a, _clip(r, 1 - low, 1 + high) * a))
        else:
            objs.append(g_gm * min(s * a, _clip(s, 1 - low, 1 + high) * a))
    return -sum(objs) / max(len(objs), 1)


def ref_gmpo_paper(logp, old, adv, mask, gamma, low, high, placement="pre_clip"):
    """GMPO paper, ratio space: J_i = (Π_t |min(r A, clip(r, e^-ε_low, e^ε_high) A)|)^(1/|o|) · sgn(A)."""
    objs = []
    for i in range(logp.shape[0]):
        ts = [t for t in range(logp.shape[1]) if mask[i, t]]
        if not ts:
            continue
        a = adv[i]
        prod = 1.0
        for t in ts:
            w = math.exp(logp[i, t] - old[i, t])
            g = 1.0 if gamma is None else gamma[i, t]
            if placement == "pre_clip":
                r = g * w
                prod *= abs(min(r * a, _clip(r, math.exp(-low), math.exp(high)) * a))
            else:
                prod *= g * abs(min(w * a, _clip(w, math.exp(-low), math.exp(high)) * a))
        objs.append(prod ** (1.0 / len(ts)) * np.sign(a))
    return -sum(objs) / max(len(objs), 1)


def ref_gmpo_design(logp, old, adv, mask, gamma, eps):
    """DESIGN §2 literally (symmetric ε): ρ = sgn(A) log w̃, ρ^clip = min(ρ, clip(ρ, −ε, ε)),
    S = exp(sgn·mean ρ^clip)."""
    objs = []
    for i in range(logp.shape[0]):
        ts = [t for t in range(logp.shape[1]) if mask[i, t]]
        if not ts:
            continue
        sg = np.sign(adv[i])
        rho = [sg * (logp[i, t] - old[i, t] + (0.0 if gamma is None else math.log(gamma[i, t]))) for t in ts]
        rc = [min(x, _clip(x, -eps, eps)) for x in rho]
        objs.append(math.exp(sg * sum(rc) / len(ts)) * adv[i])
    return -sum(objs) / max(len(objs), 1)


def fd_grad(fn, logp, mask, h=1e-6):
    g = np.zeros_like(logp)
    for i, t in zip(*np.nonzero(mask)):
        p, m = logp.copy(), logp.copy()
        p[i, t] += h
        m[i, t] -= h
        g[i, t] = (fn(p) - fn(m)) / (2 * h)
    return g


# ----------------------------------------------------------------------------- fixture

# Row lengths 4, 2, 3, 0 (fully padded), 1. Advantages: +, −, 0, +, −. Log-ratios hit both clip sides
# of grpo (ε 0.2) and gmpo (ε 0.4) away from the kinks, so finite differences are exact enough.
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=bool)
LOG_RATIO = np.array(
    [[0.5, -0.05, 0.1, -0.45], [-0.5, 0.02, 0, 0], [0.1, 0.3, -0.1, 0], [0, 0, 0, 0], [0.6, 0, 0, 0]]
)
OLD = np.array([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.2, 0, 0], [-2.2, -0.3, -1.1, 0], [0, 0, 0, 0], [-0.9, 0, 0, 0]])
ADV = np.array([1.0, -0.5, 0.0, 2.0, -1.5])
GAMMA = np.array(
    [[0.8, 0.95, 1.0, 0.9], [0.8, 0.85, 1, 1], [0.9, 0.8, 0.99, 1], [0.5, 0.5, 0.5, 0.5], [0.97, 1, 1, 1]]
)


def _torch_inputs(log_ratio=LOG_RATIO, garbage=True):
    logp_np = OLD + log_ratio
    logp = torch.tensor(logp_np, dtype=torch.float64)
    if garbage:  # padding may hold anything (e.g. -inf, NaN): it must not leak into loss or gradient
        logp = torch.where(torch.tensor(MASK), logp, torch.tensor([-math.inf, math.nan, 1e4, 0.0])[None, :4].double())
    logp.requires_grad_(True)
    return logp, torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK), torch.tensor(GAMMA)


def _ref(name, logp_np, gamma, cfg):
    low, high = cfg.clip_range(name)
    place = cfg.router_shift_placement
    if name == "grpo":
        return ref_grpo(logp_np, OLD, ADV, MASK, gamma, low, high, place, cfg.loss_agg)
    if name == "gspo":
        return ref_gspo(logp_np, OLD, ADV, MASK, gamma, low, high, place)
    return ref_gmpo_paper(logp_np, OLD, ADV, MASK, gamma, low, high, place)


CASES = [
    ("grpo", PolicyLossConfig()),
    ("grpo", PolicyLossConfig(loss_agg="seq_mean_token_mean")),
    ("grpo", PolicyLossConfig(clip_eps=0.2, clip_eps_high=0.28)),  # DAPO clip-higher
    ("gspo", PolicyLossConfig()),
    ("gspo", PolicyLossConfig(clip_eps=0.05, clip_eps_high=0.1)),
    ("gmpo", PolicyLossConfig()),
    ("gmpo", PolicyLossConfig(clip_eps=0.3, clip_eps_high=0.55)),  # asymmetric: paper semantics
    ("rspo", PolicyLossConfig()),
]


# (algorithm, cfg, use γ, placement); rspo always has γ, and placement only matters with γ.
LOSS_CASES = [
    (name, cfg, use_gamma, placement)
    for name, cfg in CASES
    for use_gamma, placement in ((False, "pre_clip"), (True, "pre_clip"), (True, "post_clip"))
    if use_gamma or name != "rspo"
]


@pytest.mark.parametrize("name,cfg,use_gamma,placement", LOSS_CASES)
def test_loss_and_grad_vs_numpy(name, cfg, use_gamma, placement):
    cfg = PolicyLossConfig(cfg.clip_eps, cfg.clip_eps_high, cfg.loss_agg, placement)
    logp, old, adv, mask, gamma = _torch_inputs()
    g_np = GAMMA if use_gamma else None
    loss, stats = POLICY_LOSSES[name](logp, old, adv, mask, cfg, gamma=gamma if use_gamma else None)
    logp_np = OLD + LOG_RATIO
    expected = _ref(name, logp_np, g_np, cfg)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-12, atol=1e-14)

    loss.backward()
    grad = logp.grad.numpy()
    assert np.all(grad[~MASK] == 0)  # padding (even -inf / NaN there) gets exactly zero gradient
    fd = fd_grad(lambda p: _ref(name, p, g_np, cfg), logp_np, MASK)
    np.testing.assert_allclose(grad, fd, atol=1e-7)
    assert all(not v.requires_grad for v in stats.values())
    assert ("gamma_mean" in stats) == use_gamma


def test_gmpo_matches_design_formula_symmetric():
    """With ε_low == ε_high the log-space implementation equals DESIGN §2 written literally."""
    logp, old, adv, mask, gamma = _torch_inputs()
    for g_t, g_np in ((gamma, GAMMA), (None, None)):
        loss, _ = POLICY_LOSSES["gmpo"](logp, old, adv, mask, PolicyLossConfig(), gamma=g_t)
        np.testing.assert_allclose(loss.item(), ref_gmpo_design(OLD + LOG_RATIO, OLD, ADV, MASK, g_np, 0.4), rtol=1e-12)


def test_rs_weights_sequences_in_gmpo_and_tokens_in_grpo():
    """Where no clip binds, pre-clip γ scales every token's gradient of a response by the same factor, the
    geometric mean of its γ, in GMPO/RSPO (the geometric mean turns w̃ = γ·w into a per-sequence scalar), but
    each token's gradient by its own γ in GRPO+RS. docs/router_shift_sweep.md builds on this."""
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(2, 6, generator=gen, dtype=torch.float64) - 2
    logp = old + 0.01 * torch.randn(2, 6, generator=gen, dtype=torch.float64)  # far inside every clip range
    adv, mask = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 6, dtype=torch.float64)
    gamma = 0.95 + 0.05 * torch.rand(2, 6, generator=gen, dtype=torch.float64)  # |log γ| < ε: no RS clip either

    def grad(name, g):
        lp = logp.clone().requires_grad_()
        POLICY_LOSSES[name](lp, old, adv, mask, PolicyLossConfig(), gamma=g)[0].backward()
        return lp.grad

    gm = gamma.log().mean(dim=1, keepdim=True).exp().expand_as(gamma)
    torch.testing.assert_close(grad("gmpo", gamma) / grad("gmpo", None), gm)
    torch.testing.assert_close(grad("grpo", gamma) / grad("grpo", None), gamma)


def test_clip_fractions_and_ratio_stats():
    logp, old, adv, mask, gamma = _torch_inputs()
    valid = LOG_RATIO[MASK]
    a_tok = np.broadcast_to(ADV[:, None], MASK.shape)[MASK]
    # grpo without γ: low = A<0 & w<0.8 ; high = A>0 & w>1.2
    _, st = POLICY_LOSSES["grpo"](logp, old, adv, mask, PolicyLossConfig())
    w = np.exp(valid)
    assert st["clip_frac_low"].item() == pytest.approx(np.mean((a_tok < 0) & (w < 0.8)))  # row1 tok0 (w=0.61)
    assert st["clip_frac_high"].item() == pytest.approx(np.mean((a_tok > 0) & (w > 1.2)))  # row0 tok0
    assert st["clip_frac_low"].item() == pytest.approx(1 / 10) and st["clip_frac_high"].item() == pytest.approx(1 / 10)
    assert st["ppo_kl"].item() == pytest.approx(np.mean(-valid))
    assert st["is_ratio_mean"].item() == pytest.approx(w.mean())
    assert st["is_ratio_std"].item() == pytest.approx(w.std())
    assert st["is_ratio_max"].item() == pytest.approx(w.max())
    seq = np.array([np.exp(LOG_RATIO[i][MASK[i]].mean()) for i in range(5) if MASK[i].any()])
    assert st["seq_is_ratio_mean"].item() == pytest.approx(seq.mean())
    assert st["seq_is_ratio_std"].item() == pytest.approx(seq.std())
    assert st["seq_is_ratio_max"].item() == pytest.approx(seq.max())
    # pre_clip counts on w̃ = γw: γ=0.9 on row0 tok3 (w=0.64) doesn't matter (A>0); γ·1.105 for row0 tok2 < 1.2
    _, st = POLICY_LOSSES["grpo"](logp, old, adv, mask, PolicyLossConfig(), gamma=gamma)
    wt = (GAMMA[MASK] * w)
    assert st["clip_frac_high"].item() == pytest.approx(np.mean((a_tok > 0) & (wt > 1.2)))
    assert st["clip_frac_low"].item() == pytest.approx(np.mean((a_tok < 0) & (wt < 0.8)))
    assert st["gamma_mean"].item() == pytest.approx(GAMMA[MASK].mean())
    assert st["is_ratio_mean"].item() == pytest.approx(w.mean())  # ratio stats exclude γ
    # gmpo (log space, ε 0.4): high = A>0 & log w > 0.4 (row0 tok0), low = A<0 & log w < -0.4 (row1 tok0)
    _, st = POLICY_LOSSES["gmpo"](logp, old, adv, mask, PolicyLossConfig())
    assert st["clip_frac_high"].item() == pytest.approx(0.1) and st["clip_frac_low"].item() == pytest.approx(0.1)
    # gspo: per valid sequence; rows 0 (A>0, s>1), 1 (A<0, s<1) clipped at 3e-4/4e-4; row2 has A=0; row4 A<0, s>1
    _, st = POLICY_LOSSES["gspo"](logp, old, adv, mask, PolicyLossConfig())
    assert st["clip_frac_high"].item() == pytest.approx(1 / 4) and st["clip_frac_low"].item() == pytest.approx(1 / 4)


@pytest.mark.parametrize("name", ["grpo", "gspo", "gmpo", "rspo"])
@pytest.mark.parametrize("placement", ["pre_clip", "post_clip"])
def test_on_policy_identity(name, placement):
    """θ = θ_old: every ratio is exactly 1, γ exactly 1, no clipping; RSPO ≡ GMPO bit for bit."""
    torch.manual_seed(0)
    n, t, layers, k = 6, 7, 3, 2
    old = -torch.rand(n, t, dtype=torch.float64) * 3
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3] = False
    adv = torch.randn(n, dtype=torch.float64)
    scores = torch.log_softmax(torch.randn(n, t, layers, 8), -1)[..., :k]
    gamma, per_layer = compute_router_shift(scores.clone(), scores, RouterShiftConfig(enabled=True))
    assert torch.equal(gamma, torch.ones(n, t)) and torch.equal(per_layer, torch.zeros(n, t, layers))
    cfg = PolicyLossConfig(router_shift_placement=placement)
    logp = old.clone().requires_grad_(True)
    loss, st = POLICY_LOSSES[name](logp, old, adv, mask, cfg, gamma=gamma)
    for key in ("is_ratio_mean", "is_ratio_max", "seq_is_ratio_mean", "seq_is_ratio_max", "gamma_mean"):
        assert st[key].item() == 1.0, key
    for key in ("is_ratio_std", "seq_is_ratio_std", "clip_frac_low", "clip_frac_high", "ppo_kl"):
        assert st[key].item() == 0.0, key
    loss.backward()
    if name in ("gmpo", "rspo"):
        ref = old.clone().requires_grad_(True)
        loss_ref, _ = POLICY_LOSSES["gmpo"](ref, old, adv, mask, cfg)
        loss_ref.backward()
        assert torch.equal(loss, loss_ref) and torch.equal(logp.grad, ref.grad)
        # analytic on-policy gradient: dJ/dlogp_{i,t} = A_i / |o_i| / N_rows
        n_tok = mask.sum(-1)
        rows = (n_tok > 0).sum()
        expected = -(adv / n_tok.clamp_min(1))[:, None] / rows * mask
        torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=0)
        assert loss.item() == pytest.approx(-(adv[n_tok > 0]).mean().item())


def test_zero_advantages_and_all_padding_are_finite():
    for name in ("grpo", "gspo", "gmpo"):
        logp = torch.zeros(3, 4, requires_grad=True)
        loss, st = POLICY_LOSSES[name](logp, torch.full((3, 4), -1.0), torch.zeros(3), torch.ones(3, 4),
                                       PolicyLossConfig())
        loss.backward()
        assert loss.item() == 0.0 and torch.all(logp.grad == 0)
        logp = torch.zeros(2, 3, requires_grad=True)
        loss, st = POLICY_LOSSES[name](logp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3), PolicyLossConfig(),
                                       gamma=torch.ones(2, 3))
        loss.backward()
        assert loss.item() == 0.0 and torch.all(torch.isfinite(logp.grad))
        assert all(torch.isfinite(v) for v in st.values())


@pytest.mark.parametrize("name,cfg", [
    ("grpo", PolicyLossConfig()),
    ("grpo", PolicyLossConfig(loss_agg="seq_mean_token_mean")),
    ("gspo", PolicyLossConfig(clip_eps=0.1)),
    ("gmpo", PolicyLossConfig()),
])
def test_normalizer_splits_micro_batches(name, cfg):
    logp, old, adv, mask, gamma = _torch_inputs(garbage=False)
    full, _ = POLICY_LOSSES[name](logp, old, adv, mask, cfg, gamma=gamma)
    tok = name == "grpo" and cfg.loss_agg == "token_mean"
    norm = mask.sum() if tok else (mask.sum(-1) > 0).sum()
    parts = sum(POLICY_LOSSES[name](logp[s], old[s], adv[s], mask[s], cfg, gamma=gamma[s], normalizer=norm)[0]
                for s in (slice(0, 2), slice(2, 5)))
    torch.testing.assert_close(parts, full, rtol=1e-12, atol=1e-14)


def test_bf16_inputs_computed_in_fp32():
    logp = (torch.full((2, 3), -1.0) + 0.1).to(torch.bfloat16).requires_grad_(True)
    loss, _ = POLICY_LOSSES["gmpo"](logp, torch.full((2, 3), -1.0, dtype=torch.bfloat16), torch.tensor([1.0, -1.0]),
                                    torch.ones(2, 3), PolicyLossConfig())
    assert loss.dtype == torch.float32
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16


def test_registry_config_and_errors():
    assert set(POLICY_LOSSES) == {"grpo", "gspo", "gmpo", "rspo"}
    assert default_clip("grpo") == (0.2, 0.2) and default_clip("gspo") == (3e-4, 4e-4)
    assert default_clip("gmpo") == default_clip("rspo") == (0.4, 0.4)
    assert PolicyLossConfig().clip_range("gspo") == (3e-4, 4e-4)
    assert PolicyLossConfig(clip_eps=0.1).clip_range("gspo") == (0.1, 0.1)
    assert PolicyLossConfig(clip_eps_high=0.28).clip_range("grpo") == (0.2, 0.28)
    with pytest.raises(ValueError, match="unknown policy loss"):
        get_policy_loss("ppo2")
    with pytest.raises(ValueError, match="clip_eps"):
        PolicyLossConfig(clip_eps=0.0)
    with pytest.raises(ValueError, match="loss_agg"):
        PolicyLossConfig(loss_agg="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="placement"):
        PolicyLossConfig(router_shift_placement="after")  # type: ignore[arg-type]
    logp, old, adv, mask, _ = _torch_inputs()
    with pytest.raises(ValueError, match="gamma"):
        POLICY_LOSSES["rspo"](logp, old, adv, mask, PolicyLossConfig())
    with pytest.raises(ValueError, match="advantages"):
        POLICY_LOSSES["grpo"](logp, old, adv[:, None], mask, PolicyLossConfig())
    with pytest.raises(ValueError, match="gamma must be"):
        POLICY_LOSSES["grpo"](logp, old, adv, mask, PolicyLossConfig(), gamma=torch.ones(2, 2))


def test_kl_entropy_masked_mean():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, math.nan]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0], [-0.5, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    lr = np.array([0.5, -1.0, 0.0])
    got = {k: kl_penalty(logp, ref, mask, k)[mask].numpy() for k in ("k1", "k2", "k3")}
    np.testing.assert_allclose(got["k1"], lr)
    np.testing.assert_allclose(got["k2"], 0.5 * lr**2)
    np.testing.assert_allclose(got["k3"], np.exp(-lr) + lr - 1)
    assert kl_penalty(logp, ref, mask)[1, 1].item() == 0.0
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(logp, ref, mask, "k4")  # type: ignore[arg-type]

    z = torch.randn(2, 3, 11, dtype=torch.float64)
    p = np.exp(z.numpy()) / np.exp(z.numpy()).sum(-1, keepdims=True)
    np.testing.assert_allclose(entropy_from_logits(z).numpy(), -(p * np.log(p)).sum(-1), rtol=1e-12)
    torch.testing.assert_close(entropy_from_logits(z, chunk_size=4), entropy_from_logits(z))
    assert entropy_from_logits(z.to(torch.bfloat16)).dtype == torch.float32

    assert masked_mean(torch.tensor([1.0, math.inf, 3.0]), torch.tensor([1, 0, 1])).item() == 2.0
    assert masked_mean(torch.ones(2), torch.zeros(2)).item() == 0.0

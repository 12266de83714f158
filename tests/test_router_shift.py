"""Router-shift distance / γ vs a NumPy reference, stop-gradient, expert-set change rate, and the router
diagnostics of rl/metrics.py (γ stats, per-layer shift, expert load, collapse detector)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_rspo.rl.losses import POLICY_LOSSES, PolicyLossConfig
from megatron_rspo.rl.metrics import (
    CollapseDetector,
    expert_load_stats,
    gamma_stats,
    masked_quantile,
    router_shift_stats,
)
from megatron_rspo.rl.router_shift import (
    RouterShiftConfig,
    compute_router_shift,
    expert_set_change_rate,
    per_layer_router_shift,
    router_shift_distance,
    router_shift_ratio,
)


def ref_gamma(cur, old, aggregation, floor, layer_mask=None):
    """Loops over tokens/layers; the "sum" form is the product of per-layer ratios exp(−d_l)."""
    n, t, num_layers, k = cur.shape
    gamma = np.zeros((n, t))
    lm = None if layer_mask is None else np.broadcast_to(layer_mask, (n, t, num_layers))
    for i in range(n):
        for j in range(t):
            present = [ll for ll in range(num_layers) if lm is None or lm[i, j, ll]]
            d_l = [sum(abs(cur[i, j, ll, kk] - old[i, j, ll, kk]) for kk in range(k)) / k for ll in present]
            if aggregation == "mean":
                g = math.exp(-sum(d_l) / len(d_l)) if d_l else 1.0
            else:
                g = float(np.prod([math.exp(-x) for x in d_l]))
            gamma[i, j] = max(g, floor)
    return gamma


def _scores(seed=0, n=3, t=4, num_layers=3, k=2, e=6, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, num_layers, e, generator=g)
    old = torch.log_softmax(logits, -1)
    cur = torch.log_softmax(logits + scale * torch.randn(n, t, num_layers, e, generator=g), -1)
    ids = old.topk(k, -1).indices
    return cur.gather(-1, ids), old.gather(-1, ids)


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
@pytest.mark.parametrize("floor", [0.0, 0.5, 0.8, 0.95])
def test_gamma_vs_numpy(aggregation, floor):
    cur, old = _scores()
    gamma, per_layer = compute_router_shift(cur, old, RouterShiftConfig(True, floor, aggregation))
    expected = ref_gamma(cur.double().numpy(), old.double().numpy(), aggregation, floor)
    np.testing.assert_allclose(gamma.numpy(), expected, rtol=1e-6)
    assert gamma.dtype == torch.float32 and torch.all(gamma >= floor) and torch.all(gamma <= 1)
    d = router_shift_distance(cur, old, aggregation)
    torch.testing.assert_close(router_shift_ratio(d, floor), gamma)
    np.testing.assert_allclose(per_layer.numpy(), np.abs(cur.numpy() - old.numpy()).mean(-1), rtol=1e-6)


def test_floor_binds_and_layer_mask():
    cur, old = _scores(scale=3.0)
    g_floor, _ = compute_router_shift(cur, old, RouterShiftConfig(True, 0.8, "sum"))
    assert torch.all(g_floor == 0.8)  # large shifts: every token held exactly at the floor
    cur, old = _scores(seed=1)
    lm = torch.tensor([1, 0, 1])
    d = router_shift_distance(cur, old, "mean", layer_mask=lm)
    ref = np.abs(cur.numpy() - old.numpy()).mean(-1)[..., [0, 2]].mean(-1)
    np.testing.assert_allclose(d.numpy(), ref, rtol=1e-6)
    lm3 = torch.ones(3, 4, 3, dtype=torch.bool)
    lm3[0, 0] = False  # a token with no MoE layer: d = 0, γ = 1
    lm3[1, 2, 1] = False
    for agg in ("mean", "sum"):
        g, _ = compute_router_shift(cur, old, RouterShiftConfig(True, 0.0, agg), layer_mask=lm3)
        np.testing.assert_allclose(g.numpy(), ref_gamma(cur.double().numpy(), old.double().numpy(), agg, 0.0,
                                                        lm3.numpy()), rtol=1e-6)
        assert g[0, 0].item() == 1.0


def test_gamma_is_stop_gradient():
    cur, old = _scores()
    cur = cur.clone().requires_grad_(True)
    d = router_shift_distance(cur, old)
    assert d.requires_grad  # the distance itself is differentiable ...
    gamma = router_shift_ratio(d, 0.5)
    assert not gamma.requires_grad  # ... γ never is
    gamma2, per_layer = compute_router_shift(cur, old, RouterShiftConfig(True, 0.5))
    assert not gamma2.requires_grad and not per_layer.requires_grad
    logp = torch.randn(3, 4, requires_grad=True)
    loss, _ = POLICY_LOSSES["rspo"](logp, logp.detach() - 0.1, torch.tensor([1.0, -1.0, 0.5]), torch.ones(3, 4),
                                    PolicyLossConfig(), gamma=gamma)
    loss.backward()
    assert cur.grad is None and logp.grad is not None


def test_bf16_scores_upcast_and_arg_errors():
    cur, old = _scores()
    d = router_shift_distance(cur.bfloat16(), old.bfloat16())
    assert d.dtype == torch.float32
    for bad in (-0.1, 1.5, "0.8", True):
        with pytest.raises(ValueError, match="floor"):
            router_shift_ratio(d, bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="floor"):
            RouterShiftConfig(True, floor=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="aggregation"):
        RouterShiftConfig(True, aggregation="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="placement"):
        RouterShiftConfig(True, placement="late")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="aggregation"):
        router_shift_distance(cur, old, "prod")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        per_layer_router_shift(cur, old[..., :1])
    with pytest.raises(ValueError, match="layer_mask"):
        router_shift_distance(cur, old, layer_mask=torch.ones(2))
    assert router_shift_ratio(torch.zeros(2), 1.0).tolist() == [1.0, 1.0]


def test_expert_set_change_rate():
    old = torch.tensor([[[[0, 1], [2, 3]], [[0, 1], [2, 3]]]])  # [1, 2, 2, 2]
    cur = torch.tensor([[[[1, 0], [2, 5]], [[4, 5], [3, 2]]]])
    # token0: layer0 0/2 changed, layer1 1/2; token1: layer0 2/2, layer1 0/2
    assert expert_set_change_rate(old, cur).item() == pytest.approx((0 + 0.5 + 1 + 0) / 4)
    assert expert_set_change_rate(old, cur, mask=torch.tensor([[1, 0]])).item() == pytest.approx(0.25)
    torch.testing.assert_close(expert_set_change_rate(old, cur, per_layer=True), torch.tensor([0.5, 0.25]))
    assert expert_set_change_rate(old, cur, layer_mask=torch.tensor([0, 1])).item() == pytest.approx(0.25)
    assert expert_set_change_rate(old, old).item() == 0.0
    rng = np.random.default_rng(0)
    o = np.stack([rng.permutation(8)[:3] for _ in range(40)]).reshape(2, 5, 4, 3)
    c = np.stack([rng.permutation(8)[:3] for _ in range(40)]).reshape(2, 5, 4, 3)
    ref = np.mean([[x not in c.reshape(-1, 3)[r] for x in o.reshape(-1, 3)[r]] for r in range(40)])
    assert expert_set_change_rate(torch.tensor(o), torch.tensor(c)).item() == pytest.approx(ref)


# ----------------------------------------------------------------------------- metrics


def test_gamma_and_router_shift_stats():
    g = torch.tensor([[0.8, 0.9, 1.0, 0.3], [0.8, 0.95, 0.85, 0.2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    st = gamma_stats(g, mask, floor=0.8)
    v = np.array([0.8, 0.9, 1.0, 0.8, 0.95, 0.85])
    assert st["gamma_mean"].item() == pytest.approx(v.mean())
    assert st["gamma_min"].item() == pytest.approx(0.8)
    assert st["gamma_p05"].item() == pytest.approx(np.percentile(v, 5))
    assert st["gamma_floor_frac"].item() == pytest.approx(2 / 6)
    assert masked_quantile(g, torch.zeros_like(mask), 0.5).item() == 0.0

    d = torch.rand(2, 4, 3)
    st = router_shift_stats(d, mask, layer_ids=[1, 3, 5])
    ref = d.numpy()[mask.numpy()].mean(0)
    for i, lid in enumerate([1, 3, 5]):
        assert st[f"router_shift/layer_{lid}"].item() == pytest.approx(ref[i])
    assert st["router_shift/mean"].item() == pytest.approx(ref.mean())

    load = torch.tensor([[10, 10, 10, 10], [40, 0, 0, 0], [0, 0, 0, 0]])
    st = expert_load_stats(load)
    assert st["expert_load/layer_0_max_over_mean"].item() == 1.0
    assert st["expert_load/layer_1_max_over_mean"].item() == 4.0
    assert st["expert_load/layer_2_max_over_mean"].item() == 1.0
    assert st["expert_load/max_over_mean"].item() == pytest.approx(2.0)
    assert st["expert_load/max_over_mean_max"].item() == 4.0


def test_collapse_detector_burst_noise_and_state():
    rng = np.random.default_rng(0)
    det = CollapseDetector(window=20, k=4.0, min_margin=0.05)
    noise = 0.1 + 0.01 * rng.standard_normal(200)
    assert not any(det.update("clip_frac", x) for x in noise)  # steady noise never fires
    assert det.update("clip_frac", 0.4)  # burst
    assert "clip_frac" in det.last_message
    assert not det.update("other", 5.0)  # no history yet for a new name
    assert det.update("clip_frac", float("nan"))

    flat = CollapseDetector(min_margin=0.05)
    assert not any(flat.update("x", 0.0) for _ in range(10))
    assert not flat.update("x", 0.01)  # above mean + k·0 but under the absolute margin
    assert flat.update("x", 0.2)

    restored = CollapseDetector(window=20, k=4.0, min_margin=0.05)
    restored.load_state_dict(det.state_dict())
    assert restored.state_dict() == det.state_dict()
    assert restored.update("clip_frac", 0.5) == det.update("clip_frac", 0.5)
    assert not CollapseDetector(window=3).update("x", 1.0)  # small windows are valid (min_history <= window)
    with pytest.raises(ValueError, match="min_history"):
        CollapseDetector(window=1)

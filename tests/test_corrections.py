"""Rollout corrections vs independent float64 NumPy references (per token / per row), config validation,
edge cases and a meta-device smoke test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_rspo.rl.corrections import (
    ROLLOUT_CORRECTIONS,
    RolloutCorrectionConfig,
    get_rollout_correction,
    register_rollout_correction,
)

LENGTHS = [7, 4, 0, 1, 6, 3]  # right padded, row 2 all padding
T = 7


def _data(seed: int = 0, scale: float = 0.7):
    rng = np.random.default_rng(seed)
    n = len(LENGTHS)
    mask = np.zeros((n, T), dtype=bool)
    for i, length in enumerate(LENGTHS):
        mask[i, :length] = True
    old = -rng.exponential(2.0, size=(n, T))
    rollout = old + rng.normal(0.0, scale, size=(n, T))
    old[~mask] = np.inf  # garbage on padding must be ignored
    rollout[~mask] = np.nan
    return old, rollout, mask


def _clamp(x, lo=-20.0, hi=20.0):
    return min(max(x, lo), hi)


def _token_log_r(old, rollout, mask):
    n, t = mask.shape
    return [[_clamp(float(old[i, j] - rollout[i, j])) if mask[i, j] else None for j in range(t)] for i in range(n)]


def _weight_stats(w, mask):
    vals = [w[i, j] for i, j in zip(*np.nonzero(mask))]
    n = max(len(vals), 1)
    return {"correction/weight_mean": sum(vals) / n, "correction/weight_max": max(vals) if vals else 0.0,
            "correction/masked_token_frac": sum(v == 0 for v in vals) / n}


def ref_tis(old, rollout, mask, clip, level):
    lr = _token_log_r(old, rollout, mask)
    w = np.zeros(mask.shape)
    for i, row in enumerate(lr):
        seq = math.exp(_clamp(sum(x for x in row if x is not None)))
        for j, x in enumerate(row):
            if x is not None:
                w[i, j] = min(seq if level == "sequence" else math.exp(x), clip)
    return w, mask, _weight_stats(w, mask)


def ref_icepop(old, rollout, mask, low, high):
    lr = _token_log_r(old, rollout, mask)
    w = np.zeros(mask.shape)
    for i, row in enumerate(lr):
        for j, x in enumerate(row):
            if x is not None and low <= math.exp(x) <= high:
                w[i, j] = math.exp(x)  # the ratio inside the band (slime / the IcePop report)
    return w, mask, _weight_stats(w, mask)


def ref_seq_mask(old, rollout, mask, low, high):
    lr = _token_log_r(old, rollout, mask)
    new = mask.copy()
    dropped_rows = dropped_tok = rows = 0
    for i, row in enumerate(lr):
        vals = [x for x in row if x is not None]
        if not vals:
            continue
        rows += 1
        if not low <= math.exp(sum(vals) / len(vals)) <= high:
            new[i] = False
            dropped_rows += 1
            dropped_tok += len(vals)
    stats = {"correction/masked_token_frac": dropped_tok / max(mask.sum(), 1),
             "correction/masked_seq_frac": dropped_rows / max(rows, 1)}
    return None, new, stats


def _run(kind, old, rollout, mask, dtype=torch.float64, **cfg):
    fn = get_rollout_correction(kind)
    return fn(torch.tensor(old, dtype=dtype), torch.tensor(rollout, dtype=dtype), torch.tensor(mask),
              RolloutCorrectionConfig(kind=kind, **cfg))


def _check(got, want, tol):
    (w, m, s), (rw, rm, rs) = got, want
    if rw is None:
        assert w is None
    else:
        assert not w.requires_grad and w.shape == m.shape
        np.testing.assert_allclose(w.double().numpy(), rw, rtol=tol, atol=tol)
    np.testing.assert_array_equal(m.numpy(), rm)
    assert set(s) == set(rs)
    for k, v in rs.items():
        assert s[k].dim() == 0 and not s[k].requires_grad
        assert s[k].item() == pytest.approx(v, rel=tol, abs=tol), k


# ----------------------------------------------------------------------------- registry and config


def test_registry_and_unknown_names():
    assert {"none", "tis", "icepop", "seq_mask"} <= set(ROLLOUT_CORRECTIONS)
    with pytest.raises(ValueError, match="unknown rollout correction"):
        get_rollout_correction("bogus")

    @register_rollout_correction("_test_identity")
    def _identity(old_logp, rollout_logp, mask, cfg):
        return None, mask, {}

    try:
        assert RolloutCorrectionConfig(kind="_test_identity").kind == "_test_identity"
    finally:
        del ROLLOUT_CORRECTIONS["_test_identity"]


@pytest.mark.parametrize("kwargs,flag", [
    (dict(kind="bogus"), "--rollout-correction "),
    (dict(kind="tis", level="row"), "--rollout-correction-level"),
    (dict(kind="icepop", level="sequence"), "--rollout-correction-level"),
    (dict(kind="tis", tis_clip=0.0), "--tis-clip"),
    (dict(kind="tis", tis_clip=float("nan")), "--tis-clip"),
    (dict(kind="icepop", icepop_low=0.0), "--icepop-low/-high"),
    (dict(kind="icepop", icepop_low=2.0, icepop_high=2.0), "--icepop-low/-high"),
    (dict(kind="seq_mask", seq_mask_low=-1.0), "--seq-mask-low/-high"),
    (dict(kind="seq_mask", seq_mask_low=3.0, seq_mask_high=2.0), "--seq-mask-low/-high"),
])
def test_config_validation(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        RolloutCorrectionConfig(**kwargs)


def test_config_defaults_accepted():
    for kind in ("none", "tis", "icepop", "seq_mask"):
        RolloutCorrectionConfig(kind=kind)
    RolloutCorrectionConfig(kind="tis", level="sequence")
    RolloutCorrectionConfig(kind="seq_mask", level="sequence")


# ----------------------------------------------------------------------------- vs NumPy


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("level,clip", [("token", 2.0), ("token", 1.2), ("sequence", 2.0), ("sequence", 1e9)])
def test_tis_matches_numpy(seed, dtype, tol, level, clip):
    old, rollout, mask = _data(seed)
    got = _run("tis", old, rollout, mask, dtype, level=level, tis_clip=clip)
    assert got[0].dtype == dtype
    _check(got, ref_tis(old, rollout, mask, clip, level), tol)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("band", [(0.5, 5.0), (0.8, 1.25)])
def test_icepop_matches_numpy(seed, band):
    old, rollout, mask = _data(seed, scale=1.0)
    got = _run("icepop", old, rollout, mask, icepop_low=band[0], icepop_high=band[1])
    want = ref_icepop(old, rollout, mask, *band)
    assert 0 < want[2]["correction/masked_token_frac"] < 1
    _check(got, want, 1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("band", [(0.5, 2.0), (0.8, 1.25)])
def test_seq_mask_matches_numpy(seed, band):
    old, rollout, mask = _data(seed, scale=1.0)
    got = _run("seq_mask", old, rollout, mask, seq_mask_low=band[0], seq_mask_high=band[1])
    _check(got, ref_seq_mask(old, rollout, mask, *band), 1e-12)


def test_seq_mask_drops_some_rows_and_keeps_float_mask_dtype():
    old, rollout, mask = _data(0, scale=1.0)
    fn = get_rollout_correction("seq_mask")
    cfg = RolloutCorrectionConfig(kind="seq_mask", seq_mask_low=0.8, seq_mask_high=1.25)
    m = torch.tensor(mask, dtype=torch.float32)
    w, new, stats = fn(torch.tensor(old), torch.tensor(rollout), m, cfg)
    assert w is None and new.dtype == torch.float32
    assert 0 < stats["correction/masked_seq_frac"].item() < 1
    assert ((new == 0) | (new == m)).all() and (new <= m).all()


# ----------------------------------------------------------------------------- exact / edge cases


@pytest.mark.parametrize("kind,level", [("none", "token"), ("tis", "token"), ("tis", "sequence"),
                                        ("icepop", "token"), ("seq_mask", "token")])
def test_identical_inputs_are_exact(kind, level):
    old, _, mask = _data(4)
    old_t = torch.tensor(old, dtype=torch.float32).requires_grad_()
    m = torch.tensor(mask)
    w, new, stats = get_rollout_correction(kind)(old_t, old_t, m, RolloutCorrectionConfig(kind=kind, level=level))
    if kind in ("none", "tis", "icepop"):
        assert new is m
    assert torch.equal(new, m)
    if w is not None:
        assert not w.requires_grad and w.dtype == torch.float32
        assert torch.equal(w, m.float())  # exactly 1 on valid tokens, 0 on padding
        assert stats["correction/weight_mean"].item() == 1 and stats["correction/weight_max"].item() == 1
    for k, v in stats.items():
        if k.startswith("correction/masked"):
            assert v.item() == 0, k
    assert (kind == "none") == (stats == {})


def test_icepop_band_edges_inclusive():
    lo, hi = 0.5, 5.0  # exp(log 5) > 5 in floating point; the band is compared in log space
    lr = [math.log(lo), math.log(hi), math.nextafter(math.log(lo), -1.0), math.nextafter(math.log(hi), 9.0), 0.0]
    old = torch.tensor([lr], dtype=torch.float64)
    cfg = RolloutCorrectionConfig(kind="icepop", icepop_low=lo, icepop_high=hi)
    w, m, s = get_rollout_correction("icepop")(old, torch.zeros_like(old), torch.ones(1, 5, dtype=torch.bool), cfg)
    assert w[0].tolist() == pytest.approx([lo, hi, 0.0, 0.0, 1.0])  # in band: the ratio itself
    assert m.all()  # out-of-band tokens stay in the mask (zero weight only)
    assert s["correction/masked_token_frac"].item() == pytest.approx(0.4)


def test_seq_mask_band_edges_inclusive():
    lo, hi = 0.5, 2.0
    rows = [[math.log(lo)] * 2, [math.log(hi)] * 2, [math.nextafter(math.log(lo), -1.0)] * 2,
            [math.nextafter(math.log(hi), 9.0)] * 2]
    old = torch.tensor([r + [0.0] for r in rows], dtype=torch.float64)  # last column is padding
    mask = torch.tensor([[True, True, False]] * 4)
    cfg = RolloutCorrectionConfig(kind="seq_mask", seq_mask_low=lo, seq_mask_high=hi)
    _, new, s = get_rollout_correction("seq_mask")(old, torch.zeros_like(old), mask, cfg)
    assert new[:, 0].tolist() == [True, True, False, False]
    assert s["correction/masked_seq_frac"].item() == 0.5 and s["correction/masked_token_frac"].item() == 0.5


def test_tis_clip_edge_and_extreme_log_ratios():
    old = torch.tensor([[math.log(2.0), 50.0, -50.0], [15.0, 15.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    roll = torch.zeros_like(old)
    cfg = RolloutCorrectionConfig(kind="tis", tis_clip=2.0)
    w, _, s = get_rollout_correction("tis")(old, roll, mask, cfg)
    assert w[0].tolist() == [2.0, 2.0, math.exp(-20.0)]  # at the clip; +50 truncated; −50 clamped to −20
    assert s["correction/weight_max"].item() == 2.0 and s["correction/masked_token_frac"].item() == 0
    cfg = RolloutCorrectionConfig(kind="tis", level="sequence", tis_clip=1e30)
    w, _, _ = get_rollout_correction("tis")(old, roll, mask, cfg)
    # row 0: Σ = log 2 + 20 − 20; row 1: Σ = 30 clamped to 20 before exp, padding stays 0.
    assert w[0].tolist() == pytest.approx([2.0] * 3) and w[1].tolist() == [math.exp(20.0)] * 2 + [0.0]
    assert torch.isfinite(w).all()


def test_all_padding_batch():
    z = torch.zeros(2, 3)
    m = torch.zeros(2, 3, dtype=torch.bool)
    for kind in ("tis", "icepop", "seq_mask"):
        w, new, stats = get_rollout_correction(kind)(z, z, m, RolloutCorrectionConfig(kind=kind))
        assert not new.any()
        assert w is None or not w.any()
        assert all(v.item() == 0 for v in stats.values()), kind


def test_bf16_inputs_give_fp32_weight():
    old, rollout, mask = _data(5)
    w, _, _ = _run("tis", np.nan_to_num(old), np.nan_to_num(rollout), mask, torch.bfloat16)
    assert w.dtype == torch.float32


@pytest.mark.parametrize("kind,level", [("none", "token"), ("tis", "token"), ("tis", "sequence"),
                                        ("icepop", "token"), ("seq_mask", "token")])
def test_corrections_meta_device(kind, level):
    old = torch.empty(4, 6, device="meta")
    rollout = torch.empty(4, 6, dtype=torch.bfloat16, device="meta")
    mask = torch.empty(4, 6, dtype=torch.bool, device="meta")
    w, new, stats = get_rollout_correction(kind)(old, rollout, mask, RolloutCorrectionConfig(kind=kind, level=level))
    assert new.device.type == "meta" and new.shape == (4, 6)
    if w is not None:
        assert w.device.type == "meta" and w.shape == (4, 6) and w.dtype == torch.float32
    for v in stats.values():
        assert v.device.type == "meta" and v.shape == ()

"""Train–inference mismatch diagnostics vs an independent float64 NumPy reference (per token / per slot)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_rspo.rl.mismatch import mismatch_stats

LENGTHS = [7, 4, 0, 1, 6]  # right padded, row 2 all padding
T, L, K, E = 7, 3, 2, 6


def _data(seed: int = 0, scale: float = 0.6):
    rng = np.random.default_rng(seed)
    n = len(LENGTHS)
    mask = np.zeros((n, T), dtype=bool)
    for i, length in enumerate(LENGTHS):
        mask[i, :length] = True
    old = -rng.exponential(2.0, size=(n, T))
    rollout = old + rng.normal(0.0, scale, size=(n, T))
    old[~mask] = np.nan  # garbage on padding must be ignored
    rollout[~mask] = -np.inf
    old_ids = np.stack([rng.permutation(E)[:K] for _ in range(n * T * L)]).reshape(n, T, L, K)
    engine_ids = old_ids.copy()
    flip = rng.random((n, T, L, K)) < 0.3
    engine_ids[flip] = rng.integers(0, E, size=flip.sum())
    engine_ids[rng.random((n, T, L, K)) < 0.15] = -1  # no record
    return old, rollout, mask, engine_ids, old_ids


def ref_stats(old, rollout, mask, engine_ids=None, old_ids=None, band=(0.5, 2.0)):
    k3, absd, out = [], [], []
    for i, t in zip(*np.nonzero(mask)):
        lr = float(old[i, t] - rollout[i, t])
        c = min(max(lr, -20.0), 20.0)
        k3.append(math.exp(c) - 1.0 - c)
        absd.append(abs(lr))
        out.append(not (band[0] <= math.exp(c) <= band[1]))
    n = max(len(k3), 1)
    res = {
        "mismatch/k3_kl": sum(k3) / n,
        "mismatch/abs_logp_diff_mean": sum(absd) / n,
        "mismatch/abs_logp_diff_max": max(absd) if absd else 0.0,
        "mismatch/ratio_out_of_band_frac": sum(out) / n,
    }
    if engine_ids is not None:
        bad = cnt = 0
        for i, t in zip(*np.nonzero(mask)):
            for layer in range(engine_ids.shape[2]):
                chosen = set(old_ids[i, t, layer].tolist())
                for e in engine_ids[i, t, layer]:
                    if e < 0:
                        continue
                    cnt += 1
                    bad += int(e) not in chosen
        res["mismatch/expert_mismatch_frac"] = bad / max(cnt, 1)
    return res


def _t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_mismatch_stats_match_numpy(dtype, tol, seed):
    old, rollout, mask, eids, oids = _data(seed)
    got = mismatch_stats(_t(old, dtype), _t(rollout, dtype), torch.tensor(mask),
                         engine_ids=torch.tensor(eids, dtype=torch.int32), old_ids=torch.tensor(oids))
    want = ref_stats(old, rollout, mask, eids, oids)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dim() == 0 and not got[k].requires_grad
        assert torch.isfinite(got[k])
        np.testing.assert_allclose(got[k].double().numpy(), v, rtol=tol, atol=tol, err_msg=k)
    assert 0 < want["mismatch/expert_mismatch_frac"] < 1 and 0 < want["mismatch/ratio_out_of_band_frac"] < 1


def test_mismatch_without_ids_has_no_expert_key_and_custom_band():
    old, rollout, mask, _, _ = _data(2, scale=1.0)
    got = mismatch_stats(_t(old), _t(rollout), torch.tensor(mask, dtype=torch.float32), band=(0.8, 1.25))
    want = ref_stats(old, rollout, mask, band=(0.8, 1.25))
    assert "mismatch/expert_mismatch_frac" not in got
    for k, v in want.items():
        assert got[k].item() == pytest.approx(v, rel=1e-12, abs=1e-12)


def test_identical_inputs_give_exact_zeros():
    old, _, mask, _, oids = _data(3)
    old_t = _t(old, torch.float32).requires_grad_()
    ids = torch.tensor(oids)
    got = mismatch_stats(old_t, old_t, torch.tensor(mask), engine_ids=ids, old_ids=ids.clone())
    assert len(got) == 5
    for k, v in got.items():
        assert v.item() == 0, k
        assert not v.requires_grad


def test_expert_mismatch_is_a_set_comparison_and_skips_no_record_slots():
    mask = torch.tensor([[True, True, False]])
    old_ids = torch.tensor([[[[1, 2]], [[3, 4]], [[0, 1]]]])  # [1, 3, L=1, K=2]
    # token 0: same set, other order -> 0 mismatches; token 1: one record kept (5 ∉ {3, 4}) and one slot
    # without a record; token 2 is padding (its mismatches must not count).
    engine = torch.tensor([[[[2, 1]], [[5, -1]], [[7, 7]]]], dtype=torch.int16)
    zeros = torch.zeros(1, 3)
    got = mismatch_stats(zeros, zeros, mask, engine_ids=engine, old_ids=old_ids)
    assert got["mismatch/expert_mismatch_frac"].item() == pytest.approx(1 / 3)
    engine_all_missing = torch.full_like(engine, -1)
    got = mismatch_stats(zeros, zeros, mask, engine_ids=engine_all_missing, old_ids=old_ids)
    assert got["mismatch/expert_mismatch_frac"].item() == 0  # no valid slot -> 0, not NaN


def test_band_edges_are_inclusive():
    lo, hi = 0.5, 5.0  # exp(log(5.0)) rounds above 5.0: compared in log space, log r = log(hi) is inside
    lr = [math.log(lo), math.log(hi), math.nextafter(math.log(lo), -1.0), math.nextafter(math.log(hi), 9.0)]
    old = torch.tensor([lr], dtype=torch.float64)
    got = mismatch_stats(old, torch.zeros_like(old), torch.ones(1, 4, dtype=torch.bool), band=(lo, hi))
    assert got["mismatch/ratio_out_of_band_frac"].item() == 0.5


def test_extremes_and_empty_mask():
    old = torch.tensor([[60.0, -60.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    got = mismatch_stats(old, torch.zeros_like(old), mask)
    want = math.exp(20) - 21 + math.exp(-20) + 19
    assert got["mismatch/k3_kl"].item() == pytest.approx(want / 2)  # log r clamped to ±20 before exp
    assert got["mismatch/abs_logp_diff_max"].item() == 60.0  # the true |Δ log p|, not clamped
    assert got["mismatch/ratio_out_of_band_frac"].item() == 1.0
    empty = mismatch_stats(old, torch.zeros_like(old), torch.zeros_like(mask))
    assert all(v.item() == 0 for v in empty.values())


def test_mismatch_validation():
    x = torch.zeros(2, 3)
    ids = torch.zeros(2, 3, 1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="together"):
        mismatch_stats(x, x, x.bool(), engine_ids=ids)
    with pytest.raises(ValueError, match="band"):
        mismatch_stats(x, x, x.bool(), band=(2.0, 0.5))
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        mismatch_stats(x, torch.zeros(2, 4), x.bool())
    with pytest.raises(ValueError, match="equal N, T, L"):
        mismatch_stats(x, x, x.bool(), engine_ids=ids, old_ids=torch.zeros(2, 3, 2, 2, dtype=torch.long))


def test_mismatch_meta_device():
    n, t = 4, 5
    old = torch.empty(n, t, device="meta")
    rollout = torch.empty(n, t, dtype=torch.bfloat16, device="meta")
    mask = torch.empty(n, t, dtype=torch.bool, device="meta")
    eids = torch.empty(n, t, L, K, dtype=torch.int32, device="meta")
    oids = torch.empty(n, t, L, K, dtype=torch.int64, device="meta")
    got = mismatch_stats(old, rollout, mask, engine_ids=eids, old_ids=oids)
    assert len(got) == 5
    for v in got.values():
        assert v.device.type == "meta" and v.shape == () and v.dtype == torch.float32

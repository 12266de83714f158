"""Metrics say what their names say: extremes are extremes over micro-batches and ranks, the reward std
is the whole batch's, and a masked quantile matches NumPy without host syncs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_rspo.rl.metrics import MetricAccumulator, masked_quantile, pooled_mean_std, reduction_of


def test_reduction_is_read_off_the_name():
    assert [reduction_of(n) for n in ("policy/is_ratio_max", "router/gamma_min", "reward/_count", "policy/ppo_kl")] \
        == ["max", "min", "sum", "mean"]


def test_accumulator_keeps_true_extremes():
    acc = MetricAccumulator()
    acc.add({"policy/is_ratio_max": torch.tensor(1.5), "router/gamma_min": torch.tensor(0.9), "x": 1.0})
    acc.add({"policy/is_ratio_max": torch.tensor(3.0), "router/gamma_min": torch.tensor(0.85), "x": 3.0})
    acc.add({"policy/is_ratio_max": torch.tensor(1.0), "router/gamma_min": torch.tensor(0.99)})
    out = acc.result()
    assert float(out["policy/is_ratio_max"]) == 3.0  # a mean of extremes would say 1.83
    assert float(out["router/gamma_min"]) == pytest.approx(0.85)
    assert float(out["x"]) == 2.0


def test_pooled_std_is_the_std_of_the_whole_batch():
    rng = np.random.default_rng(0)
    ranks = [rng.normal(size=8) * (i + 1) for i in range(3)]
    sums = [torch.tensor(r.sum()) for r in ranks]
    sq = [torch.tensor((r * r).sum()) for r in ranks]
    mean, std = pooled_mean_std(sum(sums), sum(sq), torch.tensor(24.0))
    allv = np.concatenate(ranks)
    assert float(mean) == pytest.approx(allv.mean()) and float(std) == pytest.approx(allv.std(ddof=1))
    assert float(std) != pytest.approx(np.mean([r.std(ddof=1) for r in ranks]))


@pytest.mark.parametrize("q", [0.0, 0.05, 0.5, 1.0])
def test_masked_quantile_matches_numpy(q):
    g = torch.Generator().manual_seed(1)
    x, m = torch.rand(5, 7, generator=g), torch.rand(5, 7, generator=g) > 0.3
    assert float(masked_quantile(x, m, q)) == pytest.approx(np.quantile(x[m].numpy(), q), abs=1e-6)
    assert float(masked_quantile(x, torch.zeros_like(m), q)) == 0.0

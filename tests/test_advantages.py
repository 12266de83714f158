"""Group-relative advantages: known values, std off, population std, group-size errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_rspo.rl.advantages import group_relative_advantages


def test_known_values():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two prompts, G = 4
    adv = group_relative_advantages(r, 4)
    s = np.std([1, 0, 0, 1], ddof=1)  # unbiased sample std (torch.std default, GRPO/verl)
    np.testing.assert_allclose(adv[:4].numpy(), np.array([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6), rtol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group: no signal, no NaN
    assert adv.dtype == torch.float32


def test_std_off_population_and_dtypes():
    r = torch.tensor([3, 1, 2, 2, 0, 4])  # int rewards, G = 2
    np.testing.assert_allclose(group_relative_advantages(r, 2, normalize_std=False).numpy(), [1, -1, 0, 0, -2, 2])
    r64 = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    adv = group_relative_advantages(r64, 3, unbiased=False, eps=0.0)
    x = r64.numpy()
    np.testing.assert_allclose(adv.numpy(), (x - x.mean()) / x.std(ddof=0), rtol=1e-12)
    assert adv.dtype == torch.float64


def test_bad_group_size():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        group_relative_advantages(torch.zeros(6), 4)
    for g in (0, 1, 2.0, True):
        with pytest.raises(ValueError, match="group_size must be"):
            group_relative_advantages(torch.zeros(6), g)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        group_relative_advantages(torch.zeros(2, 3), 3)

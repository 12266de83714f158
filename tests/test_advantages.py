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


@pytest.mark.parametrize("value", [0.1, 0.3, 1 / 3, 0.7, 1e-3])
@pytest.mark.parametrize("group", [4, 8, 16])
def test_equal_rewards_give_exactly_zero_in_float32(value, group):
    """Countdown's format score 0.1 for every response of a group: float32 rounding leaves the mean ~1 ulp off
    the rewards, and dividing that by (std ~ 1e-8) + eps gave A = +0.0074 for every response (worst 0.106)."""
    r = torch.full((3 * group,), value, dtype=torch.float32)
    r[group:2 * group] = torch.linspace(0, 1, group)  # a group with signal next to the tied ones
    adv = group_relative_advantages(r, group)
    assert torch.equal(adv[:group], torch.zeros(group)) and torch.equal(adv[2 * group:], torch.zeros(group))
    assert adv[group:2 * group].abs().max() > 1
    assert torch.equal(group_relative_advantages(r, group, normalize_std=False)[:group], torch.zeros(group))
    # the values the bug produced are not 0 here: the guard is what makes them 0
    raw = r.view(-1, group)
    unguarded = (raw - raw.mean(1, keepdim=True)) / (raw.std(1, keepdim=True) + 1e-6)
    if value == 0.1 and group == 8:
        assert unguarded[0].abs().max() > 1e-3

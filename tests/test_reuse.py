"""ReuseController (rl/reuse.py, our extension): stops on bursts, not on noise; absorbs level shifts; checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from megatron_rspo.rl.reuse import DEFAULT_SIGNALS, ReuseController

SHIFT, ISR = DEFAULT_SIGNALS


def _run(ctl: ReuseController, series: dict[str, np.ndarray], num_steps: int) -> list[tuple[int, int]]:
    """Feed per-step series rollout by rollout (a stopped rollout drops its remaining values, as the trainer
    would not run them); return (rollout, step) of every stop."""
    n = len(next(iter(series.values())))
    stops = []
    for r in range(n // num_steps):
        ctl.new_rollout(num_steps)
        for j in range(num_steps):
            t = r * num_steps + j
            if ctl.should_stop({k: float(v[t]) for k, v in series.items()}):
                stops.append((r, j))
                break
    return stops


def _noise(seed: int, n: int = 200) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {SHIFT: 0.03 + 0.003 * rng.standard_normal(n), ISR: 0.1 + 0.02 * rng.standard_normal(n)}


def test_stops_on_a_burst_and_counts_the_rest():
    s = _noise(0, 64)
    s[SHIFT][43] *= 10  # rollout 5, step 3 of 8
    ctl = ReuseController()
    assert _run(ctl, s, 8) == [(5, 3)]
    assert ctl.skipped_steps == 4 and ctl.stopped_rollouts == 1
    assert "router/shift_mean" in ctl.last_message and "4 skipped" in ctl.last_message
    st = ctl.stats()
    assert st["reuse/skipped_steps"] == 4 and st["reuse/stopped_rollouts"] == 1 and st["reuse/stopped"] == 0
    assert st["reuse/stopped_frac"] == pytest.approx(1 / 8)


@pytest.mark.parametrize("by_position", [False, True])
def test_no_false_stops_on_stationary_noise(by_position):
    """200 steps of Gaussian noise around a level, 20 seeds x 2 signals: no stop at the defaults."""
    stops = 0
    for seed in range(20):
        ctl = ReuseController(by_position=by_position)
        stops += len(_run(ctl, _noise(seed), 8 if not by_position else 4))
        assert ctl.skipped_steps == 0 or stops
    assert stops == 0


def test_no_false_stops_on_the_within_rollout_ramp():
    """Router shift grows with the step index (0 at the first step); neither baseline mode reads that as a burst,
    but only the per-position baseline sees a 3x jump at an early step (the all-steps baseline is too wide)."""
    rng = np.random.default_rng(0)
    steps, n = 8, 400
    ramp = 0.01 * (np.arange(n) % steps) * (1 + 0.03 * rng.standard_normal(n))
    for by_position in (False, True):
        assert _run(ReuseController(by_position=by_position), {SHIFT: ramp}, steps) == []
    burst = ramp.copy()
    burst[45 * steps + 2] *= 3
    assert _run(ReuseController(by_position=True), {SHIFT: burst}, steps) == [(45, 2)]
    assert _run(ReuseController(by_position=False), {SHIFT: burst}, steps) == []


def test_absorbs_a_lasting_level_shift():
    s = _noise(1, 320)
    s[SHIFT][80:] *= 3  # lasting: the router now moves 3x more per step
    ctl = ReuseController()
    stops = _run(ctl, s, 8)
    assert 1 <= len(stops) <= 3 and all(r in (10, 11, 12) for r, _ in stops)  # only right after the shift


def test_first_step_always_runs_and_min_steps():
    s = _noise(2, 40)
    s[SHIFT][32] *= 10  # the first step of rollout 4
    assert _run(ReuseController(), s, 8) == [(4, 0)]  # one step ran, 7 skipped
    ctl = ReuseController(min_steps=2)
    assert _run(ctl, s, 8) == [] and ctl.skipped_steps == 0  # fired at step 0 but two steps must run
    ctl = ReuseController()
    _run(ctl, {k: v[:32] for k, v in s.items()}, 8)
    ctl.new_rollout(1)  # a one-step rollout: nothing left to skip, no stop recorded
    assert not ctl.should_stop({SHIFT: 1.0}) and ctl.stopped_rollouts == 0
    with pytest.raises(ValueError, match="min_steps"):
        ReuseController(min_steps=0)
    with pytest.raises(RuntimeError, match="new_rollout"):
        ReuseController().should_stop({SHIFT: 0.1})
    with pytest.raises(RuntimeError, match="2 times"):
        ctl.should_stop({SHIFT: 1.0})


def test_missing_signals_ignored_nonfinite_stops():
    ctl = ReuseController()
    ctl.new_rollout(4)
    assert not ctl.should_stop({"other": 5.0})  # e.g. a dense model has no router shift
    assert ctl.should_stop({ISR: math.nan})  # a blown-up ratio spread: stop reusing this rollout
    assert ctl.should_stop({ISR: 0.1}) and ctl.skipped_steps == 2  # stays stopped, counted once


def test_state_round_trips():
    s = _noise(3, 160)
    s[SHIFT][130] *= 10
    a = ReuseController(window=12, by_position=True)
    _run(a, {k: v[:80] for k, v in s.items()}, 4)
    state = json.loads(json.dumps(a.state_dict()))  # plain, checkpointable
    b = ReuseController(window=12, by_position=True)
    b.load_state_dict(state)
    rest = {k: v[80:] for k, v in s.items()}
    assert _run(a, rest, 4) == _run(b, rest, 4) == [(12, 2)]
    assert a.state_dict() == b.state_dict() and a.stats() == b.stats()

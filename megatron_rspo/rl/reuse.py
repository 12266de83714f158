"""Router-shift-aware reuse: stop reusing a rollout once its off-policy signals burst.

OUR extension, not the RSPO paper's. The paper reweights tokens whose routing moved (γ); this instead
spends fewer optimizer steps on a rollout whose router (or importance ratios) has moved abnormally far:
docs/rspo_reproduction.md found that heavy reuse (many steps per rollout) is what hurts at every learning
rate, while a fixed small reuse wastes the rollout when nothing moves. Pure Python, no torch, no Megatron.

Protocol, per rollout of ``num_steps`` = ppo_epochs × num_minibatches optimizer steps::

    ctl.new_rollout(num_steps)
    for step in steps:
        stats = run_optimizer_step(step)        # scalar floats, identical on every rank
        if ctl.should_stop(stats):              # decides whether the NEXT step runs
            break                               # the remaining steps are counted as skipped

Because the decision is taken after a step, the first step of a rollout always runs (``min_steps`` ≥ 1 of
them do): a rollout is never skipped entirely. A signal "bursts" with the rule of
:class:`~megatron_rspo.rl.metrics.CollapseDetector` (value > mean + k·std of its last ``window`` values,
after ``min_history`` of them) and a margin: value − mean > max(min_margin, min_rel_margin·|mean|), the
relative part making one default work for signals of any scale. Every value joins the history, so a
lasting level shift is absorbed after a few steps rather than stopping every later rollout.

``by_position``: within a rollout the router shift and the ratio spread grow with the step index (both are
0 at the first step when rollouts come from the training model itself), so a baseline over all previous
steps mixes early and late steps: it tolerates the ramp but is less sensitive. With ``by_position`` each
step index has its own baseline (step j against step j of earlier rollouts; ``window``/``min_history``
then count rollouts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from megatron_rspo.rl.metrics import CollapseDetector

DEFAULT_SIGNALS: tuple[str, ...] = ("router/shift_mean", "policy/is_ratio_std")


class _Baseline(CollapseDetector):
    """CollapseDetector whose margin is also relative to the baseline mean."""

    def __init__(self, window: int, k: float, min_margin: float, min_history: int, min_rel_margin: float) -> None:
        super().__init__(window=window, k=k, min_margin=min_margin, min_history=min_history)
        self.min_rel_margin = float(min_rel_margin)

    def update(self, name: str, value: Any, min_margin: float | None = None) -> bool:
        margin = self.min_margin if min_margin is None else min_margin
        hist = self._history.get(name)
        if hist:
            margin = max(margin, self.min_rel_margin * abs(sum(hist) / len(hist)))
        return super().update(name, value, min_margin=margin)


class ReuseController:
    """Decides, after each optimizer step, whether the remaining steps of the current rollout are skipped.

    signals: step-stat names watched (a name missing from a step's stats is ignored for that step).
    min_margin: absolute margin, one float or per signal (signals not in the mapping get 0); guards a
    baseline that is exactly 0 with 0 std. min_rel_margin: the burst must also exceed the mean by this
    fraction of it; the default 1.0 (at least double the baseline) is what keeps stationary noise silent: on
    Gaussian noise (CV 10–20 %) k = 4 alone stops ~1 in 1000 steps (a 20-value std is a noisy estimate),
    0.5 about half that, 1.0 none in 40,000 steps. min_steps: steps that always run per rollout (≥ 1).
    """

    def __init__(
        self,
        window: int = 20,
        k: float = 4.0,
        min_margin: float | Mapping[str, float] = 1e-3,
        min_rel_margin: float = 1.0,
        min_history: int = 10,
        signals: Sequence[str] = DEFAULT_SIGNALS,
        min_steps: int = 1,
        by_position: bool = False,
    ) -> None:
        if min_steps < 1:
            raise ValueError(f"min_steps must be >= 1 (a rollout is never skipped entirely), got {min_steps}")
        if not signals:
            raise ValueError("ReuseController needs at least one signal")
        if min_rel_margin < 0 or (isinstance(min_margin, int | float) and min_margin < 0):
            raise ValueError(f"margins must be >= 0, got min_margin={min_margin!r}, min_rel_margin={min_rel_margin}")
        self.signals = tuple(signals)
        self._margins = {s: float(min_margin.get(s, 0.0) if isinstance(min_margin, Mapping) else min_margin)
                         for s in self.signals}
        self.min_steps, self.by_position = int(min_steps), bool(by_position)
        self._baseline = _Baseline(window, k, 0.0, min_history, min_rel_margin)
        self._skipped = self._stopped_rollouts = self._rollouts = 0
        self._num_steps: int | None = None
        self._steps = 0
        self._stopped = False
        self.last_message = ""

    # ------------------------------------------------------------------ protocol
    def new_rollout(self, num_steps: int) -> None:
        """Start a rollout that would run ``num_steps`` optimizer steps (ppo_epochs × num_minibatches)."""
        if num_steps < 1:
            raise ValueError(f"a rollout needs num_steps >= 1, got {num_steps}")
        self._num_steps, self._steps, self._stopped = int(num_steps), 0, False
        self._rollouts += 1

    def should_stop(self, step_stats: Mapping[str, float]) -> bool:
        """Record the stats of the step that just ran; True = skip the rest of this rollout (counted)."""
        if self._num_steps is None:
            raise RuntimeError("call new_rollout(num_steps) before should_stop")
        if self._stopped:
            return True
        if self._steps >= self._num_steps:
            raise RuntimeError(f"should_stop called {self._steps + 1} times for a rollout of {self._num_steps} steps")
        pos, self._steps = self._steps, self._steps + 1
        fired = []
        for name in self.signals:  # every signal is recorded, even once one has fired
            if name not in step_stats:
                continue
            key = f"{name}@{pos}" if self.by_position else name
            if self._baseline.update(key, step_stats[name], self._margins[name]):
                fired.append(name)
        remaining = self._num_steps - self._steps
        if not fired or self._steps < self.min_steps or remaining == 0:
            return False
        self._stopped = True
        self._skipped += remaining
        self._stopped_rollouts += 1
        self.last_message = (f"reuse stop after step {self._steps}/{self._num_steps} ({remaining} skipped): "
                             f"{', '.join(f'{n}={float(step_stats[n]):.4g}' for n in fired)} burst above the "
                             f"rolling baseline ({self._baseline.last_message})")
        return True

    # ------------------------------------------------------------------ reporting / checkpoint
    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped over the whole run."""
        return self._skipped

    @property
    def stopped_rollouts(self) -> int:
        return self._stopped_rollouts

    @property
    def steps_run(self) -> int:
        """Steps run in the current rollout so far."""
        return self._steps

    def stats(self) -> dict[str, float]:
        """Tensorboard scalars (host floats; identical on every rank when the inputs were)."""
        return {
            "reuse/steps_run": float(self._steps),
            "reuse/stopped": float(self._stopped),
            "reuse/skipped_steps": float(self._skipped),
            "reuse/stopped_rollouts": float(self._stopped_rollouts),
            "reuse/stopped_frac": self._stopped_rollouts / max(self._rollouts, 1),
        }

    def state_dict(self) -> dict[str, Any]:
        """Histories and run counters; thresholds come from the constructor (a resumed run may retune them).
        Saved between rollouts, so the current rollout's progress is not kept."""
        return {"baseline": self._baseline.state_dict(), "skipped_steps": self._skipped,
                "stopped_rollouts": self._stopped_rollouts, "rollouts": self._rollouts}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._baseline.load_state_dict(state["baseline"])
        self._skipped, self._stopped_rollouts = int(state["skipped_steps"]), int(state["stopped_rollouts"])
        self._rollouts = int(state.get("rollouts", 0))
        self._num_steps, self._steps, self._stopped = None, 0, False

"""Per-run analysis of a study's tensorboard scalars: collapse detection, run summaries, mean ± std."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Optional

from studylib.runs import Scalars, Series, last_iteration


@dataclass(frozen=True)
class CollapseCriterion:
    window: int = 5
    drop: float = 0.5
    min_peak: float = 0.05


COLLAPSE_DEFINITION = (
    "A run **collapses** at the first RL iteration *t* at which any of these holds: "
    "(a) *reward drop*: with MA(t) the mean of the train reward `reward/mean` over the {w} iterations "
    "t-{w1}..t (defined from t = {w}) and peak(t) = max over s <= t of MA(s), peak(t) >= {min_peak} and "
    "MA(t) < {keep:g} x peak(t) (a drop of more than {drop_pct:g}% from the best moving average so far); "
    "(b) *non-finite*: any logged scalar (except `time/*`) is NaN or inf at t; "
    "(c) *failed*: the trainer exited non-zero or hit the per-run timeout after logging at least one RL "
    "iteration; t = its last logged iteration + 1 (a run that fails before its first iteration is a set-up "
    "error: listed under failed runs, not counted as a collapse). "
    "Steps to collapse = t. The trainer's own `collapse/warning` (clip-fraction or IS-ratio-std burst above "
    "its rolling baseline) is counted separately (\"burst warnings\") and is not part of this definition."
)


def describe_collapse(crit: CollapseCriterion) -> str:
    return COLLAPSE_DEFINITION.format(w=crit.window, w1=crit.window - 1, min_peak=crit.min_peak, keep=1 - crit.drop,
                                      drop_pct=100 * crit.drop)

def finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def rl_points(series: Series) -> list[tuple[int, float]]:
    """(step, value) pairs of RL iterations (step >= 1: step 0 is the evaluation before any update)."""
    return sorted((s, v) for s, v in zip(*series) if s >= 1)


def reward_collapse_step(series: Series, crit: CollapseCriterion) -> Optional[int]:
    """First iteration where the reward's moving average drops below (1 - drop) x its running max."""
    buf: deque[float] = deque(maxlen=crit.window)
    peak = -math.inf
    for step, v in rl_points(series):
        if not finite(v):
            continue  # non-finite values are rule (b)
        buf.append(v)
        if len(buf) < crit.window:
            continue
        ma = sum(buf) / len(buf)
        peak = max(peak, ma)
        if peak >= crit.min_peak and ma < (1.0 - crit.drop) * peak:
            return step
    return None


def first_nonfinite(scalars: Scalars) -> Optional[tuple[int, str]]:
    """(iteration, tag) of the earliest NaN/inf among all scalars except ``time/*``."""
    best: Optional[tuple[int, str]] = None
    for tag, (steps, values) in scalars.items():
        if tag.startswith("time/"):
            continue
        for s, v in zip(steps, values):
            if not finite(v) and (best is None or (s, tag) < best):
                best = (s, tag)
    return best


def derived_series(scalars: Scalars, key: str) -> Optional[Series]:
    """A scalar's series, or ``clip_frac``: clip_frac_low + clip_frac_high per iteration."""
    if key == "clip_frac":
        lo, hi = scalars.get("policy/clip_frac_low"), scalars.get("policy/clip_frac_high")
        if lo and hi:
            hi_by_step = dict(zip(*hi))
            pts = [(s, v + hi_by_step[s]) for s, v in zip(*lo) if s in hi_by_step]
            return [s for s, _ in pts], [v for _, v in pts]
        return scalars.get("policy/clip_frac")
    return scalars.get(key)


def series_mean(series: Optional[Series]) -> Optional[float]:
    if not series:
        return None
    vals = [v for _, v in rl_points(series) if finite(v)]
    return sum(vals) / len(vals) if vals else None


@dataclass
class RunSummary:
    config: str
    seed: int
    status: str  # ok | failed | timeout (run.json) | missing (no events) | unknown (events, no run.json: interrupted)
    last_iter: int = 0
    final_acc: Optional[float] = None
    best_acc: Optional[float] = None
    init_acc: Optional[float] = None
    collapse_iter: Optional[int] = None
    collapse_cause: Optional[str] = None
    burst_warnings: Optional[int] = None
    clip_frac: Optional[float] = None
    is_ratio_std: Optional[float] = None
    router_shift: Optional[float] = None
    gamma: Optional[float] = None
    gamma_p05: Optional[float] = None
    gamma_floor_frac: Optional[float] = None
    expert_set_change: Optional[float] = None
    iter_time_s: Optional[float] = None
    wall_s: Optional[float] = None
    rc: Optional[int] = None


def summarize_run(config: str, seed: int, scalars: Scalars, manifest: Optional[dict],
                  crit: CollapseCriterion) -> RunSummary:
    status = manifest.get("status", "failed") if manifest else ("missing" if not scalars else "unknown")
    s = RunSummary(config=config, seed=seed, status=status, last_iter=last_iteration(scalars),
                   rc=manifest.get("rc") if manifest else None, wall_s=manifest.get("wall_s") if manifest else None)
    acc = scalars.get("eval/accuracy")
    if acc:
        pts = rl_points(acc)
        init = [v for st, v in zip(*acc) if st == 0]
        s.init_acc = init[0] if init else None
        accs = [v for _, v in pts if finite(v)]
        s.best_acc = max(accs) if accs else None
        if status == "ok" and pts:
            s.final_acc = pts[-1][1]
    causes: list[tuple[int, str]] = []
    if "reward/mean" in scalars:
        t = reward_collapse_step(scalars["reward/mean"], crit)
        if t is not None:
            causes.append((t, "reward drop"))
    nf = first_nonfinite(scalars)
    if nf is not None:
        causes.append((max(nf[0], 1), f"non-finite {nf[1]}"))
    if status in ("failed", "timeout") and s.last_iter >= 1:
        causes.append((s.last_iter + 1, f"{status} (rc={s.rc})"))
    if causes:
        s.collapse_iter, s.collapse_cause = min(causes)
    if "collapse/warning" in scalars:
        s.burst_warnings = int(sum(v for _, v in rl_points(scalars["collapse/warning"]) if finite(v) and v > 0))
    s.clip_frac = series_mean(derived_series(scalars, "clip_frac"))
    s.is_ratio_std = series_mean(scalars.get("policy/is_ratio_std"))
    s.router_shift = series_mean(scalars.get("router/shift_mean"))
    s.gamma = series_mean(scalars.get("router/gamma_mean"))
    s.gamma_p05 = series_mean(scalars.get("router/gamma_p05"))
    s.gamma_floor_frac = series_mean(scalars.get("router/gamma_floor_frac"))
    s.expert_set_change = series_mean(scalars.get("router/expert_set_change_rate"))
    s.iter_time_s = series_mean(scalars.get("time/iteration_s"))
    return s


def mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    """(mean, sample std or None for n < 2, n) over the finite values."""
    vals = [v for v in values if v is not None and finite(v)]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def fmt(ms: tuple, spec: str = ".3f", n_expected: Optional[int] = None) -> str:
    mean, std, n = ms
    if mean is None:
        return "–"
    text = format(mean, spec) + (f" ± {format(std, spec.lstrip('+'))}" if std is not None else "")
    if n_expected is not None and n < n_expected:
        text += f" (n={n})"
    return text


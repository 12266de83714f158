"""Small statistics for paired study comparisons (no scipy): Student's t CDF and quantile for integer
degrees of freedom, paired differences by seed, t-intervals of their mean."""

from __future__ import annotations

import math
import statistics
from typing import Optional

from studylib.analysis import RunSummary


def t_abs_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4, exact finite series)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    term = total = 1.0
    for k in range(3 if df % 2 else 2, df - 1, 2):  # odd: 2·4···(k-1)/(1·3···k); even: 1·3···(k-1)/(2·4···k)
        term *= (k - 1) / k * math.cos(theta) ** 2
        total += term
    if df % 2 == 0:
        return math.sin(theta) * total
    return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))


def t_quantile(level: float, df: int) -> float:
    """The two-sided critical value: P(|T| <= q) = level (bisection on the exact CDF)."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_abs_cdf(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def paired_diffs(base: list[RunSummary], other: list[RunSummary]) -> list[tuple[int, float]]:
    """(seed, other − base final accuracy) for the seeds with a final accuracy on both sides."""
    a = {s.seed: s.final_acc for s in base if s.final_acc is not None}
    return sorted((s.seed, s.final_acc - a[s.seed]) for s in other if s.final_acc is not None and s.seed in a)


def t_interval(values: list[float], level: float = 0.95) -> Optional[tuple]:
    """(mean, low, high, n): the t-interval of the mean (low = high = None for n = 1); None for no values."""
    n = len(values)
    if n < 2:
        return (values[0], None, None, 1) if values else None
    mean = statistics.fmean(values)
    half = t_quantile(level, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def paired_p(values: list[float]) -> Optional[float]:
    """Two-sided p-value of the paired t-test (mean difference = 0); None below 2 values or with no spread."""
    if len(values) < 2 or statistics.stdev(values) == 0:
        return None
    t = statistics.fmean(values) / (statistics.stdev(values) / math.sqrt(len(values)))
    return 1.0 - t_abs_cdf(t, len(values) - 1)


def pearson(xs: list[float], ys: list[float]) -> Optional[float]:
    """Pearson's r; None below 3 pairs or with a constant side."""
    if len(xs) != len(ys) or len(xs) < 3:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def fmt_ci(ci: Optional[tuple]) -> str:
    if ci is None:
        return "–"
    mean, lo, hi, n = ci
    return f"{mean:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None else "") + f" (n={n})"

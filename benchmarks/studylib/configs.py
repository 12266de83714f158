"""The study configurations (trainer flags per policy loss / router mode), the trainer flags every run of a
study shares, and the command-line groups the study scripts have in common."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional

from studylib.analysis import CollapseCriterion
from studylib.runs import Run, StudyConfig, trainer_command

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
# Selectable by name (--configs), not part of the default set: ablations of the RS weight itself.
EXTRA_CONFIGS: tuple[StudyConfig, ...] = (
    StudyConfig("rspo_post", "RSPO (post-clip γ)", ("--rl-algorithm", "rspo", "--router-shift-placement", "post_clip")),
    StudyConfig("rspo_floor05", "RSPO (γ floor 0.5)", ("--rl-algorithm", "rspo", "--router-shift-floor", "0.5")),
    StudyConfig("rspo_floor09", "RSPO (γ floor 0.9)", ("--rl-algorithm", "rspo", "--router-shift-floor", "0.9")),
)
# Selectable by name: rollout-correction baselines of the train-inference mismatch (they need an external
# engine: --rollout-engine vllm), R3 (needs an engine that returns routed experts) and our RS extensions.
MISMATCH_CONFIGS: tuple[StudyConfig, ...] = (
    StudyConfig("gmpo_tis", "GMPO+TIS", ("--rl-algorithm", "gmpo", "--rollout-correction", "tis")),
    StudyConfig("gmpo_icepop", "GMPO+IcePop", ("--rl-algorithm", "gmpo", "--rollout-correction", "icepop")),
    StudyConfig("rspo_tis", "RSPO+TIS", ("--rl-algorithm", "rspo", "--rollout-correction", "tis")),
    StudyConfig("rspo_token_gm", "RSPO-token-γ (ours)", ("--rl-algorithm", "rspo", "--router-shift-placement",
                                                         "token_gm")),
    StudyConfig("rspo_adaptive", "RSPO+adaptive reuse (ours)", ("--rl-algorithm", "rspo", "--adaptive-reuse")),
    StudyConfig("gmpo_r3", "GMPO+R3", ("--rl-algorithm", "gmpo", "--routing-replay", "--routing-replay-source",
                                       "rollout")),
)
CONFIG_BY_NAME = {c.name: c for c in CONFIGS + EXTRA_CONFIGS + MISMATCH_CONFIGS}


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


def expand_runs(configs: list[StudyConfig], seeds: list[int], out_dir: str, common: list[str],
                python: str = sys.executable, cell: str = "") -> list[Run]:
    """One Run per (configuration, seed), configuration-major, in ``<out_dir>/<config>/seed<seed>``;
    ``cell`` names a sweep's grid cell (it prefixes the runs' keys)."""
    runs = []
    for c in configs:
        for s in dict.fromkeys(seeds):
            d = os.path.join(out_dir, c.name, f"seed{s}")
            runs.append(Run(c, s, d, trainer_command(c, s, d, common, python), cell=cell))
    return runs


def add_execution_args(p: argparse.ArgumentParser) -> None:
    """How runs execute: parallelism, threads, timeouts, resume."""
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

def add_trainer_args(p: argparse.ArgumentParser) -> None:
    """Trainer settings shared by every run of a study."""
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

def add_collapse_args(p: argparse.ArgumentParser) -> None:
    """The collapse definition (see analysis.COLLAPSE_DEFINITION)."""
    g = p.add_argument_group("collapse definition")
    g.add_argument("--collapse-window", type=int, default=CollapseCriterion.window)
    g.add_argument("--collapse-drop", type=float, default=CollapseCriterion.drop)
    g.add_argument("--collapse-min-peak", type=float, default=CollapseCriterion.min_peak)

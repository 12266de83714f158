"""Metrics to tensorboard and the console (rank 0 only), and a progress bar."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("megatron_rspo")


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def setup_console_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level if is_rank0() else logging.WARNING)


def _scalar(v: Any) -> float:
    return float(v.item() if isinstance(v, torch.Tensor) else v)


class MetricsLogger:
    """``log(step, {"name": value})`` writes tensorboard scalars and keeps the last values."""

    def __init__(self, tensorboard_dir: str | None, run: Any = None, config: Mapping[str, Any] | None = None) -> None:
        """``run``: the RunConfig (its ``wandb_*`` fields turn W&B on, rank 0 only); ``config``: the run's flags,
        recorded with the W&B run."""
        self.writer = self.wandb = None
        if tensorboard_dir and is_rank0():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        if run is not None and getattr(run, "wandb_project", None) and is_rank0():
            import wandb

            self.wandb = wandb.init(project=run.wandb_project, name=run.wandb_run_name, mode=run.wandb_mode,
                                    dir=run.wandb_dir or run.save or os.getcwd(), config=dict(config or {}))
        self.last: dict[str, float] = {}

    def log(self, step: int, metrics: Mapping[str, Any], console: bool = False, prefix: str = "") -> None:
        values = {k: _scalar(v) for k, v in metrics.items()}
        self.last.update(values)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if console:
            text = " | ".join(f"{k} {v:.4g}" for k, v in values.items())
            log.info("%sstep %d | %s", prefix, step, text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class Progress:
    """A tqdm bar on rank 0 when stdout is a terminal (or ``force``); a no-op otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0) -> None:
        self.bar = None
        self.t0 = time.time()
        if enabled and is_rank0():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True,
                            disable=not sys.stderr.isatty())

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{_scalar(v):.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_summary(last: Mapping[str, float], iterations: int, seconds: float, save: str | None) -> str:
    """The end-of-run line: iterations, time, the last reward and accuracies, where the checkpoint is."""
    keys = ("reward/mean", "reward/accuracy", "eval/accuracy")
    parts = [f"{k} {last[k]:.4g}" for k in keys if k in last]
    where = f"; checkpoint in {save}" if save else "; no checkpoint (no --save)"
    return f"run finished: {iterations} iterations in {seconds / 60:.1f} min; " + ", ".join(parts) + where

"""Study runs: one trainer subprocess per (configuration, seed), resumable, with its own tensorboard dir,
``train.log`` and ``run.json``; plus reading those back and describing where they ran."""

from __future__ import annotations

import argparse
import functools
import glob
import importlib.util
import json
import os
import platform
import queue
import shlex
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

Series = tuple[list[int], list[float]]
Scalars = dict[str, Series]


@dataclass(frozen=True)
class StudyConfig:
    name: str  # directory name and --configs key
    label: str  # name in the table and legends
    flags: tuple[str, ...]  # trainer flags that define the configuration


@dataclass
class Run:
    config: StudyConfig
    seed: int
    dir: str
    cmd: list[str]
    cell: str = ""  # a sweep's grid cell ("" in a one-cell study)

    @property
    def key(self) -> str:
        own = f"{self.config.name}/seed{self.seed}"
        return f"{self.cell}/{own}" if self.cell else own


def trainer_command(config: StudyConfig, seed: int, run_dir: str, common: list[str],
                    python: str = sys.executable) -> list[str]:
    return [python, "-m", "megatron_rspo.rl.trainer", *common, *config.flags, "--seed", str(seed),
            "--tensorboard-dir", run_dir]


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


def core_slots(jobs: int) -> list[tuple[int, ...]]:
    """One disjoint set of CPU cores per concurrent run; empty sets (no pinning) for one run at a time or when
    there are fewer cores than runs."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if jobs <= 1 or len(cores) < jobs:
        return [()] * max(jobs, 1)
    per = len(cores) // jobs
    return [tuple(cores[i * per:(i + 1) * per]) for i in range(jobs)]


class Executor:
    """Runs trainer subprocesses (``jobs`` at a time), each writing train.log and run.json in its dir."""

    def __init__(self, jobs: int, threads: int, timeout: Optional[float]) -> None:
        self.jobs, self.threads, self.timeout = jobs, threads, timeout
        self.stop = threading.Event()
        # Concurrent runs each get their own cores (trainer and engine alike), so one run's OpenMP threads,
        # vLLM's included (it binds to every core of the node by default), do not spin on another's cores.
        self._slots: queue.Queue = queue.Queue()
        for cores in core_slots(jobs):
            self._slots.put(cores)
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
        cores = self._slots.get()
        if cores:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
        start = time.time()
        with open(os.path.join(run.dir, "train.log"), "w") as log:
            log.write("$ " + shlex.join(run.cmd) + "\n")
            log.flush()
            try:
                proc = subprocess.Popen(run.cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
            except BaseException:
                self._slots.put(cores)
                raise
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
                self._slots.put(cores)
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
            f"python {platform.python_version()}, torch {torch_v}; {jobs} run(s) at a time x {threads} thread(s)"
            + ("; each run pinned to its own core(s), engine included" if any(core_slots(jobs)) else ""))


@functools.cache  # one read per checkpoint, however many cells and tables name it
def _model_config(init_from: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron_rspo import checkpoint

    return checkpoint.read_run_config(checkpoint.resolve_checkpoint_dir(init_from))["ModelConfig"]


def model_description(init_from: str, short: bool = False) -> str:
    """The checkpoint's model shape, read from its saved run config (``short``: "E8 top-2, 4L h128")."""
    try:
        m = _model_config(init_from)
    except Exception as e:  # noqa: BLE001
        return "?" if short else f"(could not read the checkpoint's model config: {e})"
    if short:
        return f"E{m['num_experts']} top-{m['moe_router_topk']}, {m['num_layers']}L h{m['hidden_size']}"
    return (f"{m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads, "
            f"{m['num_experts']} experts top-{m['moe_router_topk']} (MoE every {m['moe_layer_freq']} layer(s)), "
            f"vocab {m['vocab_size']}")


def log_tail(run_dir: str, n: int = 1) -> str:
    try:
        with open(os.path.join(run_dir, "train.log"), errors="replace") as fh:
            lines = [ln.strip() for ln in fh if ln.strip()]
        return " / ".join(lines[-n:])
    except OSError:
        return ""



def run_pending(runs: list[Run], args: argparse.Namespace, reader, threads: int, tag: str,
                what: str) -> Optional[tuple[int, int]]:
    """Plan (complete runs of the same command are reused), then print the commands (``--dry-run``: returns
    None) or execute the rest (unless ``--report-only``), printing one line per finished run.
    Returns (runs executed, runs reused)."""
    todo, skipped = plan(runs, args.train_iters, reader, force=args.force, skip_failed=args.skip_failed)
    if args.dry_run:
        for r in runs:
            why = skipped.get(r.key)
            print(f"{'# skip (' + why + '): ' if why else ''}OMP_NUM_THREADS={threads} {shlex.join(r.cmd)}")
        print(f"# {len(todo)} to run, {len(skipped)} skipped; {args.jobs} at a time")
        return None
    if args.report_only:
        return 0, len(skipped)
    print(f"[{tag}] {what}; {len(skipped)} skipped, {len(todo)} to run, {args.jobs} at a time x {threads} threads",
          flush=True)
    done = [0]

    def on_done(run: Run, man: dict) -> None:
        done[0] += 1
        extra = "" if man["status"] == "ok" else f" -- {log_tail(run.dir)[-200:]}"
        print(f"[{tag}] [{done[0]}/{len(todo)}] {run.key}: {man['status']} (rc={man['rc']}) "
              f"in {man['wall_s']:.0f} s{extra}", flush=True)

    Executor(args.jobs, threads, args.run_timeout).execute(todo, on_done)
    return len(todo), len(skipped)


def load_run(run: Run, reader) -> tuple[Scalars, Optional[dict], Optional[str]]:
    """(scalars, run.json, problem): a run whose run.json holds another trainer command is excluded."""
    scalars, man = read_run_scalars(run.dir, reader), read_manifest(run.dir)
    if man is not None and not same_command(man.get("cmd", []), run.cmd):
        return {}, None, (f"{run.key}: its run.json holds a different trainer command (older settings); "
                          "excluded -- re-run to replace it")
    return scalars, man, None


def write_markdown(path: str, lines: list[str]) -> None:
    """Write a generated report (its folder created as needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")

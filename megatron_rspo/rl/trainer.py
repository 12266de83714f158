"""The RL loop (orchestration only; the math lives in router_shift / losses / advantages / metrics).

Per iteration: prompts -> G samples each (routing recorded) -> rewards -> group-relative advantages
-> old-policy pass (log pi_old and router log-scores at the recorded ids, theta_old) -> ppo_epochs x
num_minibatches optimizer steps -> metrics -> periodic eval and checkpoint.

    python -m megatron_rspo.rl.trainer --init-from runs/sft --tokenizer-model data/countdown/tokenizer.model \
        --rl-algorithm rspo --train-iters 30 --save runs/rl
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megatron_rspo import checkpoint, distributed
from megatron_rspo.cli import HelpFormatter, given_flags, parse_with_config, run_cli
from megatron_rspo.config import (
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    add_dataclass_args,
    from_args,
    to_dict,
)
from megatron_rspo.data import ShuffledStream
from megatron_rspo.engine import Engine
from megatron_rspo.errors import RunStopped
from megatron_rspo.evaluation import evaluate_task
from megatron_rspo.logging import MetricsLogger, Progress, log, run_summary, setup_console_logging
from megatron_rspo.memory import phase_memory
from megatron_rspo.model.provider import init_distributed, num_moe_layers, shutdown_distributed
from megatron_rspo.model.routing import frozen_router
from megatron_rspo.rl.async_rollout import RolloutQueue, pending_state, restore_pending
from megatron_rspo.rl.behaviour import build_rollout_engine, input_aligned, needs_old_pass, resolve_behaviour
from megatron_rspo.rl.config import RLConfig, effective_model_config, overlaps_generation, validate_rl_run
from megatron_rspo.rl.experience import Experience, micro_batch_rows, minibatches
from megatron_rspo.rl.memory_check import stop_unless_it_fits
from megatron_rspo.rl.memory_handoff import MemoryHandoff
from megatron_rspo.rl.metrics import (
    CollapseDetector,
    MetricAccumulator,
    expert_load_stats,
    pooled_mean_std,
    reduction_of,
    router_stat_names,
)
from megatron_rspo.rl.parallel import (
    RoutingLayout,
    all_reduce_dp,
    generation_mode,
    mean_over_dp,
    reduce_over_dp,
)
from megatron_rspo.rl.reference import ReferencePolicy
from megatron_rspo.rl.reuse import ReuseController
from megatron_rspo.rl.rollout_phase import RolloutContext, collect_rollout
from megatron_rspo.rl.run_checks import check_inputs, init_from_conflicts, resume_notes
from megatron_rspo.rl.step import loss_units, make_old_policy_step, make_train_step, step_options
from megatron_rspo.stop_signals import StopRequested, StopSignals
from megatron_rspo.tasks.registry import get_task
from megatron_rspo.tokenizer import load_tokenizer

CONFIG_CLASSES = (ModelConfig, ParallelConfig, OptimConfig, RunConfig, RLConfig)


@dataclass
class RLState:
    """Everything besides model/optimizer/scheduler that an exact resume needs."""

    iteration: int = 0
    data_position: int = 0
    collapse: dict | None = None
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient, whole run
    reuse: dict | None = None  # the adaptive-reuse controller's baselines


class TrainingStopped(RunStopped):
    """The run cannot go on (too many non-finite steps in a row); the message says why."""


class RLTrainer:
    def __init__(self, model_cfg: ModelConfig, par: ParallelConfig, opt: OptimConfig, run: RunConfig,
                 rl: RLConfig) -> None:
        # The policy's architecture is --init-from's (with this run's runtime fields); every problem of the
        # configuration is reported at once, before any process group or model exists.
        model_cfg = effective_model_config(model_cfg, rl)
        validate_rl_run(model_cfg, par, opt, run, rl, distributed.world_size() if distributed.initialized()
                        else int(os.environ.get("WORLD_SIZE", 1)))
        self.model_cfg, self.par, self.opt, self.run, self.rl = model_cfg, par, opt, run, rl
        self.tok = load_tokenizer(run.tokenizer_model)
        model_cfg.vocab_size = model_cfg.vocab_size or self.tok.vocab_size
        self.task = get_task(rl.task)
        self.train_set = self.task.load(rl.train_data)
        self.test_set = self.task.load(rl.test_data)[: rl.eval_samples]
        check_inputs(model_cfg, rl, run, self.tok, self.task, self.train_set, self.test_set)  # before any model
        init_distributed(par, seed=run.seed)
        setup_console_logging()  # again: only rank 0 logs at INFO, now that ranks are known
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp = parallel_state.get_data_parallel_world_size()
        if not rl.skip_memory_check:  # before any weight exists: each rank's share counted on the meta device
            stop_unless_it_fits(model_cfg, par, opt, rl)
        steps = rl.train_iters * rl.ppo_epochs * rl.num_minibatches
        self.engine = Engine(model_cfg, par, opt, train_iters=steps)
        self.device = distributed.module_device(self.engine.module)  # everything the loop creates lives here
        self.layout = RoutingLayout.build(self.engine.module)  # collective: every rank, before any schedule
        self.state = RLState()
        self.collapse = CollapseDetector(window=rl.collapse_window, k=rl.collapse_sigmas)
        self.opts = step_options(rl, num_moe_layers(model_cfg), self.layout)
        self.ref: ReferencePolicy | None = None
        pending = self._load()  # --load: this rank's rollouts generated but not yet trained on (or None)
        # Colocated: the trainer hands its optimizer state and gradient buffers over while the engine works, and
        # does so before the engine starts, so that the engine's share of the device is free.
        self.handoff = MemoryHandoff(self.engine, None, rl.offload_optimizer_during_rollout,
                                     rl.offload_grads_during_rollout)
        self.handoff.to_rollout()
        # Weight version = the number of update rounds the weights have seen (= the iteration).
        self.rollout_engine = build_rollout_engine(rl, run, par, self.engine.module, self.model_cfg, self.tok.stop_ids,
                                                   version=self.state.iteration)
        self.handoff.rollout = self.rollout_engine
        self.stream = ShuffledStream(len(self.train_set), run.seed, self.dp_rank, self.dp)
        self.stream.position = self.state.data_position
        # Generation overlaps training with an engine in another process, when one trainer rank runs or the
        # engines have devices of their own (--rollout-devices); its agreements then use a group of their own.
        overlap = overlaps_generation(rl, distributed.world_size())
        group = distributed.new_group_like_world() if overlap and distributed.world_size() > 1 else None
        if rl.async_rollout:
            log.info("off-policy schedule: %s", "generation overlaps training (the engines run on devices of their "
                     "own or beside one trainer rank)" if overlap else "generate ahead, then train (sequential: the "
                     "engine shares the trainer's devices or is the training model)")
        self.rollouts = RolloutContext(rl=rl, seed=run.seed, tok=self.tok, task=self.task, train_set=self.train_set,
                                       stream=self.stream, engine=self.rollout_engine, model=self.engine.module,
                                       layout=self.layout, dp=self.dp, dp_rank=self.dp_rank, group=group)
        self.queue = RolloutQueue(lambda index: collect_rollout(self.rollouts, index),
                                  rl.max_staleness if rl.async_rollout else 0, overlap,
                                  position=lambda: self.stream.position)
        if pending and rl.async_rollout:  # exact resume of the off-policy schedule
            self.stream.position = restore_pending(self.queue, pending, self.state.iteration, self.device)
        self.consecutive_skips = 0
        self.reuse = ReuseController(window=rl.reuse_window, k=rl.reuse_sigmas, min_history=min(10, rl.reuse_window),
                                     by_position=rl.reuse_by_position) if rl.adaptive_reuse else None
        if self.reuse is not None and self.state.reuse:
            self.reuse.load_state_dict(self.state.reuse)
        self.metrics = MetricsLogger(run.tensorboard_dir, run, to_dict(model_cfg, par, opt, run, rl))

    # ------------------------------------------------------------------ set-up
    def _load(self) -> dict | None:
        """Initial weights (--init-from, else the seeded initialisation), then the KL reference as a copy
        of them, then, when resuming (--load), the run's full state: the reference stays the initial policy.
        Returns the checkpoint's per-rank state (the off-policy schedule's pending rollouts), if any."""
        if self.rl.init_from:
            checkpoint.load_checkpoint(self.rl.init_from, self.engine.module, load_rng=False,
                                       model_config=self.model_cfg)
            log.info("initialised the policy from %s", self.rl.init_from)
        if self.rl.kl_coeff > 0:
            self.ref = ReferencePolicy(self.model_cfg, self.par, self.engine.module, offload=self.rl.offload_reference)
        if self.run.load and checkpoint.latest_iteration(self.run.load) is not None:
            loaded = checkpoint.load_checkpoint(self.run.load, self.engine.module, self.engine.optimizer,
                                                self.engine.scheduler, model_config=self.model_cfg)
            saved = checkpoint.read_run_config(loaded.path)
            for note in resume_notes(self.run.load, saved, to_dict(self.opt, self.rl)):
                log.warning(note)
            extra = loaded.extra_state
            keys = ("iteration", "data_position", "collapse", "skipped_steps", "reuse")
            self.state = RLState(**{k: extra[k] for k in keys if k in extra})
            if self.state.collapse:
                self.collapse.load_state_dict(self.state.collapse)
            log.info("resumed RL from %s at iteration %d", self.run.load, self.state.iteration)
            return loaded.rank_state
        return None

    # ------------------------------------------------------------------ one iteration
    def old_policy_pass(self, exp: Experience) -> tuple[Experience, dict[str, torch.Tensor]]:
        """Fill log pi_old and the old router log-scores (theta_old = the weights before any update), the
        old-policy experts when the rollout came without routing records, and log pi_ref for the KL term;
        every pass uses the training micro-batch rows. Returns the mismatch / correction statistics."""
        rl, seq = self.rl, exp.tokens.shape[1] - 1
        rows = micro_batch_rows(self.rl, self.par, self.dp, seq)
        if needs_old_pass(rl, self.rollout_engine):
            replay = rl.routing_replay and rl.routing_replay_source == "rollout" and exp.routing_ids is not None
            step = make_old_policy_step(self.opts, need_scores=True, replay_ids=replay)
            outs = self.engine.forward_only(step, exp.chunks(rows), seq, rows)
            exp.old_logp = torch.cat([o["logp"] for o in outs]) if outs else None  # last pipeline stage only
            exp.old_log_scores = torch.cat(step.log_scores)  # this stage's MoE layers
            if step.ids:  # the experts theta_old used: what router shift measures and replay replays
                exp.routing_ids = input_aligned(torch.cat(step.ids))
        # The R3 paper's figure (engine experts vs the old pass's own top-K) needs the old pass to route
        # freely: under replay its experts are the engine's, so the comparison is left out.
        compare = exp.engine_routing_ids is not None and exp.routing_ids is not None and not rl.routing_replay
        stats = resolve_behaviour(exp, rl, self.rollout_engine, self.state.iteration,
                                  engine_ids=exp.engine_routing_ids[:, :-1] if compare else None,
                                  old_pass_ids=exp.routing_ids[:, :-1] if compare else None)
        if self.ref is not None:
            exp.ref_logp = self.ref.logprobs(exp, rows, self.opts)
        return exp, stats

    def update(self, exp: Experience) -> dict[str, torch.Tensor]:
        rl = self.rl
        acc, load = MetricAccumulator(), None
        gen = torch.Generator().manual_seed(self.run.seed * 7919 + self.state.iteration)  # host: a permutation
        seq = exp.tokens.shape[1] - 1
        rows = micro_batch_rows(self.rl, self.par, self.dp, seq)
        total = rl.ppo_epochs * rl.num_minibatches
        if self.reuse is not None:
            self.reuse.new_rollout(total)
        stop = False
        for _ in range(rl.ppo_epochs):
            if stop:
                break
            for mb in minibatches(exp, rl.num_minibatches, gen):
                micro = mb.chunks(rows)
                units = torch.stack([loss_units(self.opts.algorithm, self.opts.loss, m.response_mask) for m in micro])
                normalizer = all_reduce_dp(units.sum().reshape(1))[0].clamp_min(1.0)  # stays on the device
                step = make_train_step(self.opts, normalizer, self.engine.loss_scale_for(len(micro)))
                with frozen_router(self.engine.module) if rl.freeze_router else contextlib.nullcontext():
                    res = self.engine.train_step(step, micro, seq, rows)
                self._count_skip(res.skipped)
                for m in res.metrics:
                    el = m.pop("expert_load", None)
                    if el is not None:
                        load = el.clone() if load is None else load + el
                    acc.add({f"policy/{k}" if "/" not in k else k: v for k, v in m.items()})
                if not res.skipped:
                    acc.add({"optim/grad_norm": res.grad_norm, "optim/grad_norm_max": res.grad_norm})
                acc.add({"optim/lr": res.lr})
                if self.reuse is not None and self.reuse.should_stop(_reuse_signals(res.metrics)):
                    log.info("iteration %d: %s", self.state.iteration + 1, self.reuse.last_message)
                    stop = True
                    break
        if stop:  # the LR schedule follows rollouts: the steps a reuse stop skips still advance it
            self.engine.scheduler.step(increment=total - self.reuse.steps_run)
        out = router_stat_names(acc.result())
        if self.reuse is not None:
            out.update({k: torch.tensor(float(v)) for k, v in self.reuse.stats().items()})
        out["optim/skipped_steps_max"] = torch.tensor(float(self.state.skipped_steps))
        if load is not None:
            out.update(expert_load_stats(all_reduce_dp(load)))
        return out

    def _count_skip(self, skipped: bool) -> None:
        if not skipped:
            self.consecutive_skips = 0
            return
        self.state.skipped_steps += 1
        self.consecutive_skips += 1
        log.warning("iteration %d: non-finite loss or gradient, optimizer step skipped (%d in a row, %d in this run)",
                    self.state.iteration + 1, self.consecutive_skips, self.state.skipped_steps)
        if self.consecutive_skips >= self.rl.max_consecutive_skipped_steps:
            raise TrainingStopped(
                f"{self.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient "
                f"(--max-consecutive-skipped-steps {self.rl.max_consecutive_skipped_steps}); stopping. The weights "
                "are those of the last finite step: lower --lr, check the data, or resume from a checkpoint.")

    def evaluate(self) -> dict[str, float]:
        with generation_mode(self.engine.module) as group:
            res = evaluate_task(self.engine.module, self.tok, self.task, self.test_set, self.rl.template,
                                self.rl.max_new_tokens, sync_group=group)
        return {f"eval/{k}": v for k, v in res.items()}

    # ------------------------------------------------------------------ the loop
    def train(self, stop: StopSignals | None = None) -> dict[str, float]:
        """The RL loop; SIGTERM/SIGINT stop it at an iteration boundary, with a checkpoint (``stop_signals``;
        ``stop``: handlers installed earlier, e.g. before the set-up)."""
        stop = stop or StopSignals().install()
        try:
            return self._train(stop)
        finally:
            stop.restore()
            self.rollout_engine.shutdown()

    def _train(self, stop: StopSignals) -> dict[str, float]:
        rl, run, started = self.rl, self.run, time.time()
        progress = Progress(rl.train_iters, f"rl[{rl.rl_algorithm}]", enabled=run.progress,
                            initial=self.state.iteration)
        last: dict[str, float] = {}
        if self.state.iteration == 0 and run.eval_interval:
            last = mean_over_dp(self.evaluate())
            self.metrics.log(0, last, console=True)
        while self.state.iteration < rl.train_iters:
            t0 = time.time()
            self.handoff.to_rollout()
            exp, roll_stats = self.queue.get(self.state.iteration)
            if self.state.iteration - exp.weight_version > self.queue.staleness:
                raise RuntimeError(f"rollout of weight version {exp.weight_version} at iteration "
                                   f"{self.state.iteration}: older than --max-staleness {self.queue.staleness}")
            t1 = time.time()
            rollout_memory = phase_memory("rollout", self.device)
            self.handoff.to_train()
            exp, behaviour_stats = self.old_policy_pass(exp)
            t_old = time.time()
            train_stats = self.update(exp)
            t2 = time.time()
            wait0 = self.queue.wait_seconds
            self.queue.wait()  # the generation started at this version must finish before the weights move
            train_memory = phase_memory("train", self.device)
            self.handoff.to_rollout()
            self.state.iteration += 1
            sync_s = self.rollout_engine.sync_weights(self.engine.module, self.state.iteration)
            it = self.state.iteration
            stats = _iteration_stats({**roll_stats, **behaviour_stats, **train_stats, **rollout_memory,
                                      **train_memory})
            stats.update({"time/rollout_s": t1 - t0, "time/old_pass_s": t_old - t1, "time/train_s": t2 - t_old,
                          "time/weight_sync_s": sync_s, "time/rollout_wait_s": self.queue.wait_seconds - wait0,
                          "time/iteration_s": time.time() - t0})
            warn = self._collapse_check(stats)
            stats["collapse/warning"] = float(warn)
            if run.eval_interval and (it % run.eval_interval == 0 or it == rl.train_iters):
                stats.update(mean_over_dp(self.evaluate()))
            self.metrics.log(it, stats, console=it % run.log_interval == 0 or it == rl.train_iters)
            progress.update(1, reward=stats["reward/mean"])
            last = stats
            self.state.data_position = self.queue.resume_position(self.stream.position)
            signum = stop.agreed()
            if run.save and (signum or (run.save_interval and it % run.save_interval == 0) or it == rl.train_iters):
                self.handoff.trainer_back()  # the optimizer's state is saved from where it trains
                self.save()
            if signum:
                progress.close()
                self.metrics.close()
                where = f"checkpoint saved to {run.save}" if run.save else "nothing saved (no --save)"
                raise StopRequested(f"stopped by {StopSignals.name(signum)} after iteration {it}; {where}", signum)
        progress.close()
        self.metrics.close()
        log.info("%s", run_summary(last, self.state.iteration, time.time() - started, run.save))
        return last

    def _collapse_check(self, stats: dict[str, float]) -> bool:
        fired = [k for k in ("policy/clip_frac", "policy/is_ratio_std") if k in stats
                 and self.collapse.update(k, stats[k])]
        if fired:
            log.warning("collapse warning at iteration %d: %s burst above its rolling baseline (%s)",
                        self.state.iteration, ", ".join(fired), ", ".join(f"{k}={stats[k]:.4g}" for k in fired))
        return bool(fired)

    def save(self) -> None:
        extra = {"iteration": self.state.iteration, "data_position": self.state.data_position,
                 "collapse": self.collapse.state_dict(), "skipped_steps": self.state.skipped_steps,
                 "reuse": self.reuse.state_dict() if self.reuse is not None else None}
        # The off-policy schedule's rollouts generated ahead (with older weights) travel with the checkpoint.
        pending = pending_state(self.queue, self.stream.position) if self.rl.async_rollout else None
        path = checkpoint.save_checkpoint(self.run.save, self.state.iteration, self.engine.module,
                                          self.engine.optimizer, self.engine.scheduler, extra_state=extra,
                                          rank_state=pending, configs=(self.model_cfg, self.par, self.opt, self.run,
                                                                       self.rl), keep_last=self.run.keep_last)
        log.info("checkpoint saved: %s", path)


def _reuse_signals(metrics: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """One optimizer step's signals for the adaptive-reuse controller, averaged over its micro-batches and
    the DP ranks, so that every rank decides alike (one small collective and one host sync per step)."""
    names = {"router/shift_mean": "router_shift/mean", "policy/is_ratio_std": "is_ratio_std"}
    local = {}
    for out, key in names.items():
        values = [m[key] for m in metrics if key in m]
        if values:
            local[out] = torch.stack([v.float().reshape(()) for v in values]).mean()
    return reduce_over_dp(local)


def _iteration_stats(local: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """One reduction over DP ranks (extremes as extremes, counts as sums, the rest as means) and one host
    sync; the reward std is that of the whole batch, pooled from every rank's sums."""
    out = reduce_over_dp(local, {k: reduction_of(k) for k in local})
    mean, std = pooled_mean_std(out.pop("reward/_sum"), out.pop("reward/_sq_sum"), out.pop("reward/_count"))
    out["reward/mean"], out["reward/std"] = float(mean), float(std)
    out["optim/skipped_steps"] = out.pop("optim/skipped_steps_max", 0.0)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    for cls in CONFIG_CLASSES:
        add_dataclass_args(parser, cls)
    return parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    ns = parse_with_config(build_parser(), argv)
    model_cfg, par, opt, run, rl = (from_args(c, ns) for c in CONFIG_CLASSES)
    # Every problem of the command line at once, before any process group or model exists.
    policy = effective_model_config(model_cfg, rl)
    validate_rl_run(policy, par, opt, run, rl, int(os.environ.get("WORLD_SIZE", 1)),
                    extra=init_from_conflicts(model_cfg, policy, given_flags(build_parser(), argv) | ns.config_flags)
                    if policy is not model_cfg else ())
    setup_console_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stop = StopSignals().install()  # a signal during the set-up stops the run after its first iteration
    try:
        return RLTrainer(model_cfg, par, opt, run, rl).train(stop)
    finally:
        stop.restore()


def cli() -> None:
    """The ``rspo-rl`` console script and ``python -m megatron_rspo.rl.trainer``."""
    run_cli(main, after=shutdown_distributed)


if __name__ == "__main__":
    cli()

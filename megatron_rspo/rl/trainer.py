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
from collections import defaultdict
from dataclasses import dataclass, replace

import torch
from megatron.core import parallel_state

from megatron_rspo import checkpoint
from megatron_rspo.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    add_dataclass_args,
    from_args,
)
from megatron_rspo.data import ShuffledStream
from megatron_rspo.engine import Engine
from megatron_rspo.evaluation import decode_responses, evaluate_task
from megatron_rspo.logging import MetricsLogger, Progress, log, setup_console_logging
from megatron_rspo.model.logprobs import forward_logits, token_logprobs
from megatron_rspo.model.provider import build_model, init_distributed, num_moe_layers, shutdown_distributed
from megatron_rspo.model.routing import frozen_router
from megatron_rspo.rl.advantages import group_relative_advantages
from megatron_rspo.rl.config import RLConfig
from megatron_rspo.rl.experience import Experience, minibatches
from megatron_rspo.rl.losses import PolicyLossConfig
from megatron_rspo.rl.metrics import CollapseDetector, expert_load_stats
from megatron_rspo.rl.parallel import (
    RoutingLayout,
    agreed_forward_length,
    all_reduce_dp,
    generation_mode,
    mean_over_dp,
    pad_sequence,
)
from megatron_rspo.rl.router_shift import RouterShiftConfig
from megatron_rspo.rl.step import StepOptions, loss_units, make_old_policy_step, make_train_step
from megatron_rspo.rollout.generate import SamplingParams, generate
from megatron_rspo.tasks.registry import get_task
from megatron_rspo.tokenizer import load_tokenizer

CONFIG_CLASSES = (ModelConfig, ParallelConfig, OptimConfig, RunConfig, RLConfig)


@dataclass
class RLState:
    """Everything besides model/optimizer/scheduler that an exact resume needs."""

    iteration: int = 0
    data_position: int = 0
    collapse: dict | None = None


class RLTrainer:
    def __init__(self, model_cfg: ModelConfig, par: ParallelConfig, opt: OptimConfig, run: RunConfig,
                 rl: RLConfig) -> None:
        self.model_cfg, self.par, self.opt, self.run, self.rl = model_cfg, par, opt, run, rl
        if not run.tokenizer_model:
            raise SystemExit("--tokenizer-model is required")
        self.tok = load_tokenizer(run.tokenizer_model)
        if rl.init_from:  # the policy's architecture is the initial checkpoint's, not the CLI defaults
            saved = checkpoint.read_run_config(checkpoint.resolve_checkpoint_dir(rl.init_from))["ModelConfig"]
            # ... except how it runs: the token dispatcher and the transformer implementation stay the CLI's
            self.model_cfg = model_cfg = replace(ModelConfig(**saved),
                                                 moe_token_dispatcher_type=model_cfg.moe_token_dispatcher_type,
                                                 transformer_impl=model_cfg.transformer_impl)
            log.info("model config taken from %s", rl.init_from)
        model_cfg.vocab_size = model_cfg.vocab_size or self.tok.vocab_size
        self.task = get_task(rl.task)
        self.train_set = self.task.load(rl.train_data)
        self.test_set = self.task.load(rl.test_data)[: rl.eval_samples]
        if par.pipeline_model_parallel_size > 1:
            raise ConfigError("RL rollouts need --pipeline-model-parallel-size 1 (generation has no pipelined "
                              "path); the old-policy pass and the training step support it (docs/parallelism.md)")
        init_distributed(par, seed=run.seed)
        setup_console_logging()  # again: only rank 0 logs at INFO, now that ranks are known
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp = parallel_state.get_data_parallel_world_size()
        rl.validate(self.dp, par.num_microbatches)
        steps = rl.train_iters * rl.ppo_epochs * rl.num_minibatches
        self.engine = Engine(model_cfg, par, opt, train_iters=steps)
        self.layout = RoutingLayout.build(self.engine.module)  # collective: every rank, before any schedule
        self.state = RLState()
        self.collapse = CollapseDetector(window=rl.collapse_window, k=rl.collapse_sigmas)
        self._load()
        self.ref = self._reference_model() if rl.kl_coeff > 0 else None
        self.stream = ShuffledStream(len(self.train_set), run.seed, self.dp_rank, self.dp)
        self.stream.position = self.state.data_position
        self.opts = StepOptions(
            algorithm=rl.rl_algorithm,
            loss=PolicyLossConfig(clip_eps=rl.clip_eps, clip_eps_high=rl.clip_eps_high, loss_agg=rl.loss_agg,
                                  router_shift_placement=rl.router_shift_placement),
            router_shift=RouterShiftConfig(enabled=rl.uses_router_shift, floor=rl.router_shift_floor,
                                           aggregation=rl.router_shift_aggregation,
                                           placement=rl.router_shift_placement),
            routing_replay=rl.routing_replay, temperature=rl.temperature,
            num_moe_layers=num_moe_layers(model_cfg), kl_coeff=rl.kl_coeff, entropy_coeff=rl.entropy_coeff,
            layout=self.layout,
        )
        self.metrics = MetricsLogger(run.tensorboard_dir)

    # ------------------------------------------------------------------ set-up
    def _load(self) -> None:
        """Resume from --load (full state) or start from --init-from (model weights only)."""
        if self.run.load and checkpoint.latest_iteration(self.run.load) is not None:
            extra = checkpoint.load_checkpoint(self.run.load, self.engine.module, self.engine.optimizer,
                                               self.engine.scheduler, model_config=self.model_cfg).extra_state
            self.state = RLState(**{k: extra[k] for k in ("iteration", "data_position", "collapse") if k in extra})
            if self.state.collapse:
                self.collapse.load_state_dict(self.state.collapse)
            log.info("resumed RL from %s at iteration %d", self.run.load, self.state.iteration)
        elif self.rl.init_from:
            checkpoint.load_checkpoint(self.rl.init_from, self.engine.module, load_rng=False,
                                       model_config=self.model_cfg)
            log.info("initialised the policy from %s", self.rl.init_from)

    def _reference_model(self) -> torch.nn.Module:
        ref = build_model(self.model_cfg, self.par)
        ref.load_state_dict(self.engine.module.state_dict())
        ref.eval().requires_grad_(False)
        return ref

    # ------------------------------------------------------------------ one iteration
    def rollout(self) -> tuple[Experience, dict[str, float]]:
        rl = self.rl
        per_rank = rl.rollout_batch_size // self.dp
        insts = [self.train_set[i] for i in self.stream.take(per_rank)]
        prompts = [self.tok.encode(self.task.prompt(x, rl.template, self.tok)) for x in insts]
        rows = [p for p in prompts for _ in range(rl.num_generations)]
        gen = torch.Generator().manual_seed(self.run.seed * 100003 + self.state.iteration * 101 + self.dp_rank)
        # TP ranks of a DP rank draw the same prompts and seed, and see the same gathered logits: same samples.
        with generation_mode(self.engine.module) as group:
            ro = generate(self.engine.module, rows,
                          SamplingParams(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p),
                          eos_id=self.tok.eos_id, pad_id=self.tok.pad_id, record_routing=True, generator=gen,
                          sync_group=group)
        texts = decode_responses(self.tok, ro.tokens, ro.prompt_lens, ro.response_lens)
        group_insts = [x for x in insts for _ in range(rl.num_generations)]
        rewards = torch.tensor([self.task.score(t, x, rl.template)
                                for t, x in zip(texts, group_insts)], dtype=torch.float32)
        adv = group_relative_advantages(rewards, rl.num_generations, normalize_std=rl.normalize_advantage_std)
        exp = Experience(tokens=ro.tokens, response_mask=ro.response_mask, advantages=adv, rewards=rewards,
                         routing_ids=ro.routing_ids)
        if not rl.recompute_old_logprobs:
            exp.old_logp = ro.logprobs
            exp.old_log_scores = ro.routing_log_scores[:, :-1]
        stats = {"reward/mean": rewards.mean(), "reward/std": rewards.std(),
                 "reward/accuracy": (rewards >= self.task.full_score).float().mean(),
                 "response/length_mean": ro.response_lens.float().mean(),
                 "response/eos_frac": ro.finished.float().mean() if ro.finished is not None else 1.0}
        exp = exp.trimmed()
        length = agreed_forward_length(exp.tokens.shape[1] - 1, self.layout.seq_multiple)
        return pad_sequence(exp, length, self.tok.pad_id), {k: float(v) for k, v in stats.items()}

    def old_policy_pass(self, exp: Experience) -> Experience:
        """Fill log pi_old and the old router log-scores (theta_old = the weights before any update)."""
        mbs = exp.split(self.par.num_microbatches)
        seq = exp.tokens.shape[1] - 1
        if self.rl.recompute_old_logprobs:
            step = make_old_policy_step(self.opts, need_scores=True)
            outs = self.engine.forward_only(step, mbs, seq, len(mbs[0]))
            exp.old_logp = torch.cat([o["logp"] for o in outs]) if outs else None  # last pipeline stage only
            exp.old_log_scores = torch.cat(step.log_scores)  # this stage's MoE layers
        if self.ref is not None:
            with torch.no_grad():
                exp.ref_logp = token_logprobs(forward_logits(self.ref, exp.tokens[:, :-1]) / self.rl.temperature,
                                              exp.tokens[:, 1:])
        return exp

    def update(self, exp: Experience) -> dict[str, float]:
        rl, sums, counts = self.rl, defaultdict(float), defaultdict(int)
        load = None
        gen = torch.Generator().manual_seed(self.run.seed * 7919 + self.state.iteration)
        for _ in range(rl.ppo_epochs):
            for mb in minibatches(exp, rl.num_minibatches, gen):
                micro = mb.split(self.par.num_microbatches)
                units = torch.tensor(sum(loss_units(self.opts.algorithm, self.opts.loss, m.response_mask)
                                         for m in micro))
                normalizer = max(float(all_reduce_dp(units)), 1.0)
                step = make_train_step(self.opts, normalizer, self.engine.loss_scale)
                with frozen_router(self.engine.module) if rl.freeze_router else contextlib.nullcontext():
                    res = self.engine.train_step(step, micro, mb.tokens.shape[1] - 1, len(micro[0]))
                for m in res.metrics:
                    el = m.pop("expert_load", None)
                    if el is not None:
                        load = el.clone() if load is None else load + el
                    for k, v in m.items():
                        sums[f"policy/{k}" if "/" not in k else k] += float(v)
                        counts[f"policy/{k}" if "/" not in k else k] += 1
                sums["optim/grad_norm"] += res.grad_norm
                counts["optim/grad_norm"] += 1
                sums["optim/lr"], counts["optim/lr"] = res.lr, 1
        out = {k: sums[k] / counts[k] for k in sums}
        out = _rename_router_stats(out)
        if load is not None:
            out.update({k: float(v) for k, v in expert_load_stats(all_reduce_dp(load)).items()})
        return out

    def evaluate(self) -> dict[str, float]:
        with generation_mode(self.engine.module) as group:
            res = evaluate_task(self.engine.module, self.tok, self.task, self.test_set, self.rl.template,
                                self.rl.max_new_tokens, sync_group=group)
        return {f"eval/{k}": v for k, v in res.items()}

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        rl, run = self.rl, self.run
        progress = Progress(rl.train_iters, f"rl[{rl.rl_algorithm}]", enabled=run.progress,
                            initial=self.state.iteration)
        last: dict[str, float] = {}
        if self.state.iteration == 0 and run.eval_interval:
            last = mean_over_dp(self.evaluate())
            self.metrics.log(0, last, console=True)
        while self.state.iteration < rl.train_iters:
            t0 = time.time()
            exp, roll_stats = self.rollout()
            t1 = time.time()
            exp = self.old_policy_pass(exp)
            train_stats = self.update(exp)
            t2 = time.time()
            self.state.iteration += 1
            it = self.state.iteration
            stats = mean_over_dp({**roll_stats, **train_stats})
            stats.update({"time/rollout_s": t1 - t0, "time/train_s": t2 - t1, "time/iteration_s": t2 - t0})
            warn = self._collapse_check(stats)
            stats["collapse/warning"] = float(warn)
            if run.eval_interval and (it % run.eval_interval == 0 or it == rl.train_iters):
                stats.update(mean_over_dp(self.evaluate()))
            self.metrics.log(it, stats, console=it % run.log_interval == 0 or it == rl.train_iters)
            progress.update(1, reward=stats["reward/mean"])
            last = stats
            self.state.data_position = self.stream.position
            if run.save and ((run.save_interval and it % run.save_interval == 0) or it == rl.train_iters):
                self.save()
        progress.close()
        self.metrics.close()
        return last

    def _collapse_check(self, stats: dict[str, float]) -> bool:
        fired = [k for k in ("policy/clip_frac", "policy/is_ratio_std") if k in stats
                 and self.collapse.update(k, stats[k])]
        if fired:
            log.warning("collapse warning at iteration %d: %s burst above its rolling baseline (%s)",
                        self.state.iteration, ", ".join(fired), ", ".join(f"{k}={stats[k]:.4g}" for k in fired))
        return bool(fired)

    def save(self) -> None:
        extra = {"iteration": self.state.iteration, "data_position": self.stream.position,
                 "collapse": self.collapse.state_dict()}
        checkpoint.save_checkpoint(self.run.save, self.state.iteration, self.engine.module, self.engine.optimizer,
                                   self.engine.scheduler, extra_state=extra,
                                   configs=(self.model_cfg, self.par, self.opt, self.run, self.rl),
                                   keep_last=self.run.keep_last)


def _rename_router_stats(stats: dict[str, float]) -> dict[str, float]:
    """Loss/step stats come back as ``policy/<name>``; router diagnostics live under ``router/``."""
    out = {}
    for k, v in stats.items():
        name = k.split("/", 1)[1] if k.startswith("policy/") else k
        if name.startswith("gamma_") or name == "expert_set_change_rate":
            out[f"router/{name}"] = v
        elif k.startswith("router_shift/"):
            out[f"router/shift_{k.split('/', 1)[1]}"] = v
        else:
            out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in CONFIG_CLASSES:
        add_dataclass_args(parser, cls)
    return parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    ns = build_parser().parse_args(argv)
    cfgs = [from_args(c, ns) for c in CONFIG_CLASSES]
    setup_console_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return RLTrainer(*cfgs).train()


if __name__ == "__main__":
    main()
    shutdown_distributed()

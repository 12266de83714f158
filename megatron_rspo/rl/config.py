"""RL flags (Megatron style: ``--rl-algorithm``, ``--num-generations``, ``--ppo-epochs``, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_rspo.config import ConfigError


@dataclass
class RLConfig:
    rl_algorithm: Literal["grpo", "gspo", "gmpo", "rspo"] = "rspo"
    init_from: Optional[str] = None  # checkpoint to take the initial policy weights from (e.g. the SFT run)
    # Task and data
    task: Literal["countdown", "math", "code"] = "countdown"  # tasks/registry.py
    train_data: str = "data/countdown/train.jsonl"
    test_data: str = "data/countdown/test.jsonl"
    template: str = "tiny"  # "tiny" (the demo's Countdown prompt) or "chat" (wrapped in the tokenizer's chat template)
    # Rollout
    rollout_batch_size: int = 16  # prompts per iteration (all DP ranks together)
    num_generations: int = 8  # G samples per prompt
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    # Updates (off-policy reuse: ppo_epochs x num_minibatches optimizer steps per rollout)
    train_iters: int = 50  # RL iterations (rollouts)
    ppo_epochs: int = 1
    num_minibatches: int = 4
    recompute_old_logprobs: bool = True  # False: reuse the rollout's log-probs / router scores
    # Policy loss
    clip_eps: Optional[float] = None  # None: the algorithm's default (grpo 0.2, gspo 3e-4, gmpo/rspo 0.4)
    clip_eps_high: Optional[float] = None  # DAPO clip-higher
    loss_agg: Literal["token_mean", "seq_mean_token_mean"] = "token_mean"  # grpo only
    normalize_advantage_std: bool = True
    kl_coeff: float = 0.0  # KL to the initial (reference) policy, k3 estimator
    entropy_coeff: float = 0.0
    # Router shift (RS): on for rspo; a plug-in for the others
    router_shift: bool = False
    router_shift_floor: float = 0.8
    router_shift_aggregation: Literal["mean", "sum"] = "mean"
    router_shift_placement: Literal["pre_clip", "post_clip"] = "pre_clip"
    # Baseline modes
    routing_replay: bool = False  # training forwards reuse the rollout's expert ids (R3-style)
    freeze_router: bool = False
    # Evaluation / diagnostics
    eval_samples: int = 200
    collapse_window: int = 20
    collapse_sigmas: float = 4.0

    @property
    def uses_router_shift(self) -> bool:
        return self.router_shift or self.rl_algorithm == "rspo"

    def validate(self, dp_size: int, num_microbatches: int) -> None:
        errors = []
        if self.num_generations < 2:
            errors.append("--num-generations must be >= 2 (group-relative advantages)")
        if self.rollout_batch_size % dp_size:
            errors.append(f"--rollout-batch-size ({self.rollout_batch_size}) is not divisible by the "
                          f"data-parallel size ({dp_size})")
        rows = self.rollout_batch_size // max(dp_size, 1) * self.num_generations
        if rows % (self.num_minibatches * num_microbatches):
            errors.append(f"responses per rank ({rows}) are not divisible by --num-minibatches "
                          f"({self.num_minibatches}) x --num-microbatches ({num_microbatches})")
        if not 0.0 <= self.router_shift_floor <= 1.0:
            errors.append("--router-shift-floor must be in [0, 1]")
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            errors.append("--ppo-epochs and --num-minibatches must be >= 1")
        if self.routing_replay and self.freeze_router:
            errors.append("--routing-replay and --freeze-router are separate baselines; pick one")
        if errors:
            raise ConfigError("invalid RL configuration:\n  - " + "\n  - ".join(errors))

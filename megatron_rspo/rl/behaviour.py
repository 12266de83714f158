"""The behaviour policy: which engine sampled the rollout, with which log-probs, and what the trainer does
about the difference from its own old-policy pass (DESIGN §7). Glue between the trainer and
``rollout/engine.py``, ``rl/mismatch.py`` and ``rl/corrections.py``; no math of its own.

- π_rollout: the engine's log-probs of the sampled tokens. With the built-in engine at staleness 0 the
  rollout *is* the training model, so π_rollout := π_old (the old pass's values): every mismatch metric is
  exactly 0 and a correction is the identity. With vLLM (bf16 by default), or a rollout sampled with older
  weights (``--async-rollout``), they are the engine's: the behaviour policy.
- π_old: the old-policy pass (θ_old in Megatron); ``--use-rollout-logprobs`` replaces it by π_rollout.
- The experts e at which RSPO measures router shift (and which ``--routing-replay`` replays): the old
  pass's top-K, or the engine's routed experts under ``--routing-replay-source rollout`` (R3).
- Corrections weigh or drop tokens once per rollout, so the loss normaliser sees the corrected mask.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from megatron_rspo import distributed
from megatron_rspo.config import ModelConfig, ParallelConfig, RunConfig
from megatron_rspo.rl.config import RLConfig, correction_config, rollout_ranks_per_engine, rollout_sleep_level
from megatron_rspo.rl.corrections import get_rollout_correction
from megatron_rspo.rl.experience import Experience
from megatron_rspo.rl.mismatch import mismatch_stats
from megatron_rspo.rollout.engine import MegatronEngine, RolloutEngine
from megatron_rspo.rollout.placement import parse_devices
from megatron_rspo.rollout.sampling import StopIds


def vllm_engine_config(rl: RLConfig, run: RunConfig, par: ParallelConfig, cuda: bool, world: int = 1) -> Any:
    """The vLLM engine's settings from the run's flags (``cuda``: whether the engine runs on CUDA; ``world``:
    the trainer's world size)."""
    from megatron_rspo.rollout.vllm_engine import VLLMEngineConfig

    eager = not cuda if rl.rollout_enforce_eager is None else rl.rollout_enforce_eager
    per_engine = rollout_ranks_per_engine(rl, par, world)
    engine_tp = rl.rollout_tensor_parallel_size or par.tensor_model_parallel_size
    reserved = parse_devices(rl.rollout_devices) if rl.rollout_devices else None
    sleep = rollout_sleep_level(rl, cuda, world)
    return VLLMEngineConfig(dtype=rl.rollout_dtype, kv_cache_gib=rl.vllm_kv_cache_gib,
                            gpu_memory_utilization=rl.vllm_gpu_memory_utilization, bucket_mb=rl.weight_sync_bucket_mb,
                            seed=run.seed, enforce_eager=eager, ranks_per_engine=per_engine,
                            tensor_parallel=engine_tp if cuda else 1,
                            return_routed_experts=rl.routing_replay_source == "rollout",
                            weight_sync=rl.rollout_weight_sync, sleep_level=sleep, reserved_devices=reserved,
                            expert_parallel=rl.rollout_expert_parallel)


def build_rollout_engine(rl: RLConfig, run: RunConfig, par: ParallelConfig, model: torch.nn.Module,
                         model_cfg: ModelConfig, eos_id: StopIds, version: int) -> RolloutEngine:
    """The engine ``--rollout-engine`` names, sampling with ``model``'s current weights as ``version``."""
    if rl.rollout_engine == "vllm":
        from megatron_rspo.rollout.vllm_engine import VLLMEngine

        cfg = vllm_engine_config(rl, run, par, torch.cuda.is_available(), distributed.world_size())
        engine: RolloutEngine = VLLMEngine(model, model_cfg, cfg, eos_id=eos_id)
    else:
        engine = MegatronEngine(model)
    engine.weight_version = version
    return engine


def needs_old_pass(rl: RLConfig, engine: RolloutEngine) -> bool:
    """Whether the old-policy pass runs: for π_old, or for the router records a rollout lacks."""
    if engine.same_numerics_as_trainer:
        return rl.recompute_old_logprobs
    return not rl.use_rollout_logprobs or rl.uses_router_shift or rl.routing_replay


def input_aligned(ids: torch.Tensor) -> torch.Tensor:
    """Per-forward-position records [N, S-1, ...] -> the rollout's input-aligned [N, S, ...] (the last
    input, which predicts nothing, gets 0s: the training forward never reads it)."""
    return F.pad(ids, [0, 0] * (ids.dim() - 2) + [0, 1])


def resolve_behaviour(exp: Experience, rl: RLConfig, engine: RolloutEngine, version: int,
                      engine_ids: Optional[torch.Tensor] = None,
                      old_pass_ids: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """After the old-policy pass: set ``exp.rollout_logp``, apply ``--use-rollout-logprobs`` and the
    correction, and return the ``mismatch/*`` and ``correction/*`` statistics (0-d tensors).
    ``engine_ids``: the engine's routed experts [N, S-1, L, K] when it returns them; ``old_pass_ids``: the
    old pass's top-K for the same positions. ``version``: the proximal policy's (the trainer's current)."""
    if (engine.same_numerics_as_trainer and exp.weight_version == version) or exp.rollout_logp is None:
        exp.rollout_logp = exp.old_logp
    stats: dict[str, Any] = {}
    if exp.old_logp is not None:
        compare = engine_ids is not None and old_pass_ids is not None
        stats.update(mismatch_stats(exp.old_logp, exp.rollout_logp, exp.response_mask,
                                    engine_ids=engine_ids if compare else None,
                                    old_ids=old_pass_ids if compare else None))
    if rl.use_rollout_logprobs or exp.old_logp is None:
        exp.old_logp = exp.rollout_logp
    if rl.rollout_correction != "none":
        fn = get_rollout_correction(rl.rollout_correction)
        weight, mask, cstats = fn(exp.old_logp, exp.rollout_logp, exp.response_mask, correction_config(rl))
        exp.correction_weight, exp.response_mask = weight, mask
        stats.update(cstats)
    return stats

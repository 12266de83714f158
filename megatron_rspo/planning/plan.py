"""Per-GPU memory of an RL run, by category and phase, before anything is allocated: the planner.

Inputs are the run's own configs (model, layout, optimizer, RL flags) plus the GPU's memory; parameter
counts per rank come from Megatron itself (``shares.py``), activations from ``activations.py``. Two phases:

- **train**: parameters, gradients, optimizer state, one micro-batch's activations (times the pipeline's
  micro-batches in flight), the loss's log-prob buffers, the rollout's routing records, the KL reference
  (when resident), per-step temporaries, and the rollout engine's remainder (asleep) or its whole share.
- **rollout**: what the trainer keeps while the engine generates (parameters; gradients and optimizer state
  unless handed over) plus the engine's share of the GPU (vLLM takes ``--vllm-gpu-memory-utilization``).

Bytes are GiB-exact arithmetic on element counts; what is modelled rather than counted (activations,
temporaries, the CUDA context) is said in ``notes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from megatron_rspo.planning.activations import ActivationInputs, LayerShape, activation_bytes, logit_bytes
from megatron_rspo.planning.shares import RankShare

GIB = float(1 << 30)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
FINITE_CHECK_BYTES = 7  # per element of a finiteness-check chunk: isfinite's bool result and temporaries


@dataclass
class PlanInputs:
    share: RankShare
    shape: LayerShape
    layers: int  # layers on the rank's pipeline stage
    world: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    bf16: bool = False
    distributed_optimizer: bool = False
    optimizer_cpu_offload: bool = False
    optimizer_offload_fraction: float = 1.0
    precision_aware: bool = False
    main_grads_dtype: str = "fp32"
    main_params_dtype: str = "fp32"
    exp_avg_dtype: str = "fp32"
    exp_avg_sq_dtype: str = "fp32"
    fused_adam: bool = False  # TE's or apex's fused Adam (no per-step temporaries)
    recompute: Optional[str] = None
    flash_attention: bool = False  # a fused attention kernel (transformer-engine)
    micro_batch_rows: int = 1
    seq_length: int = 1024  # forward length (prompt + response)
    microbatches: int = 1  # per optimizer step (pipeline in flight)
    fused_logprobs: bool = False
    logprob_chunk_tokens: int = 256
    kl_reference: bool = False
    offload_reference: bool = True
    routing_records: bool = True  # RSPO / routing replay: the rollout's experts (+ scores) per token and layer
    moe_layers: int = 0
    rollout_rows: int = 0  # the rank's rollout rows (records are kept for all of them)
    engine: Optional[str] = None  # None (the built-in engine) or "vllm"
    engine_share: float = 0.5  # --vllm-gpu-memory-utilization
    engine_weight_bytes: int = 0  # the engine's weights per GPU (the model in its dtype / the engine's TP)
    sleep_level: int = 0
    colocated: bool = True
    offload_grads_during_rollout: bool = False
    offload_optimizer_during_rollout: bool = False
    cuda_reserve_gib: float = 2.0  # the CUDA context, NCCL's buffers, allocator fragmentation
    imbalance: float = 1.0
    gpu_gib: float = 80.0

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def expert_dp(self) -> int:
        return self.world // (self.ep * self.etp * self.pp)


@dataclass
class MemoryPlan:
    inputs: PlanInputs
    train: dict[str, int] = field(default_factory=dict)
    rollout: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_bytes(self) -> int:
        return int(self.inputs.gpu_gib * GIB)

    def total(self, phase: str) -> int:
        return sum(getattr(self, phase).values())

    def fits(self) -> bool:
        return self.overflow() is None

    def overflow(self) -> Optional[str]:
        """One message for the first phase that does not fit, naming its largest category, or None."""
        i = self.inputs
        share = int(i.engine_share * i.gpu_gib * GIB)
        if i.engine == "vllm" and i.engine_weight_bytes >= share:
            return (f"the rollout engine's share (--vllm-gpu-memory-utilization {i.engine_share}: "
                    f"{share / GIB:.1f} GiB) cannot hold its weights ({i.engine_weight_bytes / GIB:.1f} GiB per GPU) "
                    "and a KV cache")
        for phase in ("train", "rollout"):
            need = self.total(phase)
            if need > self.gpu_bytes:
                cats = getattr(self, phase)
                big = max(cats, key=cats.get)
                return (f"the {phase} phase needs {need / GIB:.1f} GiB per GPU, more than the GPU's "
                        f"{self.inputs.gpu_gib:.1f} GiB; the largest part is {big} ({cats[big] / GIB:.1f} GiB)")
        return None


def _optimizer_bytes(i: PlanInputs) -> int:
    """Adam's state (and fp32 main params under mixed precision) on the device."""
    main = DTYPE_BYTES[i.main_params_dtype] if i.bf16 else 0  # fp32 models step their own weights
    per_param = main + DTYPE_BYTES[i.exp_avg_dtype] + DTYPE_BYTES[i.exp_avg_sq_dtype]
    dense, expert = i.share.dense, i.share.expert
    if i.distributed_optimizer:
        dense, expert = dense / i.dp, expert / i.expert_dp
    on_device = 1.0 - (i.optimizer_offload_fraction if i.optimizer_cpu_offload else 0.0)
    return int((dense + expert) * per_param * on_device)


def estimate(i: PlanInputs) -> MemoryPlan:
    plan = MemoryPlan(i)
    n = i.share.total
    pbytes = 2 if i.bf16 else 4
    params = n * pbytes
    # DDP's grad buffers: fp32, or the params' dtype when not reduced in fp32 (--main-grads-dtype bf16)
    grads = n * (DTYPE_BYTES[i.main_grads_dtype] if i.precision_aware and i.bf16 else 4)
    optim = _optimizer_bytes(i)
    tokens = i.micro_batch_rows * i.seq_length
    saved, rebuilt = activation_bytes(ActivationInputs(i.shape, i.layers, tokens, i.seq_length, pbytes, i.tp, i.pp,
                                                       i.microbatches, i.recompute, i.flash_attention, i.imbalance))
    logits = logit_bytes(tokens, i.share.vocab_rows, i.fused_logprobs, i.logprob_chunk_tokens)
    acts = saved + max(0, rebuilt - logits)  # a rebuilt layer and the loss's buffers are not alive together
    records = 0
    if i.routing_records and i.moe_layers:
        # int16 expert ids + fp32 old router log-scores, [rows, S, moe layers, k], for the rank's whole rollout
        records = i.rollout_rows * i.seq_length * i.moe_layers * i.shape.topk * (2 + 4)
    reference = 0 if (not i.kl_reference or i.offload_reference) else params
    # per step: the finite check's chunk, the optimizer's per-tensor temporaries (a fused Adam has none), and the
    # weight gradient a backward computes before adding it into DDP's buffer
    from megatron_rspo.engine import FINITE_CHECK_CHUNK

    step_temps = max(FINITE_CHECK_BYTES * min(n, FINITE_CHECK_CHUNK),
                     0 if i.fused_adam else 2 * 4 * i.share.largest_tensor)
    backward_temps = 2 * 4 * i.share.largest_tensor
    engine_rest = 0
    if i.engine == "vllm" and i.colocated:
        engine_rest = int(i.engine_share * i.gpu_gib * GIB) if i.sleep_level == 0 else int(0.5 * GIB)
    plan.train = {"parameters": params, "gradients": grads, "optimizer state": optim,
                  "activations": acts, "log-prob buffers": logits, "routing records": records,
                  "reference policy": reference,
                  "temporaries": max(step_temps, backward_temps + acts + logits) - acts - logits,
                  "rollout engine (asleep)" if i.sleep_level else "rollout engine": engine_rest,
                  "CUDA context and reserve": int(i.cuda_reserve_gib * GIB)}
    keep_grads = 0 if i.offload_grads_during_rollout else grads
    keep_optim = 0 if i.offload_optimizer_during_rollout else optim
    engine = int(i.engine_share * i.gpu_gib * GIB) if i.engine == "vllm" and i.colocated else 0
    plan.rollout = {"parameters": params, "gradients": keep_grads, "optimizer state": keep_optim,
                    "routing records": records, "reference policy": reference,
                    "rollout engine (weights + KV cache)": engine,
                    "CUDA context and reserve": int(i.cuda_reserve_gib * GIB)}
    if i.engine == "vllm" and i.engine_weight_bytes:
        kv = int(i.engine_share * i.gpu_gib * GIB) - i.engine_weight_bytes
        plan.notes.append(f"rollout engine per GPU: weights {i.engine_weight_bytes / GIB:.1f} GiB, KV cache and "
                          f"activations {kv / GIB:.1f} GiB of its share")
    if not i.flash_attention:
        plan.notes.append("attention without a fused kernel: probabilities [heads, s, s] are kept per layer")
    if i.bf16 or i.flash_attention:
        plan.notes.append("activation constants were measured with the local spec in fp32 on CPU; bf16/TE "
                          "kernels are modelled, not measured")
    return plan


def largest_micro_batch(i: PlanInputs, limit: int = 4096) -> int:
    """The most rows per micro-batch whose train phase fits (0: not even one)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(replace(i, micro_batch_rows=mid)).total("train") <= int(i.gpu_gib * GIB):
            lo = mid
        else:
            hi = mid - 1
    return lo

"""Every patch of megatron-core, in one place: its CPU/gloo workarounds and its shims for missing packages.

Written against megatron-core 0.16.1. Each patch is a named function with the condition under which it
applies, read from the capability probe (``megatron_rspo.capabilities``): most apply only without CUDA;
two are shims for what a CUDA machine may lack too (transformer-engine's ``te_general_gemm``, a
sequence-parallel torch norm where apex's fused norm is not used). Patches are idempotent and covered
by ``tests/test_compat_cpu.py``. No other module of megatron_rspo patches Megatron or torch.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import types
from collections.abc import Callable
from typing import Optional

import torch

from megatron_rspo.capabilities import Capabilities, probe

log = logging.getLogger(__name__)

_APPLIED: dict[str, bool] = {}


def _without_cuda(caps: Capabilities) -> bool:
    return not caps.cuda


def _always(caps: Capabilities) -> bool:
    return True


def _patch(name: str, when: Callable[[Capabilities], bool] = _without_cuda
           ) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Register a patch function under ``name``, applied where ``when(capabilities)``; applying it twice is a
    no-op."""

    def deco(fn: Callable[[], None]) -> Callable[[], None]:
        def wrapped() -> None:
            if _APPLIED.get(name):
                return
            fn()
            _APPLIED[name] = True

        wrapped.__name__ = fn.__name__
        wrapped.__doc__ = fn.__doc__
        PATCHES[name] = wrapped
        CONDITIONS[name] = when
        return wrapped

    return deco


PATCHES: dict[str, Callable[[], None]] = {}
CONDITIONS: dict[str, Callable[[Capabilities], bool]] = {}


@_patch("cuda_current_device_is_cpu")
def patch_current_device() -> None:
    """megatron-core 0.16.1 allocates buffers with ``device=torch.cuda.current_device()``
    (GlobalMemoryBuffer for attention, tensor_parallel.mappings all-gathers, p2p shape exchange,
    Router.gating moving its weight "to GPU"). Without CUDA, "the current device" is the CPU."""
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


class CpuRNGStatesTracker:
    """Drop-in for megatron's CudaRNGStatesTracker that forks the CPU generator instead.

    Named states (data-parallel, model-parallel, expert-parallel) get their own seeds exactly as
    ``model_parallel_cuda_manual_seed`` computes them, so dropout stays reproducible per TP/EP rank.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator()
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


@_patch("cpu_rng_tracker")
def patch_rng_tracker() -> None:
    """megatron-core 0.16.1 ``tensor_parallel.random`` tracks CUDA generator states
    (``torch.cuda.get_rng_state``/``manual_seed``); use a tracker over the CPU generator, and make
    ``model_parallel_cuda_manual_seed``'s ``torch.cuda.manual_seed`` seed the CPU generator."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker  # used by initialize_rng_tracker
    mrandom.initialize_rng_tracker(force_reset=True)
    torch.cuda.manual_seed = lambda seed: None  # type: ignore[assignment]  # CPU seed is set by caller


@_patch("te_general_gemm_none", when=_always)
def patch_te_general_gemm() -> None:
    """Without transformer-engine (on CPU, and on a CUDA machine without it alike), megatron-core 0.16.1
    ``moe_utils`` never defines ``te_general_gemm`` (l.22-39) yet ``RouterGatingLinearFunction`` reads it
    (l.1192: NameError in every router forward). Define it as None so the plain matmul path runs; a no-op
    where TE defined it."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


_FACTORIES = frozenset({"tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "as_tensor"})


class _CudaLiteralToCpuTorch(types.ModuleType):
    """Stands in for ``torch`` inside a Megatron module: tensor factories called with a literal
    ``device="cuda"`` get ``device="cpu"``; everything else is torch itself."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


# Modules of megatron-core 0.16.1 that create tensors with a literal device="cuda".
_CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.optimizer",  # FP32Optimizer._scale, found_inf, ...
    "megatron.core.optimizer.clip_grads",  # total_norm_cuda, dummy_overflow_buf
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens
    "megatron.core.distributed.param_and_grad_buffer",  # warm-up tensor
    "megatron.core.utils",  # local_multi_tensor_l2_norm (grad norm without apex)
    "megatron.core.transformer.utils",  # get_default_causal_mask (attention_mask=None)
)


@_patch("cuda_device_literals_to_cpu")
def patch_cuda_literals() -> None:
    """megatron-core 0.16.1 hard-codes ``device="cuda"`` in the optimizer, grad clipping, pipeline
    schedules and grad buffers; give those modules a ``torch`` whose factories map it to the CPU."""
    for name in _CUDA_LITERAL_MODULES:
        importlib.import_module(name).torch = _CudaLiteralToCpuTorch()


@_patch("cpu_clip_grad_by_total_norm")
def patch_clip_grad() -> None:
    """megatron-core 0.16.1 ``clip_grad_by_total_norm_fp32`` asserts every grad is a
    ``torch.cuda.FloatTensor``; same scaling (max_norm / (total_norm + 1e-6) when < 1) for CPU grads."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    moptimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


@_patch("cuda_synchronize_noop")
def patch_synchronize() -> None:
    """megatron-core 0.16.1 calls ``torch.cuda.synchronize``/``empty_cache`` in p2p communication,
    DDP and the optimizer; on CPU there is nothing to wait for or free."""
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]


@_patch("sequence_parallel_torch_norm", when=_always)
def patch_torch_norm_sequence_parallel() -> None:
    """megatron-core 0.16.1 ``WrappedTorchNorm`` (the local spec's norm without apex, and its RMSNorm
    with apex too: FusedLayerNorm refuses RMSNorm) asserts ``not config.sequence_parallel``, on CUDA as on
    CPU. A norm acts per token, so it is already correct on a sequence
    slice; what SP needs is that its parameters are marked ``sequence_parallel`` so that
    ``finalize_model_grads`` sums their grads (each TP rank saw a different slice) over the TP group,
    exactly as Megatron's fused and TE norms do."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original = WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original(cls, config, hidden_size, *args, **kwargs)
        unmarked = copy.copy(config)  # a shallow copy only to pass the assert; the model keeps its config
        unmarked.sequence_parallel = False
        norm = original(cls, unmarked, hidden_size, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    WrappedTorchNorm.__new__ = staticmethod(__new__)


@_patch("recompute_without_cuda_rng")
def patch_recompute_rng() -> None:
    """megatron-core 0.16.1 activation recomputation (``tensor_parallel.random.CheckpointFunction``) saves
    and restores the CUDA generator's state through ``_get_cuda_rng_state``/``_set_cuda_rng_state``. On CPU
    there is no CUDA generator: the CPU generator's state (which the tracker forks) is already saved
    and restored by CheckpointFunction itself (``torch.get_rng_state``), so these two become no-ops and
    dropout masks replay exactly in the recomputed forward."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None


class _NoStream:
    """Stands in for the class-level ``torch.cuda.Stream`` of the alltoall dispatcher; never used."""


def _to_numpy(x: object) -> object:
    return x.numpy() if torch.is_tensor(x) else x


@_patch("alltoall_dispatcher_without_streams")
def patch_alltoall_dispatcher() -> None:
    """megatron-core 0.16.1 ``MoEAlltoAllTokenDispatcher`` creates a ``torch.cuda.Stream`` in
    ``__init__`` and copies the all-to-all split sizes device-to-host on it. On CPU there is no copy
    to overlap: skip the stream, and hand the split sizes over as numpy arrays as the CUDA path does."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoStream()

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            self.input_splits = _to_numpy(self.input_splits)
            self.output_splits = _to_numpy(self.output_splits)
            self.output_splits_tp = _to_numpy(self.output_splits_tp)
        return tokens_per_expert

    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _maybe_dtoh_and_synchronize


def cuda_available() -> bool:
    return torch.cuda.is_available()


def patches_for(caps: Capabilities) -> list[str]:
    """The names of the patches this machine needs."""
    return sorted(n for n in PATCHES if CONDITIONS[n](caps))


def apply_compat_patches(caps: Optional[Capabilities] = None, force: bool = False) -> list[str]:
    """Apply the patches ``caps`` (default: this machine's probe) needs, or every patch with ``force``.
    Returns the names applied."""
    names = sorted(PATCHES) if force else patches_for(caps or probe())
    for name in names:
        PATCHES[name]()
    log.debug("megatron-core compat patches applied: %s", names)
    return names

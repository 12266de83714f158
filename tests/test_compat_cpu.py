"""Each patch of megatron_rspo.compat.cpu is applied where its condition holds, idempotent, and does its job."""

from __future__ import annotations

import pytest
import torch

from megatron_rspo.capabilities import Capabilities
from megatron_rspo.compat import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches apply only without CUDA")


def _caps(**kw) -> Capabilities:
    base = dict(cuda=False, transformer_engine=None, apex=False, fused_layer_norm=False, persist_layer_norm=False,
                masked_softmax=False, wgrad_fusion=False, grouped_gemm=False)
    return Capabilities(**{**base, **kw})


def test_every_patch_applied_and_idempotent():
    names = cpu.apply_compat_patches()
    assert names == sorted(cpu.PATCHES)
    assert cpu.apply_compat_patches() == names  # second call changes nothing
    assert all(cpu._APPLIED[n] for n in names)


def test_current_device_is_cpu():
    cpu.apply_compat_patches()
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"


def test_rng_tracker_forks_cpu_generator_reproducibly():
    cpu.apply_compat_patches()
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu.CpuRNGStatesTracker)
    tracker.reset()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advanced
    tracker.reset()
    tracker.add("model-parallel-rng", 123)
    with tracker.fork():
        assert torch.equal(torch.rand(3), a)  # same seed, same numbers
    with pytest.raises(RuntimeError):
        tracker.add("other", 123)  # seeds are unique


def test_te_general_gemm_defined_and_router_linear_runs():
    cpu.apply_compat_patches()
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None
    x, w = torch.randn(5, 8), torch.randn(4, 8)
    torch.testing.assert_close(moe_utils.router_gating_linear(x, w, None, torch.float32), x @ w.T)


def test_cuda_literals_map_to_cpu():
    cpu.apply_compat_patches()
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask[0, 1] and not mask[1, 0]
    from megatron.core.optimizer import clip_grads

    assert clip_grads.torch.zeros(1, device="cuda").device.type == "cpu"
    assert clip_grads.torch.float32 is torch.float32  # everything else is torch itself


def test_clip_grad_by_total_norm_scales_cpu_grads():
    cpu.apply_compat_patches()
    from megatron.core.optimizer import clip_grads

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-6, rtol=0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=10.0, total_norm=1.0)  # no-op when below
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-6, rtol=0)


def test_synchronize_is_noop():
    cpu.apply_compat_patches()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def test_which_patches_a_cuda_machine_gets():
    """With CUDA only the shims for missing packages remain: te_general_gemm where TE is absent (a GPU node
    without TE would otherwise hit NameError in every router forward), the SP-aware torch norm always."""
    shims = ["sequence_parallel_torch_norm", "te_general_gemm_none"]
    assert cpu.patches_for(_caps(cuda=True)) == shims
    assert cpu.patches_for(_caps(cuda=True, transformer_engine="2.8.0", apex=True, fused_layer_norm=True)) == shims
    assert cpu.patches_for(_caps(cuda=False)) == sorted(cpu.PATCHES)


def test_torch_norm_accepts_sequence_parallel_and_marks_params():
    cpu.apply_compat_patches()
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, tensor_model_parallel_size=2,
                            sequence_parallel=True, normalization="RMSNorm")
    norm = WrappedTorchNorm(cfg, 8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and cfg.sequence_parallel  # the model's config is untouched
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    x = torch.randn(4, 8)
    torch.testing.assert_close(norm(x), torch.cat([norm(x[:2]), norm(x[2:])]))  # per token: slices are exact
    cfg.sequence_parallel = False
    plain = WrappedTorchNorm(cfg, 8)
    assert not any(getattr(p, "sequence_parallel", False) for p in plain.parameters())


def test_alltoall_dispatcher_needs_no_cuda_stream_and_gets_numpy_splits():
    cpu.apply_compat_patches()
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    assert isinstance(MoEAlltoAllTokenDispatcher.cuda_dtoh_stream, cpu._NoStream)
    d = object.__new__(MoEAlltoAllTokenDispatcher)  # only the attributes the hook reads
    d.drop_and_pad, d.cuda_dtoh_point = False, "before_permutation_1"
    d.input_splits, d.output_splits, d.output_splits_tp = torch.tensor([1, 2]), torch.tensor([3, 0]), None
    tokens = torch.tensor([4, 5])
    assert d._maybe_dtoh_and_synchronize("before_ep_alltoall", tokens) is tokens  # not the copy point
    assert torch.is_tensor(d.input_splits)
    assert d._maybe_dtoh_and_synchronize("before_permutation_1", tokens) is tokens
    assert d.input_splits.tolist() == [1, 2] and not torch.is_tensor(d.input_splits)  # numpy, as on GPU
    assert d.output_splits.tolist() == [3, 0] and d.output_splits_tp is None


def test_recompute_runs_without_a_cuda_generator():
    """Activation recomputation saves the CUDA RNG state; on CPU that is a no-op and the CPU state, which
    CheckpointFunction saves itself, replays dropout (exact grads: tests/test_perf_flags.py)."""
    from megatron.core.tensor_parallel import random as mrandom

    cpu.apply_compat_patches()
    state = mrandom._get_cuda_rng_state()
    assert torch.is_tensor(state) and state.numel() == 0
    assert mrandom._set_cuda_rng_state(state) is None

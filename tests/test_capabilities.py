"""The capability probe decides spec, fusions, shims and flag checks, on machines that lack pieces.

A CUDA machine is simulated on this CPU machine (``torch.cuda.is_available`` patched, imports of
transformer_engine / apex / grouped_gemm / apex's kernels blocked with ``sys.modules[name] = None``); the
four crashes a GPU run met first (issue 16) each have a test here that failed before the probe existed.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from megatron_rspo import capabilities
from megatron_rspo.capabilities import APEX_SOFTMAX_KERNELS, Capabilities
from megatron_rspo.config import ModelConfig, ParallelConfig

BLOCKABLE = ("transformer_engine", "apex", "grouped_gemm", "fused_layer_norm_cuda", "fast_layer_norm",
             "fused_weight_gradient_mlp_cuda", *APEX_SOFTMAX_KERNELS)


def _caps(**kw) -> Capabilities:
    base = dict(cuda=True, transformer_engine=None, apex=False, fused_layer_norm=False, persist_layer_norm=False,
                masked_softmax=False, wgrad_fusion=False, grouped_gemm=False)
    return Capabilities(**{**base, **kw})


@pytest.fixture
def bare_cuda_machine(monkeypatch):
    """A CUDA machine with none of the optional packages: CUDA says yes, every optional import fails."""
    for name in BLOCKABLE:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capabilities.probe.cache_clear()
    yield capabilities.probe()
    capabilities.probe.cache_clear()


def test_probe_with_every_optional_import_blocked(bare_cuda_machine):
    caps = bare_cuda_machine
    assert caps.cuda and caps.transformer_engine is None and not caps.apex
    assert not (caps.fused_layer_norm or caps.persist_layer_norm or caps.masked_softmax or caps.wgrad_fusion
                or caps.grouped_gemm)
    assert not caps.use_transformer_engine("auto")
    assert caps.fusions() == {"masked_softmax_fusion": False, "persist_layer_norm": False,
                              "gradient_accumulation_fusion": False, "bias_activation_fusion": True,
                              "bias_dropout_fusion": True}


def test_probe_counts_a_package_without_its_cuda_kernels_as_absent(monkeypatch):
    """apex importable, its CUDA extensions not built (a pip install without --cuda_ext): apex is there, its
    fusions are not."""
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    for name in BLOCKABLE[3:]:
        monkeypatch.setitem(sys.modules, name, None)
    capabilities.probe.cache_clear()
    try:
        caps = capabilities.probe()
    finally:
        capabilities.probe.cache_clear()
    assert caps.apex and not caps.fused_layer_norm and not caps.masked_softmax and not caps.wgrad_fusion


def test_bf16_local_spec_without_apex_has_no_masked_softmax_fusion(bare_cuda_machine):
    """Crash 4: bf16 + local spec without apex -> ModuleNotFoundError scaled_masked_softmax_cuda in the first
    attention forward, because masked_softmax_fusion was on whenever a GPU existed."""
    from megatron_rspo.model.provider import transformer_config

    cfg = transformer_config(ModelConfig(vocab_size=64, bf16=True), ParallelConfig(), ddp=True)
    assert cfg.bf16 and not cfg.masked_softmax_fusion and not cfg.gradient_accumulation_fusion
    assert not cfg.persist_layer_norm and cfg.bias_dropout_fusion
    with_apex = transformer_config(ModelConfig(vocab_size=64, bf16=True), ParallelConfig(), ddp=True,
                                   caps=_caps(apex=True, masked_softmax=True, wgrad_fusion=True))
    assert with_apex.masked_softmax_fusion and with_apex.gradient_accumulation_fusion


def test_te_general_gemm_shim_applies_on_cuda_without_te(bare_cuda_machine):
    """Crash 2: no TE on CUDA -> NameError te_general_gemm in every router forward (the shim was CPU-only)."""
    from megatron_rspo.compat import cpu

    assert "te_general_gemm_none" in cpu.patches_for(bare_cuda_machine)
    cpu.apply_compat_patches(bare_cuda_machine)
    from megatron.core.transformer.moe import moe_utils

    x, w = torch.randn(5, 8), torch.randn(4, 8)
    torch.testing.assert_close(moe_utils.router_gating_linear(x, w, None, torch.float32), x @ w.T)


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_final_norm_never_lands_on_fused_layer_norm_with_rmsnorm(monkeypatch, normalization):
    """Crash 3: with apex importable megatron-core picks FusedLayerNorm for the block's final norm whatever
    the normalization; with RMSNorm it asserts. Our spec puts every norm on torch's, except LayerNorm where
    apex's fused kernel imports."""
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.models import backends
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_rspo.model.provider import block_spec, init_distributed, transformer_config

    init_distributed(ParallelConfig())
    monkeypatch.setattr(gpt_layer_specs, "LNImpl", FusedLayerNorm)  # what megatron sets when `import apex` works
    monkeypatch.setattr(backends, "LNImpl", FusedLayerNorm)
    model = ModelConfig(vocab_size=64, normalization=normalization, qk_layernorm=True)
    for caps, fused_ok in ((_caps(apex=True, fused_layer_norm=True), normalization == "LayerNorm"),
                           (_caps(apex=True), False)):  # apex without its kernels: never fused
        spec = block_spec(model, transformer_config(model, ParallelConfig(), caps=caps), caps)
        layer = spec.layer_specs[0].submodules
        norms = [spec.layer_norm, layer.input_layernorm, layer.pre_mlp_layernorm,
                 layer.self_attention.submodules.q_layernorm]
        want = FusedLayerNorm if fused_ok else WrappedTorchNorm
        assert all(n is want for n in norms), (caps, norms)


def test_rmsnorm_model_builds_where_apex_imports(monkeypatch, megatron_single_rank):
    """The model itself builds with megatron's apex choice in place (FusedLayerNorm asserted at build)."""
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.models import backends
    from megatron.core.models.gpt import gpt_layer_specs

    monkeypatch.setattr(gpt_layer_specs, "LNImpl", FusedLayerNorm)
    monkeypatch.setattr(backends, "LNImpl", FusedLayerNorm)
    gpt = megatron_single_rank(ModelConfig(vocab_size=64))
    assert not any(isinstance(m, FusedLayerNorm) for m in gpt.modules())


def test_flags_that_need_a_missing_package_name_it(bare_cuda_machine):
    from megatron_rspo.validation import model_parallel_errors

    errors = model_parallel_errors(ModelConfig(vocab_size=64, moe_grouped_gemm=True, transformer_impl="local"),
                                   ParallelConfig(), cuda=True)
    assert len(errors) == 1 and "grouped_gemm package" in errors[0]
    errors = model_parallel_errors(ModelConfig(vocab_size=64, transformer_impl="transformer_engine"),
                                   ParallelConfig(), cuda=True)
    assert len(errors) == 1 and "transformer-engine package" in errors[0]
    # auto on a machine without TE: the local spec, so grouped GEMM needs grouped_gemm too
    errors = model_parallel_errors(ModelConfig(vocab_size=64, moe_grouped_gemm=True), ParallelConfig(), cuda=True)
    assert len(errors) == 1 and "grouped_gemm" in errors[0]


def test_distributed_timeout_is_validated():
    from megatron_rspo.validation import model_parallel_errors

    errors = model_parallel_errors(ModelConfig(vocab_size=64), ParallelConfig(distributed_timeout_minutes=0))
    assert errors == ["--distributed-timeout-minutes must be >= 1 (got 0)"]

"""What this machine can run, probed once: CUDA, transformer-engine, apex's kernels, grouped_gemm.

One place decides (DESIGN §10): the model provider picks the spec and the fusions from it, the compat
shims apply where their condition holds, validation refuses flags whose package is missing. Never
"CUDA ⇒ everything": a GPU node may have TE without apex (pip installs), apex without TE, or neither
(a bare offline machine). Each kernel counts as present only when it actually imports — a package that
is installed but was built without its CUDA extensions is absent here.

Tests block an import with ``sys.modules[name] = None`` (then ``probe.cache_clear()``), so every
check goes through ``importlib.import_module``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass
from typing import Optional

# apex's CUDA extensions behind Megatron's fusions (built with apex's --cuda_ext).
APEX_SOFTMAX_KERNELS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                        "scaled_softmax_cuda")


def _imports(name: str) -> bool:
    """``import name`` works. Broken CUDA builds raise more than ImportError (OSError: missing .so,
    RuntimeError: driver mismatch); each of them means "not usable here"."""
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001
        return False
    return True


def _version(name: str) -> Optional[str]:
    try:
        return str(getattr(importlib.import_module(name), "__version__", "unknown"))
    except Exception:  # noqa: BLE001
        return None


@dataclass(frozen=True)
class Capabilities:
    """What imports here. The kernel fields say only that a package imports; what runs also needs CUDA
    (``fusions``, ``use_transformer_engine``, ``fused_layer_norm_for`` combine the two)."""

    cuda: bool  # torch sees a CUDA device
    transformer_engine: Optional[str]  # TE's version where ``import transformer_engine.pytorch`` works
    apex: bool  # ``import apex`` works: what megatron-core 0.16.1 checks to pick FusedLayerNorm
    fused_layer_norm: bool  # apex's FusedLayerNormAffineFunction (fused_layer_norm_cuda) imports
    persist_layer_norm: bool  # apex.contrib's FastLayerNormFN (fast_layer_norm) imports
    masked_softmax: bool  # apex's scaled_*masked_softmax_cuda kernels (Megatron's masked_softmax_fusion)
    wgrad_fusion: bool  # apex's fused_weight_gradient_mlp_cuda (Megatron's gradient_accumulation_fusion)
    grouped_gemm: bool  # the grouped_gemm package (Megatron's legacy GroupedMLP without TE)

    def use_transformer_engine(self, impl: str) -> bool:
        """The spec in effect for ``--transformer-impl``: TE for ``transformer_engine``; for ``auto``
        only where TE imports and CUDA exists (TE has no CPU kernels)."""
        if impl == "local":
            return False
        if impl == "transformer_engine":
            return True
        return self.cuda and self.transformer_engine is not None

    def fusions(self) -> dict[str, bool]:
        """Megatron's TransformerConfig fusions this machine can run; each needs CUDA and, where it has
        one, its kernel. The bias+SwiGLU and bias+dropout+add fusions are torch.jit code (no package)."""
        gpu = self.cuda
        return {
            "masked_softmax_fusion": gpu and self.masked_softmax,
            "persist_layer_norm": gpu and self.persist_layer_norm,
            "gradient_accumulation_fusion": gpu and self.wgrad_fusion,
            "bias_activation_fusion": gpu,
            "bias_dropout_fusion": gpu,
        }

    def fused_layer_norm_for(self, normalization: str) -> bool:
        """Whether the local spec may use apex's FusedLayerNorm: LayerNorm only (it asserts on RMSNorm)
        and only where its kernel imports."""
        return self.cuda and normalization == "LayerNorm" and (self.fused_layer_norm or self.persist_layer_norm)

    def summary(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@functools.cache
def probe() -> Capabilities:
    """This process's capabilities (cached; ``probe.cache_clear()`` after changing what imports)."""
    import torch

    cuda = torch.cuda.is_available()
    te = _version("transformer_engine") if _imports("transformer_engine.pytorch") else None
    return Capabilities(
        cuda=cuda,
        transformer_engine=te,
        apex=_imports("apex"),
        fused_layer_norm=_imports("fused_layer_norm_cuda") and _imports("apex.normalization.fused_layer_norm"),
        persist_layer_norm=_imports("fast_layer_norm") and _imports("apex.contrib.layer_norm.layer_norm"),
        masked_softmax=all(_imports(k) for k in APEX_SOFTMAX_KERNELS),
        wgrad_fusion=_imports("fused_weight_gradient_mlp_cuda"),
        grouped_gemm=_imports("grouped_gemm"),
    )

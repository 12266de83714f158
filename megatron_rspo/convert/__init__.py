"""HF <-> Megatron checkpoint conversion for Qwen3-MoE, Qwen2-MoE and Mixtral (see docs/conversion.md)."""

from megatron_rspo.convert.arch import ARCHS, hf_to_model_config, model_config_to_hf
from megatron_rspo.convert.common import ConversionError, UnsupportedModelError
from megatron_rspo.convert.hf_to_megatron import convert_hf_to_megatron
from megatron_rspo.convert.megatron_to_hf import convert_megatron_to_hf

__all__ = [
    "ARCHS", "ConversionError", "UnsupportedModelError", "convert_hf_to_megatron", "convert_megatron_to_hf",
    "hf_to_model_config", "model_config_to_hf",
]

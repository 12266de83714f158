"""A local-spec model whose checkpoint face is megatron-core 0.16.1's transformer-engine spec, for CPU tests.

transformer-engine does not install on CPU, so its spec cannot be built here. What a checkpoint sees of it
is reproduced from megatron-core 0.16.1's own spec code (gpt_layer_specs.py:271-303, the TE spec of an MoE
layer; extensions/transformer_engine.py; moe/experts.py), with stand-in modules that keep TE's names:

- the MoE layer's post-attention norm is a standalone ``TENorm`` (``pre_mlp_layernorm``) and the layer has
  no ``"pre_mlp_layernorm." -> "mlp.linear_fc1.layer_norm_"`` key map (the local spec's map);
- the pre-attention norm is fused into ``linear_qkv`` (``self_attention.linear_qkv.layer_norm_weight``: the
  key the local spec maps its input norm to, so that key is shared);
- every ``TENorm`` (pre-MLP, q/k, final) carries TE's ``_extra_state`` (TE 2.x norms are BasicOperations
  with fp8 extra state); the linear layers' ``_extra_state`` keys exist in both specs (megatron's local
  linears return None for it); TEDotProductAttention adds none (its sharded_state_dict is empty unless
  its softmax is learnable).

``TE_SPEC_KEYS`` lists the checkpoint keys the real TE spec gives a 2-layer all-MoE model with QK norm, read
from those sources; ``test_standin_has_the_te_spec_keys`` holds the stand-in to it. The numerics of the TE
spec are the GPU check's (tests/test_gpu.py), not this file's.
"""

from __future__ import annotations

from dataclasses import replace

import torch

TE_SPEC_KEYS = frozenset({
    "embedding.word_embeddings.weight",
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.self_attention.linear_qkv.weight",
    "decoder.layers.self_attention.linear_qkv._extra_state",
    "decoder.layers.self_attention.linear_proj.weight",
    "decoder.layers.self_attention.linear_proj._extra_state",
    "decoder.layers.self_attention.q_layernorm.weight",
    "decoder.layers.self_attention.q_layernorm._extra_state",
    "decoder.layers.self_attention.k_layernorm.weight",
    "decoder.layers.self_attention.k_layernorm._extra_state",
    "decoder.layers.pre_mlp_layernorm.weight",
    "decoder.layers.pre_mlp_layernorm._extra_state",
    "decoder.layers.mlp.router.weight",
    "decoder.layers.mlp.experts.experts.linear_fc1.weight",
    "decoder.layers.mlp.experts.experts.linear_fc1._extra_state",
    "decoder.layers.mlp.experts.experts.linear_fc2.weight",
    "decoder.layers.mlp.experts.experts.linear_fc2._extra_state",
    "decoder.final_layernorm.weight",
    "decoder.final_layernorm._extra_state",
    "output_layer.weight",
})


class TENormStandIn(torch.nn.Module):
    """TENorm as a checkpoint sees it: ``weight`` (+ ``bias`` for LayerNorm) and TE's ``_extra_state``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        if not self.rms:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        self.extra_state_loaded: object = "never"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if self.rms:
            return torch.nn.functional.rms_norm(x, shape, self.weight, self.eps)
        return torch.nn.functional.layer_norm(x, shape, self.weight, self.bias, self.eps)

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)  # TE 2.x: serialized fp8 metadata, empty without fp8

    def set_extra_state(self, state: object) -> None:
        self.extra_state_loaded = state


def te_keyed_block_spec(block):
    """A local-spec block spec rewritten to the TE spec's checkpoint names (see the module docstring)."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for spec in block.layer_specs:
        sub = spec.submodules
        if getattr(sub.mlp, "module", None) is MoELayer:
            sub.pre_mlp_layernorm = TENormStandIn
            sub.sharded_state_dict_keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
        attn = sub.self_attention.submodules
        if attn.q_layernorm is not IdentityOp:
            attn.q_layernorm = attn.k_layernorm = TENormStandIn
    block.layer_norm = TENormStandIn
    return block


def use_te_keyed_models(monkeypatch) -> None:
    """From now on ``build_model`` (trainer, SFT, conversion alike) builds TE-keyed models."""
    from megatron_rspo.model import provider

    local = provider.block_spec

    def block_spec(model, config, caps=None):
        return te_keyed_block_spec(local(replace(model, transformer_impl="local"), config, caps))

    monkeypatch.setattr(provider, "block_spec", block_spec)


def canonical_weights(model) -> dict[tuple, torch.Tensor]:
    """{(canonical key, global offset): local data} of every ShardedTensor: equal dicts = equal weights."""
    from megatron_rspo.state_keys import model_sharded_state_dict, sharded_tensors

    return {(sh.key, tuple(sh.global_offset)): sh.data.detach().clone()
            for sh in sharded_tensors(model_sharded_state_dict(model))}

"""One checkpoint format across transformer implementations (local spec and transformer-engine spec).

megatron-core 0.16.1 names an MoE layer's post-attention norm differently per spec: the local spec maps
its ``pre_mlp_layernorm`` to ``mlp.linear_fc1.layer_norm_weight`` (``sharded_state_dict_keys_map``,
gpt_layer_specs.py:417), the TE spec keeps it as ``pre_mlp_layernorm.weight`` (TE fuses the norm into
linear_fc1 only in dense layers, whose key is ``mlp.linear_fc1.layer_norm_weight`` in both specs). TE's
norms also carry ``_extra_state`` (fp8 metadata; the local norms have none).

Our canonical spelling is the local one: every checkpoint written so far uses it, ``convert/mapping.py``
names it, and it is the same key for dense and MoE layers. Every path that turns a model into sharded
state (save, load, live export, conversion) goes through ``model_sharded_state_dict``, which writes the
canonical key whichever spec built the model. Reading accepts both: ``resolve_stored_keys`` points each
key at the spelling a checkpoint actually holds (one written by Megatron-LM with the TE spec has the TE
spelling), and ``_extra_state`` objects a checkpoint lacks keep the module's own (TE: no fp8 history).
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensor, ShardedTensorFactory

LAYER_PREFIX = "decoder.layers."
# TE spec spelling (without the layer prefix) -> canonical (local spec) spelling
_TE_TO_CANONICAL = {
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",  # LayerNorm models
}
_CANONICAL_TO_TE = {v: k for k, v in _TE_TO_CANONICAL.items()}
EXTRA_STATE = "_extra_state"


def _swap(key: str, table: dict[str, str]) -> str:
    if key.startswith(LAYER_PREFIX):
        rest = key[len(LAYER_PREFIX):]
        if rest in table:
            return LAYER_PREFIX + table[rest]
    return key


def canonical_key(key: str) -> str:
    """The canonical spelling of a checkpoint key (unchanged unless it is a TE-only alias)."""
    return _swap(key, _TE_TO_CANONICAL)


def key_spellings(key: str) -> tuple[str, ...]:
    """Every spelling a checkpoint may hold ``key`` under, the canonical one first."""
    canon = canonical_key(key)
    other = _swap(canon, _CANONICAL_TO_TE)
    return (canon,) if other == canon else (canon, other)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _entries(tree: Any) -> Iterable[ShardedBase | ShardedTensorFactory]:
    """Every sharded entry of a (nested) sharded state dict, factories unbuilt."""
    if isinstance(tree, (ShardedBase, ShardedTensorFactory)):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _entries(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _entries(v)


def model_sharded_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """``model.sharded_state_dict()`` with every key in its canonical spelling (either spec, any wrapper).
    The optimizer's sharded state is built from it, so its keys follow."""
    sd = unwrap(model).sharded_state_dict()
    for entry in _entries(sd):
        entry.key = canonical_key(entry.key)
    return sd


def resolve_stored_keys(sharded_sd: dict[str, Any], stored: Container[str]) -> list[str]:
    """Point every entry at the spelling ``stored`` (a checkpoint's keys) holds, and drop the ``_extra_state``
    objects it lacks (TE modules then keep their defaults). Returns the keys found under neither spelling."""
    missing = []
    for name in list(sharded_sd):
        entry = sharded_sd[name]
        if not isinstance(entry, (ShardedBase, ShardedTensorFactory)):
            continue
        found = next((k for k in key_spellings(entry.key) if k in stored), None)
        if found is not None:
            entry.key = found
        elif entry.key.endswith(EXTRA_STATE):
            del sharded_sd[name]
        else:
            missing.append(entry.key)
    return missing


def sharded_tensors(tree: Any) -> Iterable[ShardedTensor]:
    """The ShardedTensors of a sharded state dict (factories built; ``_extra_state`` objects skipped)."""
    for entry in _entries(tree):
        if isinstance(entry, ShardedTensorFactory):  # e.g. SwiGLU fc1: the gate/up halves
            yield from sharded_tensors(entry.build())
        elif isinstance(entry, ShardedTensor):
            yield entry

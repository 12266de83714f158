"""HF safetensors checkpoint -> model-only Megatron distributed checkpoint (iteration 0).

Runs on ONE process: the Megatron model is built with TP=EP=PP=1 and saved through
``dist_checkpointing``, whose global tensor layout loads into any TP/EP/PP layout later (resharding at
load time). The target layout flags are only validated and recorded in run_config.json.
HF tensors are read one layer at a time (lazy ``safe_open``), so peak memory is the Megatron model
plus about one layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from megatron_rspo.checkpoint import save_checkpoint
from megatron_rspo.config import ConfigError, ModelConfig, ParallelConfig, validate
from megatron_rspo.convert.arch import HFArch, hf_to_model_config
from megatron_rspo.convert.common import ConversionError, Log, Progress, default_log, peak_rss_mib
from megatron_rspo.convert.hf_layout import HFCheckpointReader
from megatron_rspo.convert.mapping import (
    GLOBAL,
    LAYER_PREFIX,
    hf_global_shapes,
    hf_layer_prefix,
    hf_layer_shapes,
    layer_to_megatron,
)
from megatron_rspo.rng_state import layout


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"no config.json in {hf_dir}")
    with open(path) as fh:
        return json.load(fh)


def validate_target_layout(model: ModelConfig, parallel: ParallelConfig) -> ParallelConfig:
    """Check the layout the checkpoint is meant for (smallest world size that fits it)."""
    tp, ep, pp = (parallel.tensor_model_parallel_size, parallel.expert_model_parallel_size,
                  parallel.pipeline_model_parallel_size)
    parallel = dataclasses.replace(parallel, sequence_parallel=tp > 1)  # MoE + TP needs SP
    dp = ep // math.gcd(ep, tp)  # expert groups are carved from DP*TP ranks
    try:
        validate(model, parallel, world_size=tp * pp * dp)
    except ConfigError as e:
        raise ConversionError(f"target layout TP={tp} EP={ep} PP={pp} does not fit the model: {e}") from e
    if model.vocab_size % tp:
        raise ConversionError(f"vocab_size {model.vocab_size} is not divisible by TP={tp} (pad the vocabulary)")
    return parallel


def check_hf_tensors(reader: HFCheckpointReader, arch: HFArch, model: ModelConfig) -> list[bool]:
    """Every expected tensor present with the right shape, nothing unexpected. Returns per-layer fused flags."""
    expected = hf_global_shapes(model)
    fused = []
    for layer in range(model.num_layers):
        f = f"{hf_layer_prefix(layer)}{arch.moe_prefix}.experts.gate_up_proj" in reader
        fused.append(f)
        expected.update(hf_layer_shapes(arch, model, layer, fused_experts=f))
    have = set(reader.keys())
    missing = [n for n in expected if n not in have]
    unexpected = sorted(have - set(expected))
    bad = [f"{n}: file {reader.shape(n)}, expected {expected[n]}" for n in expected
           if n in have and reader.shape(n) != expected[n]]
    problems = []
    for what, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", bad)):
        if items:
            problems.append(f"{len(items)} {what}: " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
    if problems:
        raise ConversionError(f"{reader.dir} does not match its config.json ({arch.model_type}):\n  "
                              + "\n  ".join(problems))
    return fused


def _targets(gpt: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[int, list[tuple[str, tuple, torch.Tensor]]]]:
    """Megatron global key (and layer/expert index) of every local parameter, from its sharded state dict."""
    glob: dict[str, torch.Tensor] = {}
    layers: dict[int, list[tuple[str, tuple, torch.Tensor]]] = {}
    for entry in gpt.sharded_state_dict().values():
        if isinstance(entry, ShardedObject):
            continue
        if isinstance(entry, ShardedTensorFactory):
            sh, data = entry.build()[0], entry.data
        elif isinstance(entry, ShardedTensor):
            sh, data = entry, entry.data
        else:
            raise ConversionError(f"unexpected sharded state entry {type(entry).__name__}")
        index = tuple(sh.global_offset[: sh.prepend_axis_num])
        if sh.key.startswith(LAYER_PREFIX):
            layers.setdefault(index[0], []).append((sh.key[len(LAYER_PREFIX):], index[1:], data))
        else:
            glob[sh.key] = data
    return glob, layers


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ConversionError(f"{what}: converted shape {tuple(src.shape)} != Megatron {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def convert_hf_to_megatron(hf_dir: str, save_dir: str, parallel: Optional[ParallelConfig] = None,
                           dtype: str = "auto", log: Log = default_log) -> str:
    """Convert ``hf_dir`` into a model-only checkpoint under ``save_dir``; returns the ``iter_*`` path."""
    from megatron_rspo.model.provider import build_model, init_distributed

    hf_cfg = read_hf_config(hf_dir)
    arch, model_cfg = hf_to_model_config(hf_cfg, dtype)
    target = validate_target_layout(model_cfg, parallel or ParallelConfig())
    reader = HFCheckpointReader(hf_dir)
    fused = check_hf_tensors(reader, arch, model_cfg)
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ConversionError("run the conversion on one process; load it with any layout afterwards")
    log(f"[hf->megatron] {arch.model_type}: {model_cfg.num_layers} layers, {model_cfg.num_experts} experts, "
        f"hidden {model_cfg.hidden_size}, {'bf16' if model_cfg.bf16 else 'fp32'}; "
        f"{len(set(reader.weight_map.values()))} shard(s)")

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized() and layout() == (1, 1, 1)):
        init_distributed(ParallelConfig())  # (re-creating groups costs sockets: only when needed)
    build_cfg = dataclasses.replace(model_cfg, transformer_impl="local")  # same checkpoint keys as TE
    gpt = build_model(build_cfg, ParallelConfig(), init_weights=False)
    glob, layers = _targets(gpt)
    progress = Progress("hf->megatron", model_cfg.num_layers + 1, log)
    for key, dst in glob.items():
        if key not in GLOBAL:
            raise ConversionError(f"no HF tensor maps to Megatron {key}")
        _copy(dst, reader.get(GLOBAL[key]), f"{GLOBAL[key]} -> {key}")
    progress.step("embedding, final norm, output layer")
    for layer in range(model_cfg.num_layers):
        tensors = layer_to_megatron(arch, model_cfg, layer, reader.get, fused[layer])
        used = set()
        for key, index, dst in layers[layer]:
            if key not in tensors:
                raise ConversionError(f"no HF tensor maps to Megatron {LAYER_PREFIX}{key} (layer {layer})")
            _copy(dst, tensors[key][index] if index else tensors[key], f"layer {layer} {key}{list(index)}")
            used.add(key)
        if set(tensors) - used:
            raise ConversionError(f"layer {layer}: Megatron model has no place for {sorted(set(tensors) - used)}")
        shards = sorted({reader.shard_of(n) for n in hf_layer_shapes(arch, model_cfg, layer, fused[layer])})
        del tensors
        where = shards[0] if len(shards) == 1 else f"{shards[0]} .. {shards[-1]} ({len(shards)} shards)"
        progress.step(f"layer {layer} from {where}")
    leftover = set(reader.keys()) - reader.consumed
    if leftover:
        raise ConversionError(f"HF tensors not converted: {sorted(leftover)[:8]}")
    reader.close()
    extra = {"hf_config": hf_cfg, "hf_source": os.path.abspath(hf_dir), "converted_from": arch.model_type}
    path = save_checkpoint(save_dir, 0, gpt, extra_state=extra, configs=(model_cfg, target), save_rng=False)
    log(f"[hf->megatron] saved {path} (target layout TP={target.tensor_model_parallel_size} "
        f"EP={target.expert_model_parallel_size} PP={target.pipeline_model_parallel_size}; resharded at load); "
        f"peak RSS {peak_rss_mib():.0f} MiB")
    return path

"""HF safetensors checkpoint -> model-only Megatron distributed checkpoint (iteration 0).

Two modes, same checkpoint (``dist_checkpointing`` stores global tensors, which load into any layout):

* one process: the Megatron model is built with TP=EP=PP=1; the target layout flags are only validated
  and recorded in run_config.json. Peak memory: the whole model plus about one layer.
* sharded (under torchrun, world size = TP x PP x DP): parallel state is initialised with the target
  layout, so each rank builds only its shard (its PP stage, its TP slices, its EP experts), fills it from
  the matching slices of the HF tensors and writes it in a collective save. Peak memory per rank: the
  shard plus about one HF layer.

HF tensors are read one layer at a time (lazy ``safe_open``), routed experts one expert at a time and only
on the ranks that own them. Each local parameter is filled from its ShardedTensor (global key,
layer/expert index, ``global_offset`` and ``local_shape``), so TP slicing (per query group for the fused
QKV, gate and up halves separately for SwiGLU fc1) is exactly Megatron's own checkpoint slicing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from megatron_rspo.checkpoint import save_checkpoint
from megatron_rspo.config import ConfigError, ModelConfig, ParallelConfig
from megatron_rspo.convert.arch import HFArch, hf_to_model_config
from megatron_rspo.convert.common import ConversionError, Log, Progress, default_log, peak_rss_mib
from megatron_rspo.convert.hf_layout import HFCheckpointReader
from megatron_rspo.convert.mapping import (
    EXPERT_KEYS,
    GLOBAL,
    LAYER_PREFIX,
    expert_to_megatron,
    hf_global_shapes,
    hf_layer_prefix,
    hf_layer_shapes,
    layer_to_megatron,
)
from megatron_rspo.rng_state import layout
from megatron_rspo.state_keys import model_sharded_state_dict
from megatron_rspo.validation import validate


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"no config.json in {hf_dir}")
    with open(path) as fh:
        return json.load(fh)


def validate_target_layout(model: ModelConfig, parallel: ParallelConfig,
                           world_size: Optional[int] = None) -> ParallelConfig:
    """Check the layout the checkpoint is meant for: in the world it runs in (sharded mode), or else the
    smallest world size that fits it."""
    tp, ep, pp = (parallel.tensor_model_parallel_size, parallel.expert_model_parallel_size,
                  parallel.pipeline_model_parallel_size)
    parallel = dataclasses.replace(parallel, sequence_parallel=tp > 1)  # MoE + TP needs SP
    if world_size is None:
        world_size = tp * pp * (ep // math.gcd(ep, tp))  # expert groups are carved from DP*TP ranks
    try:
        validate(model, parallel, world_size=world_size)
    except ConfigError as e:
        raise ConversionError(f"target layout TP={tp} EP={ep} PP={pp} (world size {world_size}) does not fit "
                              f"the model: {e}") from e
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


class _Target(NamedTuple):
    """One local parameter (or one half of a SwiGLU fc1) and the part of the global tensor it holds."""

    key: str  # Megatron global key; for layer tensors without the ``decoder.layers.`` prefix
    expert: Optional[int]  # global expert index of a routed expert's weight
    global_shape: tuple[int, ...]  # of the unstacked global tensor (without layer/expert axes)
    slices: tuple[slice, ...]  # this rank's part of it
    data: torch.Tensor  # the local parameter (view)


def _targets(gpt: torch.nn.Module) -> tuple[list[_Target], dict[int, list[_Target]]]:
    """Every local parameter with its global key, layer/expert index and global slice, from the model's
    sharded state dict (factories such as SwiGLU fc1 are built into their sub-tensors, which are views)."""
    glob: list[_Target] = []
    layers: dict[int, list[_Target]] = {}
    for entry in model_sharded_state_dict(gpt).values():
        if isinstance(entry, ShardedObject):
            continue
        if isinstance(entry, ShardedTensorFactory):
            shs = entry.build()
        elif isinstance(entry, ShardedTensor):
            shs = [entry]
        else:
            raise ConversionError(f"unexpected sharded state entry {type(entry).__name__}")
        for sh in shs:
            if not isinstance(sh, ShardedTensor) or sh.flattened_range is not None:
                raise ConversionError(f"unexpected sharded entry for {sh.key}")
            n = sh.prepend_axis_num
            index = tuple(sh.global_offset[:n])
            shape, offset = tuple(sh.global_shape[n:]), tuple(sh.global_offset[n:])
            slices = tuple(slice(o, o + size) for o, size in zip(offset, sh.local_shape))
            if sh.key.startswith(LAYER_PREFIX):
                key = sh.key[len(LAYER_PREFIX):]
                expert = index[1] if key in EXPERT_KEYS else None
                layers.setdefault(index[0], []).append(_Target(key, expert, shape, slices, sh.data))
            else:
                glob.append(_Target(sh.key, None, shape, slices, sh.data))
    return glob, layers


def _assign(t: _Target, src: torch.Tensor, what: str) -> None:
    """Copy this rank's slice of the global tensor ``src`` into the local parameter."""
    if tuple(src.shape) != t.global_shape:
        raise ConversionError(f"{what}: converted shape {tuple(src.shape)} != Megatron global {t.global_shape}")
    part = src[t.slices]
    if tuple(part.shape) != tuple(t.data.shape):
        raise ConversionError(f"{what}: slice {tuple(part.shape)} != local {tuple(t.data.shape)}")
    with torch.no_grad():
        t.data.copy_(part)


def _fill(gpt: torch.nn.Module, arch: HFArch, model_cfg: ModelConfig, reader: HFCheckpointReader,
          fused: list[bool], log: Log) -> None:
    """Fill every local parameter from the HF files, one layer (and one routed expert) at a time."""
    glob, layers = _targets(gpt)
    progress = Progress("hf->megatron", len(layers) + 1, log)
    for t in glob:
        if t.key not in GLOBAL:
            raise ConversionError(f"no HF tensor maps to Megatron {t.key}")
        _assign(t, reader.get(GLOBAL[t.key]), f"{GLOBAL[t.key]} -> {t.key}")
    progress.step("embedding, final norm, output layer" if glob else "(no embedding / output on this stage)")
    for layer in sorted(layers):
        get = reader.get
        if fused[layer]:  # [E, ...] tensors: read once per layer, not once per expert
            memo: dict[str, torch.Tensor] = {}

            def get(name: str, _memo=memo) -> torch.Tensor:  # noqa: E306
                if name not in _memo:
                    _memo[name] = reader.get(name)
                return _memo[name]
        tensors = layer_to_megatron(arch, model_cfg, layer, get, fused[layer], with_experts=False)
        experts: dict[int, dict[str, torch.Tensor]] = {}
        used = set()
        for t in layers[layer]:
            what = f"layer {layer} {t.key}" + ("" if t.expert is None else f"[{t.expert}]")
            if t.expert is not None:
                if t.expert not in experts:
                    experts[t.expert] = expert_to_megatron(arch, layer, t.expert, get, fused[layer])
                src = experts[t.expert][t.key]
            elif t.key in tensors:
                src = tensors[t.key]
            else:
                raise ConversionError(f"no HF tensor maps to Megatron {LAYER_PREFIX}{t.key} (layer {layer})")
            _assign(t, src, what)
            used.add(t.key)
        if set(tensors) - used:
            raise ConversionError(f"layer {layer}: Megatron model has no place for {sorted(set(tensors) - used)}")
        shards = sorted({reader.shard_of(n) for n in hf_layer_shapes(arch, model_cfg, layer, fused[layer])})
        del tensors, experts, get
        where = shards[0] if len(shards) == 1 else f"{shards[0]} .. {shards[-1]} ({len(shards)} shards)"
        n_exp = len({t.expert for t in layers[layer] if t.expert is not None})
        progress.step(f"layer {layer} from {where}"
                      + ("" if n_exp == model_cfg.num_experts else f" ({n_exp} local experts)"))


def _world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def convert_hf_to_megatron(hf_dir: str, save_dir: str, parallel: Optional[ParallelConfig] = None,
                           dtype: str = "auto", log: Log = default_log) -> str:
    """Convert ``hf_dir`` into a model-only checkpoint under ``save_dir``; returns the ``iter_*`` path.

    On one process the model is built whole (TP=EP=PP=1). In a world of several processes (torchrun)
    ``parallel`` must be the real layout (world size = TP x PP x DP): each rank converts only its shard.
    All ranks must call this (the save is collective)."""
    from megatron_rspo.model.provider import build_model, init_distributed

    world = _world_size()
    sharded = world > 1
    hf_cfg = read_hf_config(hf_dir)
    arch, model_cfg = hf_to_model_config(hf_cfg, dtype)
    target = validate_target_layout(model_cfg, parallel or ParallelConfig(), world if sharded else None)
    reader = HFCheckpointReader(hf_dir)
    fused = check_hf_tensors(reader, arch, model_cfg)
    if sharded:
        init_distributed(target)
        rank = dist.get_rank()
        rank_log = log if rank == 0 else (lambda *_: None)
    else:
        rank, rank_log = 0, log
        if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()
                and layout() == (1, 1, 1)):
            init_distributed(ParallelConfig())  # (re-creating groups costs sockets: only when needed)
    tp, ep, pp = (target.tensor_model_parallel_size, target.expert_model_parallel_size,
                  target.pipeline_model_parallel_size)
    rank_log(f"[hf->megatron] {arch.model_type}: {model_cfg.num_layers} layers, {model_cfg.num_experts} experts, "
             f"hidden {model_cfg.hidden_size}, {'bf16' if model_cfg.bf16 else 'fp32'}; "
             f"{len(set(reader.weight_map.values()))} shard(s); "
             + (f"sharded over {world} ranks (TP={tp} EP={ep} PP={pp} DP={world // (tp * pp)})" if sharded
                else "one process"))

    # The local spec runs anywhere (no GPU needed to convert); its checkpoint loads into a TE-spec model too
    # (one canonical key set, state_keys.py).
    build_cfg = dataclasses.replace(model_cfg, transformer_impl="local")
    gpt = build_model(build_cfg, target if sharded else ParallelConfig(), init_weights=False)
    error: Optional[str] = None
    try:
        _fill(gpt, arch, model_cfg, reader, fused, rank_log)
    except ConversionError as e:
        if not sharded:
            raise
        error = f"rank {rank}: {e}"
    consumed = reader.consumed
    if sharded:  # no rank may go on to the collective save alone; every HF tensor used by some rank
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (error, sorted(consumed)))
        errors = [e for e, _ in gathered if e]
        if errors:
            raise ConversionError("\n".join(errors))
        consumed = set().union(*(set(c) for _, c in gathered))
    leftover = set(reader.keys()) - consumed
    if leftover:
        raise ConversionError(f"HF tensors not converted: {sorted(leftover)[:8]}")
    reader.close()
    extra = {"hf_config": hf_cfg, "hf_source": os.path.abspath(hf_dir), "converted_from": arch.model_type}
    path = save_checkpoint(save_dir, 0, gpt, extra_state=extra, configs=(model_cfg, target), save_rng=False)
    peaks = [peak_rss_mib()]
    if sharded:
        peaks = [None] * world
        dist.all_gather_object(peaks, peak_rss_mib())
        rank_log(f"[hf->megatron] saved {path} from {world} ranks (TP={tp} EP={ep} PP={pp}); peak RSS per rank "
                 + ", ".join(f"{p:.0f}" for p in peaks) + " MiB")
    else:
        rank_log(f"[hf->megatron] saved {path} (target layout TP={tp} EP={ep} PP={pp}; resharded at load); "
                 f"peak RSS {peaks[0]:.0f} MiB")
    return path

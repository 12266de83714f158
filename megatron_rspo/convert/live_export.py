"""Stream a live (training) Megatron model's weights as HF-named tensors to one process, in bounded buckets.

For weight sync with an inference engine: ``hf_weight_buckets`` yields ``[(hf_name, cpu_tensor), ...]``
on rank ``dst`` in HF's layout, from any TP/EP/PP layout, with the names and transforms of
``mapping.py`` (the same ones the checkpoint converter uses; no second name table).

Scheme: Megatron's own sharding metadata. ``sharded_state_dict()`` (SwiGLU factories applied) describes
every local tensor as a ShardedTensor: its GLOBAL key (``decoder.layers.<layer key>`` stacked over layers,
experts with an expert axis; ``embedding...``, ``decoder.final_layernorm...``, ``output_layer...``), global
shape, offset and replica id. Each element of a global tensor has exactly one main replica (replica id
all zeros) somewhere in the world. The stream runs unit by unit -- the embedding, each layer, then the
final norm and output layer -- and for each unit every rank sends the main replicas it holds to ``dst``
(one ``distributed.gather_object``, a collective over the world, so every rank iterates the generator to
exhaustion, in the same order). ``dst`` copies the pieces into preallocated global tensors, checks that
each element was written, converts the unit with ``layer_to_hf`` and cuts the result into buckets.

Memory on ``dst``: the pieces of one unit as received (gloo stages them once more while receiving; with
NCCL they arrive on the GPU first) plus that unit's assembled tensors -- a small multiple of one layer,
or of the embedding -- plus one bucket; a bucket's tail that outlives its unit is cloned, so it pins no
finished unit. Other ranks hold their share of one unit once more (a send buffer). Device->host copies
are asynchronous, with one host sync per unit and rank. Do not step the optimizer while iterating (with
the distributed optimizer's overlapped param all-gather, the export first gathers the stepped params).
Before any data moves, the metadata of all ranks is all-gathered and checked (keys, shapes against the
HF layout, full coverage) identically everywhere, so a bad layout raises on every rank, not a hang.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from megatron_rspo import distributed
from megatron_rspo.config import ModelConfig
from megatron_rspo.convert.arch import arch_of, infer_model_type, model_config_to_hf
from megatron_rspo.convert.common import ConversionError
from megatron_rspo.convert.mapping import (
    GLOBAL,
    LAYER_PREFIX,
    hf_global_shapes,
    hf_layer_shapes,
    layer_to_hf,
    layer_to_megatron,
    megatron_layer_keys,
)
from megatron_rspo.state_keys import model_sharded_state_dict, sharded_tensors

EMBED, NORM, OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"
Unit = Union[int, str]  # a layer index, "embed" or "final"
Bucket = list[tuple[str, torch.Tensor]]


def hf_config(model_cfg: ModelConfig, model_type: Optional[str] = None,
              dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The HF ``config.json`` of the exported weights (``model_type`` default: ``infer_model_type``)."""
    return model_config_to_hf(model_cfg, model_type or infer_model_type(model_cfg), dtype)


@dataclass(frozen=True)
class _Meta:
    """Where one local main-replica shard lies in its global tensor (``box``: its extent per global axis)."""

    key: str
    unit: Unit
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    box: tuple[int, ...]
    dtype: torch.dtype
    main: bool = True  # the main replica (replica id all zeros); other replicas hold equal data

    @property
    def piece(self) -> tuple[str, tuple[int, ...]]:
        return self.key, self.offset


def _finish_param_sync(model: Any) -> None:
    """With the distributed optimizer's ``overlap_param_gather``, a step leaves the updated params sharded
    until the next forward gathers them: gather them now (synchronously; the forward then skips it)."""
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        cfg = getattr(chunk, "ddp_config", None)
        if cfg is not None and cfg.use_distributed_optimizer and cfg.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def _is_main(replica_id: Union[int, tuple[int, ...]]) -> bool:
    return all(r == 0 for r in (replica_id if isinstance(replica_id, tuple) else (replica_id,)))


def _local_shards(model: Any, replicas: bool = False) -> tuple[list[_Meta], list[torch.Tensor], list[str]]:
    """This rank's main replicas (with ``replicas``: every replica it holds) over all model chunks (metadata,
    data), and the problems seen."""
    metas, data, problems = [], [], []
    for chunk in model if isinstance(model, (list, tuple)) else [model]:  # virtual pipeline: a list of chunks
        for sh in sharded_tensors(model_sharded_state_dict(chunk)):  # canonical keys, either spec
            main = _is_main(sh.replica_id)
            if not (main or replicas):
                continue
            if sh.flattened_range is not None:
                problems.append(f"{sh.key}: a flattened shard (distributed-optimizer layout), not a model weight")
                continue
            box = (1,) * sh.prepend_axis_num + tuple(sh.data.shape)
            if len(box) != len(sh.global_shape):
                problems.append(f"{sh.key}: local shape {tuple(sh.data.shape)} does not fit {sh.global_shape}")
                continue
            layered = sh.key.startswith(LAYER_PREFIX)
            unit: Unit = sh.global_offset[0] if layered else ("embed" if sh.key == EMBED else "final")
            metas.append(_Meta(sh.key, unit, tuple(sh.global_shape), tuple(sh.global_offset), box, sh.data.dtype,
                               main))
            data.append(sh.data.detach())
    return metas, data, problems


def _check(metas: list[_Meta], model_cfg: ModelConfig, arch: Any) -> list[str]:
    """Problems with the world's shards (every rank computes the same list from the same metadata)."""
    problems = []
    layer_keys = [LAYER_PREFIX + k for k in megatron_layer_keys(model_cfg)]
    expected = {*layer_keys, EMBED, NORM} | ({OUTPUT} if model_cfg.untie_embeddings_and_output_weights else set())
    shapes: dict[str, tuple[int, ...]] = {}
    covered: dict[str, int] = {}
    offsets: dict[str, set] = {}
    for m in metas:
        if shapes.setdefault(m.key, m.global_shape) != m.global_shape:
            problems.append(f"{m.key}: global shapes {shapes[m.key]} and {m.global_shape} on different ranks")
        if any(o + b > s for o, b, s in zip(m.offset, m.box, m.global_shape)):
            problems.append(f"{m.key}: shard at {m.offset} of extent {m.box} exceeds {m.global_shape}")
        if m.offset in offsets.setdefault(m.key, set()):
            problems.append(f"{m.key}: two main replicas of the shard at {m.offset}")
        offsets[m.key].add(m.offset)
        covered[m.key] = covered.get(m.key, 0) + math.prod(m.box)
    if unknown := sorted(set(shapes) - expected):
        problems.append(f"model tensors {unknown} have no HF mapping for this model config")
    if missing := sorted(expected - set(shapes)):
        problems.append(f"no rank holds (a main replica of) {missing}")
    for key, shape in shapes.items():
        if covered[key] != math.prod(shape):
            problems.append(f"{key}: the main replicas cover {covered[key]} of {math.prod(shape)} elements")
    if problems:
        return problems
    # the shapes this config gives the Megatron tensors: HF's shapes mapped through layer_to_megatron (meta device)
    hf_shapes = hf_layer_shapes(arch, model_cfg, 0)
    layer = layer_to_megatron(arch, model_cfg, 0, lambda n: torch.empty(hf_shapes[n], device="meta"))
    want = {LAYER_PREFIX + k: (model_cfg.num_layers, *t.shape) for k, t in layer.items()}
    hf_glob = hf_global_shapes(model_cfg)
    want.update({k: hf_glob[GLOBAL[k]] for k in GLOBAL if GLOBAL[k] in hf_glob})
    return [f"{k}: model {shapes.get(k)}, the config gives {tuple(s)}" for k, s in want.items()
            if shapes.get(k) != tuple(s)]


class _Buckets:
    """Cuts a stream of (name, tensor) into lists of at most ``limit`` bytes (a bigger tensor alone)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.items, self.nbytes = limit, [], 0

    def add(self, name: str, t: torch.Tensor) -> Optional[Bucket]:
        size, full = t.numel() * t.element_size(), None
        if self.items and self.nbytes + size > self.limit:
            full, self.items, self.nbytes = self.items, [], 0
        self.items.append((name, t))
        self.nbytes += size
        return full

    def detach(self) -> None:
        """Clone the pending views, so the unit's buffers they point into can be freed."""
        self.items = [(n, t.clone() if t._base is not None else t) for n, t in self.items]

    def flush(self) -> Optional[Bucket]:
        full, self.items, self.nbytes = self.items or None, [], 0
        return full


def _assemble(parts: list[list[tuple[int, torch.Tensor]]], metas: list[list[_Meta]], dtype: torch.dtype,
              device: Optional[torch.device] = None, whole_as_view: bool = False) -> dict[str, torch.Tensor]:
    """The unit's global tensors (layer axis dropped) from every rank's pieces, on ``device`` (default: the
    host); checks full coverage. ``whole_as_view``: a piece that is the whole tensor, already on ``device``,
    is returned as a view of itself in its own dtype (no copy; the caller casts where it copies anyway)."""
    device = device or torch.device("cpu")
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    on_device = False
    for rank_parts, rank_metas in zip(parts, metas):
        while rank_parts:
            i, piece = rank_parts.pop()  # drop each piece once copied
            m = rank_metas[i]
            skip = 1 if isinstance(m.unit, int) else 0  # the layer axis
            shape = m.global_shape[skip:]
            if whole_as_view and m.box[skip:] == shape and piece.device == device:
                out[m.key], filled[m.key] = piece.view(shape), piece.numel()
                continue
            if m.key not in out:
                out[m.key] = torch.empty(shape, dtype=dtype, device=device)
                filled[m.key] = 0
            region = out[m.key]
            for dim, (o, b) in enumerate(zip(m.offset[skip:], m.box[skip:])):
                region = region.narrow(dim, o, b)
            region.copy_(piece.view(m.box[skip:]), non_blocking=True)  # one host sync below, not one per piece
            on_device |= piece.device.type != "cpu" or device.type != "cpu"
            filled[m.key] += piece.numel()
    if on_device:
        torch.cuda.current_stream().synchronize()
    if short := {k: (filled[k], t.numel()) for k, t in out.items() if filled[k] != t.numel()}:
        raise ConversionError(f"incomplete weights (elements written, expected): {short}")
    return out


def _world_shards(model: Any, model_cfg: ModelConfig, model_type: Optional[str], replicas: bool = False
                  ) -> tuple[Any, list[list[_Meta]], list[torch.Tensor]]:
    """(arch, every rank's shard metadata, this rank's data), checked identically on every rank (collective)."""
    arch = arch_of(hf_config(model_cfg, model_type))  # unsupported configs fail here, on every rank
    _finish_param_sync(model)
    metas, data, problems = _local_shards(model, replicas)
    everyone = distributed.all_gather_object((metas, problems))
    rank_metas = [m for m, _ in everyone]
    world = [m for ms in rank_metas for m in ms if m.main]
    problems = [p for _, rank_problems in everyone for p in rank_problems] or _check(world, model_cfg, arch)
    if problems:
        raise ConversionError("cannot export the live model to HF:\n  " + "\n  ".join(problems))
    return arch, rank_metas, data


def _units(model_cfg: ModelConfig) -> list[Unit]:
    return ["embed", *range(model_cfg.num_layers), "final"]


def _unit_to_hf(arch: Any, model_cfg: ModelConfig, unit: Unit, tensors: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    if isinstance(unit, int):
        return layer_to_hf(arch, model_cfg, unit, {k[len(LAYER_PREFIX):]: v for k, v in tensors.items()})
    return {GLOBAL[k]: tensors[k] for k in GLOBAL if k in tensors}  # GLOBAL's order: norm, then lm_head


def hf_weight_buckets(model: Any, model_cfg: ModelConfig, model_type: Optional[str] = None,
                      bucket_bytes: int = 256 << 20, dst: int = 0,
                      dtype: Optional[torch.dtype] = None) -> Iterator[Bucket]:
    """Buckets of ``(hf_name, cpu_tensor)`` on global rank ``dst``: ``model.embed_tokens``, the layers in
    order, ``model.norm``, then ``lm_head`` (untied only). Each bucket holds at most ``bucket_bytes``
    unless one tensor is bigger. Yields nothing on other ranks but runs the same collectives: iterate it
    to exhaustion on every rank. ``model``: this rank's (possibly DDP-wrapped) model or its list of chunks;
    ``dtype`` default: the model's parameter dtype. Each unit's main replicas are gathered to ``dst`` (the
    file stream's path; ``engine_weight_units`` sends each engine only what it lacks, point to point)."""
    if not 0 <= dst < distributed.world_size():
        raise ValueError(f"dst={dst} is not a rank of the world (size {distributed.world_size()})")
    arch, rank_metas, data = _world_shards(model, model_cfg, model_type)
    metas = rank_metas[distributed.rank()]
    out_dtype = dtype or next(m.dtype for ms in rank_metas for m in ms if m.key == EMBED)
    by_unit: dict[Unit, list[int]] = {}
    for i, m in enumerate(metas):
        by_unit.setdefault(m.unit, []).append(i)
    me = distributed.rank()
    buckets = _Buckets(bucket_bytes)
    for unit in _units(model_cfg):
        # (index into this rank's metadata, data in the export dtype: cast on the model's device)
        parts = distributed.gather_object([(i, data[i].to(out_dtype)) for i in by_unit.get(unit, [])], dst)
        if me != dst:
            continue
        tensors = _assemble(parts, rank_metas, out_dtype)
        del parts
        hf = _unit_to_hf(arch, model_cfg, unit, tensors)
        del tensors
        for name, t in hf.items():
            if (full := buckets.add(name, t)) is not None:
                yield full
        del hf
        buckets.detach()
    if me == dst and (last := buckets.flush()) is not None:
        yield last


def _routes(rank_metas: list[list[_Meta]], dsts: list[int], near: dict[int, list[int]]
            ) -> dict[int, dict[tuple, int]]:
    """For each destination, the rank each piece comes from: the destination itself when it holds a replica,
    else the first rank of ``near[dst]`` (nearest first: its engine group, its node) that holds one, else the
    main replica's rank."""
    holders: dict[tuple, list[int]] = {}
    main: dict[tuple, int] = {}
    for r, ms in enumerate(rank_metas):
        for m in ms:
            holders.setdefault(m.piece, []).append(r)
            if m.main:
                main[m.piece] = r
    routes: dict[int, dict[tuple, int]] = {}
    for d in dsts:
        prefer = [d, *near.get(d, [])]
        routes[d] = {p: next((r for r in prefer if r in hs), main.get(p, hs[0])) for p, hs in holders.items()}
    return routes


def engine_weight_units(model: Any, model_cfg: ModelConfig, model_type: Optional[str] = None,
                        dsts: Optional[list[int]] = None, near: Optional[dict[int, list[int]]] = None,
                        dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None
                        ) -> Iterator[tuple[Unit, dict[str, torch.Tensor]]]:
    """``(unit, {hf_name: tensor})`` of the whole model, unit by unit (the embedding, each layer, the final norm
    and head), on every rank of ``dsts`` (each rollout engine's driver; default: rank 0); nothing elsewhere,
    but every rank iterates to exhaustion (each unit is one point-to-point exchange).

    Each destination receives each piece once, exactly sized, from the nearest rank holding a replica of
    it (itself, then ``near[dst]`` in order -- its engine group, its node -- then the main replica's owner):
    with data-parallel replicas inside a group or node nothing leaves it, and no rank gathers what another
    engine needs.
    Bytes received per destination are at most one model (in ``dtype``), minus what it holds itself.

    Tensors are assembled on ``device`` (default: the host; the engine's staging device), in ``dtype``,
    except that a tensor the destination holds whole comes as a view of its own weight, in the model's dtype
    (no copy: the caller copies it once, casting, and must not step the optimizer meanwhile)."""
    world, me = distributed.world_size(), distributed.rank()
    dsts = [0] if dsts is None else list(dsts)
    if any(not 0 <= d < world for d in dsts):
        raise ValueError(f"destinations {dsts} are not all ranks of the world (size {world})")
    arch, rank_metas, data = _world_shards(model, model_cfg, model_type, replicas=True)
    out_dtype = dtype or next(m.dtype for ms in rank_metas for m in ms if m.key == EMBED)
    routes = _routes(rank_metas, dsts, near or {})
    # this unit's pieces each destination takes from each rank: [(rank, index into its metadata)] in one order
    plan: dict[Unit, dict[int, list[tuple[int, int]]]] = {}
    for d in dsts:
        for r, ms in enumerate(rank_metas):
            for i, m in enumerate(ms):
                if routes[d].get(m.piece) == r:
                    routes[d].pop(m.piece)  # once, from the first replica listed on that rank
                    plan.setdefault(m.unit, {}).setdefault(d, []).append((r, i))
    for unit in _units(model_cfg):
        takes = plan.get(unit, {})
        sends = {d: torch.cat([data[i].to(out_dtype).reshape(-1) for r, i in got if r == me])
                 for d, got in takes.items() if d != me and any(r == me for r, _ in got)}
        recvs: dict[int, int] = {}
        for r, i in takes.get(me, []):
            if r != me:
                recvs[r] = recvs.get(r, 0) + math.prod(rank_metas[r][i].box)
        received = distributed.exchange(sends, recvs, out_dtype)
        del sends
        if me not in takes:
            continue
        parts: list[list[tuple[int, torch.Tensor]]] = [[] for _ in rank_metas]
        offsets = dict.fromkeys(received, 0)
        for r, i in takes[me]:
            if r == me:
                parts[r].append((i, data[i]))
                continue
            n = math.prod(rank_metas[r][i].box)
            parts[r].append((i, received[r][offsets[r]: offsets[r] + n]))
            offsets[r] += n
        del received
        yield unit, _unit_to_hf(arch, model_cfg, unit, _assemble(parts, rank_metas, out_dtype, device, True))

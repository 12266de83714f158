"""torchrun worker (2 ranks) for tests/test_live_export.py: load a 1-rank checkpoint into each layout in turn,
stream the live model to HF buckets on rank 0 and compare them with the 1-rank export, exactly.

Usage: torchrun --nproc-per-node=2 live_export.py WORK_DIR LAYOUT...

WORK_DIR/<model>/ckpt is the checkpoint, WORK_DIR/<model>/ref.pt the 1-rank export (``{"names", "tensors"}``).
Layout ``*_step`` (an Engine's DDP-wrapped model) first takes an optimizer step, then compares the export
with the offline conversion of a checkpoint saved right after it. Rank 0 prints ``LIVE_EXPORT_OK <layout>``.
Every other layout also streams ``engine_weight_units`` to both ranks (two engines' drivers) and to rank 1
alone, checks both against the reference and counts the bytes each rank receives point to point; rank 0
prints ``UNITS_OK <layout> received=<rank 0's bytes>,<rank 1's bytes>``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from dataclasses import replace

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

BUCKET = 24 << 10
# name: (model, TP, PP, EP, token dispatcher); sequence parallelism whenever TP > 1
LAYOUTS = {
    "ep2_alltoall": ("mixtral", 1, 1, 2, "alltoall"),
    "ep2_allgather": ("mixtral", 1, 1, 2, "allgather"),
    "tp2": ("mixtral", 2, 1, 1, "allgather"),
    "pp2": ("mixtral", 1, 2, 1, "allgather"),
    "tp2_tied": ("qwen3_moe_tied", 2, 1, 1, "allgather"),
    "ep2_step": ("mixtral", 1, 1, 2, "alltoall"),
    "dp2": ("mixtral", 1, 1, 1, "allgather"),  # two full replicas
}


def check_units(layout: str, module, cfg, ref_tensors: dict[str, torch.Tensor]) -> None:
    """Both ranks as destinations (each its own engine group), then rank 1 alone: every destination gets the whole
    model, equal to the reference; bytes received per rank through distributed.exchange are counted."""
    from megatron_rspo import distributed
    from megatron_rspo.convert.live_export import engine_weight_units

    received = [0]
    real = distributed.exchange

    def counting(sends, recv_numels, dtype):
        out = real(sends, recv_numels, dtype)
        received[0] += sum(t.numel() * t.element_size() for t in out.values())
        return out

    distributed.exchange = counting
    try:
        for dsts in ([0, 1], [1]):
            got = {n: t for _, unit in engine_weight_units(module, cfg, dsts=dsts, near={0: [0], 1: [1]})
                   for n, t in unit.items()}
            me = dist.get_rank()
            if me not in dsts:
                if got:
                    raise SystemExit(f"{layout}: rank {me} is no destination but got {len(got)} tensors")
                continue
            if sorted(got) != sorted(ref_tensors):
                raise SystemExit(f"{layout} units: names differ: {sorted(set(got) ^ set(ref_tensors))}")
            for n, t in got.items():
                if t.dtype != ref_tensors[n].dtype or not torch.equal(t, ref_tensors[n]):
                    raise SystemExit(f"{layout} units: {n} differs on rank {me}")
            if dsts == [0, 1]:
                first = received[0]
    finally:
        distributed.exchange = real
    counts = [None, None]
    dist.all_gather_object(counts, (first, received[0] - first))
    if dist.get_rank() == 0:
        both = ",".join(str(c[0]) for c in counts)
        alone = counts[1][1]
        model = sum(t.numel() * t.element_size() for t in ref_tensors.values())
        print(f"UNITS_OK {layout} received={both} rank1_alone={alone} model={model}", flush=True)


def _step(engine) -> None:
    g = torch.Generator().manual_seed(7 + dist.get_rank())
    tokens = torch.randint(0, engine.model_cfg.vocab_size, (2, 9), generator=g)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch[:, :-1], torch.arange(8).expand(2, 8), None, labels=batch[:, 1:])
        return out, lambda losses: (losses.float().mean(), {})

    assert not engine.train_step(forward_step, [tokens], seq_length=8, micro_batch_size=2).skipped


def _offline(cfg, parallel, model) -> dict[str, torch.Tensor]:
    """What convert_megatron_to_hf writes for a checkpoint of ``model`` saved now (read on rank 0)."""
    from megatron_rspo import checkpoint as ckpt
    from megatron_rspo.convert import convert_megatron_to_hf
    from megatron_rspo.convert.hf_layout import HFCheckpointReader

    root = tempfile.mkdtemp() if dist.get_rank() == 0 else None
    box = [root]
    dist.broadcast_object_list(box, src=0)
    ckpt.save_checkpoint(box[0] + "/ckpt", 1, model, configs=(cfg, parallel), save_rng=False)
    if dist.get_rank() != 0:
        return {}
    convert_megatron_to_hf(box[0] + "/ckpt", box[0] + "/hf", log=lambda *_: None)
    reader = HFCheckpointReader(box[0] + "/hf")
    return {k: reader.get(k) for k in reader.keys()}


def run_layout(work: str, layout: str) -> None:
    from megatron_rspo import checkpoint as ckpt
    from megatron_rspo.config import OptimConfig, ParallelConfig
    from megatron_rspo.convert.live_export import hf_weight_buckets
    from megatron_rspo.engine import Engine
    from megatron_rspo.model.provider import build_model, init_distributed

    name, tp, pp, ep, dispatcher = LAYOUTS[layout]
    root = os.path.join(work, name, "ckpt")
    cfg = replace(ckpt.read_model_config(ckpt.resolve_checkpoint_dir(root)), moe_token_dispatcher_type=dispatcher)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              expert_model_parallel_size=ep, sequence_parallel=tp > 1)
    init_distributed(parallel, seed=99)  # another init than the reference: loading must overwrite everything
    engine = Engine(cfg, parallel, OptimConfig(lr=1e-2), train_iters=2) if layout.endswith("_step") else None
    module = engine.module if engine else build_model(cfg, parallel)
    ckpt.load_checkpoint(root, module, model_config=cfg, load_rng=False)
    if engine:
        _step(engine)
        ref_tensors = _offline(cfg, parallel, engine.ddp)
        ref_names = None
    else:
        ref = torch.load(os.path.join(work, name, "ref.pt"))
        ref_names, ref_tensors = ref.get("names"), ref.get("tensors", {})
        check_units(layout, module, cfg, ref_tensors)
    buckets = list(hf_weight_buckets(engine.ddp if engine else module, cfg, bucket_bytes=BUCKET))
    half = None  # a cast on the way (each rank casts its shards before sending); every rank iterates
    if layout == "tp2":
        half = [kv for bucket in hf_weight_buckets(module, cfg, dtype=torch.bfloat16) for kv in bucket]
    if dist.get_rank() != 0:
        if buckets or half:
            raise SystemExit(f"{layout}: rank {dist.get_rank()} got {len(buckets)} buckets")
        return
    got = [kv for bucket in buckets for kv in bucket]
    names = [n for n, _ in got]
    if ref_names is not None and names != ref_names:
        raise SystemExit(f"{layout}: names/order differ from the 1-rank export")
    if sorted(names) != sorted(ref_tensors):
        raise SystemExit(f"{layout}: names differ: {sorted(set(names) ^ set(ref_tensors))}")
    for n, t in got:
        if t.dtype != ref_tensors[n].dtype or not torch.equal(t, ref_tensors[n]):
            raise SystemExit(f"{layout}: {n} differs")
    for bucket in buckets:
        if len(bucket) > 1 and sum(t.numel() * t.element_size() for _, t in bucket) > BUCKET:
            raise SystemExit(f"{layout}: a bucket exceeds {BUCKET} bytes")
    if half is not None and ([n for n, _ in half] != names
                             or not all(torch.equal(t, ref_tensors[n].bfloat16()) for n, t in half)):
        raise SystemExit(f"{layout}: the bf16 export differs from the fp32 one cast to bf16")
    print(f"LIVE_EXPORT_OK {layout} tensors={len(got)} buckets={len(buckets)}", flush=True)


def main() -> None:
    from megatron_rspo.model.provider import shutdown_distributed

    work, layouts = sys.argv[1], sys.argv[2:]
    for layout in layouts:
        run_layout(work, layout)
    shutdown_distributed()


if __name__ == "__main__":  # dist_checkpointing may spawn worker processes
    main()

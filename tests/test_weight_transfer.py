"""Weights without files (rollout/weight_handles.py, rollout/weight_sync.py, rollout/vllm_worker.py): buckets
staged in shared memory and opened in another process without a copy, whole layers per bucket, weights vLLM
keeps past a call copied out of the slot, and the memory handoff around generation (rl/memory_handoff.py)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_rspo.rollout.weight_handles import OpenedSlots, StagingSlots, layout
from megatron_rspo.rollout.weight_sync import unit_buckets


def _bucket(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [("a.weight", torch.randn(3, 5, generator=g)), ("b.bias", torch.randn(7, generator=g).bfloat16()),
            ("c.ids", torch.randint(0, 9, (2, 2), generator=g))]


CHILD = """
import json, sys, torch
from megatron_rspo.rollout.weight_handles import OpenedSlots
handle = json.loads(sys.argv[1])
bucket, span = OpenedSlots().open(handle)
torch.save({n: t.clone() for n, t in bucket}, sys.argv[2])
bucket[0][1].fill_(42.0)  # written through the view: the parent sees it (the same pages, no copy)
"""


def test_a_staged_bucket_is_the_same_memory_in_another_process(tmp_path):
    slots = StagingSlots(torch.device("cpu"))
    try:
        handle = slots.stage(_bucket(0))
        assert handle["kind"] == "shm" and "items" in handle and handle["nbytes"] == layout(_bucket(0))[1]
        out = tmp_path / "got.pt"
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(handle), str(out)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resource_tracker" not in proc.stderr
        got = torch.load(out)
        for name, t in _bucket(0):
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
        owner, base = slots.slots[0]
        first = torch.frombuffer(owner.buf, dtype=torch.float32, count=15)
        assert torch.all(first == 42.0)
    finally:
        slots.close()
    assert not any(n.startswith("rspo_w_") for n in os.listdir("/dev/shm"))  # unlinked


def test_slots_alternate_and_grow():
    slots = StagingSlots(torch.device("cpu"))
    try:
        names = [slots.stage(_bucket(i))["name"] for i in range(4)]
        assert names[0] == names[2] and names[1] == names[3] and names[0] != names[1]
        big = [("x", torch.zeros(10_000))]
        grown = slots.stage(big)
        assert grown["name"] not in names and slots.slots[0][1].numel() >= 40_000
        opened = OpenedSlots()
        views, (start, end) = opened.open(grown)
        assert end - start == grown["nbytes"] and torch.equal(views[0][1], big[0][1])
        opened.close()
    finally:
        slots.close()


def test_unit_buckets_never_split_a_unit():
    units = [(u, {f"{u}.w{i}": torch.zeros(n) for i in range(3)}) for u, n in (("embed", 100), (0, 10), (1, 10),
                                                                                (2, 300), ("final", 10))]
    buckets = list(unit_buckets(iter(units), limit=4 * 130))
    assert [[n for n, _ in b] for b in buckets] == [
        [f"embed.w{i}" for i in range(3)], [f"{u}.w{i}" for u in (0, 1) for i in range(3)],
        [f"2.w{i}" for i in range(3)], [f"final.w{i}" for i in range(3)]]


def test_weights_vllm_keeps_are_copied_out_of_the_slot():
    """vLLM's layer-wise reload buffers a layer's weights until the layer is complete; those that point into
    the slot are copied before the trainer overwrites it, the others are left alone."""
    pytest.importorskip("vllm", reason="vLLM is not installed (make vllm)")
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, get_layerwise_info

    from megatron_rspo.rollout.vllm_worker import release_slot

    slot = torch.arange(64, dtype=torch.float32)
    span = (slot.untyped_storage().data_ptr(), slot.untyped_storage().data_ptr() + slot.numel() * 4)
    layer = torch.nn.Linear(2, 2)
    try:
        info = get_layerwise_info(layer)
        sig = inspect.signature(lambda param, loaded_weight, shard_id=None: None)
        view, own = slot[8:16].view(2, 4), torch.ones(3)
        info.loaded_weights += [("weight", sig.bind(layer.weight, view)), ("bias", sig.bind(layer.bias, own))]
        assert release_slot(torch.nn.Sequential(layer), span) == 1
        kept = info.loaded_weights[0][1].arguments["loaded_weight"]
        assert torch.equal(kept, slot[8:16].view(2, 4)) and kept.untyped_storage().data_ptr() != span[0]
        slot.zero_()  # the trainer reuses the slot
        assert kept.sum() > 0 and info.loaded_weights[1][1].arguments["loaded_weight"] is own
    finally:
        LAYERWISE_INFO.pop(layer, None)


def test_each_destination_takes_a_piece_from_the_nearest_rank_holding_it():
    """4 ranks on 2 nodes (0-1, 2-3): a piece whose main replica is on rank 0 and a replica on rank 2 reaches
    rank 3 from rank 2 (its node), rank 1 from rank 0; a piece only rank 1 holds reaches everyone from rank 1."""
    from megatron_rspo.convert.live_export import _Meta, _routes

    def meta(key: str, main: bool) -> _Meta:
        return _Meta(key, 0, (4,), (0,), (4,), torch.float32, main)

    ranks = [[meta("a", True)], [meta("b", True)], [meta("a", False)], []]
    near = {d: [d, *range(d // 2 * 2, d // 2 * 2 + 2)] for d in range(4)}
    routes = _routes(ranks, [0, 1, 2, 3], near)
    a, b = ("a", (0,)), ("b", (0,))
    assert [routes[d][a] for d in range(4)] == [0, 0, 2, 2]
    assert [routes[d][b] for d in range(4)] == [1, 1, 1, 1]
    assert _routes(ranks, [3], {})[3][a] == 0  # no preference: the main replica

"""Each rank's exact share of the model, counted by Megatron itself: the rank's GPTModel built on the meta device
(no memory, no initialisation) under the layout's parallel state.

Offline (``tools/plan_memory.py``, no GPUs): a fake process group of the layout's world size stands in, one
rank at a time (``torch.distributed``'s "fake" backend: groups without communication), so a laptop counts
a 30B model's per-rank shares in about a second. In the trainer, before the model is built, the real
parallel state is there and each rank counts its own share (``current_share``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_rspo.config import ModelConfig, ParallelConfig


@dataclass(frozen=True)
class RankShare:
    """Parameters one rank holds (element counts), by what shards them in the optimizer."""

    rank: int
    pipeline_stage: int
    dense: int  # sharded over data-parallel ranks by the distributed optimizer
    expert: int  # routed experts: sharded over expert-data-parallel ranks
    largest_tensor: int  # elements of the rank's largest parameter (per-tensor temporaries)
    vocab_rows: int  # rows of this rank's output layer (V / TP on the last stage, else 0)

    @property
    def total(self) -> int:
        return self.dense + self.expert


def _count(model: torch.nn.Module, rank: int, stage: int) -> RankShare:
    dense = expert = largest = vocab = 0
    for name, p in model.named_parameters():
        n = p.numel()
        largest = max(largest, n)
        if ".experts." in name:
            expert += n
        else:
            dense += n
        if name.startswith("output_layer.") or (name.startswith("embedding.word_embeddings") and vocab == 0):
            vocab = max(vocab, p.shape[0])
    return RankShare(rank, stage, dense, expert, largest, vocab)


def current_share(model_cfg: ModelConfig, par: ParallelConfig) -> RankShare:
    """This rank's share under the initialised parallel state (the trainer, before it builds the model)."""
    from megatron.core import parallel_state

    from megatron_rspo.model.provider import build_model

    with torch.device("meta"):
        model = build_model(model_cfg, par, init_weights=False, to_device=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    stage = parallel_state.get_pipeline_model_parallel_rank()
    share = _count(model, rank, stage)
    if not parallel_state.is_pipeline_last_stage():
        share = RankShare(share.rank, stage, share.dense, share.expert, share.largest_tensor, 0)
    return share


@contextlib.contextmanager
def _fake_world(par: ParallelConfig, world: int, rank: int) -> Iterator[None]:
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_rspo.compat.cpu import apply_compat_patches

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        apply_compat_patches()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size,
            expert_model_parallel_size=par.expert_model_parallel_size,
            expert_tensor_parallel_size=par.expert_tp(), create_gloo_process_groups=False)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def offline_shares(model_cfg: ModelConfig, par: ParallelConfig, world: int) -> list[RankShare]:
    """The share of the first rank of every pipeline stage (TP and EP ranks of a stage hold the same counts:
    Megatron splits evenly), each counted by building that rank's model on the meta device under a fake
    process group of ``world`` ranks. Needs a process without torch.distributed initialised."""
    if dist.is_initialized():
        raise RuntimeError("offline_shares needs a process without torch.distributed (use current_share)")
    from megatron_rspo.model import provider

    # Counted with the local experts: grouped GEMMs (CUDA kernels, refused here) hold the same elements
    model_cfg = dataclasses.replace(model_cfg, moe_grouped_gemm=False)
    pp = par.pipeline_model_parallel_size
    shares = []
    for stage in range(pp):
        rank = stage * (world // pp)  # Megatron's default order (tp-cp-ep-dp-pp): the stage is outermost
        with _fake_world(par, world, rank):
            provider._LAYOUT = None  # the real layout is not this one (the trainer re-initialises)
            try:
                share = current_share(model_cfg, par)
            except (AssertionError, RuntimeError) as e:
                if torch.cuda.is_available() or "CUDA" not in str(e):
                    raise
                from megatron_rspo.errors import ConfigError

                raise ConfigError("this layout cannot be counted on a CPU machine (Megatron builds it with CUDA "
                                  f"calls: {e}); plan it on a GPU node") from e
        shares.append(RankShare(rank, stage, share.dense, share.expert, share.largest_tensor, share.vocab_rows))
    provider._LAYOUT = None
    return shares

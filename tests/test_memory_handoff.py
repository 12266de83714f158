"""The memory handoff between generation and training (rl/memory_handoff.py) and its flags: gradient buffers
freed while rollouts are generated and training afterwards exactly as without; the engine asked to sleep
once per round; optimizer offload through Megatron's own call; the flags' refusals, all before any model."""

from __future__ import annotations

import pytest
import torch

from megatron_rspo.config import ModelConfig, OptimConfig, ParallelConfig
from megatron_rspo.engine import Engine
from megatron_rspo.model.logprobs import forward_logits, token_logprobs
from megatron_rspo.model.provider import init_distributed
from megatron_rspo.rl.config import RLConfig, engine_errors, overlaps_generation
from megatron_rspo.rl.memory_handoff import MemoryHandoff
from megatron_rspo.rollout.placement import EnginePlacement, engine_cores, engine_devices, parse_devices

MODEL = ModelConfig(vocab_size=32, hidden_size=32, num_attention_heads=2, ffn_hidden_size=32, num_experts=4,
                    moe_router_topk=2)


class _Engine:
    def __init__(self) -> None:
        self.sleeps = 0

    def sleep(self) -> None:
        self.sleeps += 1


def _forward_step(tokens):
    def step(data_iterator, model):
        batch = next(data_iterator)
        logits = forward_logits(model, batch[:, :-1])
        return logits, lambda out: ((-token_logprobs(out, batch[:, 1:]).mean()), {})

    return step


def _train(handoff: bool) -> tuple[list[torch.Tensor], int]:
    init_distributed(ParallelConfig(), seed=5)
    engine = Engine(MODEL, ParallelConfig(), OptimConfig(lr=1e-2), train_iters=4)
    rollout = _Engine()
    ho = MemoryHandoff(engine, rollout, offload_optimizer=handoff, offload_grads=handoff)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        if handoff:
            ho.to_rollout()
            ho.to_rollout()  # idempotent
            # freed: the grad buffers hold no memory while the engine generates
            assert all(b.grad_data.untyped_storage().size() == 0 for b in engine.ddp.buffers)
            ho.to_train()
            ho.to_train()
        tokens = torch.randint(0, 32, (4, 9), generator=g)
        assert not engine.train_step(_forward_step(tokens), [tokens], seq_length=8, micro_batch_size=4).skipped
    return [p.detach().clone() for p in engine.module.parameters()], rollout.sleeps


def test_training_with_the_handoff_equals_training_without():
    plain, _ = _train(handoff=False)
    handed, sleeps = _train(handoff=True)
    assert sleeps == 3  # once per round, not once per call
    assert all(torch.equal(a, b) for a, b in zip(plain, handed))


def test_trainer_back_restores_without_putting_the_engine_to_sleep(monkeypatch):
    init_distributed(ParallelConfig(), seed=5)
    engine = Engine(MODEL, ParallelConfig(), OptimConfig(lr=1e-2), train_iters=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the optimizer part runs on CUDA only
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    calls = []
    engine.optimizer.offload_to_cpu = lambda: calls.append("offload")
    engine.optimizer.restore_from_cpu = lambda: calls.append("restore")
    rollout = _Engine()
    ho = MemoryHandoff(engine, rollout, offload_optimizer=True, offload_grads=False)
    ho.to_rollout()
    ho.trainer_back()  # e.g. before a checkpoint
    ho.to_train()  # already back: nothing more
    assert calls == ["offload", "restore"] and rollout.sleeps == 0


def _errors(world: int = 1, bf16: bool = False, **kw) -> list[str]:
    return engine_errors(RLConfig(rollout_engine=kw.pop("rollout_engine", "vllm"), **kw), vllm_installed=True,
                         par=ParallelConfig(), world=world, model=ModelConfig(bf16=bf16))


def test_handoff_flags_are_refused_where_they_cannot_work():
    assert _errors() == []
    assert _errors(rollout_sleep_level=3) == ["--rollout-sleep-level must be 0, 1 or 2 (got 3)"]
    assert any("needs --bf16" in e for e in _errors(offload_optimizer_during_rollout=True))
    assert _errors(bf16=True, offload_optimizer_during_rollout=True) == []
    both = _errors(rollout_devices="1", rollout_sleep_level=1, offload_grads_during_rollout=True)
    assert len(both) == 1 and "nothing to hand over" in both[0] and "--rollout-sleep-level" in both[0]
    assert any("only apply to --rollout-engine vllm" in e
               for e in _errors(rollout_engine="megatron", rollout_devices="1"))
    assert any("expected device ids" in e for e in _errors(rollout_devices="a-b"))
    overlap = _errors(async_rollout=True, offload_grads_during_rollout=True)
    assert len(overlap) == 1 and "one rank" in overlap[0]
    assert _errors(world=2, async_rollout=True, offload_grads_during_rollout=True) == []  # sequential there


def test_generation_overlaps_training_only_where_engines_do_not_share_devices():
    rl = RLConfig(rollout_engine="vllm", async_rollout=True)
    assert overlaps_generation(rl, 1) and not overlaps_generation(rl, 2)
    assert overlaps_generation(RLConfig(rollout_engine="vllm", async_rollout=True, rollout_devices="1"), 2)
    assert not overlaps_generation(RLConfig(rollout_engine="megatron", async_rollout=True), 1)


def test_reserved_devices_are_shared_by_the_node_engines():
    assert parse_devices("4-6,1, 9") == [1, 4, 5, 6, 9]
    with pytest.raises(ValueError):
        parse_devices("")
    two = [EnginePlacement(rank=r, world=4, ranks_per_engine=2, local_rank=r, local_world=4) for r in (0, 2)]
    assert [engine_cores(p, [4, 5, 6, 7]) for p in two] == [[4, 5], [6, 7]]
    assert engine_devices(two[1], 1, reserved=[6, 7]) == {"VLLM_CPU_OMP_THREADS_BIND": "7"}


def test_vllm_expert_parallelism_needs_cuda_and_a_multi_gpu_engine(monkeypatch):
    assert any("needs --rollout-engine vllm on CUDA" in e for e in _errors(rollout_expert_parallel=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert any("more than one GPU" in e for e in _errors(rollout_expert_parallel=True))
    assert _errors(world=2, rollout_expert_parallel=True, rollout_tensor_parallel_size=2) == []

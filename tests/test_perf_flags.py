"""Performance flags: Megatron's rules, which ones run on this device, and that the ones that run change
nothing a step computes (loss, gradients, weights after the optimizer step)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from megatron_rspo.config import ConfigError, ModelConfig, ParallelConfig
from megatron_rspo.validation import model_parallel_errors, training_errors

TINY = dict(vocab_size=64, num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
            hidden_dropout=0.1, attention_dropout=0.1)  # dropout on: recompute must replay the same masks
RECOMPUTE_FULL = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
# (model fields, parallel fields, the flag a refusal must name)
FLAGS = {
    "overlap_grad_reduce": ({}, {"overlap_grad_reduce": True}, "--overlap-grad-reduce"),
    "recompute_full": (RECOMPUTE_FULL, {}, "--recompute-granularity full"),
    "recompute_block": ({**RECOMPUTE_FULL, "recompute_method": "block", "recompute_num_layers": 2}, {},
                        "--recompute-granularity full"),
    "recompute_selective": ({"recompute_granularity": "selective"}, {}, "--recompute-granularity selective"),
    "distributed_optimizer": ({}, {"use_distributed_optimizer": True}, "--use-distributed-optimizer"),
    "overlap_param_gather": ({}, {"use_distributed_optimizer": True, "overlap_param_gather": True},
                             "--use-distributed-optimizer"),
    "bf16": ({"bf16": True}, {}, "--bf16"),
}
# Run on CPU too: overlap_grad_reduce over gloo, recompute through compat/cpu.py's recompute_without_cuda_rng.
CPU_FLAGS = {"overlap_grad_reduce", "recompute_full", "recompute_block", "recompute_selective"}


def test_token_dispatcher_resolves_by_layout():
    from megatron_rspo.model.provider import transformer_config

    assert ModelConfig().moe_token_dispatcher_type is None
    assert ModelConfig().token_dispatcher(ParallelConfig()) == "allgather"
    assert ModelConfig().token_dispatcher(ParallelConfig(expert_model_parallel_size=2)) == "alltoall"
    explicit = ModelConfig(moe_token_dispatcher_type="allgather")
    assert explicit.token_dispatcher(ParallelConfig(expert_model_parallel_size=2)) == "allgather"
    ep2 = ParallelConfig(expert_model_parallel_size=2)
    assert transformer_config(ModelConfig(vocab_size=64), ep2).moe_token_dispatcher_type == "alltoall"


def test_init_from_keeps_the_command_lines_runtime_fields():
    from megatron_rspo.rl.config import with_runtime_fields

    saved = ModelConfig(num_layers=4, moe_token_dispatcher_type="alltoall", moe_grouped_gemm=True)
    cli = ModelConfig(num_layers=2, recompute_granularity="selective")
    got = with_runtime_fields(saved, cli)
    assert got.num_layers == 4 and got.moe_token_dispatcher_type is None  # None: resolved by this run's layout
    assert not got.moe_grouped_gemm and got.recompute_granularity == "selective"


@pytest.mark.parametrize("model_kw, par_kw, needle", [
    ({"recompute_method": "uniform"}, {}, "--recompute-method needs --recompute-granularity full"),
    ({"recompute_num_layers": 1}, {}, "--recompute-num-layers needs --recompute-granularity full"),
    ({"recompute_granularity": "selective", "recompute_method": "block"}, {}, "selective recompute takes neither"),
    ({"recompute_granularity": "full", "recompute_num_layers": 1}, {}, "needs --recompute-method uniform or block"),
    ({"recompute_granularity": "full", "recompute_method": "block"}, {}, "needs --recompute-num-layers (1..2"),
    ({**RECOMPUTE_FULL, "num_layers": 4, "recompute_num_layers": 3}, {"pipeline_model_parallel_size": 2},
     "--recompute-num-layers (3) exceeds the layers per pipeline stage (2)"),
])
def test_recompute_rules(model_kw, par_kw, needle):
    errors = model_parallel_errors(ModelConfig(**model_kw), ParallelConfig(**par_kw), world_size=2, cuda=True)
    assert any(needle in e for e in errors), errors


def test_overlap_param_gather_needs_the_distributed_optimizer():
    for cuda in (False, True):
        errors = training_errors(ModelConfig(), ParallelConfig(overlap_param_gather=True), cuda=cuda)
        assert "--overlap-param-gather requires --use-distributed-optimizer" in errors


@pytest.mark.parametrize("name", FLAGS)
def test_cuda_only_flags_are_refused_on_cpu_only(name):
    model_kw, par_kw, flag = FLAGS[name]
    cpu = training_errors(ModelConfig(**model_kw), ParallelConfig(**par_kw), cuda=False)
    assert training_errors(ModelConfig(**model_kw), ParallelConfig(**par_kw), cuda=True) == []
    if name in CPU_FLAGS:
        assert cpu == []  # runs on CPU, see test_flag_changes_nothing_a_step_computes
    else:
        assert any(e.startswith(flag) and "needs CUDA" in e for e in cpu), cpu


def test_grouped_gemm_needs_cuda_and_a_kernel(monkeypatch):
    import dataclasses

    from megatron_rspo import validation

    m = ModelConfig(moe_grouped_gemm=True, transformer_impl="local")
    assert any("--moe-grouped-gemm needs CUDA" in e for e in model_parallel_errors(m, ParallelConfig(), cuda=False))
    bare = dataclasses.replace(validation.probe(), grouped_gemm=False)
    monkeypatch.setattr(validation, "probe", lambda: bare)
    assert any("grouped_gemm package" in e for e in model_parallel_errors(m, ParallelConfig(), cuda=True))
    monkeypatch.setattr(validation, "probe", lambda: dataclasses.replace(bare, grouped_gemm=True))
    assert model_parallel_errors(m, ParallelConfig(), cuda=True) == []


def _one_step(model_kw: dict, par_kw: dict) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    """(loss, grads, weights after one Adam step) of a tiny MoE on fixed tokens, through the Engine."""
    from megatron_rspo.config import OptimConfig
    from megatron_rspo.engine import Engine
    from megatron_rspo.model.provider import init_distributed
    from megatron_rspo.sft import sft_forward_step

    par = ParallelConfig(**par_kw)
    init_distributed(par, seed=7)
    engine = Engine(ModelConfig(**{**TINY, **model_kw}), par, OptimConfig(lr=1e-2), train_iters=4)
    device = next(engine.module.parameters()).device
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0)).to(device)
    mbs = [{"tokens": tokens, "loss_mask": torch.ones(4, 16, device=device)}]
    torch.manual_seed(123)  # the dropout masks
    out = engine.forward_backward(partial(sft_forward_step, loss_scale=engine.loss_scale, global_tokens=64.0),
                                  mbs, 16, 4)
    grads = {n: p.main_grad.detach().float().clone() for n, p in engine.module.named_parameters()}
    engine.optimizer.step()
    weights = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])
    return float(out[0]["nll_sum"]) / 64, grads, weights


@pytest.mark.parametrize("name", FLAGS)
def test_flag_changes_nothing_a_step_computes(megatron_single_rank, name):
    model_kw, par_kw, flag = FLAGS[name]
    if training_errors(ModelConfig(**model_kw), ParallelConfig(**par_kw)):
        from megatron_rspo.engine import Engine

        with pytest.raises(ConfigError, match=flag):  # refused before anything is built
            Engine(ModelConfig(**{**TINY, **model_kw}), ParallelConfig(**par_kw), None, train_iters=1)
        return
    loss0, grads0, w0 = _one_step({}, {})
    loss1, grads1, w1 = _one_step(model_kw, par_kw)
    tol = 5e-2 if name == "bf16" else 1e-6
    assert loss1 == pytest.approx(loss0, abs=tol)
    assert max(float((grads1[k] - grads0[k]).abs().max()) for k in grads0) <= (1e-2 if name == "bf16" else 1e-6)
    assert float((w1 - w0).abs().max()) <= (1e-1 if name == "bf16" else 1e-6)

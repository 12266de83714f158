"""A non-finite loss or gradient skips the optimizer step: weights, optimizer state and LR schedule stay
exactly as they were; a finite step afterwards is applied as usual."""

from __future__ import annotations

import pytest
import torch

from megatron_rspo.config import ModelConfig, OptimConfig, ParallelConfig
from megatron_rspo.engine import Engine
from megatron_rspo.model.logprobs import forward_logits, token_logprobs
from megatron_rspo.model.provider import init_distributed


def _engine() -> Engine:
    init_distributed(ParallelConfig(), seed=3)
    return Engine(ModelConfig(vocab_size=32, hidden_size=32, num_attention_heads=2, ffn_hidden_size=32),
                  ParallelConfig(), OptimConfig(lr=1e-2, lr_warmup_iters=2), train_iters=10)


def _step(poison: float | None):
    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        logits = forward_logits(model, tokens[:, :-1])

        def loss_func(out):
            loss = -token_logprobs(out, tokens[:, 1:]).mean()
            if poison is not None:
                loss = loss * poison  # nan or inf reaches both the loss and every gradient
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    return forward_step


def _snapshot(engine: Engine):
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    opt = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
           for s in engine.optimizer.optimizer.state.values()] if hasattr(engine.optimizer, "optimizer") else []
    return params, opt, engine.scheduler.num_steps, engine.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_step_is_skipped_and_leaves_everything_untouched(poison):
    engine = _engine()
    tokens = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    assert not engine.train_step(_step(None), [tokens], 8, 2).skipped  # optimizer state now exists
    before = _snapshot(engine)
    res = engine.train_step(_step(poison), [tokens], 8, 2)
    assert res.skipped
    after = _snapshot(engine)
    assert all(torch.equal(before[0][n], after[0][n]) for n in before[0])
    assert len(before[1]) == len(after[1]) > 0
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before[1], after[1]) for k in a)
    assert before[2:] == after[2:]  # no scheduler step, same LR
    res = engine.train_step(_step(None), [tokens], 8, 2)
    assert not res.skipped and res.grad_norm == res.grad_norm
    assert any(not torch.equal(before[0][n], p) for n, p in engine.module.named_parameters())


def test_reported_lr_is_the_one_the_step_applied():
    engine = _engine()
    tokens = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    lrs = [engine.train_step(_step(None), [tokens], 8, 2).lr for _ in range(3)]
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2], rel=1e-6)  # linear warmup over 2 steps, from 0

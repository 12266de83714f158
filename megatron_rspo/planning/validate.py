"""The planner against a measurement: one real training step (forward, backward, finiteness check, Adam) of a
small model on this machine, every allocation tracked (``measure.PeakTracker``), against the planner's train
phase for the same model, layout and micro-batch. Layouts here differ from the ones the activation constants
were measured on (``benchmarks/activation_probe.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_rspo.config import ModelConfig, OptimConfig, ParallelConfig
from megatron_rspo.planning.measure import PeakTracker
from megatron_rspo.planning.plan import PlanInputs, estimate
from megatron_rspo.planning.shares import current_share


@dataclass(frozen=True)
class Layout:
    name: str
    model: ModelConfig
    rows: int
    seq: int


# held out: none of these shapes was used to measure the constants
LAYOUTS = (
    Layout("gqa-3-layers", ModelConfig(vocab_size=1024, num_layers=3, hidden_size=192, num_attention_heads=6,
                                       num_query_groups=2, ffn_hidden_size=384, num_experts=8, moe_router_topk=2,
                                       max_position_embeddings=512), rows=2, seq=256),
    Layout("logit-heavy-full-recompute", ModelConfig(vocab_size=4096, num_layers=2, hidden_size=128,
                                                     num_attention_heads=4, ffn_hidden_size=128, num_experts=16,
                                                     moe_router_topk=4, max_position_embeddings=512,
                                                     recompute_granularity="full", recompute_method="uniform",
                                                     recompute_num_layers=1), rows=4, seq=128),
    Layout("wide-top1-4-layers", ModelConfig(vocab_size=512, num_layers=4, hidden_size=256, num_attention_heads=8,
                                             num_query_groups=4, ffn_hidden_size=512, num_experts=4, moe_router_topk=1,
                                             moe_router_pre_softmax=True,
                                             max_position_embeddings=512), rows=1, seq=384),
)


def plan_inputs_for(model: ModelConfig, par: ParallelConfig, world: int, rows: int, seq: int, **kw) -> PlanInputs:
    """The planner's inputs for this process's share of ``model`` (parallel state initialised)."""
    from megatron_rspo.planning.activations import layer_shape

    share, shape = current_share(model, par), layer_shape(model)
    return PlanInputs(share=share, shape=shape, layers=model.num_layers // par.pipeline_model_parallel_size,
                      world=world, tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
                      ep=par.expert_model_parallel_size, etp=par.expert_tp(), bf16=model.bf16,
                      distributed_optimizer=par.use_distributed_optimizer, recompute=model.recompute_granularity,
                      micro_batch_rows=rows, seq_length=seq, **kw)


def measure_step(layout: Layout) -> tuple[int, int]:
    """(predicted train-phase bytes without the CUDA reserve, measured peak bytes) of one step of ``layout``."""
    from megatron_rspo.engine import Engine
    from megatron_rspo.model.logprobs import forward_logits, token_logprobs
    from megatron_rspo.model.provider import init_distributed

    par = ParallelConfig()
    init_distributed(par, seed=1)
    m, rows, seq = layout.model, layout.rows, layout.seq
    predicted = estimate(plan_inputs_for(m, par, 1, rows, seq, routing_records=False, cuda_reserve_gib=0.0))
    engine = Engine(m, par, OptimConfig(lr=1e-4), train_iters=2)
    tokens = torch.randint(0, m.vocab_size, (rows, seq + 1), generator=torch.Generator().manual_seed(0))

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        logits = forward_logits(model, batch[:, :-1])
        return logits, lambda out: (-token_logprobs(out, batch[:, 1:]).mean(), {})

    engine.train_step(forward_step, [tokens], seq_length=seq, micro_batch_size=rows)  # Adam's state exists now
    state = [v for s in engine.optimizer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    resident = [*engine.module.parameters(), *(b.grad_data for b in engine.ddp.buffers), *state]
    with PeakTracker(resident) as tracker:
        engine.train_step(forward_step, [tokens], seq_length=seq, micro_batch_size=rows)
    return predicted.total("train"), tracker.peak


def validate(layouts: tuple[Layout, ...] = LAYOUTS) -> list[tuple[str, int, int]]:
    """[(layout, predicted bytes, measured bytes)] on this machine."""
    return [(lay.name, *measure_step(lay)) for lay in layouts]

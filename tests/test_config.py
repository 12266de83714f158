"""Config flags and up-front validation of incompatible parallel / MoE settings."""

from __future__ import annotations

import argparse

import pytest

from megatron_rspo.config import ConfigError, ModelConfig, ParallelConfig, add_dataclass_args, from_args
from megatron_rspo.validation import validate


def parse(argv: list[str]) -> tuple[ModelConfig, ParallelConfig]:
    p = argparse.ArgumentParser()
    add_dataclass_args(p, ModelConfig)
    add_dataclass_args(p, ParallelConfig)
    ns = p.parse_args(argv)
    return from_args(ModelConfig, ns), from_args(ParallelConfig, ns)


def test_megatron_style_flags():
    m, par = parse(["--num-layers", "4", "--hidden-size", "128", "--num-experts", "8", "--moe-router-topk", "2",
                    "--expert-model-parallel-size", "2", "--moe-router-score-function", "sigmoid",
                    "--no-swiglu", "--sequence-parallel", "--tensor-model-parallel-size", "2"])
    assert (m.num_layers, m.hidden_size, m.num_experts, m.moe_router_topk) == (4, 128, 8, 2)
    assert m.moe_router_score_function == "sigmoid" and not m.swiglu
    assert par.expert_model_parallel_size == 2 and par.sequence_parallel


def test_bad_choice_rejected_by_parser():
    with pytest.raises(SystemExit):
        parse(["--moe-router-score-function", "tanh"])


@pytest.mark.parametrize(
    "model_kw, par_kw, world, needle",
    [
        ({"num_experts": 6}, {"expert_model_parallel_size": 4}, 4, "not divisible by --expert-model-parallel-size"),
        ({"num_attention_heads": 3, "hidden_size": 63}, {"tensor_model_parallel_size": 2,
                                                         "sequence_parallel": True}, 2, "--num-attention-heads (3)"),
        ({}, {"tensor_model_parallel_size": 2}, 2, "requires --sequence-parallel"),
        ({}, {"sequence_parallel": True}, 1, "needs --tensor-model-parallel-size > 1"),
        ({"num_layers": 3}, {"pipeline_model_parallel_size": 2}, 2, "--num-layers (3)"),
        ({"moe_router_topk": 5}, {}, 1, "--moe-router-topk (5)"),
        ({}, {"tensor_model_parallel_size": 2, "sequence_parallel": True}, 3, "world size 3"),
        ({"hidden_size": 66}, {}, 1, "--hidden-size (66) is not divisible"),
        ({"num_query_groups": 3}, {}, 1, "--num-query-groups (3)"),
        ({"moe_router_enable_expert_bias": True}, {}, 1, "requires --moe-router-score-function sigmoid"),
        ({}, {"expert_model_parallel_size": 4}, 2, "must divide DP*TP"),
        ({"moe_router_load_balancing_type": "sinkhorn"}, {}, 1, "sinkhorn"),
        # EP = 1: expert grads are reduced over the dense DP group only, so experts must be TP-split like MLPs
        ({}, {"tensor_model_parallel_size": 2, "sequence_parallel": True, "expert_tensor_parallel_size": 1}, 2,
         "must equal --tensor-model-parallel-size (2) when --expert-model-parallel-size is 1"),
        ({}, {"tensor_model_parallel_size": 2, "sequence_parallel": True, "expert_tensor_parallel_size": 2,
              "expert_model_parallel_size": 2}, 2, "x expert TP (2) must divide DP*TP = 2"),
    ],
)
def test_invalid_combinations_fail_with_clear_message(model_kw, par_kw, world, needle):
    with pytest.raises(ConfigError, match=None) as exc:
        validate(ModelConfig(vocab_size=64, **model_kw), ParallelConfig(**par_kw), world)
    assert needle in str(exc.value)


def test_several_errors_reported_together():
    with pytest.raises(ConfigError) as exc:
        validate(ModelConfig(num_experts=6, num_layers=3), ParallelConfig(expert_model_parallel_size=4,
                                                                          pipeline_model_parallel_size=2), 8)
    assert "--num-experts (6)" in str(exc.value) and "--num-layers (3)" in str(exc.value)


def test_valid_layouts_pass():
    validate(ModelConfig(num_experts=8), ParallelConfig(expert_model_parallel_size=2), 2)
    validate(ModelConfig(), ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), 2)
    validate(ModelConfig(num_layers=4), ParallelConfig(pipeline_model_parallel_size=2), 2)
    validate(ModelConfig(num_experts=8), ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                                        expert_model_parallel_size=2), 4)
    validate(ModelConfig(num_experts=4), ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                                        expert_model_parallel_size=2), 2)  # EP from the TP ranks


def test_expert_tensor_parallel_default():
    assert ParallelConfig(tensor_model_parallel_size=2).expert_tp() == 2  # EP = 1: experts split like MLPs
    assert ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2).expert_tp() == 1
    assert ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                          expert_tensor_parallel_size=2).expert_tp() == 2


def test_every_config_field_has_help():
    import dataclasses

    from megatron_rspo.config import OptimConfig, RunConfig, field_help
    from megatron_rspo.rl.config import RLConfig
    from megatron_rspo.sft import SFTConfig

    for cls in (ModelConfig, ParallelConfig, OptimConfig, RunConfig, RLConfig, SFTConfig):
        missing = [f.name for f in dataclasses.fields(cls) if not field_help(f).strip()]
        assert not missing, f"{cls.__name__}: {missing}"


def test_zero_sizes_and_layout_errors_reported_together():
    with pytest.raises(ConfigError) as exc:
        validate(ModelConfig(num_layers=0, num_experts=6, moe_router_load_balancing_type="bogus"),
                 ParallelConfig(expert_model_parallel_size=4, num_microbatches=0), 4)
    msg = str(exc.value)
    for needle in ("--num-layers must be >= 1", "--num-microbatches must be >= 1", "--num-experts (6) is not divisible",
                   "'bogus' is not one of"):
        assert needle in msg, needle

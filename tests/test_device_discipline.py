"""Device discipline (DESIGN §8): what the loop creates lives on the model's device, and collectives go
through the parallel plumbing, which places tensors for the backend.

The meta device stands in for CUDA: any tensor the loss/step path creates on the CPU and combines with
the model's tensors fails with "Tensor on device meta is not on the expected device cpu!".
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from megatron_rspo import distributed
from megatron_rspo.rl.experience import build_experience, minibatches
from megatron_rspo.rl.losses import POLICY_LOSSES, PolicyLossConfig
from megatron_rspo.rl.metrics import MetricAccumulator, gamma_stats, masked_quantile, pooled_mean_std
from megatron_rspo.rl.parallel import StageRouting
from megatron_rspo.rl.router_shift import RouterShiftConfig
from megatron_rspo.rl.step import PolicyOutput, StepOptions, TrainStep, loss_units

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_rspo"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "gather",
    "scatter", "send", "recv", "isend", "irecv", "batch_isend_irecv", "gather_object", "scatter_object_list",
    "monitored_barrier",
}
# The parallel plumbing, plus checkpoint/convert (object collectives of their own, outside the loop).
ALLOWED = {"distributed.py", "rl/parallel.py", "rl/routing_exchange.py", "checkpoint.py"}


def _direct_collective_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            if ast.unparse(node.func.value) in aliases:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node.func)}")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno} from torch.distributed import {a.name}"
                      for a in node.names if a.name in COLLECTIVES]
    return found


def test_only_the_parallel_plumbing_calls_collectives():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED or rel.startswith("convert/"):
            continue
        offenders += _direct_collective_calls(path)
    assert not offenders, "collectives outside the parallel plumbing:\n" + "\n".join(offenders)


def test_the_scanner_sees_a_direct_collective(tmp_path, monkeypatch):
    bad = PACKAGE / "_probe_for_test.py"
    bad.write_text("import torch.distributed as d\n\ndef f(t):\n    d.all_reduce(t)\n")
    try:
        assert _direct_collective_calls(bad) == ["_probe_for_test.py:4 d.all_reduce"]
    finally:
        bad.unlink()


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_experience_lives_on_the_rollout_device():
    n, s = 8, 7
    exp = build_experience(_meta(n, s, dtype=torch.long), _meta(n, s - 1), torch.full((n,), s), [1.0, 0.0] * 4,
                           num_generations=4, normalize_std=True, routing_ids=_meta(n, s, 2, 2, dtype=torch.uint8))
    for name in ("tokens", "response_mask", "advantages", "rewards", "lengths", "routing_ids"):
        assert getattr(exp, name).device.type == "meta", name
    assert exp.padding_mask().device.type == "meta"
    parts = minibatches(exp, 2, torch.Generator().manual_seed(0))  # a host permutation indexes meta rows
    assert all(p.tokens.device.type == "meta" for p in parts)


@pytest.mark.parametrize("algorithm", sorted(POLICY_LOSSES))
def test_every_policy_loss_runs_on_the_model_device(algorithm):
    n, t = 4, 6
    logp = _meta(n, t).requires_grad_()
    loss, stats = POLICY_LOSSES[algorithm](logp, _meta(n, t), _meta(n), _meta(n, t), PolicyLossConfig(),
                                          gamma=_meta(n, t), normalizer=torch.ones((), device="meta"))
    assert loss.device.type == "meta" and all(v.device.type == "meta" for v in stats.values())
    loss.backward()


def test_train_step_loss_and_stats_run_on_the_model_device(monkeypatch):
    """The training micro-batch's loss function (log-probs, γ, loss, entropy, KL, stats) on meta tensors."""
    n, s, layers, k, v = 4, 6, 2, 2, 11
    opts = StepOptions(algorithm="rspo", loss=PolicyLossConfig(), router_shift=RouterShiftConfig(enabled=True),
                       routing_replay=False, temperature=0.7, num_moe_layers=layers, kl_coeff=0.1, entropy_coeff=0.01)
    exp = build_experience(_meta(n, s + 1, dtype=torch.long), _meta(n, s), torch.full((n,), s + 1), [1.0, 0.0] * 2,
                           num_generations=2, normalize_std=True,
                           routing_ids=_meta(n, s + 1, layers, k, dtype=torch.uint8))
    exp.old_logp, exp.ref_logp = _meta(n, s), _meta(n, s)
    step = TrainStep(opts, normalizer=loss_units("rspo", opts.loss, exp.response_mask), loss_scale=1.0)
    routing = StageRouting(_meta(n, s, layers), _meta(n, s, layers), _meta(layers, 4))
    logits = _meta(n, s, v).requires_grad_()
    loss, stats = step._loss(PolicyOutput(opts), logits, exp, routing, have_shift=True, have_ids=True)
    assert loss.device.type == "meta"
    assert {k_ for k_, t in stats.items() if t is not None and t.device.type != "meta"} == set()
    acc = MetricAccumulator()
    acc.add({k_: t for k_, t in stats.items() if k_ != "expert_load"})
    assert all(t.device.type == "meta" for t in acc.result().values())


def test_sync_free_statistics_on_meta():
    x, m = _meta(3, 5), _meta(3, 5)
    assert masked_quantile(x, m, 0.05).device.type == "meta"
    assert all(t.device.type == "meta" for t in gamma_stats(x, m, 0.8).values())
    mean, std = pooled_mean_std(_meta(()), _meta(()), _meta(()))
    assert mean.device.type == std.device.type == "meta"


def test_single_rank_collectives_keep_the_device():
    t = torch.arange(3.0)
    assert distributed.all_reduce(t) is t
    assert distributed.comm_device().type == "cpu"
    out = distributed.reduce_scalars({"a_max": torch.tensor(2.0), "b": 3.0}, {"a_max": "max"})
    assert out == {"a_max": 2.0, "b": 3.0}

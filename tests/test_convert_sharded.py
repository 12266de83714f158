"""HF -> Megatron conversion under torchrun with the target layout (each rank converts only its shard):
the result equals the one-process conversion bit for bit."""

from __future__ import annotations

import os
import re

import pytest
import torch
from conftest import run_torchrun

from megatron_rspo import checkpoint as ckpt
from megatron_rspo.config import ParallelConfig
from megatron_rspo.convert import ConversionError, convert_hf_to_megatron, hf_to_model_config
from megatron_rspo.convert.hf_to_megatron import read_hf_config, validate_target_layout

pytest.importorskip("transformers")
from test_convert_hf import QUIET, make_hf  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "dist", "convert_sharded.py")


@pytest.fixture(scope="module")
def dist_env():
    from megatron_rspo.model.provider import init_distributed

    init_distributed(ParallelConfig(), seed=1)
    yield


@pytest.fixture(scope="module")
def hf_and_reference(dist_env, tmp_path_factory):
    """A tiny Qwen3-MoE (8 experts, 2 KV groups, head_dim 24, several safetensors shards) and its
    one-process conversion."""
    root = tmp_path_factory.mktemp("sharded")
    make_hf("qwen3_moe", str(root / "hf"), seed=5)
    convert_hf_to_megatron(str(root / "hf"), str(root / "ref"), log=QUIET)
    return root



def _torchrun(hf_dir: str, out_dir: str, *flags: str) -> list[float]:
    proc = run_torchrun(SCRIPT, "--hf-dir", hf_dir, "--save", out_dir, *flags, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    done = re.findall(r"CONVERT_DONE rank=\d+ rc=0 peak_growth_mib=([\d.]+)", proc.stdout)
    assert len(done) == 2, proc.stdout[-3000:]
    assert "sharded over 2 ranks" in proc.stderr, proc.stderr[-3000:]
    return [float(x) for x in done]


def _load_1proc(root: str) -> dict[str, torch.Tensor]:
    from megatron_rspo.model.provider import build_model

    cfg = ckpt.read_model_config(ckpt.resolve_checkpoint_dir(root))
    model = build_model(cfg, ParallelConfig(), init_weights=False)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # anything the checkpoint does not set would show
    ckpt.load_checkpoint(root, model, model_config=cfg)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.dist
@pytest.mark.parametrize("layout", [
    ("--expert-model-parallel-size", "2"),  # DP=2, experts split by EP (expert 0-3 rank 0, 4-7 rank 1)
    ("--tensor-model-parallel-size", "2"),  # TP=2 (+SP); experts tensor-parallel too (QKV per group, fc1 halves)
], ids=["ep2", "tp2"])
def test_sharded_conversion_equals_one_process(hf_and_reference, layout):
    root = hf_and_reference
    name = "out_" + "_".join(layout).replace("-", "")
    _torchrun(str(root / "hf"), str(root / name), *layout)
    run = ckpt.read_run_config(ckpt.resolve_checkpoint_dir(str(root / name)))
    flag, value = layout[0].lstrip("-").replace("-", "_"), int(layout[1])
    assert run["ParallelConfig"][flag] == value
    assert run["ParallelConfig"]["sequence_parallel"] == (flag == "tensor_model_parallel_size")
    ref, got = _load_1proc(str(root / "ref")), _load_1proc(str(root / name))
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert not v.isnan().any(), k
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_layout_must_fit_the_world(hf_and_reference):
    _, model = hf_to_model_config(read_hf_config(str(hf_and_reference / "hf")))
    validate_target_layout(model, ParallelConfig(expert_model_parallel_size=2), world_size=4)  # DP=4: fine
    with pytest.raises(ConversionError, match=r"world size 2 .*not divisible by TP\*PP = 4"):
        validate_target_layout(model, ParallelConfig(tensor_model_parallel_size=4), world_size=2)
    with pytest.raises(ConversionError, match=r"expert-model-parallel-size \(4\) x expert TP \(1\) must divide"):
        validate_target_layout(model, ParallelConfig(expert_model_parallel_size=4), world_size=2)
    with pytest.raises(ConversionError, match=r"num-experts \(8\) is not divisible by --expert-model-parallel-size"):
        validate_target_layout(model, ParallelConfig(expert_model_parallel_size=3), world_size=3)

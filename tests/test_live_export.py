"""Live export (convert/live_export.py): a live model's weights as HF tensors in bounded buckets, equal to the
offline conversion of a checkpoint, loadable by transformers, and the same from 2-rank layouts (torchrun)."""

from __future__ import annotations

import os
import re

import pytest
import torch
from conftest import run_torchrun

from megatron_rspo import checkpoint as ckpt
from megatron_rspo.config import ModelConfig, ParallelConfig
from megatron_rspo.convert import ConversionError, convert_megatron_to_hf
from megatron_rspo.convert.hf_layout import HFCheckpointReader
from megatron_rspo.convert.live_export import hf_config, hf_weight_buckets

transformers = pytest.importorskip("transformers")

SCRIPT = os.path.join(os.path.dirname(__file__), "dist", "live_export.py")
COMMON = dict(vocab_size=96, num_layers=2, hidden_size=48, ffn_hidden_size=64, moe_ffn_hidden_size=40,
              num_attention_heads=4, num_query_groups=2, num_experts=4, moe_router_topk=2,
              max_position_embeddings=64)
MODELS = {  # name: (HF model type, ModelConfig)
    "mixtral": ("mixtral", ModelConfig(**COMMON, norm_epsilon=1e-5, rotary_base=500000)),
    "qwen3_moe_tied": ("qwen3_moe", ModelConfig(**{**COMMON, "num_experts": 8}, qk_layernorm=True, kv_channels=16,
                                                untie_embeddings_and_output_weights=False)),
}
BUCKET = 24 << 10
QUIET = lambda *_: None  # noqa: E731


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every tensor distinct and O(1) (norms around 1, routers sharp): a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "router" in name else 0.08
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in name else
                    scale * torch.randn(p.shape, generator=g))


def _flat(buckets: list) -> list[tuple[str, torch.Tensor]]:
    return [kv for bucket in buckets for kv in bucket]


def _read_all(hf_dir: str) -> dict[str, torch.Tensor]:
    r = HFCheckpointReader(hf_dir)
    return {k: r.get(k) for k in r.keys()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per model: the live 1-rank model, its config, a checkpoint of it and its 1-rank export (ref.pt)."""
    from megatron_rspo.model.provider import build_model, init_distributed

    init_distributed(ParallelConfig(), seed=1)
    root = tmp_path_factory.mktemp("live_export")
    out = {}
    for i, (name, (model_type, cfg)) in enumerate(MODELS.items()):
        model = build_model(cfg, ParallelConfig())
        _randomize(model, seed=i)
        model.eval()
        ckpt.save_checkpoint(str(root / name / "ckpt"), 1, model, configs=(cfg, ParallelConfig()), save_rng=False)
        got = _flat(hf_weight_buckets(model, cfg, bucket_bytes=BUCKET))
        torch.save({"names": [n for n, _ in got], "tensors": dict(got)}, root / name / "ref.pt")
        out[name] = (model, cfg, model_type)
    return root, out


@pytest.mark.parametrize("name", list(MODELS))
def test_export_equals_offline_conversion(models, name):
    root, found = models
    model, cfg, model_type = found[name]
    buckets = list(hf_weight_buckets(model, cfg, bucket_bytes=BUCKET))
    assert len(buckets) > 3
    for bucket in buckets:
        assert len(bucket) == 1 or sum(t.numel() * t.element_size() for _, t in bucket) <= BUCKET
    got = _flat(buckets)
    names = [n for n, _ in got]
    layer_of = [int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))]
    tail = ["model.norm.weight"] + (["lm_head.weight"] if cfg.untie_embeddings_and_output_weights else [])
    assert names[0] == "model.embed_tokens.weight" and names[-len(tail):] == tail  # the streaming order
    assert layer_of == sorted(layer_of) and len(layer_of) == len(names) - 1 - len(tail)
    convert_megatron_to_hf(str(root / name / "ckpt"), str(root / name / "hf"), log=QUIET)
    ref = _read_all(str(root / name / "hf"))
    assert sorted(names) == sorted(ref) and len(names) == len(ref)
    for n, t in got:
        assert t.device.type == "cpu" and t.dtype == ref[n].dtype and torch.equal(t, ref[n]), n
    if name == "mixtral":  # a cast on the way: the same rounding as the converter's --dtype
        convert_megatron_to_hf(str(root / name / "ckpt"), str(root / name / "bf16"), dtype="bf16", log=QUIET)
        ref = _read_all(str(root / name / "bf16"))
        got = _flat(hf_weight_buckets(model, cfg, bucket_bytes=BUCKET, dtype=torch.bfloat16))
        assert sorted(n for n, _ in got) == sorted(ref)
        assert all(t.dtype == torch.bfloat16 and torch.equal(t, ref[n]) for n, t in got)
    with torch.no_grad():  # a copy, not a view of the live weights: training on does not change it
        before = got[0][1].clone()
        model.embedding.word_embeddings.weight.add_(1.0)
        assert torch.equal(got[0][1], before)
        model.embedding.word_embeddings.weight.sub_(1.0)


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_loads_the_export(models, tmp_path, name):
    """What an engine does with the stream: config.json from ``hf_config``, the buckets as safetensors files;
    transformers loads them with no missing, unexpected or misshapen tensor, and computes our logits."""
    import json

    from safetensors.torch import save_file

    from megatron_rspo.model.logprobs import forward_logits

    _, found = models
    model, cfg, model_type = found[name]
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg, model_type)))
    weight_map = {}
    for i, bucket in enumerate(hf_weight_buckets(model, cfg, bucket_bytes=BUCKET)):
        save_file(dict(bucket), str(tmp_path / f"part-{i}.safetensors"), metadata={"format": "pt"})
        weight_map.update({n: f"part-{i}.safetensors" for n, _ in bucket})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert type(hf).__name__ == hf_config(cfg, model_type)["architectures"][0]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    if not cfg.untie_embeddings_and_output_weights:
        assert "lm_head.weight" not in weight_map and hf.lm_head.weight is hf.model.embed_tokens.weight
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (forward_logits(model, tokens) - hf.eval()(tokens).logits).abs().max().item()
    print(f"{name}: max |logits diff| = {diff:.2e}")
    assert diff <= 1e-5, diff


class _Dropping:
    """A model whose sharded state dict lacks one expert's fc2 (a layout that loses a shard)."""

    def __init__(self, gpt: torch.nn.Module) -> None:
        self.gpt, self.decoder = gpt, gpt.decoder

    def sharded_state_dict(self) -> dict:
        sd = self.gpt.sharded_state_dict()
        del sd["decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"]
        return sd


def test_clear_errors(models):
    from dataclasses import replace

    _, found = models
    model, cfg, _ = found["mixtral"]
    with pytest.raises(ConversionError, match=r"linear_fc2\.weight: the main replicas cover 13440 of 15360"):
        next(hf_weight_buckets(_Dropping(model), cfg))
    with pytest.raises(ConversionError, match=r"router\.weight: model \(2, 4, 48\), the config gives \(2, 8, 48\)"):
        next(hf_weight_buckets(model, replace(cfg, num_experts=8)))
    with pytest.raises(ConversionError, match=r"output_layer\.weight'\] have no HF mapping"):
        next(hf_weight_buckets(model, replace(cfg, untie_embeddings_and_output_weights=False)))
    with pytest.raises(ValueError, match="dst=1"):
        next(hf_weight_buckets(model, cfg, dst=1))


def test_streams_and_finishes_the_param_gather(models, monkeypatch):
    """The first bucket comes after at most two units are gathered (not the whole model); a DDP model with the
    distributed optimizer's overlapped param all-gather is synced first."""
    from types import SimpleNamespace

    from megatron_rspo import distributed

    _, found = models
    model, cfg, _ = found["mixtral"]

    class OverlappedDDP:
        def __init__(self, module: torch.nn.Module) -> None:
            self.module, self.synced = module, []
            self.ddp_config = SimpleNamespace(use_distributed_optimizer=True, overlap_param_gather=True)

        def start_param_sync(self, force_sync: bool = False) -> None:
            self.synced.append(force_sync)

    gathers, real = [], distributed.gather_object
    monkeypatch.setattr(distributed, "gather_object", lambda obj, dst=0, group=None: (gathers.append(len(obj)),
                                                                                     real(obj, dst, group))[1])
    ddp = OverlappedDDP(model)
    stream = hf_weight_buckets(ddp, cfg, bucket_bytes=BUCKET)
    next(stream)
    assert ddp.synced == [True] and len(gathers) <= 2
    rest = list(stream)
    assert len(gathers) == cfg.num_layers + 2 and len(rest) > 2


@pytest.mark.dist
def test_two_rank_layouts_equal_one_rank(models):
    """EP=2 (alltoall, allgather), TP=2 + SP, PP=2, tied embeddings under TP (tied + PP > 1 needs CUDA in
    Megatron), and a DDP-wrapped EP=2 model
    after an optimizer step (against the offline conversion of a checkpoint saved right after it)."""
    root, _ = models
    layouts = ["ep2_alltoall", "ep2_allgather", "tp2", "pp2", "tp2_tied", "ep2_step", "dp2"]
    proc = run_torchrun(SCRIPT, str(root), *layouts, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    done = re.findall(r"LIVE_EXPORT_OK (\w+)", proc.stdout)
    assert done == layouts, proc.stdout[-3000:]
    # engine_weight_units: each destination receives what it lacks, exactly once, nothing through a third rank
    found = re.findall(r"UNITS_OK (\w+) received=(\d+),(\d+) rank1_alone=(\d+) model=(\d+)", proc.stdout)
    units = {m[0]: tuple(map(int, m[1:4])) for m in found}
    model_bytes = {m[0]: int(m[4]) for m in found}
    assert sorted(units) == sorted(set(layouts) - {"ep2_step"}), proc.stdout[-3000:]
    assert units["dp2"] == (0, 0, 0)  # both replicas whole: nothing moves
    for layout in ("ep2_alltoall", "tp2", "pp2"):
        r0, r1, alone = units[layout]
        # each rank holds a share of its own and receives the rest once: the two together hold the model once
        assert 0 < r0 and 0 < r1 and r1 == alone, (layout, units[layout])
        assert r0 + r1 <= model_bytes[layout], (layout, units[layout], model_bytes[layout])

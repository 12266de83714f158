"""HF <-> Megatron conversion: logits and router top-k parity with transformers, exact round trip, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_rspo import checkpoint as ckpt
from megatron_rspo.config import ModelConfig, ParallelConfig
from megatron_rspo.convert import (
    ConversionError,
    UnsupportedModelError,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    hf_to_model_config,
    model_config_to_hf,
)
from megatron_rspo.convert.hf_layout import HFCheckpointReader

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256, dtype="float32")
ARCHS = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=True, head_dim=24)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       norm_topk_prob=False, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 50000.0})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, rope_theta=5e5, rms_norm_eps=1e-5)),
}
QUIET = lambda *_: None  # noqa: E731


def make_hf(model_type: str, out_dir: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random HF model saved in the published sharded layout (several shards)."""
    cfg_name, model_name, extra = ARCHS[model_type]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor distinct and O(1): a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                scale = 0.5 if (name.endswith("gate.weight") and "shared" not in name) else 0.08
                p.copy_(scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(out_dir, max_shard_size="60KB")
    return model


@pytest.fixture(scope="module")
def dist_env():
    from megatron_rspo.model.provider import init_distributed

    init_distributed(ParallelConfig(), seed=1)
    yield


def _megatron_from(ckpt_root: str):
    from megatron_rspo.model.provider import build_model

    model_cfg = ckpt.read_model_config(ckpt.resolve_checkpoint_dir(ckpt_root))
    model = build_model(model_cfg, ParallelConfig())
    ckpt.load_checkpoint(ckpt_root, model, model_config=model_cfg)
    return model.eval(), model_cfg


def _read_all(hf_dir: str) -> dict[str, torch.Tensor]:
    r = HFCheckpointReader(hf_dir)
    return {k: r.get(k) for k in r.keys()}


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_parity_and_round_trip(model_type, dist_env, tmp_path):
    from megatron_rspo.model.routing import RoutingSession, routing_session

    hf_dir, meg_dir, back_dir = str(tmp_path / "hf"), str(tmp_path / "meg"), str(tmp_path / "back")
    hf = make_hf(model_type, hf_dir)
    assert len([n for n in os.listdir(hf_dir) if n.endswith(".safetensors")]) > 1
    convert_hf_to_megatron(hf_dir, meg_dir, log=QUIET)
    model, cfg = _megatron_from(meg_dir)

    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(tokens, output_router_logits=True)
        with routing_session(model, RoutingSession(record=True)) as session:
            logits = model(tokens, torch.arange(12).expand(2, 12), None)
    diff = (logits - ref.logits).abs().max().item()
    print(f"{model_type}: max |logits diff| = {diff:.2e}")
    assert diff <= 1e-4, diff
    ids = RoutingSession.stack(session.recorded_ids, cfg.num_layers).long().sort(-1).values  # [B, S, L, K]
    for layer, router_logits in enumerate(ref.router_logits):
        hf_ids = router_logits.float().softmax(-1).topk(cfg.moe_router_topk, dim=-1).indices.view(2, 12, -1)
        assert torch.equal(ids[:, :, layer], hf_ids.sort(-1).values), f"layer {layer} top-k differs"

    convert_megatron_to_hf(meg_dir, back_dir, max_shard_size="50KB", log=QUIET)
    orig, back = _read_all(hf_dir), _read_all(back_dir)
    assert sorted(back) == sorted(orig)
    for name, t in orig.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    again = transformers.AutoModelForCausalLM.from_pretrained(back_dir).eval()
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, ref.logits)


def test_fused_expert_layout_is_read(dist_env, tmp_path):
    """transformers' in-memory fused experts (experts.gate_up_proj / down_proj) convert like per-expert files."""
    from safetensors.torch import save_file

    hf_dir = str(tmp_path / "hf")
    make_hf("qwen3_moe", hf_dir)
    tensors = _read_all(hf_dir)
    fused, e = {}, ARCHS["qwen3_moe"][2]["num_experts"]
    for name, t in tensors.items():
        if ".experts." not in name:
            fused[name] = t
    for layer in range(COMMON["num_hidden_layers"]):
        x = f"model.layers.{layer}.mlp.experts."
        fused[x + "gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{x}{i}.gate_proj.weight"], tensors[f"{x}{i}.up_proj.weight"]]) for i in range(e)])
        fused[x + "down_proj"] = torch.stack([tensors[f"{x}{i}.down_proj.weight"] for i in range(e)])
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    save_file(fused, str(fused_dir / "model.safetensors"))
    (fused_dir / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    convert_hf_to_megatron(str(fused_dir), str(tmp_path / "meg"), log=QUIET)
    convert_megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "back"), hf_config_from=hf_dir, log=QUIET)
    back = _read_all(str(tmp_path / "back"))
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_bf16_checkpoint(dist_env, tmp_path):
    """--dtype bf16: a bf16 checkpoint that loads into an fp32 model and exports back as bf16."""
    from megatron_rspo.model.provider import build_model

    hf = make_hf("mixtral", str(tmp_path / "hf"))
    convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "meg"), dtype="bf16", log=QUIET)
    cfg = ckpt.read_model_config(ckpt.resolve_checkpoint_dir(str(tmp_path / "meg")))
    assert cfg.bf16
    fp32 = build_model(ModelConfig(**{**cfg.__dict__, "bf16": False}), ParallelConfig())
    ckpt.load_checkpoint(str(tmp_path / "meg"), fp32, model_config=cfg)
    emb = hf.state_dict()["model.embed_tokens.weight"]
    assert torch.equal(fp32.state_dict()["embedding.word_embeddings.weight"], emb.bfloat16().float())
    convert_megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "back"), log=QUIET)
    back = _read_all(str(tmp_path / "back"))
    assert back["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(back["model.embed_tokens.weight"], emb.bfloat16())


def test_unsupported_and_mismatched(dist_env, tmp_path):
    cfg = json.loads(json.dumps({**COMMON, "model_type": "deepseek_v3"}))
    with pytest.raises(UnsupportedModelError, match=r"deepseek_v3.*MLA.*supported: mixtral, qwen2_moe, qwen3_moe"):
        hf_to_model_config(cfg)
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        hf_to_model_config({**COMMON, "model_type": "mixtral", "num_local_experts": 4, "sliding_window": 4096})
    with pytest.raises(UnsupportedModelError, match="RoPE scaling"):
        hf_to_model_config({**COMMON, "model_type": "qwen3_moe", "num_experts": 4, "moe_intermediate_size": 8,
                            "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})

    hf_dir = tmp_path / "hf"
    make_hf("mixtral", str(hf_dir))
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(ConversionError, match=r"shape mismatches: .*w1\.weight: file \(96, 64\), expected \(80, 64\)"):
        convert_hf_to_megatron(str(hf_dir), str(tmp_path / "meg"), log=QUIET)
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 8}))
    with pytest.raises(ConversionError, match=r"missing tensors: .*experts\.4\.w1\.weight"):
        convert_hf_to_megatron(str(hf_dir), str(tmp_path / "meg"), log=QUIET)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="EP=3"):
        convert_hf_to_megatron(str(hf_dir), str(tmp_path / "meg"), ParallelConfig(expert_model_parallel_size=3),
                               log=QUIET)


def test_tool_entry_points_and_synthesized_config(dist_env, tmp_path, capsys):
    import importlib.util

    def tool(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "..", "tools",
                                                                         f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    hf_dir = str(tmp_path / "hf")
    make_hf("qwen2_moe", hf_dir)
    to_meg, to_hf = tool("convert_hf_to_megatron"), tool("convert_megatron_to_hf")
    assert to_meg.main(["--hf-dir", hf_dir, "--save", str(tmp_path / "meg"), "--expert-model-parallel-size", "2",
                        "--tensor-model-parallel-size", "2"]) == 0
    assert "layer 1 from model-0000" in capsys.readouterr().err
    run = ckpt.read_run_config(ckpt.resolve_checkpoint_dir(str(tmp_path / "meg")))
    assert run["ParallelConfig"]["expert_model_parallel_size"] == 2 and run["ParallelConfig"]["sequence_parallel"]
    assert to_meg.main(["--hf-dir", str(tmp_path / "nope"), "--save", str(tmp_path / "x")]) == 2
    # a synthesized HF config (no original at hand) describes the same model
    model_cfg = ModelConfig(**run["ModelConfig"])
    for mt in ("qwen2_moe", "qwen3_moe", "mixtral"):
        m = model_cfg if mt == "qwen2_moe" else ModelConfig(
            **{**run["ModelConfig"], "moe_shared_expert_intermediate_size": None, "moe_shared_expert_gate": False,
               "add_qkv_bias": False, "qk_layernorm": mt == "qwen3_moe", "moe_router_pre_softmax": False})
        _, again = hf_to_model_config(model_config_to_hf(m, mt))
        assert ckpt._effective(again.__dict__) == ckpt._effective(m.__dict__), mt
    assert to_hf.main(["--load", str(tmp_path / "meg"), "--hf-dir", str(tmp_path / "back"),
                       "--model-type", "qwen2_moe"]) == 0
    assert sorted(_read_all(str(tmp_path / "back"))) == sorted(_read_all(hf_dir))

"""One checkpoint format across the local and the transformer-engine spec (state_keys.py), both ways, on every
path: save/load/resume, --init-from, HF export, the live export behind vLLM's weight sync, HF conversion.

The TE side is the stand-in of tests/te_standin.py (TE's checkpoint names, reproduced from megatron-core
0.16.1's spec code); before state_keys.py every test here failed on the MoE post-attention norm
(``pre_mlp_layernorm.weight`` vs ``mlp.linear_fc1.layer_norm_weight``) or on TE's ``_extra_state``.
"""

from __future__ import annotations

import pytest
import torch
from te_standin import TE_SPEC_KEYS, TENormStandIn, canonical_weights, use_te_keyed_models

from megatron_rspo import checkpoint as ckpt
from megatron_rspo.config import ModelConfig, ParallelConfig

MODEL = ModelConfig(vocab_size=96, num_layers=2, hidden_size=48, ffn_hidden_size=64, moe_ffn_hidden_size=40,
                    num_attention_heads=4, num_query_groups=2, num_experts=4, moe_router_topk=2, qk_layernorm=True,
                    kv_channels=16, max_position_embeddings=64)
QUIET = lambda *_: None  # noqa: E731


def _build(seed: int, te: bool, monkeypatch) -> torch.nn.Module:
    from megatron_rspo.model.provider import build_model, init_distributed

    with monkeypatch.context() as m:
        if te:
            use_te_keyed_models(m)
        init_distributed(ParallelConfig(), seed=seed)
        model = build_model(MODEL, ParallelConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # distinct O(1) weights, norms included: a wrong mapping cannot hide
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if p.dim() == 1 else 0.1 * noise)
    return model


def _save(model, root, *, raw: bool = False, monkeypatch=None) -> str:
    """``raw``: keep the model's own key spellings, as Megatron-LM itself writes a TE-spec checkpoint."""
    if raw:
        monkeypatch.setattr(ckpt, "model_sharded_state_dict", lambda m: m.sharded_state_dict())
    try:
        return ckpt.save_checkpoint(str(root), 1, model, configs=(MODEL, ParallelConfig()), save_rng=False)
    finally:
        if raw:
            monkeypatch.undo()


def test_standin_has_the_te_spec_keys(monkeypatch):
    model = _build(1, te=True, monkeypatch=monkeypatch)
    raw = {v.key for v in model.sharded_state_dict().values()}
    assert raw == TE_SPEC_KEYS
    local = {v.key for v in _build(1, te=False, monkeypatch=monkeypatch).sharded_state_dict().values()}
    assert raw - local == {"decoder.layers.pre_mlp_layernorm.weight", "decoder.layers.pre_mlp_layernorm._extra_state",
                           "decoder.layers.self_attention.q_layernorm._extra_state",
                           "decoder.layers.self_attention.k_layernorm._extra_state",
                           "decoder.final_layernorm._extra_state"}
    assert local - raw == {"decoder.layers.mlp.linear_fc1.layer_norm_weight"}


@pytest.mark.parametrize("direction", ["te->local", "local->te", "megatron-lm te->local"])
def test_checkpoint_loads_across_specs(direction, tmp_path, monkeypatch):
    src_te = direction.startswith("te") or direction.startswith("megatron")
    src = _build(1, te=src_te, monkeypatch=monkeypatch)
    path = _save(src, tmp_path / "ckpt", raw=direction.startswith("megatron"), monkeypatch=monkeypatch)
    dst = _build(2, te=not src_te, monkeypatch=monkeypatch)
    assert canonical_weights(dst).keys() == canonical_weights(src).keys()
    assert not all(torch.equal(a, b) for a, b in zip(canonical_weights(dst).values(), canonical_weights(src).values()))
    ckpt.load_checkpoint(path, dst, model_config=MODEL)
    want, got = canonical_weights(src), canonical_weights(dst)
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]
    if direction == "local->te":  # the TE norms' extra state is absent from a local checkpoint: left as it was
        norms = [m for m in dst.modules() if isinstance(m, TENormStandIn)]
        assert norms and all(n.extra_state_loaded == "never" for n in norms)


def test_hf_export_of_a_te_checkpoint(tmp_path, monkeypatch):
    """convert_megatron_to_hf reads a TE-spec checkpoint, in our spelling or in Megatron-LM's, as the local one."""
    from megatron_rspo.convert import convert_megatron_to_hf
    from megatron_rspo.convert.hf_layout import HFCheckpointReader

    local = _build(1, te=False, monkeypatch=monkeypatch)
    te = _build(1, te=True, monkeypatch=monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(canonical_weights(local).values(), canonical_weights(te).values()))
    out = {}
    for name, model, raw in (("local", local, False), ("te", te, False), ("te_raw", te, True)):
        _save(model, tmp_path / name, raw=raw, monkeypatch=monkeypatch)
        convert_megatron_to_hf(str(tmp_path / name), str(tmp_path / f"{name}_hf"), log=QUIET)
        r = HFCheckpointReader(str(tmp_path / f"{name}_hf"))
        out[name] = {k: r.get(k) for k in r.keys()}
    assert out["te"].keys() == out["local"].keys() == out["te_raw"].keys()
    assert any("post_attention_layernorm" in k for k in out["te"])
    for k, t in out["local"].items():
        assert torch.equal(out["te"][k], t) and torch.equal(out["te_raw"][k], t), k


def test_live_export_of_a_te_model_equals_the_local_one(monkeypatch):
    """The weight stream behind --rollout-engine vllm accepts a TE-spec model (it refused it before)."""
    from megatron_rspo.convert.live_export import hf_weight_buckets

    streams = [[kv for bucket in hf_weight_buckets(_build(1, te=te, monkeypatch=monkeypatch), MODEL)
                for kv in bucket] for te in (False, True)]
    assert [n for n, _ in streams[0]] == [n for n, _ in streams[1]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*streams))


def test_hf_conversion_loads_into_a_te_model(tmp_path, monkeypatch):
    """An HF checkpoint converted by our tool (built on the local spec) initialises a TE-spec model."""
    from test_convert_hf import make_hf

    from megatron_rspo.convert import convert_hf_to_megatron
    from megatron_rspo.model.provider import build_model, init_distributed

    make_hf("qwen3_moe", str(tmp_path / "hf"))
    path = convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "meg"), log=QUIET)
    cfg = ckpt.read_model_config(path)
    init_distributed(ParallelConfig(), seed=5)
    local = build_model(cfg, ParallelConfig())
    ckpt.load_checkpoint(path, local, model_config=cfg)
    with monkeypatch.context() as m:
        use_te_keyed_models(m)
        te = build_model(cfg, ParallelConfig())
    ckpt.load_checkpoint(path, te, model_config=cfg)
    want, got = canonical_weights(local), canonical_weights(te)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def _rl(data, tmp_path, *extra: str) -> dict[str, float]:
    from megatron_rspo.rl import trainer

    return trainer.main([
        "--train-data", str(data / "train.jsonl"), "--test-data", str(data / "test.jsonl"),
        "--tokenizer-model", str(data / "tok.model"), "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "2", "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-router-topk", "2",
        "--qk-layernorm", "--rollout-batch-size", "2", "--num-generations", "4", "--max-new-tokens", "6",
        "--num-minibatches", "2", "--log-interval", "1", "--no-progress", *extra])


@pytest.mark.slow
def test_rl_init_from_and_resume_across_specs(countdown_data, tmp_path, monkeypatch):
    """A TE-spec run saves; a local-spec run initialises from it (--init-from) and another resumes it (--load:
    weights, optimizer and schedule), and the other way round."""
    with monkeypatch.context() as m:
        use_te_keyed_models(m)
        _rl(countdown_data, tmp_path, "--train-iters", "1", "--save", str(tmp_path / "te"))
    _rl(countdown_data, tmp_path, "--train-iters", "1", "--init-from", str(tmp_path / "te"),
        "--save", str(tmp_path / "local"))
    resumed = _rl(countdown_data, tmp_path, "--train-iters", "2", "--load", str(tmp_path / "te"),
                  "--save", str(tmp_path / "te"))
    assert ckpt.latest_iteration(str(tmp_path / "te")) == 2 and resumed
    with monkeypatch.context() as m:  # and back: a local checkpoint into TE-spec runs
        use_te_keyed_models(m)
        _rl(countdown_data, tmp_path, "--train-iters", "1", "--init-from", str(tmp_path / "local"))
        _rl(countdown_data, tmp_path, "--train-iters", "2", "--load", str(tmp_path / "local"))

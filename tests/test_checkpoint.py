"""Distributed checkpoints: exact resume, atomic publishing, keep-last-N, clear errors, resharding (torchrun)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from conftest import run_torchrun

from megatron_rspo import checkpoint as ckpt
from megatron_rspo.config import ModelConfig, OptimConfig, ParallelConfig

MODEL = ModelConfig(vocab_size=64, num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, num_experts=4, moe_router_topk=2)
PARALLEL = ParallelConfig()
OPTIM = OptimConfig(lr=1e-2, lr_warmup_iters=2, lr_decay_style="cosine")
B, S = 2, 8


@pytest.fixture(scope="module")
def dist_env():
    from megatron_rspo.model.provider import init_distributed

    init_distributed(PARALLEL, seed=3)
    yield


def _engine():
    from megatron_rspo.engine import Engine

    return Engine(MODEL, PARALLEL, OPTIM, train_iters=10)


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MODEL.vocab_size, (B, S + 1), generator=g)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "pos": torch.arange(S).expand(B, S)}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["pos"], None, labels=batch["labels"])

    def loss_func(losses):
        loss = losses.float().mean()
        return loss, {"loss": loss.detach()}

    return out, loss_func


def _step(engine, seed: int):
    return engine.train_step(_forward_step, [_batch(seed)], seq_length=S, micro_batch_size=B)


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _draws() -> tuple:
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(3)
    return random.random(), float(np.random.rand()), torch.rand(3), tracked


def _assert_same_draws(got: tuple, expected: tuple) -> None:
    assert got[0] == expected[0] and got[1] == expected[1], "python/numpy RNG not restored"
    assert torch.equal(got[2], expected[2]), "torch RNG not restored"
    assert torch.equal(got[3], expected[3]), "Megatron RNG tracker not restored"


def test_resume_is_exact(dist_env, tmp_path):
    e1 = _engine()
    for i in range(2):
        _step(e1, i)
    path = ckpt.save_checkpoint(str(tmp_path), 2, e1.ddp, e1.optimizer, e1.scheduler,
                                extra_state={"iteration": 2, "data_pos": 17, "baseline": [0.5, 0.25]},
                                configs=(MODEL, PARALLEL, OPTIM))
    expected_draws = _draws()
    saved = _params(e1.module)
    _step(e1, 2)
    after1 = _params(e1.module)

    assert os.path.basename(path) == "iter_0000002"
    assert open(tmp_path / ckpt.TRACKER_FILE).read() == "2"
    assert (tmp_path / "iter_0000002" / "rng" / "rank_00000.pt").is_file()
    assert ckpt.read_run_config(path)["ModelConfig"]["num_experts"] == 4

    e2 = _engine()
    res = ckpt.load_checkpoint(str(tmp_path), e2.module, e2.optimizer, e2.scheduler, model_config=MODEL)
    _assert_same_draws(_draws(), expected_draws)
    assert res.iteration == 2 and res.extra_state == {"iteration": 2, "data_pos": 17, "baseline": [0.5, 0.25]}
    assert set(res.contents) >= {"model", "optimizer", "scheduler", "rng"}
    loaded = _params(e2.module)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert e2.scheduler.num_steps == 2
    s1 = e1.optimizer.chained_optimizers[0].optimizer.state
    s2 = e2.optimizer.chained_optimizers[0].optimizer.state
    assert len(s2) == len(s1) > 0
    _step(e2, 2)
    after2 = _params(e2.module)
    assert all(torch.equal(after1[k], after2[k]) for k in after1), "next step differs after resume"
    assert e2.optimizer.param_groups[0]["lr"] == e1.optimizer.param_groups[0]["lr"]


def test_rng_restored(dist_env, tmp_path):
    model = _engine().module
    ckpt.save_checkpoint(str(tmp_path), 1, model, configs=(MODEL,))
    expected = _draws()
    _draws()  # advance every stream
    ckpt.load_checkpoint(str(tmp_path), model)
    _assert_same_draws(_draws(), expected)


def test_rank_state_round_trip(dist_env, tmp_path):
    model = _engine().module
    state = {"stream_position": 7, "pending": [{"index": 3, "experience": {"tokens": torch.arange(4)}}]}
    ckpt.save_checkpoint(str(tmp_path / "a"), 1, model, configs=(MODEL,), rank_state=state)
    got = ckpt.load_checkpoint(str(tmp_path / "a"), model)
    assert "rank_state" in got.contents and got.rank_state["stream_position"] == 7
    assert torch.equal(got.rank_state["pending"][0]["experience"]["tokens"], torch.arange(4))
    ckpt.save_checkpoint(str(tmp_path / "b"), 1, model, configs=(MODEL,))
    assert ckpt.load_checkpoint(str(tmp_path / "b"), model).rank_state is None


def test_crash_mid_save_keeps_previous(dist_env, tmp_path, monkeypatch):
    model = _engine().module
    ckpt.save_checkpoint(str(tmp_path), 1, model, configs=(MODEL,), extra_state={"it": 1})
    real_save = ckpt.dist_checkpointing.save

    def crash_after_writing(*args, **kwargs):
        real_save(*args, **kwargs)
        raise RuntimeError("simulated crash")

    def stale() -> list[str]:
        return sorted(n for n in os.listdir(tmp_path) if ".tmp-" in n)

    monkeypatch.setattr(ckpt.dist_checkpointing, "save", crash_after_writing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ckpt.save_checkpoint(str(tmp_path), 2, model, configs=(MODEL,))
    monkeypatch.undo()
    assert len(stale()) == 1 and stale()[0].startswith("iter_0000002.tmp-")
    assert ckpt.latest_iteration(str(tmp_path)) == 1
    # crash after every file is written, before the rename: still not published
    monkeypatch.setattr(ckpt, "_publish", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash at rename")))
    with pytest.raises(RuntimeError, match="crash at rename"):
        ckpt.save_checkpoint(str(tmp_path), 3, model, configs=(MODEL,))
    monkeypatch.undo()
    assert len(stale()) == 1 and stale()[0].startswith("iter_0000003.tmp-")  # the older one was cleaned
    assert ckpt.latest_iteration(str(tmp_path)) == 1
    assert ckpt.load_checkpoint(str(tmp_path), model).extra_state == {"it": 1}
    ckpt.save_checkpoint(str(tmp_path), 4, model, configs=(MODEL,))
    assert not stale(), "stale temp dirs not cleaned"
    assert ckpt.latest_iteration(str(tmp_path)) == 4


def test_keep_last_and_resave(dist_env, tmp_path):
    model = _engine().module
    for it in (1, 2, 3, 4):
        ckpt.save_checkpoint(str(tmp_path), it, model, configs=(MODEL,), keep_last=2, extra_state={"it": it})
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("iter_")) == ["iter_0000003", "iter_0000004"]
    ckpt.save_checkpoint(str(tmp_path), 4, model, configs=(MODEL,), extra_state={"it": 44})  # overwrite
    assert ckpt.load_checkpoint(str(tmp_path), model).extra_state == {"it": 44}
    # an iter_* directory can be named directly, and an explicit iteration picked from the root
    assert ckpt.load_checkpoint(str(tmp_path / "iter_0000003"), model).iteration == 3
    assert ckpt.load_checkpoint(str(tmp_path), model, iteration=3).extra_state == {"it": 3}
    # no tracker (crash between rename and tracker write): the newest complete dir is used
    os.remove(tmp_path / ckpt.TRACKER_FILE)
    assert ckpt.latest_iteration(str(tmp_path)) == 4


def test_clear_errors(dist_env, tmp_path):
    from megatron_rspo.model.provider import build_model

    model = _engine().module
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint found"):
        ckpt.load_checkpoint(str(tmp_path), model)
    ckpt.save_checkpoint(str(tmp_path), 5, model, configs=(MODEL, PARALLEL))
    bigger = ModelConfig(**{**MODEL.__dict__, "num_experts": 8, "moe_router_pre_softmax": True})
    other = build_model(bigger, PARALLEL)
    with pytest.raises(ckpt.ConfigMismatchError, match=r"num_experts: checkpoint 4, current 8") as err:
        ckpt.load_checkpoint(str(tmp_path), other, model_config=bigger)
    assert "moe_router_pre_softmax" in str(err.value)
    with pytest.raises(ckpt.ConfigMismatchError, match=r"router\.weight: checkpoint \(2, 4, 32\), model \(2, 8, 32\)"):
        ckpt.load_checkpoint(str(tmp_path), other)  # no config given: the tensor shapes still catch it
    with pytest.raises(ckpt.CheckpointError, match="iter_0000007 does not exist"):
        ckpt.load_checkpoint(str(tmp_path), model, iteration=7)
    os.remove(tmp_path / "iter_0000005" / "common.pt")
    with pytest.raises(ckpt.CheckpointError, match="missing common.pt"):
        ckpt.load_checkpoint(str(tmp_path), model)


def test_model_only_checkpoint_leaves_optimizer_fresh(dist_env, tmp_path):
    e = _engine()
    ckpt.save_checkpoint(str(tmp_path), 0, e.module, configs=(MODEL,))
    res = ckpt.load_checkpoint(str(tmp_path), e.module, e.optimizer, e.scheduler)
    assert "optimizer" not in res.contents and e.scheduler.num_steps == 0
    _step(e, 0)  # still trains



@pytest.mark.dist
def test_reshard_one_rank_save_to_ep2(dist_env, tmp_path):
    """Save on 1 rank, load with EP=2 on 2 ranks (torchrun, gloo): every local shard equals its slice."""
    model = _engine().module
    ckpt.save_checkpoint(str(tmp_path / "ckpt"), 1, model, configs=(MODEL, PARALLEL))
    torch.save(_params(model), tmp_path / "ref.pt")
    script = os.path.join(os.path.dirname(__file__), "dist", "ckpt_reshard.py")
    proc = run_torchrun(script, str(tmp_path / "ckpt"), str(tmp_path / "ref.pt"), str(tmp_path / "ep2"), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("RESHARD_OK") == 2, proc.stdout[-3000:]
    # the EP=2 save holds the same global tensors: exporting either gives identical HF files
    from megatron_rspo.convert import convert_megatron_to_hf
    from megatron_rspo.convert.hf_layout import HFCheckpointReader

    exported = []
    for src in ("ckpt", "ep2"):
        convert_megatron_to_hf(str(tmp_path / src), str(tmp_path / f"hf_{src}"), log=lambda *_: None)
        r = HFCheckpointReader(str(tmp_path / f"hf_{src}"))
        exported.append({k: r.get(k) for k in r.keys()})
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])

"""torchrun worker (2 ranks): load a 1-rank checkpoint with EP=2; compare each local shard with the reference;
then save it again from the EP=2 layout (the test exports both checkpoints to HF and compares).

Usage: torchrun --nproc-per-node=2 ckpt_reshard.py CKPT_DIR REF_PARAMS.pt OUT_CKPT_DIR
"""

from __future__ import annotations

import re
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def _step(engine, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 100 * dist.get_rank())  # each DP rank its own batch
    tokens = torch.randint(0, engine.model_cfg.vocab_size, (2, 9), generator=g)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch[:, :-1], torch.arange(8).expand(2, 8), None, labels=batch[:, 1:])
        return out, lambda losses: (losses.float().mean(), {})

    engine.train_step(forward_step, [tokens], seq_length=8, micro_batch_size=2)


def _resume_with_optimizer(init_dir: str, save_dir: str, model_cfg, parallel) -> None:
    """EP=2 with dense + expert optimizers: save after a step, resume in a fresh engine, next step identical."""
    from megatron_rspo import checkpoint as ckpt
    from megatron_rspo.config import OptimConfig
    from megatron_rspo.engine import Engine

    def engine():
        return Engine(model_cfg, parallel, OptimConfig(lr=1e-2, lr_warmup_iters=1), train_iters=5)

    e1 = engine()
    ckpt.load_checkpoint(init_dir, e1.module, e1.optimizer, e1.scheduler)
    _step(e1, 0)
    ckpt.save_checkpoint(save_dir, 1, e1.ddp, e1.optimizer, e1.scheduler, configs=(model_cfg, parallel))
    e2 = engine()
    ckpt.load_checkpoint(save_dir, e2.module, e2.optimizer, e2.scheduler, model_config=model_cfg)
    _step(e1, 1)
    _step(e2, 1)
    p1, p2 = e1.module.state_dict(), e2.module.state_dict()
    for k, v in p1.items():
        if isinstance(v, torch.Tensor) and not torch.equal(v, p2[k]):
            raise SystemExit(f"rank {dist.get_rank()}: {k} differs after resuming with the optimizer")


def main() -> None:
    from megatron.core import parallel_state

    from megatron_rspo import checkpoint as ckpt
    from megatron_rspo.config import load_model_config
    from megatron_rspo.model.provider import build_model, init_distributed

    ckpt_dir, ref_file, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    path = ckpt.resolve_checkpoint_dir(ckpt_dir)
    model_cfg = load_model_config(f"{path}/{ckpt.RUN_CONFIG_FILE}")
    from megatron_rspo.config import ParallelConfig

    parallel = ParallelConfig(expert_model_parallel_size=2)
    init_distributed(parallel, seed=99)  # different init: loading must overwrite everything
    model = build_model(model_cfg, parallel)
    res = ckpt.load_checkpoint(ckpt_dir, model, model_config=model_cfg)

    ref = torch.load(ref_file)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    local = model_cfg.num_experts // 2
    checked = 0
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        # local expert i on EP rank r is global expert r * local + i
        ref_name = re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{ep_rank * local + int(m.group(1))}.",
                          name)
        if not torch.equal(value, ref[ref_name]):
            raise SystemExit(f"rank {dist.get_rank()}: {name} != reference {ref_name}")
        checked += 1
    n_experts = sum(1 for n in model.state_dict() if "local_experts" in n and n.endswith("fc1.weight"))
    assert n_experts == local * model_cfg.num_layers, n_experts
    assert res.iteration == 1
    ckpt.save_checkpoint(out_dir, 2, model, configs=(model_cfg, parallel))
    _resume_with_optimizer(ckpt_dir, out_dir + "_opt", model_cfg, parallel)
    print(f"RESHARD_OK rank={dist.get_rank()} ep_rank={ep_rank} tensors={checked}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

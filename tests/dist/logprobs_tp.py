"""Worker for tests/test_logprobs_memory.py::test_vocab_parallel_tp2: vocab-parallel log-probs on 2 ranks.

    torchrun --nproc-per-node=2 logprobs_tp.py WORK_DIR

Every rank builds the same full-vocabulary inputs (seeded), keeps its vocab shard, and compares with
torch.log_softmax on the full vocabulary (the single-rank result): the standard path on sharded logits,
the fused path on weight shards with the hidden states replicated (copy-to-TP-region) or split over the
sequence (sequence parallelism), values of log p and entropy and gradients (logits / hidden / weight
shards), with and without the entropy gradient, T in {1, 0.7}, grad and no-grad. Then a tiny TP=2 + SP
MoE model: log-probs and parameter gradients through ``output_hidden`` + the fused path equal those of
its logits + the standard path. Writes WORK_DIR/rank<r>.json: {check: max abs error}.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rspo.config import ModelConfig, ParallelConfig
from megatron_rspo.model.fused_logprobs import fused_token_logprobs, output_hidden
from megatron_rspo.model.logprobs import forward_logits, token_logprobs, token_logprobs_and_entropy
from megatron_rspo.model.provider import build_model, init_distributed, shutdown_distributed

warnings.filterwarnings("ignore")
B, S, H, V = 2, 6, 8, 34  # V / 2 = 17 per rank; S / 2 = 3 per rank under SP


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def reference(logits, labels, temperature, weights, entropy_grad, wrt):
    lp_all = torch.log_softmax(logits.float() / temperature, -1)
    lp = lp_all.gather(-1, labels[..., None])[..., 0]
    ent = -(lp_all.exp() * lp_all).sum(-1)
    loss = (lp * weights[0]).sum() + ((ent * weights[1]).sum() if entropy_grad else 0)
    return lp.detach(), ent.detach(), torch.autograd.grad(loss, wrt)


def main(work: Path) -> None:
    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    rank = dist.get_rank()
    shard = slice(rank * V // 2, (rank + 1) * V // 2)
    seq = slice(rank * S // 2, (rank + 1) * S // 2)
    g = torch.Generator().manual_seed(0)
    full_logits = 3 * torch.randn(B, S, V, generator=g)
    full_hidden = torch.randn(B, S, H, generator=g)
    full_weight = torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :2] = torch.tensor([0, V - 1])  # first and last id: one on each shard's edge
    weights = torch.randn(B, S, generator=g), torch.randn(B, S, generator=g)
    report: dict[str, float] = {}

    for temperature in (1.0, 0.7):
        for entropy_grad in (False, True):
            tag = f"T{temperature}_Hgrad{int(entropy_grad)}"
            # standard path on this rank's vocab shard of the logits
            logits = full_logits.clone().requires_grad_()
            ref_lp, ref_h, (ref_g,) = reference(logits, labels, temperature, weights, entropy_grad, [logits])
            part = full_logits[..., shard].clone().requires_grad_()
            lp, ent = token_logprobs_and_entropy(part, labels, temperature, entropy_grad=entropy_grad)
            loss = (lp * weights[0]).sum() + ((ent * weights[1]).sum() if entropy_grad else 0)
            loss.backward()
            report[f"standard_logp_{tag}"] = err(lp, ref_lp)
            report[f"standard_entropy_{tag}"] = err(ent, ref_h)
            report[f"standard_grad_{tag}"] = err(part.grad, ref_g[..., shard])
            with torch.no_grad():
                lp_ng, ent_ng = token_logprobs_and_entropy(part, labels, temperature)
            report[f"standard_nograd_logp_{tag}"] = err(lp_ng, ref_lp)
            report[f"standard_nograd_entropy_{tag}"] = err(ent_ng, ref_h)
            report[f"standard_logp_only_{tag}"] = err(token_logprobs(part, labels, temperature), ref_lp)

            # fused path: weight shard, hidden replicated or sequence-parallel
            hidden = full_hidden.clone().requires_grad_()
            weight = full_weight.clone().requires_grad_()
            ref_lp, ref_h, (ref_gh, ref_gw) = reference(hidden @ weight.t(), labels, temperature, weights,
                                                        entropy_grad, [hidden, weight])
            for sp in (False, True):
                w_part = full_weight[shard].clone().requires_grad_()
                h_part = (full_hidden[:, seq] if sp else full_hidden).clone().requires_grad_()
                lp, ent = fused_token_logprobs(h_part, w_part, labels, temperature, chunk_tokens=5,
                                               with_entropy=True, entropy_grad=entropy_grad, sequence_parallel=sp)
                loss = (lp * weights[0]).sum() + ((ent * weights[1]).sum() if entropy_grad else 0)
                loss.backward()
                name = f"fused_sp{int(sp)}_{tag}"
                report[f"{name}_logp"] = err(lp, ref_lp)
                report[f"{name}_entropy"] = err(ent, ref_h)
                report[f"{name}_grad_hidden"] = err(h_part.grad, ref_gh[:, seq] if sp else ref_gh)
                report[f"{name}_grad_weight"] = err(w_part.grad, ref_gw[shard])

    # a tiny TP=2 + SP model: output_hidden + fused == logits + standard, values and parameter gradients
    cfg = ModelConfig(vocab_size=64, num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=32,
                      num_experts=4, moe_router_topk=2, init_method_std=0.05, max_position_embeddings=32)
    for tied in (False, True):
        torch.manual_seed(3)
        model = build_model(replace(cfg, untie_embeddings_and_output_weights=not tied),
                            ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
        tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4))
        targets = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
        params = [p for p in model.parameters() if p.requires_grad]
        logp = token_logprobs(forward_logits(model, tokens), targets, 0.7)
        ref_grads = torch.autograd.grad(logp.sum(), params)
        with output_hidden(model) as out:
            hidden = forward_logits(model, tokens)
        assert out.sequence_parallel and hidden.shape == (2, 4, 32), (out.sequence_parallel, hidden.shape)
        fused, _ = fused_token_logprobs(hidden, out.weight, targets, 0.7, chunk_tokens=6,
                                        sequence_parallel=out.sequence_parallel)
        grads = torch.autograd.grad(fused.sum(), params)
        report[f"model_tied{int(tied)}_logp"] = err(fused, logp)
        report[f"model_tied{int(tied)}_grads"] = max(err(a, b) / max(1.0, b.abs().max().item())
                                                     for a, b in zip(grads, ref_grads))

    (work / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

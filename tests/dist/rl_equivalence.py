"""Worker for tests/test_parallel_equivalence.py: one RL old-policy pass + training forward-backward of a
tiny MoE in a given parallel layout, compared with the single-rank reference.

    python rl_equivalence.py WORK_DIR ref                        # 1 process: writes WORK_DIR/ref.pt
    torchrun --nproc-per-node=2 rl_equivalence.py WORK_DIR dp2 ep2_allgather ...   # each layout in turn

The reference builds the model, a synthetic experience (random tokens and masks, routing ids from a
record pass) and saves the full weights. Every layout loads those weights sharded to its ranks,
generates greedily from fixed prompts (layouts without PP), runs the old-policy pass (log pi_old, old
router scores), perturbs the router weights identically everywhere (so the router shift is
non-trivial), then a forward-backward with RSPO (router shift on), with and without routing replay.
Each rank compares its rollout, loss, per-token γ and log-probs, old-pass outputs, metrics and gradient
shards with the reference's and writes the max errors to WORK_DIR/<layout>.rank<r>.json.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rspo.config import ModelConfig, OptimConfig, ParallelConfig
from megatron_rspo.engine import Engine
from megatron_rspo.model.logprobs import forward_logits
from megatron_rspo.model.provider import init_distributed
from megatron_rspo.model.routing import RoutingSession, routers, routing_session
from megatron_rspo.rl.experience import Experience
from megatron_rspo.rl.losses import PolicyLossConfig
from megatron_rspo.rl.parallel import RoutingLayout, all_reduce_dp, generation_mode, localize
from megatron_rspo.rl.router_shift import RouterShiftConfig
from megatron_rspo.rl.step import OldPolicyStep, StepOptions, TrainStep, loss_units
from megatron_rspo.rollout.generate import SamplingParams, generate

warnings.filterwarnings("ignore")

MODEL = dict(vocab_size=64, num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=64,
             moe_ffn_hidden_size=32, num_experts=4, moe_router_topk=2, init_method_std=0.05,
             max_position_embeddings=32)
# Rollout generation (greedy) per DP rank: prompt lengths differ between the sets, so EP ranks must agree on
# the prefill length and the number of decode steps.
PROMPTS = [[[1, 5, 7], [1, 9], [3, 4, 5, 6], [2, 2]], [[7, 7, 7, 7, 7], [4], [9, 8], [6, 1, 2]]]
ROWS, SEQ, MICROBATCHES = 8, 17, 4  # tokens [8, 17]: forwards of 16 positions (a multiple of TP=2)
# name: (TP, PP, EP, dispatcher); sequence parallelism whenever TP > 1
LAYOUTS = {
    "ref": (1, 1, 1, "allgather"),
    "dp2": (1, 1, 1, "allgather"),
    "ep2_allgather": (1, 1, 2, "allgather"),
    "ep2_alltoall": (1, 1, 2, "alltoall"),
    "tp2": (2, 1, 1, "allgather"),
    "pp2": (1, 2, 1, "allgather"),
    "tp2_ep2": (2, 1, 2, "alltoall"),  # 2 ranks: the EP group is carved from the TP ranks
    "dp2_tp2_ep2": (2, 1, 2, "alltoall"),  # 4 ranks
    "pp2_ep2": (1, 2, 2, "alltoall"),  # 4 ranks
}


def synthetic_experience(model, cfg: ModelConfig) -> Experience:
    """Random tokens, right padding, response masks of varied length; routing ids from a record pass."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg.vocab_size, (ROWS, SEQ), generator=g)
    prompt = torch.randint(2, 6, (ROWS,), generator=g)
    total = (prompt + torch.randint(4, SEQ - 5, (ROWS,), generator=g)).clamp_max(SEQ)
    pos = torch.arange(SEQ)[None]
    tokens = torch.where(pos < total[:, None], tokens, 0)  # right padding
    labels = pos[:, 1:]
    mask = ((labels >= prompt[:, None]) & (labels < total[:, None])).float()
    adv = torch.randn(ROWS, generator=g)
    model.eval()
    with torch.no_grad(), routing_session(model, RoutingSession(record=True)) as s:
        forward_logits(model, tokens)
    ids = RoutingSession.stack(s.recorded_ids, len(s.recorded_ids))
    return Experience(tokens=tokens, response_mask=mask, advantages=adv, rewards=adv, routing_ids=ids)


def rollout(model, dp_rank: int) -> dict[str, torch.Tensor]:
    """Greedy generation of this DP rank's prompt set, in the layout's generation mode."""
    with generation_mode(model) as group:
        ro = generate(model, PROMPTS[dp_rank], SamplingParams(max_new_tokens=6, temperature=0.0), eos_id=None,
                      pad_id=0, sync_group=group)
    return {"tokens": ro.tokens, "ids": ro.routing_ids, "scores": ro.routing_log_scores, "logp": ro.logprobs}


def reference_shard(name: str, param: torch.Tensor, full: dict[str, torch.Tensor], model) -> torch.Tensor:
    """The slice of the single-rank tensor ``full[...]`` that local parameter ``name`` holds here."""
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if m:  # local layer index -> global (pipeline stages hold consecutive layers)
        number = model.decoder.layers[int(m.group(1))].layer_number
        name = f"decoder.layers.{number - 1}.{m.group(2)}"
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    m = re.search(r"local_experts\.(\d+)\.", name)
    if m:  # local expert j of EP rank e is global expert e * E_local + j; split over the expert TP group
        local = MODEL["num_experts"] // ps.get_expert_model_parallel_world_size()
        j = ps.get_expert_model_parallel_rank() * local + int(m.group(1))
        name = name.replace(m.group(0), f"local_experts.{j}.")
        tp, r = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    t = full[name]
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return t
    if name.endswith("linear_fc1.weight"):  # SwiGLU: [gate; up], each split over TP
        gate, up = t.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[r], up.chunk(tp, dim=0)[r]])
    return t.chunk(tp, dim=param.partition_dim)[r]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != reference {tuple(b.shape)}")
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def run_layout(name: str, work: str) -> None:
    tp, pp, ep, dispatcher = LAYOUTS[name]
    cfg = ModelConfig(**MODEL, moe_token_dispatcher_type=dispatcher)
    dp = int(os.environ.get("WORLD_SIZE", 1)) // (tp * pp)
    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         expert_model_parallel_size=ep, sequence_parallel=tp > 1, num_microbatches=MICROBATCHES // dp)
    init_distributed(par, seed=1)
    engine = Engine(cfg, par, OptimConfig(), train_iters=1)
    model = engine.module
    is_ref = name == "ref"
    if is_ref:
        full_state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        exp = synthetic_experience(model, cfg)
        ref = None
    else:
        ref = torch.load(os.path.join(work, "ref.pt"))
        full_state, exp = ref["state"], Experience(**ref["exp"])
        with torch.no_grad():
            for pname, p in model.named_parameters():
                p.copy_(reference_shard(pname, p, full_state, model))
    layout = RoutingLayout.build(model)
    dp_rank = ps.get_data_parallel_rank()
    if is_ref:
        generated = [rollout(model, i) for i in range(len(PROMPTS))]
    elif pp == 1:
        generated = rollout(model, dp_rank)
    local = localize(exp, layout, dp_rank, dp)
    rows = slice(dp_rank * len(local), (dp_rank + 1) * len(local))
    micro = local.split(par.num_microbatches)
    seq, mbs = SEQ - 1, len(micro[0])
    opts = StepOptions(algorithm="rspo", loss=PolicyLossConfig(), routing_replay=False, temperature=1.0,
                       router_shift=RouterShiftConfig(enabled=True, floor=0.5), num_moe_layers=layout.num_moe_layers,
                       layout=layout)

    old = OldPolicyStep(opts, need_scores=True)
    outs = engine.forward_only(old, micro, seq, mbs)
    old_logp = torch.cat([o["logp"] for o in outs]) if layout.is_last_stage else None
    old_scores = torch.cat(old.log_scores)
    for i, m in enumerate(micro):
        m.old_logp = None if old_logp is None else old_logp[i * mbs:(i + 1) * mbs]
        m.old_log_scores = old_scores[i * mbs:(i + 1) * mbs]

    with torch.no_grad():  # move the routers identically on every rank: γ < 1 for some tokens
        for r in routers(model):
            g = torch.Generator().manual_seed(1000 + r.moe_index)
            r.weight.add_(0.02 * torch.randn(r.weight.shape, generator=g))

    normalizer = float(loss_units("rspo", opts.loss, exp.response_mask))
    results: dict[str, dict] = {}
    for replay in (False, True):
        step = TrainStep(replace(opts, routing_replay=replay), normalizer, engine.loss_scale, keep_tensors=True)
        stats = engine.forward_backward(step, micro, seq, mbs)
        res: dict[str, torch.Tensor | float | dict | None] = {"grads": {
            pname: p.main_grad.detach().clone() for pname, p in engine.ddp.module.named_parameters()}}
        if layout.is_last_stage:
            loss = all_reduce_dp(torch.stack([k["loss"] for k in step.kept]).sum().double().reshape(1))
            res.update(loss=float(loss[0]), gamma=torch.cat([k["gamma"] for k in step.kept]),
                       logp=torch.cat([k["logp"] for k in step.kept]), stats=stats,
                       expert_load=all_reduce_dp(torch.stack([m["expert_load"] for m in stats]).sum(0)))
        results["replay" if replay else "free"] = res

    if is_ref:
        full_exp = replace(exp, old_logp=old_logp, old_log_scores=old_scores)
        torch.save({"state": full_state, "exp": asdict(exp), "old_exp": asdict(full_exp), "results": results,
                    "generated": generated}, os.path.join(work, "ref.pt"))
        mask = exp.response_mask.bool()
        gamma = results["free"]["gamma"][mask]
        report = {"gamma_min": float(gamma.min()), "gamma_mean": float(gamma.mean()),
                  "gamma_below_one": float((gamma < 1).float().mean()),
                  "replay_minus_free_gamma": max_err(results["replay"]["gamma"], results["free"]["gamma"]),
                  "grad_max": max(float(g.abs().max()) for g in results["free"]["grads"].values())}
    else:
        report = compare(ref, results, old_logp, old_scores, layout, rows, model)
        if pp == 1:
            want = ref["generated"][dp_rank]
            report["rollout/tokens_equal"] = torch.equal(generated["tokens"], want["tokens"])
            report["rollout/ids_equal"] = torch.equal(generated["ids"], want["ids"])
            report["rollout/scores"] = max_err(generated["scores"], want["scores"])
            report["rollout/logp"] = max_err(generated["logp"], want["logp"])
    report.update(layout=name, rank=dist.get_rank(), tp_rank=ps.get_tensor_model_parallel_rank(),
                  pp_rank=ps.get_pipeline_model_parallel_rank(), ep_rank=ps.get_expert_model_parallel_rank(),
                  dp_rank=dp_rank, last_stage=layout.is_last_stage)
    with open(os.path.join(work, f"{name}.rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    dist.barrier()


def compare(ref: dict, results: dict, old_logp, old_scores, layout, rows: slice, model) -> dict:
    ref_old = ref["old_exp"]
    out: dict[str, float | int] = {
        "old_scores": max_err(old_scores, ref_old["old_log_scores"][rows][:, :, layout.local_layers])}
    if old_logp is not None:
        out["old_logp"] = max_err(old_logp, ref_old["old_logp"][rows])
    for mode, res in results.items():
        want = ref["results"][mode]
        if "loss" in res:
            out[f"{mode}/loss"] = abs(res["loss"] - want["loss"])
            out[f"{mode}/gamma"] = max_err(res["gamma"], want["gamma"][rows])
            out[f"{mode}/logp"] = max_err(res["logp"], want["logp"][rows])
            out[f"{mode}/expert_load"] = max_err(res["expert_load"], want["expert_load"])
            if rows == slice(0, len(want["logp"])):  # one DP rank: the same micro-batches as the reference
                out[f"{mode}/stats"] = max(max_err(a[k].float(), b[k].float())
                                           for a, b in zip(res["stats"], want["stats"]) for k in b)
                if any(a.keys() != b.keys() for a, b in zip(res["stats"], want["stats"])):
                    raise AssertionError("the step reports other metrics than the reference's")
        errs = []
        params = dict(model.named_parameters())
        for pname, g in res["grads"].items():
            errs.append(max_err(g, reference_shard(pname, params[pname], want["grads"], model)))
        out[f"{mode}/grads"] = max(errs)
        if os.environ.get("EQ_DEBUG"):
            out.update({f"{mode}/{n}": e for n, e in zip(res["grads"], errs) if e > 1e-6})
        out[f"{mode}/num_grads"] = len(errs)
    return out


def main() -> None:
    work, names = sys.argv[1], sys.argv[2:]
    for name in names:
        run_layout(name, work)
        if dist.get_rank() == 0:
            print(f"LAYOUT_DONE {name}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

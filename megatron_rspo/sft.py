"""Supervised warm-up of the tiny MoE policy on Countdown reference solutions.

Loss: token-mean cross-entropy on the completion tokens only (the answer and its EOS), normalised
over all micro-batches and data-parallel ranks of a step. Periodic held-out accuracy by greedy
sampling; checkpoints through ``megatron_rspo.checkpoint`` (the RL stage starts from them).

    python -m megatron_rspo.sft --train-data data/train.jsonl --test-data data/test.jsonl \
        --tokenizer-model data/tokenizer.model --save runs/sft --train-iters 600
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rspo import checkpoint
from megatron_rspo.config import (
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    add_dataclass_args,
    from_args,
    validate,
)
from megatron_rspo.data import ShuffledStream
from megatron_rspo.engine import Engine
from megatron_rspo.evaluation import evaluate_countdown
from megatron_rspo.logging import MetricsLogger, Progress, log, setup_console_logging
from megatron_rspo.model.logprobs import forward_logits, token_logprobs
from megatron_rspo.model.provider import count_parameters, init_distributed, shutdown_distributed
from megatron_rspo.rl.parallel import agreed_forward_length, generation_mode
from megatron_rspo.tasks import countdown
from megatron_rspo.tokenizer import Tokenizer, load_tokenizer


@dataclass
class SFTConfig:
    train_data: str = "data/countdown/train.jsonl"
    test_data: str = "data/countdown/test.jsonl"
    template: str = "tiny"
    micro_batch_size: int = 32  # per data-parallel rank and micro-batch
    train_iters: int = 500
    eval_samples: int = 200
    eval_max_new_tokens: int = 24


def encode_examples(instances: list[countdown.CountdownInstance], tok: Tokenizer, template: str
                    ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per instance."""
    out = []
    for inst in instances:
        prompt = tok.encode(countdown.format_prompt(inst, template))
        completion = tok.encode(countdown.sft_completion(inst, template)) + [tok.eos_id]
        out.append((prompt, completion))
    return out


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int,
            width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``tokens`` [B, S] and ``loss_mask`` [B, S-1] over the completion labels
    (S = ``width``, default: the longest example)."""
    seqs = [p + c for p, c in examples]
    width = width or max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1))
    for i, ((p, _c), s) in enumerate(zip(examples, seqs)):
        tokens[i, : len(s)] = torch.tensor(s)
        mask[i, len(p) - 1: len(s) - 1] = 1.0  # label j+1 is predicted at position j
    return {"tokens": tokens, "loss_mask": mask}


def sft_forward_step(data_iterator, model, loss_scale: float, global_tokens: float):
    batch = next(data_iterator)
    tokens = batch["tokens"]
    logits = forward_logits(model, tokens[:, :-1])

    def loss_func(logits: torch.Tensor):
        logp = token_logprobs(logits, tokens[:, 1:])
        mask = batch["loss_mask"]
        nll_sum = -(logp * mask).sum()
        loss = nll_sum / global_tokens
        return loss * loss_scale, {"nll_sum": nll_sum.detach().clone(), "tokens": mask.sum().detach()}

    return logits, loss_func


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in (ModelConfig, ParallelConfig, OptimConfig, RunConfig, SFTConfig):
        add_dataclass_args(parser, cls)
    return parser


def main(argv: list[str] | None = None) -> float:
    """Run SFT; returns the final held-out accuracy."""
    ns = build_parser().parse_args(argv)
    model_cfg, par, opt, run, sft = (from_args(c, ns) for c in
                                     (ModelConfig, ParallelConfig, OptimConfig, RunConfig, SFTConfig))
    setup_console_logging()
    if not run.tokenizer_model:
        raise SystemExit("--tokenizer-model is required")
    tok = load_tokenizer(run.tokenizer_model)
    model_cfg.vocab_size = model_cfg.vocab_size or tok.vocab_size
    validate(model_cfg, par, int(os.environ.get("WORLD_SIZE", 1)))
    train = encode_examples(countdown.load_jsonl(sft.train_data), tok, sft.template)
    test = countdown.load_jsonl(sft.test_data)[: sft.eval_samples]
    init_distributed(par, seed=run.seed)
    setup_console_logging()  # again: only rank 0 logs at INFO, now that ranks are known
    engine = Engine(model_cfg, par, opt, train_iters=sft.train_iters)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    stream = ShuffledStream(len(train), run.seed, dp_rank, dp)
    start = 0
    if run.load:
        loaded = checkpoint.load_checkpoint(run.load, engine.module, engine.optimizer, engine.scheduler,
                                            model_config=model_cfg)
        start, stream.position = loaded.iteration, loaded.extra_state.get("data_position", 0)
    metrics = MetricsLogger(run.tensorboard_dir)
    log.info("SFT: %d train / %d eval examples, %s params/rank", len(train), len(test),
             f"{count_parameters(engine.module):,}")
    progress = Progress(sft.train_iters, "sft", enabled=run.progress, initial=start)
    accuracy = float("nan")
    for it in range(start, sft.train_iters):
        batches = [[train[i] for i in stream.take(sft.micro_batch_size)] for _ in range(par.num_microbatches)]
        # One shape for every micro-batch and rank: pipeline stages exchange fixed-shape activations, MoE
        # dispatchers gather tokens over EP ranks, and sequence parallelism splits the sequence over TP.
        width = 1 + agreed_forward_length(max(len(p) + len(c) for b in batches for p, c in b) - 1,
                                          par.tensor_model_parallel_size if par.sequence_parallel else 1)
        mbs = [collate(b, tok.pad_id, width) for b in batches]
        n_tok = torch.tensor(float(sum(mb["loss_mask"].sum() for mb in mbs)))
        if dist.is_initialized():
            dist.all_reduce(n_tok, group=parallel_state.get_data_parallel_group())
        step = partial(sft_forward_step, loss_scale=engine.loss_scale, global_tokens=float(n_tok))
        res = engine.train_step(step, mbs, seq_length=mbs[0]["tokens"].shape[1] - 1,
                                micro_batch_size=sft.micro_batch_size)
        totals = torch.tensor([sum(float(m["nll_sum"]) for m in res.metrics),
                               sum(float(m["tokens"]) for m in res.metrics)], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # The loss lives on the last pipeline stage (rank 0 logs): sum over last-stage ranks of every DP rank.
            reports = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            totals *= float(reports)
            dist.all_reduce(totals)
        loss = float(totals[0]) / max(float(totals[1]), 1.0)
        progress.update(1, loss=loss)
        metrics.log(it + 1, {"train/loss": loss, "train/grad_norm": res.grad_norm, "train/lr": res.lr},
                    console=(it + 1) % run.log_interval == 0)
        last = it + 1 == sft.train_iters
        evaluate = (run.eval_interval and (it + 1) % run.eval_interval == 0) or last
        if evaluate and par.pipeline_model_parallel_size == 1:  # no generation under PP: no held-out accuracy
            with generation_mode(engine.module) as group:
                accuracy = evaluate_countdown(engine.module, tok, test, sft.template, sft.eval_max_new_tokens,
                                              sync_group=group)["accuracy"]
            metrics.log(it + 1, {"eval/accuracy": accuracy}, console=True)
        if run.save and ((run.save_interval and (it + 1) % run.save_interval == 0) or last):
            checkpoint.save_checkpoint(run.save, it + 1, engine.module, engine.optimizer, engine.scheduler,
                                       extra_state={"data_position": stream.position},
                                       configs=(model_cfg, par, opt, run, sft))
    progress.close()
    metrics.close()
    log.info("SFT done: held-out accuracy %.3f", accuracy)
    return accuracy


if __name__ == "__main__":
    main()
    shutdown_distributed()

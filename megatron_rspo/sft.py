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
from typing import Literal

import torch
from megatron.core import parallel_state

from megatron_rspo import checkpoint, distributed
from megatron_rspo.cli import HelpFormatter, parse_with_config, run_cli
from megatron_rspo.config import (
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    add_dataclass_args,
    arg,
    from_args,
    to_dict,
)
from megatron_rspo.data import ShuffledStream
from megatron_rspo.engine import Engine
from megatron_rspo.evaluation import evaluate_countdown
from megatron_rspo.logging import MetricsLogger, Progress, log, setup_console_logging
from megatron_rspo.model.logprobs import forward_logits, token_logprobs
from megatron_rspo.model.provider import count_parameters, init_distributed, shutdown_distributed
from megatron_rspo.rl.parallel import agreed_forward_length, all_reduce_dp, generation_mode
from megatron_rspo.tasks import countdown
from megatron_rspo.tokenizer import Tokenizer, load_tokenizer
from megatron_rspo.validation import (
    data_file_errors,
    model_parallel_errors,
    optim_errors,
    raise_errors,
    run_errors,
    training_errors,
)


@dataclass
class SFTConfig:
    train_data: str = arg("data/countdown/train.jsonl", "Countdown training instances (JSONL with reference "
                                                        "solutions).")
    test_data: str = arg("data/countdown/test.jsonl", "Held-out Countdown instances for the accuracy.")
    template: Literal["tiny", "chat"] = arg("tiny", "Prompt template of the examples.")
    micro_batch_size: int = arg(32, "Examples per data-parallel rank and micro-batch.")
    train_iters: int = arg(500, "Optimizer steps.")
    eval_samples: int = arg(200, "Held-out instances per evaluation (greedy).")
    eval_max_new_tokens: int = arg(24, "Maximum generated tokens per evaluation answer.")


def validate_sft_run(model_cfg: ModelConfig, par: ParallelConfig, opt: OptimConfig, run: RunConfig, sft: SFTConfig,
                     world_size: int = 1, cuda: bool | None = None, check_files: bool = True) -> None:
    """Every problem of an SFT command line in one ConfigError, before any process group or model exists."""
    errors = model_parallel_errors(model_cfg, par, world_size, cuda) + training_errors(model_cfg, par, cuda, opt)
    errors += optim_errors(opt) + run_errors(run, check_files)
    for name, low in (("micro_batch_size", 1), ("train_iters", 1), ("eval_samples", 0), ("eval_max_new_tokens", 1)):
        if getattr(sft, name) < low:
            errors.append(f"--{name.replace('_', '-')} must be >= {low} (got {getattr(sft, name)})")
    if check_files:
        errors += data_file_errors(train_data=sft.train_data, test_data=sft.test_data)
    raise_errors(errors, "invalid SFT configuration")


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
        return loss * loss_scale, {"nll_sum": nll_sum.detach().clone(), "tokens": mask.sum().detach(),
                                   "loss": loss.detach()}

    return logits, loss_func


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    for cls in (ModelConfig, ParallelConfig, OptimConfig, RunConfig, SFTConfig):
        add_dataclass_args(parser, cls)
    return parser


def main(argv: list[str] | None = None) -> float:
    """Run SFT; returns the final held-out accuracy."""
    ns = parse_with_config(build_parser(), argv)
    model_cfg, par, opt, run, sft = (from_args(c, ns) for c in
                                     (ModelConfig, ParallelConfig, OptimConfig, RunConfig, SFTConfig))
    validate_sft_run(model_cfg, par, opt, run, sft, int(os.environ.get("WORLD_SIZE", 1)))
    setup_console_logging()
    tok = load_tokenizer(run.tokenizer_model)
    model_cfg.vocab_size = model_cfg.vocab_size or tok.vocab_size
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
    metrics = MetricsLogger(run.tensorboard_dir, run, to_dict(model_cfg, par, opt, run, sft))
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
        device = distributed.module_device(engine.module)  # batches live where the model does
        mbs = [{k: v.to(device, non_blocking=True) for k, v in collate(b, tok.pad_id, width).items()} for b in batches]
        n_tok = all_reduce_dp(torch.stack([mb["loss_mask"].sum() for mb in mbs]).sum().reshape(1))
        step = partial(sft_forward_step, loss_scale=engine.loss_scale, global_tokens=float(n_tok[0]))
        res = engine.train_step(step, mbs, seq_length=mbs[0]["tokens"].shape[1] - 1,
                                micro_batch_size=sft.micro_batch_size)
        totals = torch.tensor([sum(float(m["nll_sum"]) for m in res.metrics),
                               sum(float(m["tokens"]) for m in res.metrics)], dtype=torch.float64)
        if distributed.world_size() > 1:
            # The loss lives on the last pipeline stage (rank 0 logs): sum over last-stage ranks of every DP rank.
            reports = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            totals *= float(reports)
            distributed.all_reduce(totals)
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


def cli() -> None:
    """The ``rspo-sft`` console script and ``python -m megatron_rspo.sft``."""
    run_cli(main, after=shutdown_distributed)


if __name__ == "__main__":
    cli()

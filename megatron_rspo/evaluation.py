"""Held-out evaluation by sampling (greedy by default): accuracy and mean reward on a task."""

from __future__ import annotations

import torch

from megatron_rspo.rollout.generate import SamplingParams, generate
from megatron_rspo.tasks import countdown
from megatron_rspo.tasks.registry import Task, get_task
from megatron_rspo.tokenizer import Tokenizer


def decode_responses(tok: Tokenizer, tokens: torch.Tensor, prompt_lens: torch.Tensor,
                     response_lens: torch.Tensor) -> list[str]:
    out = []
    for row, p, r in zip(tokens.tolist(), prompt_lens.tolist(), response_lens.tolist()):
        out.append(tok.decode(row[p: p + r]))  # decode drops every stop id
    return out


def evaluate_task(model: torch.nn.Module, tok: Tokenizer, task: Task, instances: list, template: str,
                  max_new_tokens: int, batch_size: int = 128, temperature: float = 0.0,
                  sync_group=None) -> dict[str, float]:
    """Sample one answer per instance; returns accuracy (full score), mean reward, mean length.
    ``sync_group``: see ``generate`` (expert/tensor parallelism; every rank evaluates the same instances)."""
    rewards, lengths = [], []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    for start in range(0, len(instances), batch_size):
        chunk = instances[start: start + batch_size]
        prompts = [tok.encode(task.prompt(inst, template, tok)) for inst in chunk]
        ro = generate(model, prompts, params, eos_id=tok.stop_ids, pad_id=tok.pad_id, record_routing=False,
                      sync_group=sync_group)
        texts = decode_responses(tok, ro.tokens, ro.prompt_lens, ro.response_lens)
        rewards.extend(task.score(text, inst, template) for inst, text in zip(chunk, texts))
        lengths.extend(ro.response_lens.tolist())
    n = max(len(rewards), 1)
    return {
        "accuracy": sum(r >= task.full_score for r in rewards) / n,
        "reward_mean": sum(rewards) / n,
        "response_length": sum(lengths) / n,
    }


def evaluate_countdown(model: torch.nn.Module, tok: Tokenizer, instances: list[countdown.CountdownInstance],
                       template: str, max_new_tokens: int, **kwargs) -> dict[str, float]:
    return evaluate_task(model, tok, get_task("countdown"), instances, template, max_new_tokens, **kwargs)

"""Token log-probs and entropy from (possibly vocab-parallel) logits, and the model-forward glue
shared by SFT and RL.

With tensor parallelism GPTModel returns logits sharded over the vocabulary (``parallel_output``);
Megatron's ``vocab_parallel_cross_entropy`` gives exact log-probs on the shards, and the entropy is
computed with three all-reduces over the TP group, so the full vocabulary is never gathered.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(label) per position; ``logits`` [B, S, V/TP] (fp32 upcast), ``labels`` [B, S].

    Megatron's vocab-parallel cross-entropy works in place on its input, so fp32 logits are copied:
    the caller's logits stay usable (entropy, other terms)."""
    x = logits.float()
    if x.data_ptr() == logits.data_ptr():
        x = x.clone()
    return -tensor_parallel.vocab_parallel_cross_entropy(x, labels)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position, [B, S], differentiable."""
    logits = logits.float()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    m = logits.max(dim=-1, keepdim=True).values.detach()
    if tp > 1:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_tensor_model_parallel_group())
    shifted = logits - m
    e = shifted.exp()
    sum_e = e.sum(-1)
    sum_ez = (e * shifted).sum(-1)
    if tp > 1:
        sum_e = reduce_from_tensor_model_parallel_region(sum_e)
        sum_ez = reduce_from_tensor_model_parallel_region(sum_ez)
    return sum_e.log() - sum_ez / sum_e


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    """0..S-1 for every row (sequences start at position 0; right padding only)."""
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


def forward_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Causal forward over ``tokens`` [B, S] -> logits [B, S, V/TP] (last pipeline stage)."""
    return model(tokens, position_ids(tokens), None)

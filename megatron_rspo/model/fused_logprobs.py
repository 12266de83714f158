"""Token log-probs straight from the final hidden states: the [tokens, V] logits are never materialised.

``fused_token_logprobs(hidden, weight, labels)`` computes the output layer and the log-softmax together,
``chunk_tokens`` tokens at a time: the forward keeps only per-token statistics (log-sum-exp, entropy),
the backward recomputes each chunk's logits and accumulates the hidden and weight gradients. Peak memory
is a couple of [chunk_tokens, V/TP] fp32 buffers plus the weight gradient, whatever the token count.

``output_hidden(model)`` makes GPTModel's forward return those hidden states (and tells which weight its
output layer would have used, and whether it is sequence-parallel).

Tensor parallelism: ``weight`` is this rank's vocab shard [V/TP, H]; the hidden states enter through
Megatron's ``copy_to_tensor_model_parallel_region`` (``gather_from_sequence_parallel_region`` with
sequence parallelism), as in ColumnParallelLinear, so that their gradient is reduced over the TP group.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_rspo.model.logprobs import chunk_stats, combine_stats, shard_targets, tp_group


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 z / T of one chunk; the matmul runs in the weights' dtype, as the output layer's would."""
    z = (h @ weight.t()).float()
    if temperature != 1.0:
        z.div_(temperature)  # z is a fresh buffer (matmul output or its fp32 upcast)
    return z


class _FusedTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float,
                chunk: int, with_entropy: bool, entropy_grad: bool):
        group, rank, size = tp_group()
        n = hidden.shape[0]
        local, owned = shard_targets(labels, weight.shape[0], rank, size)
        stats = torch.empty(4, n, dtype=torch.float32, device=hidden.device)
        for i in range(0, n, chunk):
            s = _chunk_logits(hidden[i:i + chunk], weight, temperature)
            stats[:, i:i + chunk] = chunk_stats(s, local[i:i + chunk], owned[i:i + chunk], with_entropy)
            del s
        logp, lse, entropy = combine_stats(stats, group, size)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.entropy_grad = with_entropy and entropy_grad
        ctx.save_for_backward(hidden, weight, local, owned, lse, entropy if ctx.entropy_grad else None)
        if not with_entropy:
            return logp
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor] = None):
        hidden, weight, local, owned, lse, entropy = ctx.saved_tensors
        chunk, inv_t = ctx.chunk, 1.0 / ctx.temperature
        use_entropy = ctx.entropy_grad and grad_entropy is not None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulation over chunks; a bf16 weight gets its grad cast once at the end
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g = grad_logp.reshape(-1, 1).float()
        gh = grad_entropy.reshape(-1, 1).float() if use_entropy else None
        for i in range(0, hidden.shape[0], chunk):
            j = min(i + chunk, hidden.shape[0])
            h = hidden[i:j]
            q = _chunk_logits(h, weight, ctx.temperature).sub_(lse[i:j, None])  # log p
            if use_entropy:
                # q <- g p + gH p (log p + H); log p from the recomputed logits (no 0 * log 0)
                p = torch.exp(q)
                q.add_(entropy[i:j, None]).mul_(gh[i:j]).add_(g[i:j]).mul_(p)
                del p
            else:
                q.exp_().mul_(g[i:j])
            # dz = (g onehot - q) / T; the onehot term only on the shard owning the label
            q.scatter_add_(1, local[i:j, None], -torch.where(owned[i:j, None], g[i:j], 0.0))
            q.mul_(-inv_t)
            dz = q if q.dtype == weight.dtype else q.to(weight.dtype)
            del q
            if need_h:
                torch.matmul(dz, weight, out=grad_h[i:j])
            if need_w:
                if dz.dtype == torch.float32 and h.dtype == torch.float32:
                    grad_w.addmm_(dz.t(), h)
                else:
                    grad_w.add_(dz.t() @ h)
            del dz
        if need_w and weight.dtype != torch.float32:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def fused_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0, *, chunk_tokens: int = 1024, with_entropy: bool = False,
                         entropy_grad: bool = False, sequence_parallel: bool = False
                         ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(log softmax(hidden @ weight^T / T)[label], entropy or None), each [B, S] fp32, differentiable
    w.r.t. ``hidden`` and ``weight`` (the entropy only with ``entropy_grad``).

    ``hidden`` [B, S, H]: the final-norm output as GPTModel returns it inside ``output_hidden`` (batch
    first); with ``sequence_parallel`` this rank's sequence slice [B, S/TP, H], gathered here. ``weight``
    the output layer's weight, this rank's vocab shard [V/TP, H]; ``labels`` [B, S] global ids. Matches
    ``token_logprobs(logits)`` of the same output layer to fp32 rounding."""
    if hidden.dtype != weight.dtype:  # e.g. Float16Module's fp32 upcast of bf16 outputs: exact to undo
        hidden = hidden.to(weight.dtype)
    group, _, size = tp_group()
    if size > 1:
        if sequence_parallel:  # [B, S/TP, H] -> [S/TP, B, H] -> gather along the sequence -> [B, S, H]
            hidden = gather_from_sequence_parallel_region(hidden.transpose(0, 1), group=group).transpose(0, 1)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = _FusedTokenLogProbs.apply(flat, weight, labels.reshape(-1), temperature, chunk_tokens, with_entropy,
                                    entropy_grad)
    if not with_entropy:
        return out.view(labels.shape), None
    logp, entropy = out
    return logp.view(labels.shape), entropy.view(labels.shape)


@dataclass
class OutputHidden:
    """What ``output_hidden`` tells: the output layer's weight (vocab shard [V/TP, H]; the weight the last
    forward passed, e.g. tied embeddings, else the layer's own) and whether the layer is sequence-parallel
    (then the hidden states are this rank's sequence slice). ``weight`` is None off the last stage."""

    weight: Optional[torch.Tensor]
    sequence_parallel: bool


def unwrap_gpt(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


@contextmanager
def output_hidden(model: torch.nn.Module) -> Iterator[OutputHidden]:
    """Within the block, the model's forward returns the final hidden states [B, S(/TP), H] instead of the
    logits: the output layer (of the unwrapped GPTModel) returns its input. Its parameters stay registered
    (only the instance's ``forward`` is shadowed), so DDP hooks and optimisers see the weight as usual.
    Stages without an output layer (pipeline parallelism) are left as they are."""
    gpt = unwrap_gpt(model)
    layer = getattr(gpt, "output_layer", None)
    if layer is None:
        yield OutputHidden(None, False)
        return
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else layer.weight
    handle = OutputHidden(weight, bool(getattr(layer, "sequence_parallel", False)))

    def forward(hidden_states: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None) -> tuple[torch.Tensor, None]:
        handle.weight = layer.weight if weight is None else weight
        return hidden_states, None

    previous = layer.__dict__.get("forward")
    layer.forward = forward
    try:
        yield handle
    finally:
        if previous is None:
            del layer.forward
        else:
            layer.forward = previous

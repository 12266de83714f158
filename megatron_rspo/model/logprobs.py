"""Token log-probs and entropy from (possibly vocab-parallel) logits, and the model-forward glue
shared by SFT and RL.

With tensor parallelism GPTModel returns logits sharded over the vocabulary (``parallel_output``); the
statistics (max, sum-exp, target logit, entropy) are combined with all-reduces over the TP group, so the
full vocabulary is never gathered.

Memory (per logit of a micro-batch, fp32 logits): with gradients, one fp32 working buffer holds the
softmax for backward and is turned into the gradient in place (4 bytes, which become the logits' grad);
without gradients (old-policy / reference passes) nothing of size [B, S, V] is allocated at all: rows are
processed in chunks of ``CHUNK_ELEMENTS`` logits. The temperature is folded in (no ``logits / T`` copy).
The fused path that never materialises the logits is in ``fused_logprobs.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility

from megatron_rspo import distributed

CHUNK_ELEMENTS = 1 << 23  # logits per row chunk of the chunked passes: 32 MiB per fp32 temporary

_MAX, _SUM = dist.ReduceOp.MAX, dist.ReduceOp.SUM


def tp_group() -> tuple[Optional[dist.ProcessGroup], int, int]:
    """(group, rank, size) of the tensor-parallel group; (None, 0, 1) when Megatron is not initialised."""
    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return None, 0, 1
    return (parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: Optional[dist.ProcessGroup], size: int) -> None:
    if size > 1:
        distributed.all_reduce(x, op, group)  # placed on the backend's device (the plumbing's job)


def shard_targets(labels: torch.Tensor, vocab_per_rank: int, rank: int, size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(label index within this rank's vocab shard, 0 where not owned; whether this shard owns the label)."""
    start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(vocab_per_rank, rank, size)
    owned = (labels >= start) & (labels < end)
    return torch.where(owned, labels - start, 0), owned


def chunk_stats(s: torch.Tensor, local: torch.Tensor, owned: torch.Tensor, with_entropy: bool) -> torch.Tensor:
    """Shard-local softmax statistics of the rows of ``s`` [n, V/TP] (fp32 scaled logits, overwritten):
    [4, n] = (row max m_r, target logit or 0, sum exp(s - m_r), sum exp(s - m_r) (s - m_r) or 0).
    Relative to the local max, so one pass suffices; ``combine_stats`` rescales across shards."""
    m = s.amax(-1)
    target = torch.where(owned, s.gather(-1, local[:, None]).squeeze(-1), 0.0)
    s.sub_(m[:, None])
    if with_entropy:
        e = torch.exp(s)
        a = torch.bmm(e.unsqueeze(1), s.unsqueeze(2)).view(-1)  # row dot product without an [n, V] product
        sum_e = e.sum(-1)
    else:
        sum_e = s.exp_().sum(-1)
        a = torch.zeros_like(m)
    return torch.stack([m, target, sum_e, a])


def combine_stats(stats: torch.Tensor, group: Optional[dist.ProcessGroup], size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-prob of the target, log-sum-exp, entropy) per row from ``chunk_stats`` of every shard: two
    all-reduces over the TP group (max, then one stacked sum)."""
    m_local, target, sum_local, a_local = stats
    if size > 1:
        m = m_local.clone()
        _all_reduce(m, _MAX, group, size)
        d = m_local - m
        scale = d.exp()
        # sum_j e^(s_j - m) (s_j - m) on a shard = scale * (a_local + d * sum_local)
        sums = torch.stack([target, sum_local * scale, scale * (a_local + d * sum_local)])
        _all_reduce(sums, _SUM, group, size)
        target, sum_e, a = sums
    else:
        m, sum_e, a = m_local, sum_local, a_local
    log_z = sum_e.log()
    return target - m - log_z, m + log_z, log_z - a / sum_e


def _chunked(logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad log-probs (and entropy) in row chunks: temporaries are bounded by ``CHUNK_ELEMENTS``."""
    group, rank, size = tp_group()
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    local, owned = shard_targets(labels.reshape(-1), v, rank, size)
    n = flat.shape[0]
    stats = torch.empty(4, n, dtype=torch.float32, device=logits.device)
    rows = max(1, CHUNK_ELEMENTS // v)
    for i in range(0, n, rows):
        s = flat[i:i + rows].to(torch.float32, copy=True)  # copy: the caller's logits are never touched
        if temperature != 1.0:
            s.div_(temperature)
        stats[:, i:i + rows] = chunk_stats(s, local[i:i + rows], owned[i:i + rows], with_entropy)
        del s
    logp, _, entropy = combine_stats(stats, group, size)
    return logp.view(labels.shape), entropy.view(labels.shape)


def _xlogx_row_sums(x: torch.Tensor) -> torch.Tensor:
    """sum_j x_j log x_j per row of [..., V] (0 log 0 = 0), in row chunks."""
    flat = x.view(-1, x.shape[-1])
    out = torch.empty(flat.shape[0], dtype=x.dtype, device=x.device)
    rows = max(1, CHUNK_ELEMENTS // flat.shape[1])
    for i in range(0, flat.shape[0], rows):
        out[i:i + rows] = torch.xlogy(flat[i:i + rows], flat[i:i + rows]).sum(-1)
    return out.view(x.shape[:-1])


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(z / T)[label] (and the entropy) with a single fp32 [B, S, V/TP] buffer: it holds the
    softmax for backward, where the gradient is written into it in place (so a leaf's grad takes it over)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool,
                entropy_grad: bool):
        group, rank, size = tp_group()
        vpc = VocabParallelCrossEntropy
        # the one working copy (contiguous: Megatron's helpers view it 2-D); the caller's logits stay intact
        buf = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        if temperature != 1.0:
            buf.div_(temperature)
        buf, m = vpc.calculate_logits_max(buf)
        _all_reduce(m, _MAX, group, size)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(buf.shape[-1], rank, size)
        target_mask, masked_target_1d, predicted, sum_exp, exp = vpc.calculate_predicted_logits(
            buf, labels, m, start, end)  # in place: buf = exp(s - m)
        # sum e log e = sum e (s - m), taken before normalising so that one all-reduce carries all three sums
        parts = [predicted, sum_exp] + ([_xlogx_row_sums(exp)] if with_entropy else [])
        sums = torch.stack(parts)
        _all_reduce(sums, _SUM, group, size)
        predicted, sum_exp = sums[0], sums[1]
        softmax, loss = vpc.calculate_cross_entropy_loss(exp, predicted, sum_exp)  # in place: buf = softmax
        logp = -loss
        ctx.temperature, ctx.in_dtype = temperature, logits.dtype
        ctx.entropy_grad = with_entropy and entropy_grad
        if not with_entropy:
            ctx.save_for_backward(softmax, target_mask, masked_target_1d)
            return logp
        entropy = sum_exp.log() - sums[2] / sum_exp
        if ctx.entropy_grad:
            ctx.save_for_backward(softmax, target_mask, masked_target_1d, entropy)
        else:
            ctx.save_for_backward(softmax, target_mask, masked_target_1d)
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor] = None):
        vpc = VocabParallelCrossEntropy
        softmax, target_mask, masked_target_1d, *rest = ctx.saved_tensors
        inv_t = 1.0 / ctx.temperature
        grad_2d, arange_1d, softmax_update, grad_input = vpc.prepare_gradient_calculation_operands(
            softmax, target_mask)
        if ctx.entropy_grad and grad_entropy is not None:
            # d/ds [g logp + gH H] = g (onehot - p) - gH p (log p + H), s = z / T; in row chunks:
            # softmax <- g p + gH (p log p + H p), then the onehot term, then the factor -1/T.
            (entropy,) = rest
            g, gh, hh = (t.reshape(-1, 1) for t in (grad_logp, grad_entropy, entropy))
            rows = max(1, CHUNK_ELEMENTS // grad_2d.shape[1])
            for i in range(0, grad_2d.shape[0], rows):
                p = grad_2d[i:i + rows]
                t = torch.xlogy(p, p).addcmul_(p, hh[i:i + rows]).mul_(gh[i:i + rows])
                p.mul_(g[i:i + rows]).add_(t)
                del t
            grad_2d[arange_1d, masked_target_1d] -= softmax_update * g.reshape(-1)
            grad_input.mul_(-inv_t)
        else:
            # Megatron's cross-entropy gradient (softmax - onehot) * grad, with grad = -g / T
            grad_input = vpc.calculate_gradients(grad_2d, arange_1d, masked_target_1d, softmax_update, grad_input,
                                                 grad_logp * -inv_t)
        if ctx.in_dtype != torch.float32:
            grad_input = grad_input.to(ctx.in_dtype)
        return grad_input, None, None, None, None


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[label] per position, [B, S] fp32, differentiable w.r.t. ``logits``.

    ``logits`` [B, S, V/TP] (any float dtype; computed in fp32, never modified), ``labels`` [B, S] global
    vocabulary ids. Without grad the pass is chunked (no [B, S, V] temporary)."""
    if _needs_grad(logits):
        return _TokenLogProbs.apply(logits, labels, temperature, False, False)
    return _chunked(logits, labels, temperature, False)[0]


def token_logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                               entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs as ``token_logprobs``, entropy of softmax(logits / T)), both [B, S] fp32, sharing one
    fp32 buffer. The entropy is detached unless ``entropy_grad`` (then its backward runs in row chunks)."""
    if _needs_grad(logits):
        return _TokenLogProbs.apply(logits, labels, temperature, True, entropy_grad)
    return _chunked(logits, labels, temperature, True)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position, [B, S]; differentiable when grad is enabled (prefer
    ``token_logprobs_and_entropy``, which shares the working buffer with the log-probs)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    if _needs_grad(logits):
        return token_logprobs_and_entropy(logits, labels, temperature, entropy_grad=True)[1]
    return _chunked(logits, labels, temperature, True)[1]


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    """0..S-1 for every row (sequences start at position 0; right padding only)."""
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


def forward_logits(model: torch.nn.Module, tokens: torch.Tensor,
                   padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal forward over ``tokens`` [B, S] -> logits [B, S, V/TP] (last pipeline stage); inside
    ``fused_logprobs.output_hidden`` the final hidden states [B, S, H] instead."""
    if padding_mask is None:
        return model(tokens, position_ids(tokens), None)
    return model(tokens, position_ids(tokens), None, padding_mask=padding_mask)



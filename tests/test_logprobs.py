"""Token log-probs and entropy from logits: exact values, and no in-place damage to the logits."""

from __future__ import annotations

import torch

from megatron_rspo.model.logprobs import token_entropy, token_logprobs


def test_logprobs_and_entropy_match_torch_and_leave_logits_intact(megatron_single_rank):
    megatron_single_rank()  # parallel state (TP=1)
    logits = torch.randn(2, 5, 11, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    before = logits.detach().clone()
    lp = token_logprobs(logits, labels)
    assert torch.equal(logits.detach(), before)  # Megatron's cross-entropy works in place; we must copy
    ref = torch.log_softmax(before, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(lp, ref, atol=1e-6, rtol=0)
    ent = token_entropy(logits)
    p = before.softmax(-1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1), atol=1e-5, rtol=0)
    (lp.sum() + ent.sum()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()

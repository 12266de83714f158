"""Single-process pieces of the parallel plumbing: padding, layout slices, packing of stage routing."""

from __future__ import annotations

import pytest
import torch

from megatron_rspo.rl.experience import Experience
from megatron_rspo.rl.parallel import RoutingLayout, StageRouting, agreed_forward_length, localize, pad_sequence


def experience(n: int = 4, s: int = 6, layers: int = 3, k: int = 2) -> Experience:
    g = torch.Generator().manual_seed(0)
    return Experience(tokens=torch.randint(1, 9, (n, s), generator=g), response_mask=torch.ones(n, s - 1),
                      advantages=torch.randn(n, generator=g), rewards=torch.zeros(n),
                      routing_ids=torch.randint(0, 4, (n, s, layers, k), generator=g).to(torch.int8),
                      old_logp=torch.randn(n, s - 1, generator=g),
                      old_log_scores=torch.randn(n, s - 1, layers, k, generator=g))


def test_pad_sequence_masks_the_new_positions():
    exp = experience()
    out = pad_sequence(exp, forward_length=8, pad_id=7)
    assert out.tokens.shape == (4, 9) and (out.tokens[:, 6:] == 7).all()
    assert out.response_mask.shape == (4, 8) and (out.response_mask[:, 5:] == 0).all()
    assert out.routing_ids.shape == (4, 9, 3, 2) and out.routing_ids.dtype == torch.int8
    assert out.old_log_scores.shape == (4, 8, 3, 2) and out.old_logp.shape == (4, 8)
    assert torch.equal(out.old_log_scores[:, :5], exp.old_log_scores) and out.ref_logp is None
    assert pad_sequence(exp, 5) is exp
    with pytest.raises(ValueError):
        pad_sequence(exp, 4)


def test_agreed_forward_length_rounds_up_to_the_tp_multiple():
    assert agreed_forward_length(5, 2) == 6 and agreed_forward_length(6, 2) == 6 and agreed_forward_length(5) == 5


def test_localize_takes_the_dp_rows_and_the_stage_layers():
    exp = experience(n=4, layers=4)
    layout = RoutingLayout(local_layers=[2, 3], stage_layers=[[0, 1], [2, 3]], stage_ranks=[0, 1], pp_rank=1)
    out = localize(exp, layout, dp_rank=1, dp_size=2)
    assert torch.equal(out.tokens, exp.tokens[2:]) and torch.equal(out.routing_ids, exp.routing_ids[2:])
    assert torch.equal(out.old_log_scores, exp.old_log_scores[2:, :, 2:])
    assert layout.is_last_stage and layout.last_stage_rank == 1 and layout.num_moe_layers == 4


def test_sequence_slices_tile_the_sequence():
    slices = [RoutingLayout(local_layers=[0], tp_size=2, tp_rank=r, sequence_parallel=True).seq_slice(8)
              for r in range(2)]
    assert slices == [slice(0, 4), slice(4, 8)]
    with pytest.raises(ValueError, match="multiple of the tensor-parallel size"):
        RoutingLayout(local_layers=[0], tp_size=2, sequence_parallel=True).seq_slice(7)
    assert RoutingLayout(local_layers=[0]).seq_slice(7) is None


def test_stage_routing_round_trips_through_a_flat_buffer():
    g = torch.Generator().manual_seed(1)
    part = StageRouting(torch.rand(2, 3, 2, generator=g), torch.rand(2, 3, 2, generator=g),
                        torch.rand(2, 4, generator=g))
    back = StageRouting.unpack(part.pack(), batch=2, seq=3, layers=2, experts=4)
    assert all(torch.equal(a, b) for a, b in ((part.shift, back.shift), (part.changed, back.changed),
                                               (part.load, back.load)))
    both = StageRouting.cat([part, back])
    assert both.shift.shape == (2, 3, 4) and both.load.shape == (4, 4)

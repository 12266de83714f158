"""Fake ``cuda`` tensors (FakeTensorMode) on this CPU-only torch: the pure-tensor pieces of RSPO see real shapes,
dtypes and a CUDA device, and a tensor left on the CPU is caught (FakeTensorDeviceMismatchError).

Where it stops (torch 2.13.0+cpu, measured): factories, elementwise ops, matmul, view and reductions work on
fake CUDA tensors; basic slicing (``x[:, :1]``, ``x[:, None]``) and advanced indexing raise "PyTorch is not
linked with support for cuda devices", and a backward through a fake CUDA tensor aborts the process (the
autograd engine's CUDA device thread). So a Megatron forward (which slices) and any train step cannot run
under it here; their device placement is tested on the meta device (tests/test_device_discipline.py) and
run for real by the GPU check (tests/test_gpu.py).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from megatron_rspo.rl.advantages import group_relative_advantages
from megatron_rspo.rl.losses import PolicyLossConfig, gspo_loss
from megatron_rspo.rl.router_shift import RouterShiftConfig, compute_router_shift

N, T, L, K = 4, 6, 3, 2


def _cuda(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device="cuda")


@pytest.fixture
def fake_cuda():
    with FakeTensorMode() as mode:
        yield mode


def test_router_shift_gamma_on_cuda(fake_cuda):
    gamma, per_layer = compute_router_shift(_cuda(N, T, L, K), _cuda(N, T, L, K), RouterShiftConfig(enabled=True))
    assert gamma.device.type == "cuda" and gamma.shape == (N, T) and gamma.dtype == torch.float32
    assert per_layer.shape == (N, T, L) and per_layer.device.type == "cuda"
    with pytest.raises(FakeTensorDeviceMismatchError):  # old scores left on the host
        compute_router_shift(_cuda(N, T, L, K), torch.zeros(N, T, L, K), RouterShiftConfig(enabled=True))


def test_advantages_on_cuda(fake_cuda):
    adv = group_relative_advantages(_cuda(8), 4)
    assert adv.device.type == "cuda" and adv.dtype == torch.float32 and adv.shape == (8,)


def test_sequence_loss_on_cuda(fake_cuda):
    loss, stats = gspo_loss(_cuda(N, T), _cuda(N, T), _cuda(N), _cuda(N, T), PolicyLossConfig(), gamma=_cuda(N, T),
                            normalizer=torch.ones((), device="cuda"))
    assert loss.device.type == "cuda" and loss.dim() == 0
    assert stats and all(v.device.type == "cuda" for v in stats.values())
    with pytest.raises(FakeTensorDeviceMismatchError):  # γ computed on the host
        gspo_loss(_cuda(N, T), _cuda(N, T), _cuda(N), _cuda(N, T), PolicyLossConfig(), gamma=torch.zeros(N, T),
                  normalizer=torch.ones((), device="cuda"))

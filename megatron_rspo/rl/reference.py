"""The KL reference policy: a frozen copy of the initial policy and its log-prob pass.

Between passes the weights wait in host memory (``offload``, the default): on a GPU node the reference is
resident only while it computes (for Qwen3-30B-A3B on 8 GPUs, 10 GB per GPU freed for the rest of the
iteration, at the cost of one host->device copy per rollout).

"Initial" means the weights RL started from (``--init-from``, or the seeded initialisation), never
the weights of a resumed run: the trainer takes the copy before a ``--load`` overwrites the policy, so
an interrupted and resumed run has the same reference as an uninterrupted one. The pass uses the same
micro-batch rows as the old-policy and training passes, and the same log-prob path (standard or fused).
"""

from __future__ import annotations

import torch

from megatron_rspo.config import ModelConfig, ParallelConfig
from megatron_rspo.distributed import module_device
from megatron_rspo.model.provider import build_model
from megatron_rspo.model.routing import RoutingSession
from megatron_rspo.rl.experience import Experience
from megatron_rspo.rl.step import PolicyOutput, StepOptions


class ReferencePolicy:
    def __init__(self, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, initial: torch.nn.Module,
                 offload: bool = True) -> None:
        self.model = build_model(model_cfg, parallel_cfg, init_weights=False)
        self.model.load_state_dict(initial.state_dict())
        self.model.eval().requires_grad_(False)
        self.device = module_device(self.model)
        self.offload = offload and self.device.type != "cpu"
        if self.offload:
            self.model.to("cpu")

    @property
    def resident_bytes(self) -> int:
        """Bytes of the reference's weights on the device now."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.device.type != "cpu")

    @torch.no_grad()
    def logprobs(self, exp: Experience, micro_rows: int, opts: StepOptions) -> torch.Tensor:
        """log π_ref of every label of ``exp`` [N, S-1] at the sampling temperature, ``micro_rows`` rows
        per forward."""
        if self.offload:
            self.model.to(self.device, non_blocking=True)
        try:
            out = []
            for mb in exp.chunks(micro_rows):
                policy = PolicyOutput(opts)
                output = policy.forward(self.model, mb, RoutingSession())
                out.append(policy.logprobs(output, mb.tokens[:, 1:])[0])
            return torch.cat(out)
        finally:
            if self.offload:
                self.model.to("cpu")

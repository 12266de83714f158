"""Distributed checkpoints (``megatron.core.dist_checkpointing``): atomic save, resume, resharding.

Layout of ``<save>``::

    latest_checkpointed_iteration.txt   # "100": the newest COMPLETE checkpoint (rewritten atomically)
    iter_0000100/                       # published by one rename, so it is complete or absent
        metadata.json, .metadata, *.distcp, common.pt   # dist_checkpointing (model, optimizer, ...)
        run_config.json                 # every config dataclass of the run
        rng/rank_00000.pt ...           # python/numpy/torch/CUDA/Megatron-tracker RNG, one per rank
        rank_state/rank_00000.pt ...    # optional per-rank state of the run (e.g. rollouts not yet trained on)
    iter_0000200.tmp-<nonce>/           # a save in progress (or a crashed one: ignored, cleaned later)

Tensors are stored in Megatron's global (layout-independent) form, so a checkpoint written with one
TP/EP/PP layout loads into another. ``common.pt`` holds the scheduler state, the run's ``extra_state``
(rank 0's copy: keep it identical on all ranks), the iteration and what the checkpoint contains.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_rspo import distributed, rng_state
from megatron_rspo.checkpoint_check import space_needed, write_problem
from megatron_rspo.config import ModelConfig, save_json
from megatron_rspo.errors import UserError
from megatron_rspo.state_keys import model_sharded_state_dict, resolve_stored_keys, sharded_tensors, unwrap

log = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RUN_CONFIG_FILE = "run_config.json"
FORMAT_VERSION = 1
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_TMP_RE = re.compile(r"^(iter_\d{7,}\.(tmp|old)|latest_checkpointed_iteration\.txt\.tmp)-[0-9a-f]+$")
# Optimizer keys do not depend on how Megatron splits params into chained optimizers (dense/expert).
_OPTIM_METADATA = {"chained_optim_avoid_prefix": True}
# ModelConfig fields that do not change what the weights compute (training/runtime knobs).
RUNTIME_FIELDS = frozenset({
    "moe_aux_loss_coeff", "moe_router_load_balancing_type", "moe_token_dispatcher_type", "init_method_std",
    "hidden_dropout", "attention_dropout", "transformer_impl", "bf16", "max_position_embeddings",
    "recompute_granularity", "recompute_method", "recompute_num_layers", "moe_grouped_gemm",
})


class CheckpointError(UserError, RuntimeError):
    """No checkpoint, an incomplete/corrupt one, or one that does not fit the model."""


class ConfigMismatchError(CheckpointError):
    """The checkpoint's model config differs from the current one (fields are named)."""


class LoadResult(NamedTuple):
    iteration: int
    extra_state: dict[str, Any]
    path: str = ""
    contents: tuple[str, ...] = ()
    rank_state: Optional[dict[str, Any]] = None  # this rank's ``rank_state`` from the save, if any


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank_file(path: str, folder: str) -> str:
    """This rank's file in a per-rank folder of a checkpoint (``rng``, ``rank_state``)."""
    return os.path.join(path, folder, f"rank_{_rank():05d}.pt")


def _save_rank_file(path: str, folder: str, obj: Any) -> None:
    os.makedirs(os.path.join(path, folder), exist_ok=True)
    torch.save(obj, _rank_file(path, folder))


def _complete_iterations(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))]
    return sorted(int(m.group(1)) for n in names if (m := _ITER_RE.match(n)))


def latest_iteration(root: str) -> Optional[int]:
    """Iteration named by the tracker file; without one, the newest complete ``iter_*`` dir; None if none."""
    tracker = os.path.join(root, TRACKER_FILE)
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        if not text.isdigit():
            raise CheckpointError(f"corrupt tracker file {tracker}: {text!r} is not an iteration number")
        return int(text)
    # Crash between publishing iter_X and rewriting the tracker: iter_X is complete, use it.
    its = _complete_iterations(root)
    return its[-1] if its else None


def resolve_checkpoint_dir(load_dir: str, iteration: Optional[int] = None) -> str:
    """``load_dir`` is a save root (latest, or ``iteration``) or an ``iter_*`` directory itself."""
    load_dir = os.path.abspath(load_dir)
    if _ITER_RE.match(os.path.basename(load_dir)) and os.path.isdir(load_dir):
        path = load_dir
    else:
        if not os.path.isdir(load_dir):
            raise CheckpointError(f"no checkpoint found: {load_dir} does not exist")
        it = iteration if iteration is not None else latest_iteration(load_dir)
        if it is None:
            raise CheckpointError(f"no checkpoint found in {load_dir} (no {TRACKER_FILE}, no iter_* directory)")
        path = os.path.join(load_dir, iter_dir_name(it))
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint {path} does not exist"
                                  + ("" if iteration is not None else f" (named by {TRACKER_FILE})"))
    missing = [f for f in ("metadata.json", "common.pt", RUN_CONFIG_FILE) if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise CheckpointError(f"incomplete or corrupt checkpoint {path}: missing {', '.join(missing)}")
    return path


# ---------------------------------------------------------------------------------------- save
def _broadcast_nonce() -> str:
    box = [uuid.uuid4().hex[:12] if _rank() == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return str(box[0])


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_stale(root: str) -> list[str]:
    """Remove leftovers of crashed saves (``iter_*.tmp-*``, ``iter_*.old-*``, tracker temp files).
    Call with no save running."""
    removed = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if _TMP_RE.match(name):
            path = os.path.join(root, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
    return removed


def _publish(root: str, tmp: str, iteration: int, nonce: str) -> None:
    """Rank 0: rename the finished temp dir into place, THEN point the tracker at it."""
    final = os.path.join(root, iter_dir_name(iteration))
    old = None
    if os.path.exists(final):  # re-saving an iteration: move the old one aside, drop it after publishing
        old = f"{final}.old-{nonce}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)  # the rename is durable before the tracker names it
    _write_text_atomic(os.path.join(root, TRACKER_FILE), str(iteration))
    _fsync_dir(root)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _prune(root: str, current: int, keep_last: int) -> list[int]:
    others = [i for i in _complete_iterations(root) if i != current]
    doomed = others[: max(0, len(others) - (keep_last - 1))]
    for i in doomed:
        shutil.rmtree(os.path.join(root, iter_dir_name(i)), ignore_errors=True)
    return doomed


def save_checkpoint(save_dir: str, iteration: int, model: torch.nn.Module, optimizer: Any = None,
                    scheduler: Any = None, extra_state: Optional[dict[str, Any]] = None,
                    configs: Sequence[Any] = (), keep_last: Optional[int] = None, save_rng: bool = True,
                    rank_state: Optional[dict[str, Any]] = None) -> str:
    """Save on every rank (collective). Returns the published ``iter_*`` path.

    ``configs``: dataclass instances (ModelConfig, ParallelConfig, ...) written to run_config.json.
    ``keep_last``: after publishing, delete all but the newest ``keep_last`` complete checkpoints.
    ``save_rng=False``: no RNG states (a converted model: a run starting from it keeps its own seeds).
    ``rank_state``: this rank's own state (CPU tensors, numbers, strings, lists and dicts of them), published
    with the rest; every rank passes one or none does.
    """
    if not dist.is_initialized():
        raise CheckpointError("save_checkpoint needs torch.distributed (call init_distributed first)")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (got {keep_last})")
    root = os.path.abspath(save_dir)
    nonce = _broadcast_nonce()
    tmp = os.path.join(root, f"{iter_dir_name(iteration)}.tmp-{nonce}")
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        clean_stale(root)
        os.makedirs(tmp)
    _barrier()

    model_sd = model_sharded_state_dict(model)  # canonical keys, whichever spec built the model
    contents = ["model"]
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=_OPTIM_METADATA)
        contents.append("optimizer")
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
        contents.append("scheduler")
    if save_rng:
        contents.append("rng")
    if rank_state is not None:
        contents.append("rank_state")
    state.update(iteration=iteration, extra_state=dict(extra_state or {}), contents=contents,
                 format_version=FORMAT_VERSION, saved_layout=list(rng_state.layout()))
    # Before writing: every rank agrees whether its share fits on the disk (no half-written checkpoint to clean).
    short = space_needed(state, shutil.disk_usage(root).free)
    if distributed.agree_int(int(short is not None), distributed.ReduceOp.MAX):
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot save to {root}: {short or 'no space left on another rank'}; the previous "
                              "checkpoint is intact")
    try:
        dist_checkpointing.save(state, tmp)
        if save_rng:
            _save_rank_file(tmp, "rng", rng_state.capture())
        if rank_state is not None:
            _save_rank_file(tmp, "rank_state", rank_state)
        if _rank() == 0:
            save_json(os.path.join(tmp, RUN_CONFIG_FILE), *configs)
    except Exception as e:
        if (problem := write_problem(e)) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # never published: the previous checkpoint stays the latest
        raise CheckpointError(f"cannot save to {root}: {problem}; the previous checkpoint is intact") from e
    _barrier()  # every rank's files are in tmp
    if _rank() == 0:
        _publish(root, tmp, iteration, nonce)
        if keep_last is not None:
            _prune(root, iteration, keep_last)
    _barrier()  # nobody reads the checkpoint before it is published
    return os.path.join(root, iter_dir_name(iteration))


# ---------------------------------------------------------------------------------------- load
def read_run_config(path: str) -> dict[str, dict[str, Any]]:
    with open(os.path.join(path, RUN_CONFIG_FILE)) as fh:
        return json.load(fh)


def read_model_config(path: str) -> ModelConfig:
    """The ModelConfig a checkpoint (an ``iter_*`` dir) was saved with; unknown fields are dropped."""
    saved = read_run_config(path).get("ModelConfig")
    if saved is None:
        raise CheckpointError(f"{path}/{RUN_CONFIG_FILE} has no ModelConfig")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    dropped = sorted(set(saved) - known)
    if dropped:
        log.warning("%s: ignoring unknown ModelConfig fields %s", path, dropped)
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def _effective(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults that mean the same thing (None head dim = hidden/heads, ...)."""
    c = dict(cfg)
    c["kv_channels"] = c.get("kv_channels") or c["hidden_size"] // c["num_attention_heads"]
    c["num_query_groups"] = c.get("num_query_groups") or c["num_attention_heads"]
    c["moe_ffn_hidden_size"] = c.get("moe_ffn_hidden_size") or c["ffn_hidden_size"]
    if c.get("moe_layer_freq", 1) == 1:
        c.pop("ffn_hidden_size", None)  # no dense layers: their width is irrelevant
    return c


def check_model_config(path: str, current: ModelConfig, allow: Iterable[str] = ()) -> None:
    """Raise ConfigMismatchError naming every model field that differs from the checkpoint's."""
    saved = read_run_config(path).get("ModelConfig")
    if saved is None:
        return
    ours = _effective(dataclasses.asdict(current))
    theirs = _effective({**dataclasses.asdict(ModelConfig()), **saved})
    skip = RUNTIME_FIELDS | set(allow)
    diffs = [f"{k}: checkpoint {theirs.get(k)!r}, current {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
             if k not in skip and theirs.get(k) != ours.get(k)]
    if diffs:
        raise ConfigMismatchError(f"model config of {path} differs from the current model:\n  "
                                  + "\n  ".join(diffs))


def _check_shapes(path: str, model_sd: dict[str, Any], strict: bool) -> set[str]:
    """Point the model's keys at the spellings the checkpoint holds (either spec's, ``state_keys``), then
    compare the global shapes the model asks for with the checkpoint's, naming tensors. Returns the keys the
    checkpoint lacks (an error when ``strict``)."""
    try:
        meta = load_sharded_metadata(path)
    except Exception as e:  # noqa: BLE001 - name the checkpoint whatever went wrong
        raise CheckpointError(f"cannot read the metadata of {path}: {type(e).__name__}: {e}") from e
    stored = {k.split("/shard_")[0] for k in meta}  # ShardedObjects are listed per shard
    missing = set(resolve_stored_keys(model_sd, stored))
    bad = [f"{sh.key}: checkpoint {tuple(meta[sh.key].global_shape)}, model {tuple(sh.global_shape)}"
           for sh in sharded_tensors(model_sd) if sh.key in meta and not sh.allow_shape_mismatch
           and tuple(meta[sh.key].global_shape) != tuple(sh.global_shape)]
    if bad:
        raise ConfigMismatchError(f"tensor shapes of {path} do not fit the model:\n  " + "\n  ".join(bad))
    if missing and strict:
        raise CheckpointError(f"checkpoint {path} lacks model tensors: {', '.join(sorted(missing))}")
    return missing


def _intact(load_dir: str, iteration: Optional[int], path: str) -> str:
    """``path`` when intact; resuming the latest of a save root, else the newest intact older one (with a warning);
    otherwise one error naming the damaged file and any intact alternative."""
    from megatron_rspo.checkpoint_check import damage, newest_intact

    if (problem := damage(path)) is None:
        return path
    root, name = os.path.split(path)
    current = int(_ITER_RE.match(name).group(1))
    older = newest_intact({i: os.path.join(root, iter_dir_name(i)) for i in _complete_iterations(root) if i < current})
    if older is not None and iteration is None and os.path.abspath(load_dir) == root:
        log.warning("checkpoint %s is damaged (%s); resuming from the newest intact one, %s", path, problem,
                    iter_dir_name(older))
        return resolve_checkpoint_dir(root, older)
    hint = f"; the newest intact one is {os.path.join(root, iter_dir_name(older))}" if older is not None else ""
    raise CheckpointError(f"checkpoint {path} is damaged: {problem}{hint}")


def load_checkpoint(load_dir: str, model: torch.nn.Module, optimizer: Any = None, scheduler: Any = None,
                    iteration: Optional[int] = None, strict: bool = True, model_config: Optional[ModelConfig] = None,
                    load_rng: bool = True, allow_config_changes: Iterable[str] = ()) -> LoadResult:
    """Load into ``model`` (and optimizer/scheduler/RNG when given and present); collective.

    A model-only checkpoint (e.g. from conversion) leaves a given optimizer/scheduler untouched.
    ``model_config``: compared with the checkpoint's run_config.json (ConfigMismatchError names fields;
    ``allow_config_changes`` lists fields allowed to differ, e.g. ``moe_router_topk``).
    """
    path = _intact(load_dir, iteration, resolve_checkpoint_dir(load_dir, iteration))
    if model_config is not None:
        check_model_config(path, model_config, allow_config_changes)
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise CheckpointError(f"cannot read {path}/common.pt: {e}") from e
    contents = tuple(common.get("contents", ("model",)))
    gpt = unwrap(model)
    model_sd = model_sharded_state_dict(gpt)
    absent = _check_shapes(path, model_sd, strict)
    # strict=False: tensors the checkpoint lacks keep their current values
    request: dict[str, Any] = {"model": {k: v for k, v in model_sd.items() if getattr(v, "key", None) not in absent}}
    if optimizer is not None and "optimizer" in contents:
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPTIM_METADATA)
    elif optimizer is not None:
        log.info("%s has no optimizer state; the optimizer starts fresh", path)
    try:
        loaded = dist_checkpointing.load(request, path, strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"loading {path} failed: {type(e).__name__}: {e}") from e
    result = gpt.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if strict and (missing or result.unexpected_keys):
        raise CheckpointError(f"{path}: missing model keys {missing}, unexpected {result.unexpected_keys}")
    if "optimizer" in request:
        try:
            optimizer.load_state_dict(loaded["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. another dense/expert optimizer split (EP change)
            saved = common.get("saved_layout")
            raise CheckpointError(f"optimizer state of {path} (saved with (tp,pp,ep)={saved}) does not fit this "
                                  f"optimizer: {e}; load with optimizer=None to start it fresh") from e
    if scheduler is not None and "scheduler" in contents:
        scheduler.num_steps = 0  # load_state_dict steps the scheduler forward by the saved count
        scheduler.load_state_dict(common["scheduler"])
    if load_rng and "rng" in contents:
        file = _rank_file(path, "rng")
        if not os.path.isfile(file):
            log.warning("no RNG state for rank %d in %s; RNG not restored", _rank(), path)
        else:
            rng_state.restore(torch.load(file, weights_only=False))
    rank_state = None
    if "rank_state" in contents:
        file = _rank_file(path, "rank_state")
        if os.path.isfile(file):  # plain data only: no code runs on load
            rank_state = torch.load(file, weights_only=True)
        else:
            log.warning("no rank state for rank %d in %s (saved with another world size?)", _rank(), path)
    _barrier()
    return LoadResult(int(common.get("iteration", 0)), dict(common.get("extra_state", {})), path, contents,
                      rank_state)


__all__ = [
    "CheckpointError", "ConfigMismatchError", "LoadResult", "save_checkpoint", "load_checkpoint", "latest_iteration",
    "resolve_checkpoint_dir", "read_run_config", "read_model_config", "check_model_config", "clean_stale",
    "iter_dir_name", "TRACKER_FILE", "RUN_CONFIG_FILE",
]

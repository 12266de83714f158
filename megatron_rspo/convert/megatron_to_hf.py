"""Megatron distributed checkpoint (any TP/EP/PP layout it was saved with) -> HF safetensors shards.

No model is built and no process group is needed: each layer's tensors are read straight from the
checkpoint's global view (a one-layer slice of each stacked tensor), converted, and appended to the
shard being written. Peak memory is about one layer plus one output shard.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from megatron.core import dist_checkpointing

from megatron_rspo.checkpoint import ConfigMismatchError, check_model_config, read_model_config, resolve_checkpoint_dir
from megatron_rspo.config import ModelConfig
from megatron_rspo.convert.arch import hf_to_model_config, model_config_to_hf
from megatron_rspo.convert.common import (
    DTYPES,
    ConversionError,
    Log,
    Progress,
    default_log,
    dtype_name,
    parse_size,
    peak_rss_mib,
)
from megatron_rspo.convert.dist_reader import GlobalTensorReader
from megatron_rspo.convert.hf_layout import HFCheckpointWriter, copy_non_weight_files
from megatron_rspo.convert.mapping import GLOBAL, LAYER_PREFIX, layer_to_hf, megatron_layer_keys


def _hf_config(path: str, model: ModelConfig, hf_config_from: Optional[str], model_type: Optional[str],
               dtype: torch.dtype, common: dict[str, Any]) -> dict[str, Any]:
    if hf_config_from:
        with open(os.path.join(hf_config_from, "config.json")) as fh:
            cfg = json.load(fh)
    elif "hf_config" in common.get("extra_state", {}):  # recorded by convert_hf_to_megatron
        cfg = dict(common["extra_state"]["hf_config"])
    else:
        cfg = model_config_to_hf(model, model_type, dtype)
    if model_type and cfg.get("model_type") != model_type:
        raise ConversionError(f"--model-type {model_type} but the HF config says {cfg.get('model_type')}")
    _, from_hf = hf_to_model_config(cfg)
    try:  # the HF config must describe the checkpoint's model
        check_model_config(path, from_hf)
    except ConfigMismatchError as e:
        raise ConversionError(f"the HF config does not describe this checkpoint: {e}") from e
    cfg["dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"] = dtype_name(dtype)
    return cfg


def convert_megatron_to_hf(load_dir: str, hf_dir: str, max_shard_size: str | int = "2GB",
                           hf_config_from: Optional[str] = None, model_type: Optional[str] = None,
                           dtype: Optional[str] = None, iteration: Optional[int] = None,
                           log: Log = default_log) -> list[str]:
    """Write ``hf_dir`` (config.json, shards, index; tokenizer files from ``hf_config_from``)."""
    path = resolve_checkpoint_dir(load_dir, iteration)
    model = read_model_config(path)
    common = dist_checkpointing.load_common_state_dict(path)
    loader = GlobalTensorReader(path)
    layer_keys = [LAYER_PREFIX + k for k in megatron_layer_keys(model)]
    glob_keys = [k for k in GLOBAL if k in loader.meta]
    model_keys = {k for k in loader.meta if not k.startswith("optimizer.")}
    unknown = sorted(model_keys - set(layer_keys) - set(glob_keys))
    missing = [k for k in layer_keys + list(GLOBAL)[:2] if k not in loader.meta]
    if unknown or missing:
        raise ConversionError(f"{path}: checkpoint tensors {unknown} have no HF mapping; missing {missing}")
    bad = [k for k in layer_keys if loader.shape(k)[0] != model.num_layers]
    if bad:
        raise ConversionError(f"{path}: {bad} are not stacked over {model.num_layers} layers")
    out_dtype = DTYPES[dtype] if dtype else loader.dtype("embedding.word_embeddings.weight")
    cfg = _hf_config(path, model, hf_config_from, model_type, out_dtype, common)
    arch, _ = hf_to_model_config(cfg)

    os.makedirs(hf_dir, exist_ok=True)
    if hf_config_from:
        copied = copy_non_weight_files(hf_config_from, hf_dir)
        log(f"[megatron->hf] copied {', '.join(copied) or 'nothing'} from {hf_config_from}")
    with open(os.path.join(hf_dir, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
    writer = HFCheckpointWriter(hf_dir, parse_size(max_shard_size), log)
    progress = Progress("megatron->hf", model.num_layers + 1, log)
    glob = loader.read(glob_keys)
    writer.add(GLOBAL["embedding.word_embeddings.weight"], glob.pop("embedding.word_embeddings.weight").to(out_dtype))
    for layer in range(model.num_layers):
        tensors = {k[len(LAYER_PREFIX):]: v for k, v in loader.read(layer_keys, (layer,)).items()}
        for name, t in layer_to_hf(arch, model, layer, tensors).items():
            writer.add(name, t.to(out_dtype))
        del tensors
        progress.step(f"layer {layer}")
    for key, t in glob.items():  # final norm, then lm_head when untied
        writer.add(GLOBAL[key], t.to(out_dtype))
    files = writer.finish()
    progress.step(f"final norm, output layer; {len(files)} shard(s) in {hf_dir}")
    log(f"[megatron->hf] done: {writer.total_bytes / 2**20:.1f} MiB of weights, peak RSS {peak_rss_mib():.0f} MiB")
    return files

"""Artifacts that do not belong together, each answered with one clear message before any model is built:
architecture flags that contradict ``--init-from``, a tokenizer that is not the checkpoint's, prompts that
leave no room for the response within the model's positions; and, when resuming, a missing ``--load``
folder (a warning: a fresh run starts), a run that already finished, flags that changed since the save.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

from megatron_rspo.config import ModelConfig
from megatron_rspo.errors import ConfigError
from megatron_rspo.rl.config import RUNTIME_MODEL_FIELDS

log = logging.getLogger(__name__)
LENGTH_CHECK_ROWS = 20_000  # prompts measured per data file (the longest of them decides)
# flags that may change on a resume without a note: where the run writes, how often, how long
RESUME_FREE = {"save", "load", "save_interval", "eval_interval", "log_interval", "keep_last", "tensorboard_dir",
               "progress", "train_iters", "init_from", "skip_memory_check", "wandb_project"}


def init_from_conflicts(cli: ModelConfig, saved: ModelConfig, given: set[str]) -> list[str]:
    """Architecture flags given on the command line (``given``: their names) that differ from ``--init-from``'s
    checkpoint: the checkpoint decides the architecture, so they would be ignored."""
    return [f"--{f.name.replace('_', '-')} {getattr(cli, f.name)!r} (the checkpoint has {getattr(saved, f.name)!r})"
            for f in dataclasses.fields(ModelConfig)
            if f.name in given and f.name not in RUNTIME_MODEL_FIELDS and f.name != "vocab_size"
            and getattr(cli, f.name) != getattr(saved, f.name)]


def tokenizer_problem(tokenizer_path: str, tok_vocab: int, model_vocab: int,
                      saved_run: Optional[dict[str, Any]]) -> Optional[str]:
    """Why this tokenizer cannot drive a model of ``model_vocab`` embeddings (None: it can). A checkpoint our
    trainer wrote records its tokenizer, whose vocabulary is the model's: any other size is another tokenizer.
    A converted Hugging Face model pads its vocabulary: a smaller tokenizer is normal there."""
    if tok_vocab > model_vocab:
        return (f"the tokenizer {tokenizer_path} has {tok_vocab} tokens, more than the model's {model_vocab} "
                "embeddings: it is not this model's tokenizer")
    trained_with = (saved_run or {}).get("RunConfig", {}).get("tokenizer_model")
    if trained_with and tok_vocab != model_vocab:
        return (f"the tokenizer {tokenizer_path} has {tok_vocab} tokens; the checkpoint was trained with "
                f"{trained_with} ({model_vocab} tokens): use that tokenizer")
    return None


def prompt_length_problem(prompts: list[tuple[str, int]], max_new_tokens: int, positions: int) -> Optional[str]:
    """``prompts``: (where, token count). A message when the longest prompt plus the response exceeds the model's
    positions (generation would run past them)."""
    if not prompts:
        return None
    where, longest = max(prompts, key=lambda p: p[1])
    if longest + max_new_tokens > positions:
        return (f"the longest prompt ({where}: {longest} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
                f"model's {positions} positions (--max-position-embeddings); shorten the prompts or the responses")
    return None


def measured_prompts(task: Any, rows: list, template: str, tok: Any, name: str) -> list[tuple[str, int]]:
    """(``name``:row, token count) of the first LENGTH_CHECK_ROWS prompts of a data file."""
    return [(f"{name} row {i + 1}", len(tok.encode(task.prompt(x, template, tok))))
            for i, x in enumerate(rows[:LENGTH_CHECK_ROWS])]


def resume_notes(load: str, saved_run: dict[str, Any], current: dict[str, dict[str, Any]]) -> list[str]:
    """A warning for a resume whose flags changed since the save, naming them."""
    changed = []
    for section, values in current.items():
        before = saved_run.get(section, {})
        changed += [f"--{k.replace('_', '-')} {before[k]!r} -> {v!r}" for k, v in values.items()
                    if k in before and k not in RESUME_FREE and before[k] != v]
    return [f"resuming {load} with flags that changed since it was saved: {', '.join(changed)}"] if changed else []


def missing_load_note(load: Optional[str], found: bool) -> Optional[str]:
    if load and not found:
        what = "does not exist" if not os.path.exists(load) else "holds no checkpoint"
        return f"--load {load} {what}: starting a new run"
    return None


def check_inputs(model: ModelConfig, rl: Any, run: Any, tok: Any, task: Any, train_set: list, test_set: list) -> None:
    """The tokenizer against the checkpoint the policy comes from, and the prompts against the model's positions:
    one ConfigError naming every problem."""
    from megatron_rspo import checkpoint

    resumed = checkpoint.latest_iteration(run.load) if run.load and os.path.isdir(run.load) else None
    if (note := missing_load_note(run.load, resumed is not None)) is not None:
        log.warning(note)
    if resumed is not None and resumed >= rl.train_iters:
        raise ConfigError(f"the run in {run.load} already reached iteration {resumed} (--train-iters "
                          f"{rl.train_iters}): nothing to train; raise --train-iters to continue it")
    source = run.load if resumed is not None else rl.init_from
    saved = checkpoint.read_run_config(checkpoint.resolve_checkpoint_dir(source)) if source else None
    prompts = measured_prompts(task, train_set, rl.template, tok, rl.train_data)
    prompts += measured_prompts(task, test_set, rl.template, tok, rl.test_data)
    problems = [p for p in (tokenizer_problem(run.tokenizer_model, tok.vocab_size, model.vocab_size, saved),
                            prompt_length_problem(prompts, rl.max_new_tokens, model.max_position_embeddings)) if p]
    if problems:
        raise ConfigError("; ".join(problems))

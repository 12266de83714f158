"""Entry points: every problem of a command line reported at once, before a process group or a model
exists, as one ``error:`` message with exit code 2 and no traceback; ``--help`` documents every flag."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_rspo import cli
from megatron_rspo.config import ConfigError, ModelConfig, OptimConfig, ParallelConfig, RunConfig
from megatron_rspo.errors import UserError
from megatron_rspo.rl.config import RLConfig, validate_rl_run

ROOT = Path(__file__).resolve().parents[1]
# 6 experts on EP=4 x TP=2 on one process: Megatron's parallel_state would die on it ("world_size (1) is not
# divisible by 2"); the RL flags are each invalid; all must be named in one message.
BAD_RL = {
    "--num-experts": "6", "--expert-model-parallel-size": "4", "--tensor-model-parallel-size": "2",
    "--num-minibatches": "0", "--rollout-batch-size": "0", "--top-p": "0", "--temperature": "0",
    "--num-generations": "1", "--max-new-tokens": "0", "--ppo-epochs": "0", "--clip-eps": "0",
    "--router-shift-floor": "1.5", "--eval-samples": "-1", "--collapse-window": "1", "--kl-coeff": "-1",
    "--entropy-coeff": "-0.1", "--lr": "-1", "--micro-batch-size": "0", "--micro-batch-tokens": "0",
    "--generation-batch-size": "0", "--logprob-chunk-tokens": "0", "--max-consecutive-skipped-steps": "0",
    "--clip-eps-high": "-1",
}
NAMED = [f for f in BAD_RL if f not in ("--expert-model-parallel-size",)] + ["world size 1"]


def _argv(flags: dict[str, str]) -> list[str]:
    return [x for kv in flags.items() for x in kv]


def _run(module: str, *argv: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, time.time() - t0


def test_rl_main_reports_every_problem_at_once_and_exits_2(tmp_path):
    proc, seconds = _run("megatron_rspo.rl.trainer", *_argv(BAD_RL), "--tokenizer-model", str(tmp_path / "nope"),
                         "--train-data", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("error: ") == 1 and proc.stderr.startswith("error: invalid RL configuration")
    for needle in NAMED + ["--tokenizer-model", "missing.jsonl", "greedy rollouts for RL are refused"]:
        assert needle in proc.stderr, needle
    assert seconds < 60  # no model, no process group: imports and a few checks


def test_sft_main_reports_every_problem_at_once_and_exits_2(tmp_path):
    proc, _ = _run("megatron_rspo.sft", "--num-experts", "6", "--expert-model-parallel-size", "4",
                   "--micro-batch-size", "0", "--lr", "-1", "--train-data", str(tmp_path / "none.jsonl"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in ("--num-experts (6)", "--micro-batch-size", "--lr", "--tokenizer-model is required", "none.jsonl"):
        assert needle in proc.stderr, needle


def test_validate_rl_run_lists_everything_without_a_process_group():
    import torch.distributed as dist

    rl = RLConfig(**{k[2:].replace("-", "_"): float(v) if "." in v or k in ("--top-p", "--temperature", "--clip-eps",
                                                                              "--kl-coeff", "--entropy-coeff",
                                                                              "--clip-eps-high") else int(v)
                     for k, v in BAD_RL.items() if k[2:].replace("-", "_") in RLConfig.__dataclass_fields__})
    model = ModelConfig(num_experts=6)
    par = ParallelConfig(expert_model_parallel_size=4, tensor_model_parallel_size=2)
    had_group = dist.is_initialized()  # earlier tests in this process may have made one
    with pytest.raises(ConfigError) as exc:
        validate_rl_run(model, par, OptimConfig(lr=-1), RunConfig(), rl, world_size=1, cuda=False, check_files=False)
    message = str(exc.value)
    for needle in NAMED + ["--tokenizer-model is required"]:
        assert needle in message, needle
    assert dist.is_initialized() == had_group


@pytest.mark.parametrize("rl_kw, par_kw, world, needle", [
    ({"rollout_batch_size": 3}, {}, 2, "--rollout-batch-size (3) is not divisible by the data-parallel size (2)"),
    ({"rollout_batch_size": 2, "num_generations": 3, "num_minibatches": 4}, {}, 1, "responses per rank (6)"),
    ({"micro_batch_size": 2}, {"num_microbatches": 2}, 1, "both size the micro-batches"),
    ({"routing_replay": True, "freeze_router": True}, {}, 1, "pick one"),
    ({}, {"pipeline_model_parallel_size": 2}, 2, "RL rollouts need --pipeline-model-parallel-size 1"),
    ({"micro_batch_size": 3, "rollout_batch_size": 4, "num_generations": 2, "num_minibatches": 2},
     {"pipeline_model_parallel_size": 2}, 2, "not divisible by --micro-batch-size (3)"),
    ({"micro_batch_tokens": 64}, {"pipeline_model_parallel_size": 2}, 2, "use --micro-batch-size"),
])
def test_rl_layout_rules(rl_kw, par_kw, world, needle):
    with pytest.raises(ConfigError, match=None) as exc:
        validate_rl_run(ModelConfig(), ParallelConfig(**par_kw), OptimConfig(), RunConfig(tokenizer_model="t"),
                        RLConfig(**rl_kw), world_size=world, cuda=False, check_files=False)
    assert needle in str(exc.value)


def test_full_recompute_with_routing_replay_is_refused():
    model = ModelConfig(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    with pytest.raises(ConfigError, match="cannot be combined with --routing-replay"):
        validate_rl_run(model, ParallelConfig(), OptimConfig(), RunConfig(tokenizer_model="t"),
                        RLConfig(routing_replay=True), cuda=True, check_files=False)


def test_valid_rl_run_passes():
    validate_rl_run(ModelConfig(), ParallelConfig(), OptimConfig(), RunConfig(tokenizer_model="t"),
                    RLConfig(micro_batch_size=4), cuda=False, check_files=False)


# ------------------------------------------------------------------ run_cli


@pytest.fixture
def no_group(monkeypatch):
    """run_cli would os._exit with a live process group (another test may have made one here)."""
    monkeypatch.setattr(cli, "_process_group_exists", lambda: False)


@pytest.mark.parametrize("exc, text", [
    (ConfigError("invalid configuration:\n  - --x must be >= 1"), "error: invalid configuration:\n  - --x must"),
    (FileNotFoundError(2, "No such file or directory", "/data/x.jsonl"), "error: No such file or directory: /data/"),
])
def test_run_cli_turns_user_errors_into_exit_2(no_group, capsys, exc, text):
    def main(argv):
        raise exc

    with pytest.raises(SystemExit) as done:
        cli.run_cli(main, [])
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith(text)


def test_run_cli_keeps_bugs_and_return_codes(no_group):
    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run_cli(bug, [])
    for rc, code in ((3, 3), (None, 0), ({"accuracy": 1.0}, 0), (0.5, 0)):
        with pytest.raises(SystemExit) as done:
            cli.run_cli(lambda argv, rc=rc: rc, [])
        assert done.value.code == code


def test_data_tokenizer_checkpoint_conversion_errors_are_user_errors(tmp_path):
    from megatron_rspo.checkpoint import CheckpointError, resolve_checkpoint_dir
    from megatron_rspo.convert import ConversionError
    from megatron_rspo.tasks import countdown
    from megatron_rspo.tasks.data import DataError
    from megatron_rspo.tokenizer import load_tokenizer

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"numbers": [3, 5, 7], "target": 22, "solution": "3*5+7"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON|bad\.jsonl:2: Expecting"):
        countdown.load_jsonl(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        countdown.load_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(UserError, match="cannot load a tokenizer from .*junk.model"):
        load_tokenizer(tmp_path / "junk.model")
    with pytest.raises(UserError, match="no such file"):
        load_tokenizer(tmp_path / "absent.model")
    with pytest.raises(UserError):
        resolve_checkpoint_dir(str(tmp_path / "no_ckpt"))
    assert issubclass(CheckpointError, UserError) and issubclass(ConversionError, UserError)


def test_sft_malformed_data_row_is_one_message(no_group, countdown_data, tmp_path, capsys):
    from megatron_rspo import sft

    bad = tmp_path / "train.jsonl"
    bad.write_text((countdown_data / "train.jsonl").read_text().splitlines()[0] + '\n{"numbers": [1]}\n')
    with pytest.raises(SystemExit) as done:
        cli.run_cli(sft.main, ["--train-data", str(bad), "--test-data", str(countdown_data / "test.jsonl"),
                               "--tokenizer-model", str(countdown_data / "tok.model"), "--no-progress"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2: ") and "Traceback" not in err


# ------------------------------------------------------------------ --help


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _tool_parser(path: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a tool's ``main`` builds (captured at parse_args)."""
    import importlib.util

    class Captured(Exception):
        pass

    def capture(self, *args, **kwargs):
        raise Captured(self)

    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Captured) as got:
        module.main([])
    monkeypatch.undo()
    return got.value.args[0]


@pytest.mark.parametrize("entry", ["rl", "sft", "tools/convert_hf_to_megatron.py", "tools/convert_megatron_to_hf.py",
                                   "tools/eval_countdown.py", "tools/make_countdown_data.py", "tools/plot_metrics.py"])
def test_every_flag_has_help_and_its_default(entry, monkeypatch):
    if entry == "rl":
        from megatron_rspo.rl.trainer import build_parser
    elif entry == "sft":
        from megatron_rspo.sft import build_parser
    else:
        parser = _tool_parser(entry, monkeypatch)
        build_parser = None
    parser = build_parser() if build_parser else parser
    missing = [a.option_strings or a.dest for a in _actions(parser) if not (a.help or "").strip()]
    assert not missing, f"flags without --help text: {missing}"
    text = parser.format_help()
    if entry in ("rl", "sft"):
        assert text.count("(default:") >= len(_actions(parser)) and "--moe-grouped-gemm" in text
        assert "%(" not in text

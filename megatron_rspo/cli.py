"""What every entry point shares: the ``--help`` formatter and ``run_cli``, which turns a user's mistake
into one clear message and exit code 2.

A ``UserError`` (a bad flag combination, a malformed data row, a broken checkpoint or tokenizer) and a
missing or unreadable file end the program with ``error: <message>`` on stderr and exit status 2, without
a traceback; any other exception is a bug and keeps its traceback. Under torchrun every rank exits 2;
rank 0 prints, other ranks only once the process group exists (an error then may be theirs alone).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, Optional

from megatron_rspo.errors import RunStopped, UserError

# File-system errors that are the user's (a path flag), not the program's.
_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, every flag with its default."""


def user_error_message(exc: BaseException) -> Optional[str]:
    """The one-line-per-problem message for a user error; None for anything else (a bug)."""
    if isinstance(exc, (UserError, RunStopped)):
        return str(exc)
    if isinstance(exc, _FILE_ERRORS):
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}" if exc.filename else str(exc)
    return None


def _process_group_exists() -> bool:
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def run_cli(main: Callable[[Optional[list[str]]], Any], argv: Optional[list[str]] = None,
            after: Optional[Callable[[], None]] = None) -> NoReturn:
    """Run ``main(argv)``, then ``after()`` (e.g. ``shutdown_distributed``), and exit: with ``main``'s return
    value when it is an int, else 0; with 2 and one ``error:`` message on a user error (1 for a run that
    stopped itself, ``RunStopped``)."""
    try:
        rc = main(argv)
        if after is not None:
            after()
    except Exception as exc:  # anything that is not a user error is re-raised below
        message = user_error_message(exc)
        if message is None:
            raise
        group = _process_group_exists()
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or group:
            prefix = f"[rank {rank}] " if group and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"{prefix}error: {message}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        code = getattr(exc, "exit_code", 2)
        if group:
            # Interpreter teardown with live gloo/NCCL groups can abort (exit 134) or wait on peers that are gone.
            os._exit(code)
        sys.exit(code)
    sys.exit(rc if isinstance(rc, int) and not isinstance(rc, bool) else 0)


__all__ = ["HelpFormatter", "run_cli", "user_error_message"]


def given_flags(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> set[str]:
    """The destinations of the flags ``argv`` sets explicitly (a default left alone is not among them)."""
    for action in parser._actions:  # noqa: SLF001 - argparse keeps no public list
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> argparse.Namespace:
    """``parser``'s flags plus ``--config FILE``: a YAML file or a run's ``run_config.json`` supplies values, and
    flags on the command line override them. Keys are flag names (``lr``, ``rollout-batch-size``), at the top or
    in sections (``RLConfig: {...}``, as a saved run_config.json has them); an unknown key, a file that does not
    parse, or one that is not a mapping is one error naming the file."""
    parser.add_argument("--config", metavar="FILE", help="YAML file or a saved run_config.json with flag values "
                                                         "(command-line flags override them)")
    known, _ = parser.parse_known_args(argv)
    values = config_file_values(known.config, {a.dest for a in parser._actions}) if known.config else {}  # noqa: SLF001
    parser.set_defaults(**values)
    ns = parser.parse_args(argv)
    ns.config_flags = set(values)  # given by the file (given_flags: by the command line)
    return ns


def config_file_values(path: str, dests: set[str]) -> dict[str, Any]:
    """The flag values of a config file (see ``parse_with_config``), by argparse destination."""
    from megatron_rspo.errors import ConfigError

    try:
        with open(path) as fh:
            text = fh.read()
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (OSError, ValueError) as e:  # unreadable, or JSON that does not parse
        raise ConfigError(f"--config {path}: {type(e).__name__}: {e}") from e
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError (not imported unless needed)
        raise ConfigError(f"--config {path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        section = isinstance(value, dict) and key[:1].isupper()  # RLConfig: {...} as in run_config.json
        for k, v in (value.items() if section else [(key, value)]):
            flat[k.replace("-", "_").lstrip("_")] = v
    unknown = sorted(k for k in flat if k not in dests)
    if unknown:
        raise ConfigError(f"--config {path}: unknown flags {', '.join('--' + k.replace('_', '-') for k in unknown)}")
    return flat

"""Error classes for mistakes of the user (flags, files, data), as opposed to bugs.

The entry points (``megatron_rspo.cli.run_cli``) turn a ``UserError`` into one ``error: ...`` line on
stderr and exit code 2; anything else keeps its traceback. This module imports nothing, so the config
layer and the data loaders can use it without pulling in torch or Megatron.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (a flag, a path, a file's contents); reported without a traceback."""


class ConfigError(UserError, ValueError):
    """An invalid or incompatible setting; raised before any work starts."""


class TokenizerError(UserError, ValueError):
    """A tokenizer path that is missing or is not a tokenizer we can load."""


class RunStopped(Exception):
    """The run stopped itself for a reason its message gives (e.g. repeated non-finite steps): reported
    without a traceback, exit code 1 (not a usage error)."""

    exit_code = 1


__all__ = ["UserError", "ConfigError", "TokenizerError", "RunStopped"]

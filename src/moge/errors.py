"""The errors a user can cause, as one family, so the CLI can tell them from bugs.

`moge` prints a one-line message for a `MogeError` (a wrong value, a bad file, a rank that died)
and the whole traceback for anything else: an unexpected exception is a bug to report. Each class
also derives from the builtin a caller would expect (`ValueError`, `FileNotFoundError`,
`RuntimeError`), so `except ValueError` keeps working.
"""

from __future__ import annotations

from typing import Any


class MogeError(Exception):
    """Base of every error caused by input: a config value, a file, a command-line flag."""


class ConfigError(MogeError, ValueError):
    """A value that is out of range or inconsistent; the message names the field, the value and what
    would be valid."""


class CheckpointError(MogeError, ValueError):
    """A checkpoint that does not match the model or is damaged (missing, unexpected or truncated
    tensors, wrong shapes)."""


class MissingFileError(MogeError, FileNotFoundError):
    """A file or directory the user named (or that a named directory must contain) does not exist."""


class DistributedError(MogeError, RuntimeError):
    """A collective failed because another rank died or did not answer in time."""


def bad_value(field_name: str, value: Any, valid: str) -> ConfigError:
    """`field=value is invalid: what would be valid` as a ConfigError (raise it)."""
    return ConfigError(f"{field_name}={value!r} is invalid: {valid}")

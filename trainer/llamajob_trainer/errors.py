"""User errors of the trainer: mistakes in the job that a restart cannot fix.

Each carries the protocol exit code the CLI returns and a one-line message that names the field or
file at fault and the fix. Anything else that escapes is a bug or a transient fault (retryable).
Pure Python, no torch.
"""

from __future__ import annotations

from . import protocol


class TrainerUserError(Exception):
    """A permanent error with a clear message; the CLI prints it without a traceback."""

    exit_code: int = protocol.EXIT_CONFIG
    reason: str = "InvalidConfig"


class ConfigError(TrainerUserError):
    """The config (or something it points at, like a tokenizer) is invalid."""

    exit_code = protocol.EXIT_CONFIG
    reason = "InvalidConfig"


class DataError(TrainerUserError):
    """The dataset (or a checkpoint's bytes) is missing, unreadable or too small."""

    exit_code = protocol.EXIT_DATA
    reason = "DataError"


class CheckpointError(ConfigError):
    """A requested checkpoint is missing or incompatible with the job."""

    reason = "CheckpointError"


class CheckpointCorruptError(DataError):
    """A complete checkpoint cannot be read back (truncated or damaged files)."""

    reason = "CheckpointCorrupt"


class DependencyError(TrainerUserError):
    """A package the chosen backend needs is not installed."""

    exit_code = protocol.EXIT_DEPENDENCY
    reason = "MissingDependency"

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


class TrainingDiverged(Exception):
    """A step produced a non-finite loss or gradient norm; raised before anything is saved.

    Not a TrainerUserError: whether a restart from the newest checkpoint may help is the job's
    policy (restartPolicy.onDivergence), so the supervisor decides."""

    exit_code = protocol.EXIT_DIVERGED
    reason = protocol.REASON_DIVERGED

    def __init__(self, step: int, loss: float, grad_norm: float, checkpoint: int | None) -> None:
        self.step = step
        self.loss = protocol.non_finite_name(loss) or repr(loss)
        kept = f"step_{checkpoint}" if checkpoint is not None else "no checkpoint yet"
        super().__init__(
            f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; "
            f"stopped before saving anything from it (newest checkpoint: {kept}). Lower "
            "optimizer.lr, raise warmupSteps or set gradClip; restartPolicy.onDivergence: "
            "Rollback retries from the newest checkpoint"
        )

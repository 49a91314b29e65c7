"""The status vocabulary (phases, conditions and their reasons) and the helpers that write it:
Kubernetes-style times and conditions, and messages clipped to a readable length."""

from __future__ import annotations

from datetime import UTC, datetime

from .api import Condition, LlamaTrainingJobStatus

PENDING, COMPILING, TRAINING, RESTARTING = "Pending", "Compiling", "Training", "Restarting"
SUSPENDED = "Suspended"  # also the condition type, as a Kubernetes Job's
SUCCEEDED, FAILED = "Succeeded", "Failed"
TERMINAL = (SUCCEEDED, FAILED)

VALIDATED, COMPILED, RUNNING = "Validated", "Compiled", "Running"
CONDITION_TYPES = (VALIDATED, COMPILED, RUNNING, SUSPENDED, SUCCEEDED, FAILED)

# Condition / failure reasons
INVALID_SPEC = "InvalidSpec"
TRAINER_ERROR = "TrainerError"  # also the fault reason of the pod that reported it
TRAINING_DIVERGED = "TrainingDiverged"  # also a fault reason
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
COMPILE_SKIPPED, COMPILE_FINISHED, COMPILE_DISABLED = (
    "CompileSkipped",
    "CompileFinished",
    "CompileDisabled",
)
SPEC_CHANGED = "SpecChanged"
RESUMED = "Resumed"
PODS_UNSCHEDULABLE = "PodsUnschedulable"
PODS_NOT_STARTING = "PodsNotStarting"

MESSAGE_LIMIT = 512  # termination messages can be long; status and Events stay readable


# --- time -------------------------------------------------------------------------------------
def aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def timestamp(dt: datetime) -> str:
    """RFC 3339 in UTC with a Z, as Kubernetes writes times (fraction only when present)."""
    return aware(dt).astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return aware(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return None


# --- conditions -------------------------------------------------------------------------------
def get_condition(status: LlamaTrainingJobStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def set_condition(
    status: LlamaTrainingJobStatus,
    type_: str,
    value: str,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> None:
    """Upsert a condition; lastTransitionTime moves only when the status value flips."""
    old = get_condition(status, type_)
    since = (
        old.last_transition_time
        if old is not None and old.status == value and old.last_transition_time
        else timestamp(now)
    )
    new = Condition(
        type=type_,
        status=value,  # type: ignore[arg-type]
        reason=reason,
        message=clip(message),
        last_transition_time=since,
        observed_generation=generation,
    )
    status.conditions = [new if c.type == type_ else c for c in status.conditions]
    if old is None:
        status.conditions.append(new)


def is_true(status: LlamaTrainingJobStatus, type_: str) -> bool:
    c = get_condition(status, type_)
    return c is not None and c.status == "True"


def clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."

"""Kubernetes Events, derived from the old and the new status and nothing else, so a replayed
watch or a second identical reconcile emits none."""

from __future__ import annotations

from .actions import EmitEvent
from .api import Condition, LlamaTrainingJob, LlamaTrainingJobStatus
from .faults import INVALID_IMAGE, is_node_fault
from .status import (
    COMPILE_FINISHED,
    COMPILE_SKIPPED,
    COMPILED,
    COMPILING,
    FAILED,
    PODS_NOT_STARTING,
    PODS_UNSCHEDULABLE,
    RESTARTING,
    RESUMED,
    RUNNING,
    SPEC_CHANGED,
    SUCCEEDED,
    SUSPENDED,
    TRAINER_ERROR,
    TRAINING,
    TRAINING_DIVERGED,
    VALIDATED,
    clip,
    get_condition,
)


def events(
    job: LlamaTrainingJob, old: LlamaTrainingJobStatus, new: LlamaTrainingJobStatus
) -> list[EmitEvent]:
    """Events for what changed between two statuses, and nothing else."""
    out: list[EmitEvent] = []

    def flipped(type_: str, value: str) -> Condition | None:
        n, o = get_condition(new, type_), get_condition(old, type_)
        if n is not None and n.status == value and (o is None or o.status != value):
            return n
        return None

    if c := flipped(VALIDATED, "True"):
        out.append(EmitEvent("Normal", "Validated", c.message))
    running, was = get_condition(new, RUNNING), get_condition(old, RUNNING)
    if running is not None and (was is None or was.reason != running.reason):
        if running.reason == SPEC_CHANGED:
            out.append(EmitEvent("Normal", SPEC_CHANGED, running.message))
        elif running.reason == PODS_UNSCHEDULABLE:
            out.append(EmitEvent("Warning", "Unschedulable", running.message))
        elif running.reason == PODS_NOT_STARTING:
            out.append(EmitEvent("Warning", PODS_NOT_STARTING, running.message))
    if c := flipped(SUSPENDED, "True"):
        out.append(EmitEvent("Normal", SUSPENDED, c.message))
    if (c := flipped(SUSPENDED, "False")) and c.reason == RESUMED:
        out.append(EmitEvent("Normal", RESUMED, c.message))
    seen = {(f.attempt, f.pod, f.reason, f.time) for f in old.faults}
    for f in new.faults:
        if (f.attempt, f.pod, f.reason, f.time) in seen:
            continue
        if f.reason in (TRAINER_ERROR, INVALID_IMAGE) or (new.phase == FAILED and (
            f.reason == TRAINING_DIVERGED
        )):
            continue  # the job failed on it, and the Failed event says so
        reason = "NodeFault" if is_node_fault(f.reason) else f.reason
        where = f" on node {f.node}" if f.node else ""
        text = f"attempt {f.attempt}: pod {f.pod}{where}: {f.reason}: {f.message}"
        if new.phase == RESTARTING and new.restart_after:
            text += f"; restarting the gang at {new.restart_after}"
        out.append(EmitEvent("Warning", reason, clip(text)))
    c = flipped(COMPILED, "True")
    if c is not None and c.reason in (COMPILE_SKIPPED, COMPILE_FINISHED):
        out.append(EmitEvent("Normal", c.reason, c.message))
    if new.phase in (COMPILING, TRAINING) and (
        old.phase != new.phase or old.attempt != new.attempt
    ):
        role = "compile" if new.phase == COMPILING else "training"
        gang = f"{new.pods} {role} pod(s)"
        if new.restarts > old.restarts:
            avoid = (
                f", avoiding node(s) {', '.join(new.faulty_nodes)}"
                if new.faulty_nodes and job.spec.restart_policy.avoid_faulty_nodes
                else ""
            )
            text = (
                f"attempt {new.attempt}: restart {new.restarts} of at most "
                f"{job.spec.restart_policy.max_restarts}, recreating {gang}{avoid}"
            )
            out.append(EmitEvent("Normal", "Restarting", text))
        elif new.phase == COMPILING:
            out.append(EmitEvent("Normal", "CompileStarted", f"attempt {new.attempt}: {gang}"))
        else:
            out.append(EmitEvent("Normal", "TrainingStarted", f"attempt {new.attempt}: {gang}"))
    if (new.checkpoints_quarantined or 0) > (old.checkpoints_quarantined or 0):
        out.append(EmitEvent(
            "Warning", "CheckpointQuarantined",
            f"attempt {new.attempt}: the trainer found damaged or incomplete checkpoints and "
            f"moved them to {job.spec.checkpoint.dir}/quarantine/ instead of loading them "
            f"({new.checkpoints_quarantined} there now; each holds a QUARANTINED.txt saying why; "
            "nothing was deleted)",
        ))
    if new.last_checkpoint_step is not None and (
        old.last_checkpoint_step is None or new.last_checkpoint_step > old.last_checkpoint_step
    ):
        out.append(
            EmitEvent("Normal", "CheckpointSaved", f"checkpoint at step {new.last_checkpoint_step}")
        )
    if new.phase == SUCCEEDED and old.phase != SUCCEEDED:
        out.append(EmitEvent("Normal", "Succeeded", new.message or "job finished"))
    if new.phase == FAILED and old.phase != FAILED:
        c = get_condition(new, FAILED)
        reason = c.reason if c else "Failed"
        out.append(EmitEvent("Warning", "Failed", clip(f"{reason}: {new.message or ''}")))
    return out

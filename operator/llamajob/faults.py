"""Why a pod ends its gang's attempt: the fault reasons, which of them blame the node, and the
verdict on one observed pod."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llamajob_trainer import protocol

from .observed import NodeHealth, ObservedPod
from .render import NODE_GONE
from .status import TRAINER_ERROR, TRAINING_DIVERGED

# Fault reasons (status.faults[].reason)
NODE_UNHEALTHY = "NodeUnhealthy"
NODE_LOST = "NodeLost"
EVICTED = "Evicted"
POD_FAILED = "PodFailed"
OOM_KILLED = "OOMKilled"
POD_DELETED = "PodDeleted"
HANG = "Hang"
INVALID_IMAGE = "InvalidImage"

# Container waiting reasons no retry by the kubelet can end: the image reference itself is
# wrong (or may not be pulled at all). Others (ImagePullBackOff, CreateContainerConfigError for a
# missing Secret, ...) can clear up once the user pushes the image or creates the Secret, so the
# job waits for them and says why.
IMAGE_NEVER_STARTS = frozenset({"InvalidImageName", "ErrImageNeverPull"})

# Pod-level reasons (pod.status.reason or the DisruptionTarget reason) that mean the node, not
# the job, ended the pod. Reasons starting with "OutOf" (device plugin lost the devices at
# admission) count too.
NODE_POD_REASONS = frozenset(
    {
        EVICTED,
        NODE_LOST,
        NODE_GONE,
        "NodeNotReady",
        "NodeShutdown",
        "Shutdown",
        "Terminated",
        "TerminationByKubelet",
        "UnexpectedAdmissionError",
    }
)


def is_node_fault(reason: str | None) -> bool:
    if not reason:
        return False
    return reason in NODE_POD_REASONS or reason == NODE_UNHEALTHY or reason.startswith("OutOf")


@dataclass(frozen=True)
class Finding:
    """One pod's fault; ``permanent`` (a bug in the job) fails the job instead of restarting."""

    rank: int
    pod: str
    node: str | None
    reason: str
    message: str
    permanent: bool = False

    @property
    def node_level(self) -> bool:
        return is_node_fault(self.reason)


def pod_finding(pod: ObservedPod, nodes: Mapping[str, NodeHealth]) -> Finding | None:
    """Why this pod ends its attempt, or None while it is healthy (or finished)."""
    if pod.phase == "Succeeded":
        return None  # its part is done; whatever happens to its node now changes nothing

    def finding(reason: str, message: str, permanent: bool = False) -> Finding:
        return Finding(pod.rank, pod.name, pod.node, reason, message, permanent)

    health = nodes.get(pod.node) if pod.node else None
    if health is not None and not health.healthy:
        reason = NODE_GONE if health.reason == NODE_GONE else NODE_UNHEALTHY
        detail = "is gone" if reason == NODE_GONE else f"is unhealthy ({health.reason or '?'})"
        return finding(reason, f"node {pod.node} {detail}")
    if pod.not_starting and pod.not_starting.split(":")[0] in IMAGE_NEVER_STARTS:
        return finding(
            INVALID_IMAGE,
            f"its container cannot start: {pod.not_starting}. Fix spec.cluster.image (or "
            "imagePullPolicy Never on nodes without the image)",
            permanent=True,
        )
    if pod.phase == "Unknown":
        return finding(NODE_LOST, f"pod state unknown: node {pod.node or '?'} stopped reporting")
    if is_node_fault(pod.reason):
        return finding(pod.reason, f"pod removed by its node ({pod.reason})")
    if pod.phase == "Failed":
        tm = pod.termination_message
        if tm.get("reason") == protocol.REASON_DIVERGED or pod.exit_code == protocol.EXIT_DIVERGED:
            # Whether this ends the job is restartPolicy.onDivergence's call (reconcile).
            return finding(TRAINING_DIVERGED, str(tm.get("message") or "training diverged"))
        permanent = pod.exit_code in protocol.PERMANENT_EXIT_CODES or tm.get("permanent") is True
        parts = [f"exit code {pod.exit_code}" if pod.exit_code is not None else "failed"]
        cause = tm.get("reason") or pod.reason
        if cause:
            parts.append(str(cause))
        text = ", ".join(parts)
        if tm.get("message"):
            text += f": {tm['message']}"
        if permanent:
            return finding(TRAINER_ERROR, text, permanent=True)
        return finding(OOM_KILLED if pod.reason == OOM_KILLED else POD_FAILED, text)
    if pod.deleting:
        return finding(POD_DELETED, "deleted while the gang was running")
    return None

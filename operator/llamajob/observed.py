"""What the shells observe and hand to the core: the job's pods, their nodes' health, rank 0's
progress, and which of the job's other children exist. Plain frozen data, filled in by
``render.observed_pod``/``render.node_health`` (Kubernetes) or by the local runner."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class ObservedPod:
    name: str
    role: str  # "compile" | "train"
    attempt: int
    rank: int
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    node: str | None = None
    exit_code: int | None = None  # the trainer container's terminated exit code
    reason: str | None = None  # pod.status.reason / disruption reason / container reason
    termination_message: Mapping[str, Any] = field(default_factory=dict)
    deleting: bool = False  # metadata.deletionTimestamp is set
    ip: str | None = None
    unschedulable: str | None = None  # the scheduler's reason while no node fits the pod
    # "Reason: message" while the kubelet cannot start the trainer container (image pull,
    # a missing Secret or key, ...); None while it starts normally, runs or has ended.
    not_starting: str | None = None


@dataclass(frozen=True)
class NodeHealth:
    """A node the job's pods run on. Unhealthy: HyperPod health label not Schedulable, Ready not
    True, or gone (reason ``NodeGone``). A node absent from ``Observed.nodes`` is unknown and
    judged healthy: a brand-new node can run a pod before the shell has seen the node itself."""

    name: str
    healthy: bool
    reason: str = ""


@dataclass(frozen=True)
class Progress:
    """Rank 0's training metrics as last read by the shell. ``max_steps`` is informational:
    status.maxSteps comes from the spec, which the trainer reads too."""

    step: int | None
    loss: float | None
    tokens_per_second: float | None
    mfu: float | None
    last_checkpoint_step: int | None
    max_steps: int | None
    observed_at: datetime
    validation_loss: float | None = None
    process_restarts: int | None = None
    checkpoints_quarantined: int | None = None


@dataclass(frozen=True)
class Observed:
    pods: tuple[ObservedPod, ...] = ()
    nodes: Mapping[str, NodeHealth] = field(default_factory=dict)
    progress: Progress | None = None  # from the training gang's rank 0
    service: bool = False  # the headless Service exists
    configmaps: frozenset[str] = frozenset()  # names of the job's trainer ConfigMaps

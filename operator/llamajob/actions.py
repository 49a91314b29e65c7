"""What the core asks the shells to do (create, delete, emit an event, call again later), and
the decision that bundles those actions with the new status."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .api import LlamaTrainingJobStatus
from .observed import Observed, ObservedPod


@dataclass(frozen=True)
class CreateObject:
    """Create a Service, ConfigMap or Pod. For pods, role/attempt/rank repeat the labels so the
    local runner need not parse the manifest."""

    manifest: dict[str, Any]
    role: str | None = None
    attempt: int | None = None
    rank: int | None = None

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.manifest.get("metadata", {}).get("name", ""))


@dataclass(frozen=True)
class DeletePods:
    names: tuple[str, ...]
    reason: str
    # Overrides the pods' terminationGracePeriodSeconds; None keeps it.
    grace_seconds: int | None = None


@dataclass(frozen=True)
class EmitEvent:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class RequeueAfter:
    """Reconcile again after this long even if nothing changes (backoff expiry, hang timer)."""

    seconds: float


Action = CreateObject | DeletePods | EmitEvent | RequeueAfter


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    status: LlamaTrainingJobStatus

    @property
    def creates(self) -> list[CreateObject]:
        return [a for a in self.actions if isinstance(a, CreateObject)]

    @property
    def created_pods(self) -> list[CreateObject]:
        return [a for a in self.creates if a.kind == "Pod"]

    @property
    def deleted(self) -> list[str]:
        return [n for a in self.actions if isinstance(a, DeletePods) for n in a.names]

    @property
    def events(self) -> list[EmitEvent]:
        return [a for a in self.actions if isinstance(a, EmitEvent)]

    @property
    def requeue_after(self) -> float | None:
        times = [a.seconds for a in self.actions if isinstance(a, RequeueAfter)]
        return min(times) if times else None


def apply_actions(observed: Observed, decision: Decision) -> Observed:
    """The observation once a shell has carried out ``decision``: created pods appear Pending,
    deleted pods are marked deleting, Service and ConfigMap exist. Shells can use it to count
    their own fresh writes as seen (no AlreadyExists storm while the watch catches up), and tests
    use it to check the fixed point."""
    pods = {p.name: p for p in observed.pods}
    service, configmaps = observed.service, observed.configmaps
    for a in decision.actions:
        if isinstance(a, CreateObject):
            if a.kind == "Service":
                service = True
            elif a.kind == "ConfigMap" and a.name not in configmaps:
                configmaps = configmaps | {a.name}
            elif a.kind == "Pod" and a.name not in pods:
                assert a.role is not None and a.attempt is not None and a.rank is not None
                pods[a.name] = ObservedPod(a.name, a.role, a.attempt, a.rank, "Pending")
        elif isinstance(a, DeletePods):
            for name in a.names:
                if name in pods:
                    pods[name] = replace(pods[name], deleting=True)
    return replace(
        observed, pods=tuple(pods.values()), service=service, configmaps=configmaps
    )

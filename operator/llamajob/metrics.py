"""The operator's own Prometheus metrics (listed in docs/monitoring.md), on their own registry.

``REGISTRY`` is what ``llamajob operator --metrics-port`` serves and what the chart's dashboard
and alert rules are checked against, so the names here are part of the product's interface.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .api import PHASES

REGISTRY = CollectorRegistry(auto_describe=True)

JOBS = Gauge(
    "llamajob_jobs",
    "LlamaTrainingJobs known to the operator, by phase.",
    ["phase", "namespace"],
    registry=REGISTRY,
)
JOB_INFO = Gauge(
    "llamajob_job_info",
    "1 for every LlamaTrainingJob the operator works, with its current phase; from its first "
    "decision (a job that never trained included) until it is deleted. The dashboard's "
    "Namespace and Job lists come from it.",
    ["namespace", "job", "phase"],
    registry=REGISTRY,
)
JOB_RESTARTS = Counter(
    "llamajob_job_restarts_total",
    "Gang restarts the operator started, per job.",
    ["job", "namespace"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "llamajob_reconcile_duration_seconds",
    "Time of one reconcile: decide, then apply the actions and write status.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
FAULT_DETECTION = Histogram(
    "llamajob_fault_detection_seconds",
    "From a pod's failure as Kubernetes reports it (container finishedAt or condition time) "
    "to the operator acting on it. Kubernetes timestamps have whole-second precision.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
RESTART_LATENCY = Histogram(
    "llamajob_restart_latency_seconds",
    "From the operator seeing a fault to every replacement pod created (includes backoff).",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200),
    registry=REGISTRY,
)
PODS_CREATED = Counter(
    "llamajob_pods_created_total",
    "Pods the operator created (compile and training).",
    registry=REGISTRY,
)
STATUS_CONFLICTS = Counter(
    "llamajob_status_conflicts_total",
    "Status writes answered 409 Conflict because the job changed after the version the "
    "decision read; each is decided again from the newer object.",
    registry=REGISTRY,
)
API_ERRORS = Counter(
    "llamajob_api_errors_total",
    "Kubernetes API calls that failed unexpectedly (AlreadyExists on create and NotFound on "
    "delete are expected and not counted).",
    registry=REGISTRY,
)

METRIC_NAMES: tuple[str, ...] = (
    "llamajob_jobs",
    "llamajob_job_info",
    "llamajob_job_restarts_total",
    "llamajob_reconcile_duration_seconds",
    "llamajob_fault_detection_seconds",
    "llamajob_restart_latency_seconds",
    "llamajob_pods_created_total",
    "llamajob_api_errors_total",
    "llamajob_status_conflicts_total",
)


def set_job_phases(phases: Iterable[tuple[str, str]]) -> None:
    """Publish how many jobs are in each phase, from (namespace, phase) pairs of all known jobs.

    Every phase of every namespace seen so far is written, zeros included, so a job leaving a
    phase brings that series down rather than leaving a stale count behind.
    """
    counts: dict[tuple[str, str], int] = {}
    for namespace, phase in phases:
        counts[(namespace, phase)] = counts.get((namespace, phase), 0) + 1
    namespaces = {ns for ns, _ in counts} | _seen_namespaces
    _seen_namespaces.update(namespaces)
    for namespace in namespaces:
        for phase in PHASES:
            JOBS.labels(phase=phase, namespace=namespace).set(counts.get((namespace, phase), 0))


_seen_namespaces: set[str] = set()


def set_job_info(namespace: str, job: str, phase: str, old_phase: str | None = None) -> None:
    """``llamajob_job_info{namespace, job, phase} 1`` for the job's phase, and the series of
    its previous phase removed, so each job has exactly one."""
    if old_phase is not None and old_phase != phase:
        forget_job_info(namespace, job, old_phase)
    JOB_INFO.labels(namespace=namespace, job=job, phase=phase).set(1)


def forget_job_info(namespace: str, job: str, phase: str | None) -> None:
    if phase is not None:
        with contextlib.suppress(KeyError):
            JOB_INFO.remove(namespace, job, phase)
